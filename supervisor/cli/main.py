"""agentctl: the operator's CLI. Talks to the daemon only through the control socket; imports the
client and the wire models, never daemon code. Runs unprivileged (root or the operators group)."""

from __future__ import annotations

import functools
import os
import shutil
import signal
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, TypeVar, cast

import click

from supervisor.api.client import Client
from supervisor.cli import progress, verbs
from supervisor.cli.completion import complete_agent, complete_class
from supervisor.cli.embedded import exec_runner, run_body
from supervisor.cli.embedded import spec as embedded_spec
from supervisor.cli.fast import DEFAULT_SOCKET, SOCKET_ENV
from supervisor.cli.follow import follow as follow_output
from supervisor.cli.lazy import LazyGroup
from supervisor.cli.output import ago as _ago
from supervisor.cli.output import emit_json as _emit_json
from supervisor.cli.output import fail as _fail
from supervisor.cli.output import fail_local
from supervisor.cli.output import ms as _ms
from supervisor.cli.output import table as _table
from supervisor.cli.units import human_bytes
from supervisor.cli.verbs import checked_reason as _reason
from supervisor.errors import (
    InvalidRequest,
    StreamEnded,
    SupervisorError,
    launch_exit_status,
)
from supervisor.limits import REASON_MAX

if TYPE_CHECKING:
    from supervisor.api.shapes import (
        AuditVerifyResult,
        RunView,
        TelemetrySummary,
    )

F = TypeVar("F", bound=Callable[..., Any])

class LocalPath(click.Path):
    """click.Path that refuses a NUL byte as a usage error (os.stat raises ValueError on it,
    which click does not catch)."""

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> Any:
        if isinstance(value, str | bytes) and "\0" in os.fsdecode(value):
            self.fail(f"{value!r} contains a NUL byte", param, ctx)
        return super().convert(value, param, ctx)


class Context:
    def __init__(self, socket_path: Path) -> None:
        self.socket_path = socket_path
        self.client = Client(socket_path)


def handles_errors(func: F) -> F:
    """Turn a SupervisorError into its message and exit status (JSON body with --json)."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except SupervisorError as exc:
            _fail(exc, bool(kwargs.get("as_json")))
        except (OSError, ValueError) as exc:
            fail_local(exc, bool(kwargs.get("as_json")))

    return wrapper  # type: ignore[return-value]


json_option = click.option(*verbs.JSON.decls, verbs.JSON.dest, is_flag=True,
                           help=verbs.JSON.help)


def _print_version(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if not value or ctx.resilient_parsing:
        return
    from supervisor import __version__  # looked up only here (importlib.metadata is slow)

    click.echo(f"agentctl, version {__version__}")
    ctx.exit()


# Commands whose modules (and their dependencies: pydantic for fleet, aiohttp for the console)
# are imported only when they run, so `agentctl kill` does not pay for `agentctl fleet`.
LAZY_COMMANDS = {
    "top": "supervisor.cli.top:top",
    "console": "supervisor.cli.console:console",
    "fleet": "supervisor.cli.fleet:fleet",
    "completion": "supervisor.cli.completion:completion",
}


@click.group(cls=LazyGroup, lazy_commands=LAZY_COMMANDS,
             context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--version", is_flag=True, expose_value=False, is_eager=True,
              callback=_print_version, help="Show the version and exit.")
@click.option("--socket", "socket_path", type=LocalPath(path_type=Path, readable=False),
              default=Path(DEFAULT_SOCKET), show_default=True, envvar=SOCKET_ENV,
              help="The daemon's control socket.")
@click.pass_context
def cli(ctx: click.Context, socket_path: Path) -> None:
    """Control the agent supervisor: run, inspect, pause, stop and kill AI agents."""
    ctx.obj = Context(socket_path)


def _client() -> Client:
    obj: Context = click.get_current_context().find_object(Context)  # type: ignore[assignment]
    return obj.client


# ----------------------------------------------------------------------------- formatting

def iso_time(ts: float, utc: bool = False) -> str:
    """ISO 8601 with the zone's offset, to the second: 2026-12-02T03:14:07+01:00."""
    moment = datetime.fromtimestamp(ts, tz=UTC)
    return (moment if utc else moment.astimezone()).isoformat(timespec="seconds")


def _table_wrapping_last(rows: list[list[str]], headers: list[str], columns: int) -> None:
    """A table whose last column (free text) wraps under itself instead of being cut."""
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows, strict=False)]
    indent = sum(w + 2 for w in widths[:-1])
    room = max(20, columns - indent)
    for row in [headers, *rows]:
        lead = "  ".join(str(c).ljust(w) for c, w in zip(row[:-1], widths, strict=False))
        lines = textwrap.wrap(str(row[-1]), room, break_on_hyphens=False) or [""]
        click.echo(f"{lead}  {lines[0]}".rstrip())
        for line in lines[1:]:
            click.echo(" " * indent + line)


_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def duration_seconds(text: str) -> float | None:
    """A duration like 90s, 10m, 1h30m, 1.5h, 2d or 500ms (units required); None otherwise."""
    import re

    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)", text)
    if not parts or "".join(number + unit for number, unit in parts) != text:
        return None
    return sum(float(number) * _DURATION_UNITS[unit] for number, unit in parts)


class SinceTime(click.ParamType):  # type: ignore[type-arg]  # generic from click 8.2
    """--since: a duration ago or an ISO 8601 time, as a Unix time."""

    name = "time"

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> float:
        if isinstance(value, float):
            return value
        text = str(value).strip()
        ago = duration_seconds(text)
        if ago is not None:
            return time.time() - ago
        try:
            moment = datetime.fromisoformat(text)
        except ValueError:
            self.fail(f"{text!r} is neither a duration (90s, 10m, 1h30m, 2d) nor an ISO 8601 "
                      f"time (2026-12-02T03:14:00+01:00)", param, ctx)
        if moment.tzinfo is None:
            moment = moment.astimezone()  # no zone given: the operator's local time
        return moment.timestamp()


# ----------------------------------------------------------------------------- run

@cli.command(context_settings={"ignore_unknown_options": False})
@click.option("--name", help="Agent name (registered on first use); generated when omitted.")
@click.option("--class", "agent_class", help="Class label, for class-wide pause/kill.")
@click.option("--profile", help="Sandbox profile (default: the daemon's default profile).")
@click.option("--workspace", type=LocalPath(file_okay=False, readable=False, path_type=Path),
              help="Directory bound read-write at /workspace (the daemon decides whether you "
                   "may use it: one you can read and write, or under a root your role is "
                   "granted).")
@click.option("--timeout", help="Hard execution window, e.g. 30s, 10m; the run is killed after.")
@click.option("--image", help="Docker image that is the agent's read-only root (docker runtime).")
@click.option("--env", "env", multiple=True, help="KEY=VALUE for the agent's environment.")
@click.option("--tripwire", "tripwires", multiple=True, metavar="NAME:METRIC>VALUE[:ACTION]",
              help="A tripwire for this agent, e.g. 'mem:memory_bytes>512M:kill' (action "
                   "alert, pause or kill; default alert). Replaces the profile's rule of the "
                   "same name.")
@click.option("--detach", "-d", is_flag=True, help="Return once the agent runs.")
@click.option("--embedded", is_flag=True,
              help="No daemon: run the supervisor in this process for this one run (root; the "
                   "default when no daemon socket exists and the caller is root). See docs/ci.md.")
@click.option("--allow-changes", "allow_changes", multiple=True, metavar="GLOB",
              help="Embedded: what the agent may change in the workspace ('src/**'); any other "
                   "change fails the run with status 83. Repeatable.")
@click.option("--report", type=LocalPath(dir_okay=False, path_type=Path),
              help="Embedded: write the signed JSON report of the run here.")
@click.option("--summary", type=LocalPath(dir_okay=False, path_type=Path),
              help="Embedded: append a Markdown summary here (e.g. $GITHUB_STEP_SUMMARY).")
@click.option("--audit", "audit_path", type=LocalPath(dir_okay=False, path_type=Path),
              help="Embedded: write the run's hash-chained audit log here as JSON lines "
                   "(default: REPORT.audit.jsonl with --report).")
@click.option("--signing-key", type=LocalPath(dir_okay=False, path_type=Path),
              envvar="AGENT_SUPERVISOR_SIGNING_KEY",
              help="Embedded: Ed25519 private key (PEM) that signs the report; without it an "
                   "ephemeral key is used ('agentctl report keygen' makes one).")
@click.option("--self-test", is_flag=True,
              help="Embedded: run the daemon's canary self-test before the agent.")
@click.option("--config", "config_path", type=LocalPath(dir_okay=False, path_type=Path),
              help="Embedded: the daemon configuration for sandbox settings "
                   "(default /etc/agent-supervisor/daemon.toml if present).")
@json_option
@click.argument("command", nargs=-1, required=True)
@handles_errors
def run(name: str | None, agent_class: str | None, profile: str | None,
        workspace: Path | None, timeout: str | None, image: str | None, env: tuple[str, ...],
        tripwires: tuple[str, ...], detach: bool, embedded: bool,
        allow_changes: tuple[str, ...], report: Path | None, summary: Path | None,
        audit_path: Path | None, signing_key: Path | None, self_test: bool,
        config_path: Path | None, as_json: bool, command: tuple[str, ...]) -> None:
    """Run COMMAND as a sandboxed agent: agentctl run --name a1 -- python agent.py

    In the foreground the agent's output is streamed and agentctl exits with the agent's
    status (137 when it was killed). A run that does not start exits as `docker run` does:
    125 the supervisor could not start it, 126 the command cannot be executed, 127 it is not
    found. Ctrl-C stops the agent (SIGTERM, then the kill path). Through a restart of the
    daemon the agent runs on and agentctl says so on one line and follows it again once the
    daemon is back; it exits 75 when the daemon stops (killing every agent) or is not back
    within 120 s.
    Embedded runs exit 80 killed, 81 tripwire, 82 timeout, 83 scope violation, 84 supervisor
    error, else the agent's own status."""
    body = run_body(command, name=name, agent_class=agent_class, profile=profile,
                    workspace=workspace, timeout=timeout, image=image, env=env,
                    tripwires=tripwires)
    ci_options = {"allow_changes": list(allow_changes), "report": report, "summary": summary,
                  "audit": audit_path, "signing_key": signing_key, "self_test": self_test,
                  "config": config_path}
    socket_path = click.get_current_context().find_object(Context).socket_path  # type: ignore[union-attr]
    if embedded or (not socket_path.exists() and os.geteuid() == 0):
        if detach:
            raise InvalidRequest("--detach needs a daemon: an embedded run lives as long as "
                                 "agentctl", field="detach")
        exec_runner(embedded_spec(body, allow_changes=allow_changes, report=report,
                                  summary=summary, audit=audit_path, signing_key=signing_key,
                                  self_test=self_test, config=config_path))
    given = sorted(k for k, v in ci_options.items() if v)
    if given:
        raise InvalidRequest(f"--{given[0].replace('_', '-')} is for embedded runs "
                             f"(--embedded); this run would go to the daemon at {socket_path}",
                             field=given[0])
    client = _client()
    try:
        view = client.run(body)
    except SupervisorError as exc:  # did not start: docker run's 125, 126 and 127
        _fail(exc, as_json, launch_exit_status(exc))
    if detach:
        if as_json:
            _emit_json(view)
        else:
            click.echo(f"{view['agent']} {view['id']}")
        return
    sys.exit(_follow(client, view, as_json))


def _follow(client: Client, view: RunView, as_json: bool) -> int:
    out = sys.stderr.buffer if as_json else sys.stdout.buffer
    stopping = {"asked": False}

    def on_interrupt(signum: int, _frame: Any) -> None:
        if stopping["asked"]:
            return
        stopping["asked"] = True
        click.echo(f"\nagentctl: stopping agent {view['agent']} ...", err=True)
        try:
            client.action("stop", {"agent": view["agent"]}, reason="interrupted at agentctl run",
                          grace="5s")
        except SupervisorError as exc:
            click.echo(f"agentctl: {exc.code}: {exc.message}", err=True)

    previous = signal.signal(signal.SIGINT, on_interrupt)
    previous_term = signal.signal(signal.SIGTERM, on_interrupt)
    try:
        _write_stream(follow_output(client, view["id"], told=_following_again), out)
    except StreamEnded as exc:  # the daemon stopped, or was not back in time
        return _stream_ended(exc, as_json, out)
    finally:
        signal.signal(signal.SIGINT, previous)
        signal.signal(signal.SIGTERM, previous_term)
    final = client.get_run(view["id"])
    if as_json:
        _emit_json(final)
    code = final.get("exit_code")
    if final.get("state") == "killed":
        reason = final.get("end_reason") or "killed"
        click.echo(f"agentctl: agent {final['agent']} killed ({reason}); time_to_halt_ms="
                   f"{_ms(final.get('time_to_halt_ms'))}", err=True)
        return 137 if code is None else int(code)
    if final.get("state") == "failed":
        click.echo(f"agentctl: run failed: {final.get('end_reason')}", err=True)
        return 1
    return 1 if code is None else int(code)


def _write_stream(chunks: Iterator[bytes], out: BinaryIO) -> None:
    for chunk in chunks:
        out.write(chunk)
        out.flush()


def _following_again(exc: StreamEnded, seconds: float) -> None:
    """A restart ended the stream: said on one line, then the output goes on from where it
    stopped once the next daemon answers (Client.follow)."""
    click.echo(f"agentctl: the daemon is restarting; run {exc.detail.get('run')} keeps "
               f"running: following it again once the daemon is back (up to {seconds:g}s)",
               err=True)


def _stream_ended(exc: StreamEnded, as_json: bool, out: BinaryIO | None) -> int:
    """A follow stream that ended before the run did, for good (the daemon stopped, or was
    not back in time after a restart): the daemon's notice on one line (the error body with
    --json), and exit status 75."""
    if as_json:
        _emit_json(exc.to_body())
    else:
        if out is not None and exc.detail.get("midline"):
            out.write(b"\n")
            out.flush()
        click.echo(f"agentctl: {exc.message}", err=True)
    return exc.exit_status


# ----------------------------------------------------------------------------- read verbs

def _incident_command(name: str) -> None:
    """The click command of an incident verb, built from its one declaration (cli/verbs.py),
    which the fast path (cli/fast.py) reads argv by, running the body both paths share."""
    verb = verbs.VERBS[name]

    def command(**kwargs: Any) -> None:
        if name in verbs.SCOPED:
            verbs.scoped(_client(), name, **kwargs)
        else:
            verbs.BODIES[name](_client(), **kwargs)

    command = handles_errors(command)
    completers = {"agent": complete_agent, "class": complete_class}
    for option in reversed(verb.options):  # click lists them in the order declared
        settings: dict[str, Any] = {"help": option.help}
        if option.flag:
            settings["is_flag"] = True
        elif option.default is not None:
            settings["default"] = option.default
        if option.complete:
            settings["shell_complete"] = completers[option.complete]
        command = click.option(*option.decls, option.dest, **settings)(command)
    if verb.argument is not None:
        command = click.argument(verb.argument, required=False,
                                 shell_complete=complete_agent)(command)
    cli.command(name=name, help=verb.help)(command)


for _name in verbs.VERBS:
    _incident_command(_name)


@cli.command()
@click.argument("agent", shell_complete=complete_agent)
@json_option
@handles_errors
def inspect(agent: str, as_json: bool) -> None:
    """Show one agent, its current or last run and its last time_to_halt_ms."""
    data = _client().agent(agent)
    if as_json:
        _emit_json(data)
        return
    for key in ("name", "class", "state", "profile", "last_actor", "last_reason"):
        click.echo(f"{key:16} {data.get(key) or '-'}")
    click.echo(f"{'time_to_halt_ms':16} {_ms(data.get('time_to_halt_ms'))}")
    run_view = data.get("run")
    if run_view:
        click.echo("run:")
        for key in ("id", "state", "pid", "command", "workspace", "exit_code", "end_reason",
                    "timeout"):
            value = run_view.get(key)
            if isinstance(value, list):  # the command
                value = " ".join(value)
            click.echo(f"  {key:14} {value if value is not None else '-'}")
        click.echo(f"  {'started':14} {_ago(run_view.get('started_at'))} ago")
    summary = data.get("telemetry")
    if summary:
        _print_summary_block(summary)


# ----------------------------------------------------------------------------- telemetry

def _num(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _count(value: int | None) -> str:
    return "-" if value is None else str(value)


def _print_summary_block(summary: TelemetrySummary) -> None:
    state = "live" if summary.get("ended_at") is None else "final"
    click.echo(f"telemetry ({state}, {summary['samples']} samples):")
    for label, text in (("peak_memory", human_bytes(summary.get("peak_memory_bytes"))),
                        ("cpu_seconds", _num(summary.get("cpu_seconds"), 2)),
                        ("peak_processes", _count(summary.get("peak_processes"))),
                        ("syscall_attempts", _count(summary.get("syscall_attempts")))):
        click.echo(f"  {label:16} {text}")
    if summary.get("output_bytes") is not None:  # recorded stops at the run's output cap
        click.echo(f"  {'output':16} {human_bytes(summary['output_bytes'])} "
                   f"({human_bytes(summary.get('output_recorded_bytes'))} recorded)")


@cli.command()
@click.argument("ref", shell_complete=complete_agent)
@click.option("--limit", type=click.IntRange(0, 10_000), default=20, show_default=True,
              help="How many of the most recent samples.")
@json_option
@handles_errors
def telemetry(ref: str, limit: int, as_json: bool) -> None:
    """A run's most recent telemetry samples and its summary (REF: agent name or run id).
    Samples exist while the run is live; an ended run keeps only its summary."""
    data = _client().telemetry(ref, limit=limit)
    if as_json:
        _emit_json(data)
        return
    state = "live" if data["live"] else "ended"
    click.echo(f"run {data['run']} of agent {data['agent']}: {data['state']} ({state})")
    rows = [[time.strftime("%H:%M:%S", time.localtime(s["ts"])) + f".{int(s['ts'] * 10) % 10}",
             _num(s.get("cpu_percent")), human_bytes(s.get("memory_bytes")),
             str(s["processes"]), _count(s.get("open_fds")), _count(s.get("threads")),
             str(s.get("syscall_attempts", 0))]
            for s in data["samples"]]
    if rows:
        _table(rows, ["TIME", "CPU%", "MEMORY", "PROCS", "FDS", "THREADS", "SYSCALLS"])
    summary = data.get("summary")
    if summary:
        _print_summary_block(summary)


@cli.command()
@click.argument("ref", shell_complete=complete_agent)
@click.option("--follow", "-f", is_flag=True, help="Keep streaming until the run ends.")
@click.option("--tail", "-n", type=click.IntRange(0, 100_000), default=None, metavar="N",
              help="Start with the last N lines of the output.")
@click.option("--since", type=SinceTime(), default=None, metavar="TIME",
              help="Only output that arrived since TIME: a duration ago (90s, 10m, 1h30m, "
                   "2d) or an ISO 8601 time (2026-12-02T03:14:00+01:00; local time without a "
                   "zone). Exact to about a second.")
@json_option
@handles_errors
def logs(ref: str, follow: bool, tail: int | None, since: float | None, as_json: bool) -> None:
    """Print the output of an agent's current or last run (REF: agent name or run id).

    With --json, one object {run, agent, state, exit_code, output} once the output is read
    (with -f, once the run has ended). With -f, a restart of the daemon is said on one line
    and the output followed again from where it stopped once the daemon is back; a stop of
    the daemon, or none back within 120 s, ends it with one line and exit status 75."""
    client = _client()
    chunks = (follow_output(client, ref, tail=tail, since=since, told=_following_again)
              if follow else client.logs(ref, tail=tail, since=since))
    if not as_json:
        try:
            _write_stream(chunks, sys.stdout.buffer)
        except StreamEnded as exc:
            sys.exit(_stream_ended(exc, as_json, sys.stdout.buffer))
        return
    try:
        output = b"".join(chunks)
    except StreamEnded as exc:
        sys.exit(_stream_ended(exc, as_json, None))
    run_view = client.get_run(ref)
    _emit_json({"run": run_view["id"], "agent": run_view["agent"], "state": run_view["state"],
                "exit_code": run_view["exit_code"],
                "output": output.decode("utf-8", errors="replace")})


# ----------------------------------------------------------------------------- scoped verbs

@cli.command("rm")
@click.argument("agents", nargs=-1, required=True, metavar="AGENT...",
                shell_complete=complete_agent)
@click.option("--reason", default="", help=f"Why (recorded; at most {REASON_MAX} chars).")
@json_option
@handles_errors
def rm(agents: tuple[str, ...], reason: str, as_json: bool) -> None:
    """Forget idle agents (owner): their registrations go, their runs and audit rows stay. A
    killed agent must be reactivated first; a running one stopped."""
    client = _client()
    results = [client.forget(name, _reason(reason)) for name in agents]
    if as_json:
        _emit_json({"forgotten": results})
        return
    for result in results:
        click.echo(f"forgot {result['agent']} (was {result['previous_state']})")


# ----------------------------------------------------------------------------- audit

@cli.group(invoke_without_command=True)
@click.option("--limit", default=50, show_default=True)
@click.option("--wide", is_flag=True,
              help="One line per row with the whole reason (default: the reason wraps under "
                   "its row to fit the terminal).")
@click.option("--utc", is_flag=True, help="Timestamps in UTC (default: local time).")
@json_option
@click.pass_context
@handles_errors
def audit(ctx: click.Context, limit: int, wide: bool, utc: bool, as_json: bool) -> None:
    """List the audit log (newest last): who did what to which agent, and why. Timestamps are
    ISO 8601 with their zone. 'audit verify' checks the hash chain."""
    if ctx.invoked_subcommand is not None:
        return
    data = _client().audit(limit=limit)
    if as_json:
        _emit_json(data)
        return
    rows = []
    for entry in data["entries"]:
        change = (f"{entry['previous_state']}->{entry['new_state']}"
                  if entry.get("new_state") else "")
        rows.append([str(entry["seq"]), iso_time(entry["ts"], utc), entry["actor"],
                     entry["verb"], entry["scope"], entry.get("target") or "-", change,
                     entry["outcome"], _ms(entry.get("time_to_halt_ms")), entry["reason"]])
    headers = ["SEQ", "TIME", "ACTOR", "VERB", "SCOPE", "TARGET", "STATE", "OUTCOME",
               "HALT_MS", "REASON"]
    if wide:
        _table(rows, headers)
        return
    _table_wrapping_last(rows, headers, shutil.get_terminal_size((120, 24)).columns)


@audit.command("verify")
@click.option("--state-dir", type=LocalPath(file_okay=False, path_type=Path), default=None,
              help="Verify this state directory offline, without a daemon (a stopped host, or "
                   "a copy taken as evidence).")
@click.option("--key", "public_key", type=LocalPath(dir_okay=False, path_type=Path),
              default=None, help="With --state-dir: the audit public key to trust (default "
                                 "/etc/agent-supervisor/audit-key.pub). Pin the copy you kept "
                                 "off the host.")
@click.option("--checkpoints", type=LocalPath(dir_okay=False, path_type=Path), default=None,
              help="With --state-dir: the checkpoint file (default "
                   "/var/log/agent-supervisor/audit-checkpoints.jsonl).")
@json_option
@handles_errors
def audit_verify(state_dir: Path | None, public_key: Path | None, checkpoints: Path | None,
                 as_json: bool) -> None:
    """Check the audit hash chain against its signed checkpoints; exits 1 and names every
    problem (the first bad row first) when it does not hold."""
    if state_dir is None:
        if public_key is not None or checkpoints is not None:
            raise InvalidRequest("--key and --checkpoints go with --state-dir",
                                 field="state_dir")
        result: AuditVerifyResult = _client().audit_verify()
    else:
        from supervisor.audit.anchor import (
            DEFAULT_CHECKPOINT_FILE,
            DEFAULT_KEY,
            public_path_of,
            verify_state_dir,
        )
        key = public_key or public_path_of(DEFAULT_KEY)
        if not key.exists():
            raise InvalidRequest(f"no audit public key at {key}", path=str(key),
                                 hint="pass --key with the public key you trust")
        result = cast("AuditVerifyResult", verify_state_dir(
            state_dir, key, checkpoints or DEFAULT_CHECKPOINT_FILE).model_dump(mode="json"))
    if as_json:
        _emit_json(result)
    elif result["ok"]:
        anchor = result.get("anchor_seq")
        head = (result["head_hash"] or "-")[:16]
        click.echo(f"audit log intact: {result['rows']} rows, head {head}"
                   + (f", anchored at row {anchor} ({result.get('unanchored_rows', 0)} after "
                      f"it), key {result.get('key_id')}" if anchor else ""))
        for note in result.get("notes", []):
            click.echo(f"  note: {note}")
    else:
        click.echo(f"audit log BROKEN at row {result['first_bad_seq']}: {result['problem']}",
                   err=True)
        for problem in result.get("problems", [])[1:]:
            click.echo(f"  also: {problem}", err=True)
    sys.exit(0 if result["ok"] else 1)


DRILL_FAILED = 12


@cli.command()
@click.option("--processes", type=click.IntRange(1, 10_000), default=None,
              help="Processes the canary forks (default from the daemon's [drill] config).")
@click.option("--slo", default=None, help="time_to_halt objective, e.g. 50ms.")
@click.option("--history", is_flag=True, help="List past drills instead of running one.")
@click.option("--limit", default=20, show_default=True, help="With --history: how many.")
@json_option
@handles_errors
def drill(processes: int | None, slo: str | None, history: bool, limit: int,
          as_json: bool) -> None:
    """Kill drill: launch a canary that forks and holds network state, kill it through the real
    kill path, prove nothing survived. Exits 12 when the SLO is missed or anything survived."""
    client = _client()
    if history:
        data = client.drills(limit=limit)
        if as_json:
            _emit_json(data)
            return
        rows = [[iso_time(d["ts"]), d["id"],
                 "PASS" if d["passed"] else "FAIL", str(d["processes"]),
                 _ms(d.get("time_to_halt_ms")), f"{d['slo_ms']:g}", d["actor"]]
                for d in data["drills"]]
        _table(rows, ["TIME", "ID", "RESULT", "PROCS", "HALT_MS", "SLO_MS", "ACTOR"])
        return
    result = progress.run_with_progress(
        functools.partial(client.drill, processes=processes, slo=slo),
        "drill: canary launched, killing it through the kill path", None, quiet=as_json)
    if as_json:
        _emit_json(result)
    else:
        verdict = "PASSED" if result["passed"] else "FAILED"
        click.echo(f"drill {result['id']} {verdict}: {result['processes_seen']} processes, "
                   f"time_to_halt_ms={_ms(result.get('time_to_halt_ms'))} "
                   f"(SLO {result['slo_ms']:g} ms)")
        for check, outcome in result["checks"].items():
            click.echo(f"  {check:22} {outcome}")
        if result.get("error"):
            click.echo(f"  error: {result['error']}")
    sys.exit(0 if result["passed"] else DRILL_FAILED)


@cli.command()
@click.option("--reason", default="", help="Recorded with the reload in the audit log.")
@json_option
@handles_errors
def reload(reason: str, as_json: bool) -> None:
    """Apply the changed configuration (owner): roles, webhooks, profiles, metrics, drills.
    Every agent keeps running; a configuration with errors is refused and the running one
    stays (exit 78, every error listed)."""
    data = _client().reload(_reason(reason) if reason else "")
    if as_json:
        _emit_json(data)
        return
    changed = ", ".join(data["changed"]) or "nothing changed"
    click.echo(f"reloaded {data['source']}: {changed}; {data['running']} agents kept running")
    if data["restart_required"]:
        click.echo(f"takes effect at the next restart: {', '.join(data['restart_required'])}")
    for warning in data.get("warnings", []):
        click.echo(f"warning: {warning['key']}: {warning['reason']}", err=True)
    for run in data.get("gateway_runs", []):
        routes = run.get("routes")
        what = (f"routes {', '.join(routes) or '(none)'}" if routes is not None
                else f"kept what it had: {run['kept']}")
        click.echo(f"running agent {run['agent']} (run {run['run']}): {what}")


# ----------------------------------------------------------------------------- egress gateway

@cli.command()
@json_option
@handles_errors
def approvals(as_json: bool) -> None:
    """Requests the egress gateway holds for an operator's decision."""
    data = _client().approvals()
    if as_json:
        _emit_json(data)
        return
    rows = [[a["id"], a["agent"], a["method"], f"{a['host']}{a['path']}", a["rule"],
             _ago(a["requested_at"]), f"{max(0.0, a['expires_at'] - time.time()):.0f}s"]
            for a in data["approvals"]]
    if not rows:
        click.echo("no requests waiting for approval")
        return
    _table(rows, ["ID", "AGENT", "METHOD", "TARGET", "RULE", "HELD", "EXPIRES IN"])


def _decision_command(approved: bool) -> None:
    # No explicit default=None on the required option: click 8.2 treats an explicit None as a
    # default and stops enforcing `required` (deny without --reason then crashed).
    reason_default: dict[str, Any] = {"default": ""} if approved else {"required": True}

    @click.argument("approval_id", metavar="ID")
    @click.option("--reason", **reason_default,
                  help=f"Why (recorded; at most {REASON_MAX} chars)"
                       f"{'' if approved else '; required'}.")
    @json_option
    @handles_errors
    def command(approval_id: str, reason: str, as_json: bool) -> None:
        data = _client().decide(approval_id, approved, _reason(reason))
        if as_json:
            _emit_json(data)
        else:
            verb = "approved" if approved else "denied"
            click.echo(f"{verb} {data['id']}: {data['method']} {data['host']}{data['path']} "
                       f"of agent {data['agent']}")

    name = "approve" if approved else "deny"
    text = ("Release a held request (admin or owner)." if approved else
            "Refuse a held request (admin or owner); the agent gets approval_denied.")
    cli.command(name=name, help=text)(command)


_decision_command(True)
_decision_command(False)


@cli.group()
def breaker() -> None:
    """The egress gateway's circuit breaker."""


@breaker.command("reset")
@click.argument("agent", shell_complete=complete_agent)
@click.option("--reason", default="", help=f"Why (recorded; at most {REASON_MAX} chars).")
@json_option
@handles_errors
def breaker_reset(agent: str, reason: str, as_json: bool) -> None:
    """Close AGENT's tripped breaker (admin or owner); resume the agent separately."""
    data = _client().reset_breaker(agent, _reason(reason))
    if as_json:
        _emit_json(data)
    else:
        click.echo(f"breaker of {data['agent']} closed (it had tripped: {data['was']})")


@cli.command()
@click.argument("ref", metavar="AGENT|RUN", shell_complete=complete_agent)
@json_option
@handles_errors
def egress(ref: str, as_json: bool) -> None:
    """A gateway run's calls, bytes, spend, breaker and pending approvals."""
    data = _client().egress(ref)
    if as_json:
        _emit_json(data)
        return
    usage, total = data["usage"], data["agent_total"]
    click.echo(f"run {data['run']} of {data['agent']} via gateway {data['gateway']}")
    for key in ("requests", "bytes", "spend", "tokens", "denied", "errors"):
        click.echo(f"  {key:9} {usage.get(key, 0):>14g}   (agent total {total.get(key, 0):g})")
    click.echo(f"  breaker   {'OPEN: ' + data['breaker'] if data['breaker'] else 'closed'}")
    if data["pending_approvals"]:
        click.echo(f"  waiting   {', '.join(data['pending_approvals'])}")

@cli.group()
def report() -> None:
    """CI reports of embedded runs: verify one, or make a signing key."""


@report.command("verify")
@click.argument("path", type=LocalPath(dir_okay=False, path_type=Path))
@click.option("--key", "key_path", required=True, type=LocalPath(dir_okay=False, path_type=Path),
              help="The Ed25519 public key (PEM or ssh-ed25519) you trust.")
@click.option("--repo", "repo", type=LocalPath(file_okay=False, path_type=Path),
              help="Also check the report's commits against this git checkout.")
@click.option("--rev", default="HEAD", show_default=True,
              help="With --repo: the revision whose commits since the run's start must be "
                   "exactly the report's.")
@json_option
@handles_errors
def report_verify(path: Path, key_path: Path, repo: Path | None, rev: str,
                  as_json: bool) -> None:
    """Check a report's signature against KEY (and with --repo its commits against the
    repository); exits 1 when it does not hold."""
    from supervisor.ci import report as ci_report  # cryptography only for this command

    document = ci_report.read_report(path)
    result = ci_report.verify(document, ci_report.load_public_key(key_path))
    if repo is not None and result["ok"]:
        result.update(ci_report.verify_commits(document, repo, rev))
    result.update(ending=document.get("ending"), exit_status=document.get("exit_status"))
    if as_json:
        _emit_json(result)
    elif result["ok"]:
        click.echo(f"report signature valid (key {result['key_id']}): run "
                   f"{document['run'].get('id')} {document.get('ending')}, exit status "
                   f"{document.get('exit_status')}"
                   + (f"; its {result['commits']} commit(s) match {repo}" if repo else ""))
    else:
        what = "commits DO NOT MATCH" if "commits" in result else "signature INVALID"
        click.echo(f"report {what}: {result['problem']}", err=True)
    sys.exit(0 if result["ok"] else 1)


@report.command("keygen")
@click.argument("prefix", type=LocalPath(dir_okay=False, path_type=Path))
@handles_errors
def report_keygen(prefix: Path) -> None:
    """Write an Ed25519 key pair: PREFIX (private, 0600) and PREFIX.pub."""
    from supervisor.ci import report as ci_report

    public = prefix.with_name(prefix.name + ".pub")
    try:
        ci_report.write_key_pair(ci_report.generate_key(), prefix, public)
    except FileExistsError as exc:
        raise InvalidRequest(f"{prefix} exists; not overwriting a key", path=str(prefix)
                             ) from exc
    click.echo(f"private key {prefix} (keep it secret, e.g. a CI secret); public key {public}")



def main() -> None:
    cli(prog_name="agentctl")
