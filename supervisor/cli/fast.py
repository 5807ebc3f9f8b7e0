"""agentctl's entry point. The incident verbs (cli/verbs.py: kill, pause, resume, stop,
reactivate, ls, status) and --version run here without importing click, pydantic or the other
commands, so `agentctl kill` under stress costs little more than the interpreter's start and
one request. Only argv that click would accept exactly as read here takes this path; anything
else (--help, an unknown or repeated option, a value that looks like an option, `--`, other
commands, shell completion) goes to the click CLI unchanged, which prints its usage errors and
did-you-mean itself. Both paths run the same bodies and print through cli/output.py
(tests/unit/test_cli_fast.py runs a corpus of argv through both). No privilege."""

from __future__ import annotations

import os
import sys

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (agentctl's fast path)
if TYPE_CHECKING:
    import signal as _signal  # typed; the same functions and numbers as its C module's
    from collections.abc import Mapping, Sequence
    from typing import Any
else:
    # signal's C module: `signal` itself builds enums as it loads (enum, functools...)
    import _signal

DEFAULT_SOCKET = "/run/agent-supervisor/control.sock"  # cli/main.py's --socket default
SOCKET_ENV = "AGENT_SUPERVISOR_SOCKET"
_COMPLETE_ENV = "_AGENTCTL_COMPLETE"  # click's shell-completion instruction for agentctl


class Plan:
    """What the fast path will do: a verb with its socket and keyword arguments, --version
    (verb None), or an embedded run (verb "run", the runner's spec in `embedded`)."""

    __slots__ = ("embedded", "kwargs", "socket", "verb")

    def __init__(self, verb: str | None, socket: str = "",
                 kwargs: dict[str, str | bool | None] | None = None,
                 embedded: dict[str, Any] | None = None) -> None:
        self.verb = verb
        self.socket = socket
        self.kwargs = kwargs or {}
        self.embedded = embedded


def _plain(value: str, text: bool = False) -> bool:
    """A value both paths read alike: no NUL (refused by --socket's type), nothing that
    reads as an option (click may take it as one or as a value), encodable as it was given
    unless it is `text` (a --reason: both paths send its argv bytes that are not UTF-8 as
    U+FFFD, verbs.checked_reason, so a kill with such a reason stays on this path)."""
    if "\0" in value or value.startswith("-"):
        return False
    if text:
        return True
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # undecodable argv bytes: left to click's handling
        return False
    return True


def plan(argv: Sequence[str], environ: Mapping[str, str]) -> Plan | None:
    """The fast path's reading of argv, or None when it is not certain to be click's."""
    if environ.get(_COMPLETE_ENV) is not None:
        return None
    if list(argv) == ["--version"]:
        return Plan(None)
    socket: str | None = None
    index = 0
    while index < len(argv) and argv[index].startswith("-"):
        name, eq, value = argv[index].partition("=")
        if name != "--socket" or socket is not None:
            return None
        if not eq:
            if index + 1 >= len(argv):
                return None
            value = argv[index + 1]
            index += 1
        if not value or not _plain(value):
            return None
        socket = value
        index += 1
    if socket is None:
        from_env = environ.get(SOCKET_ENV)  # click ignores an empty one, as here
        if from_env and not _plain(from_env):
            return None
        socket = from_env or DEFAULT_SOCKET
    if index < len(argv) and argv[index] == "run":
        from supervisor.cli.embedded import plan_run

        run_spec = plan_run(argv[index + 1:], environ)
        return None if run_spec is None else Plan("run", socket, embedded=run_spec)
    from supervisor.cli.verbs import VERBS  # after --version and run, which need none of it

    if index >= len(argv) or argv[index] not in VERBS:
        return None
    verb = VERBS[argv[index]]
    by_spelling = {decl: option for option in verb.options for decl in option.decls}
    kwargs: dict[str, str | bool | None] = {
        option.dest: False if option.flag else option.default for option in verb.options}
    if verb.argument is not None:
        kwargs[verb.argument] = None
    seen: set[str] = set()
    rest = list(argv[index + 1:])
    while rest:
        token = rest.pop(0)
        if not _plain(token) and not token.startswith("-"):
            return None
        if not token.startswith("-"):
            if verb.argument is None or verb.argument in seen:
                return None  # click: "Got unexpected extra argument"
            seen.add(verb.argument)
            kwargs[verb.argument] = token
            continue
        name, eq, value = token.partition("=") if token.startswith("--") else (token, "", "")
        option = by_spelling.get(name)
        if option is None or option.dest in seen:
            return None
        seen.add(option.dest)
        if option.flag:
            if eq:
                return None
            kwargs[option.dest] = True
            continue
        if not eq:
            if not rest:
                return None
            value = rest.pop(0)
        if value and not _plain(value, text=option.dest == "reason"):
            return None
        kwargs[option.dest] = value
    return Plan(verb.name, socket, kwargs)


def run(todo: Plan) -> None:
    """Carry out a plan as click's standalone main would: exit 0 after the body, a failure's
    own status, "Aborted!" and 1 on Ctrl-C."""
    if todo.embedded is not None:
        from supervisor.cli.embedded import exec_runner

        exec_runner(todo.embedded, take_early_signals())
    from supervisor.cli.output import echo, fail, fail_local

    try:  # a Ctrl-C from here on (or one that came while agentctl started) is "Aborted!"
        _interrupt_now()
        if todo.verb is None:
            from supervisor import __version__

            echo(f"agentctl, version {__version__}")
            sys.exit(0)
        from pathlib import Path

        from supervisor.api.client import Client
        from supervisor.cli import verbs
        from supervisor.errors import SupervisorError

        as_json = bool(todo.kwargs.get("as_json"))
        client = Client(Path(todo.socket))
        try:
            if todo.verb in verbs.SCOPED:
                verbs.scoped(client, todo.verb, **todo.kwargs)  # type: ignore[arg-type]
            else:
                verbs.BODIES[todo.verb](client, **todo.kwargs)
        except SupervisorError as exc:
            fail(exc, as_json)
        except (OSError, ValueError) as exc:
            fail_local(exc, as_json)
    except KeyboardInterrupt:
        echo("", err=True)
        echo("Aborted!", err=True)
        sys.exit(1)
    except BrokenPipeError:
        # click's answer to EPIPE: exit 1, and no "Exception ignored" when the interpreter
        # flushes the dead pipe at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        sys.exit(1)
    sys.exit(0)


_early_signals: list[int] = []


def _remember(signum: int, _frame: object) -> None:
    _early_signals.append(signum)


def take_early_signals() -> list[int]:
    """The Ctrl-Cs that came while agentctl started; from here on a Ctrl-C is Python's
    KeyboardInterrupt again (each path turns it into "Aborted!", or the runner's cancel)."""
    _signal.signal(_signal.SIGINT, _signal.default_int_handler)
    taken = list(_early_signals)
    _early_signals.clear()
    return taken


def _interrupt_now() -> None:
    """A Ctrl-C that came while agentctl started, raised where its path catches it."""
    if take_early_signals():
        raise KeyboardInterrupt


def main() -> None:
    """The console script: the fast path when it applies, else the click CLI. Until agentctl
    knows which, a Ctrl-C is only remembered: it used to end in a KeyboardInterrupt traceback
    from whichever import it hit; an embedded run hands it to the runner (which cancels the
    run through the audited path), every other path ends "Aborted!" as click does."""
    _signal.signal(_signal.SIGINT, _remember)
    # agentctl's launcher (cli/launcher.py) blocks SIGINT from its exec: one that came while
    # the interpreter started is delivered now, to _remember (a no-op under pip's script).
    _signal.pthread_sigmask(_signal.SIG_UNBLOCK, (_signal.SIGINT,))
    from supervisor.cli.output import stream_is_ascii

    todo = plan(sys.argv[1:], os.environ)
    if todo is None or stream_is_ascii(sys.stdout) or stream_is_ascii(sys.stderr):
        from supervisor.cli.main import main as click_main

        if take_early_signals():  # what click's standalone main does with a Ctrl-C
            print("\nAborted!", file=sys.stderr)
            sys.exit(1)
        click_main()
        return
    run(todo)
