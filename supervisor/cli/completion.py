"""Shell completion for agentctl (bash, zsh, fish): `agentctl completion SHELL` prints the
script (click's own protocol: the shell calls agentctl back with _AGENTCTL_COMPLETE set), and
agent and class arguments complete from the daemon's registry. Runs as the operator; a daemon
that cannot be reached simply completes nothing."""

from __future__ import annotations

from pathlib import Path

import click
from click.shell_completion import CompletionItem, get_completion_class

SHELLS = ("bash", "zsh", "fish")
PROG = "agentctl"
COMPLETE_VAR = "_AGENTCTL_COMPLETE"
# Completion runs on every Tab: a hung daemon must not hang the shell.
_TIMEOUT = 2.0


def _registry(ctx: click.Context) -> list[tuple[str, str]]:
    """(name, class) of every agent, or nothing when the daemon cannot be asked."""
    from supervisor.api.client import DEFAULT_SOCKET, Client
    from supervisor.errors import SupervisorError

    socket_path = ctx.find_root().params.get("socket_path") or DEFAULT_SOCKET
    try:
        data = Client(Path(socket_path), timeout=_TIMEOUT).agents()
    except (SupervisorError, OSError, ValueError):
        return []
    return [(agent["name"], agent["class"]) for agent in data.get("agents", [])]


def complete_agent(ctx: click.Context, param: click.Parameter, incomplete: str
                   ) -> list[CompletionItem]:
    return [CompletionItem(name, help=f"class {agent_class}")
            for name, agent_class in _registry(ctx) if name.startswith(incomplete)]


def complete_class(ctx: click.Context, param: click.Parameter, incomplete: str
                   ) -> list[CompletionItem]:
    classes = sorted({agent_class for _name, agent_class in _registry(ctx)})
    return [CompletionItem(c) for c in classes if c.startswith(incomplete)]


def script(shell: str, group: click.Command) -> str:
    """The completion script for `shell`, as the install step writes it."""
    cls = get_completion_class(shell)
    if cls is None:  # click knows bash, zsh and fish; SHELLS limits the choice to them
        raise click.BadParameter(f"no completion for {shell}")
    return cls(group, {}, PROG, COMPLETE_VAR).source()


@click.command("completion")
@click.argument("shell", type=click.Choice(SHELLS))
@click.pass_context
def completion(ctx: click.Context, shell: str) -> None:
    """Print the shell completion script for SHELL (bash, zsh or fish); agent names complete
    from the daemon. Installed by scripts/install-deps.sh; by hand:

      agentctl completion bash > /etc/bash_completion.d/agentctl
      agentctl completion zsh > /usr/local/share/zsh/site-functions/_agentctl
      agentctl completion fish > ~/.config/fish/completions/agentctl.fish"""
    click.echo(script(shell, ctx.find_root().command), nl=False)
