"""agentctl(1), generated from the click command tree so the man page cannot drift from the
CLI: `python -m supervisor.cli.manpage > docs/agentctl.1` (a unit test checks the checked-in
page matches). No I/O beyond stdout, no privilege."""

from __future__ import annotations

import click

_EXIT_STATUSES = [
    ("0", "success"), ("1", "failure (a verification that did not hold, an internal error)"),
    ("2", "usage error"), ("3", "not found (agent, run, approval, an empty scope)"),
    ("4", "conflict (illegal transition, agent killed, global halt)"), ("5", "forbidden"),
    ("6", "invalid input (including a missing --reason)"), ("7", "daemon unavailable"),
    ("10", "enforcement failed"), ("11", "kill not confirmed by the kernel"),
    ("12", "drill failed"), ("13", "disk space low"),
    ("75", "run (foreground) or logs -f: the stream ended because the daemon stopped, or "
     "restarted and was not back within 120 s (through a restart they follow on by "
     "themselves)"),
    ("78", "configuration invalid"),
    ("80-84", "an embedded run (run --embedded) was killed (80), tripped a tripwire (81), "
     "timed out (82), changed files out of scope (83), or could not be supervised to the end "
     "(84)"),
    ("125", "run: the supervisor could not start the run (sandbox, runtime, engine or gateway)"),
    ("126", "run: the command cannot be executed"), ("127", "run: the command was not found"),
]


def _escape(text: str) -> str:
    lines = text.replace("\\", "\\e").split("\n")
    # A line starting with . or ' would be read as a roff request.
    return "\n".join("\\&" + line if line[:1] in (".", "'") else line for line in lines)


def _commands(group: click.Group, prefix: str
              ) -> list[tuple[str, click.Command, click.Context]]:
    found = []
    ctx = click.Context(group, info_name=prefix)
    for name in group.list_commands(ctx):  # lazily loaded commands included
        command = group.get_command(ctx, name)
        if command is None or command.hidden:
            continue
        path = f"{prefix} {name}"
        found.append((path, command, click.Context(command, info_name=path, parent=ctx)))
        if isinstance(command, click.Group):
            found.extend(_commands(command, path))
    return found


def _options(command: click.Command, ctx: click.Context) -> list[str]:
    out = []
    for param in command.get_params(ctx):
        if not isinstance(param, click.Option) or "--help" in param.opts:
            continue
        record = param.get_help_record(ctx)
        if record is None:
            continue
        names, help_text = record
        out += [".TP", f"\\fB{_escape(names)}\\fR", _escape(help_text) or "\\&"]
    return out


def render(group: click.Group, prog: str = "agentctl") -> str:
    root = click.Context(group, info_name=prog, **group.context_settings)
    lines = [
        f'.TH {prog.upper()} 1 "" "agent-supervisor" "User Commands"',
        ".SH NAME", f"{prog} \\- {_escape(group.get_short_help_str(200))}",
        ".SH SYNOPSIS", f"\\fB{prog}\\fR [\\fIOPTIONS\\fR] \\fICOMMAND\\fR [\\fIARGS\\fR]...",
        ".SH DESCRIPTION", _escape(group.help or ""),
        ".SH OPTIONS", *_options(group, root),
        ".TP", "\\fB-h, --help\\fR", "Show the help of agentctl or of any command.",
        ".SH COMMANDS",
    ]
    for path, command, ctx in _commands(group, prog):
        usage = " ".join(command.collect_usage_pieces(ctx))
        lines += [".SS " + _escape(path.removeprefix(prog + " ")),
                  f"\\fB{_escape(path)}\\fR {_escape(usage)}", ".PP",
                  _escape(command.help or command.short_help or ""), *_options(command, ctx)]
    lines += [".SH EXIT STATUS"]
    for status, meaning in _EXIT_STATUSES:
        lines += [".TP", f"\\fB{status}\\fR", meaning]
    lines += [
        ".SH ENVIRONMENT", ".TP", "\\fBAGENT_SUPERVISOR_SOCKET\\fR",
        "The daemon's control socket (default /run/agent-supervisor/control.sock).",
        ".SH SEE ALSO", "agent-supervisord(8); docs/runbook.md in the source distribution.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    from supervisor.cli.main import cli

    assert isinstance(cli, click.Group)
    print(render(cli), end="")


if __name__ == "__main__":
    main()
