"""The incident verbs (kill, pause, resume, stop, reactivate, ls, status), declared once and
run without click: cli/main.py builds their click commands from these declarations and calls
these bodies, and cli/fast.py parses argv by the same declarations and calls the same bodies,
so the two paths cannot drift apart. No privilege beyond access to the socket."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from supervisor.cli.output import ago, clip, echo, emit_json, ms, table
from supervisor.errors import InvalidRequest, ReasonRequired, class_not_found
from supervisor.limits import REASON_MAX, reason_text

if TYPE_CHECKING:
    from supervisor.api.client import Client
    from supervisor.api.shapes import ActionResult, Scope

STOP_GRACE_DEFAULT = 10.0  # the daemon's default grace, shown when --grace is not given
# An answer whose audit rows were still queued (api/client.py AUDIT_PENDING_HEADER).
AUDIT_PENDING_WARNING = (
    "warning: audit_pending: done, but its audit rows were not yet durable when the daemon "
    "answered (a full disk or a failing audit writer); they are written once it recovers, and "
    "lost if the daemon stops first. hint: `agentctl status` shows the audit alarm; free disk "
    "space under the daemon's state directory")


class Option:
    """One option of a verb: its spellings ("--quiet", "-q"), the name its value is passed
    under, whether it is a flag, its default, help, and what completes it ("agent", "class")."""

    __slots__ = ("complete", "decls", "default", "dest", "flag", "help")

    def __init__(self, decls: tuple[str, ...], dest: str, help: str, *, flag: bool = False,
                 default: str | None = None, complete: str | None = None) -> None:
        self.decls = decls
        self.dest = dest
        self.help = help
        self.flag = flag
        self.default = default
        self.complete = complete


class Verb:
    """A verb: its help, its options in the order `--help` lists them, and its one optional
    positional argument (the agent), if it takes one."""

    __slots__ = ("argument", "help", "name", "options")

    def __init__(self, name: str, help: str, options: tuple[Option, ...],
                 argument: str | None = None) -> None:
        self.name = name
        self.help = help
        self.options = options
        self.argument = argument


JSON = Option(("--json",), "as_json", "Print JSON.", flag=True)
_SCOPE = (
    Option(("--class",), "agent_class", "Every agent with this class label.", complete="class"),
    Option(("--all",), "all_agents", "Every agent.", flag=True),
    Option(("--reason",), "reason", f"Why (recorded; at most {REASON_MAX} chars). Required for "
           f"kill and for --class or --all.", default=""),
    JSON,
)
_GRACE = Option(("--grace",), "grace", "Time between SIGTERM and the kill path (default 10s).")

VERBS: dict[str, Verb] = {
    "kill": Verb("kill", "SIGKILL the agent's whole cgroup and hold it killed until "
                 "reactivated.", _SCOPE, "agent"),
    "pause": Verb("pause", "Freeze the agent's cgroup.", _SCOPE, "agent"),
    "resume": Verb("resume", "Thaw a paused agent.", _SCOPE, "agent"),
    "stop": Verb("stop", "SIGTERM, wait --grace, then the kill path; the agent may run again.",
                 (_GRACE, *_SCOPE), "agent"),
    "reactivate": Verb("reactivate", "Lift a kill's hold (with --all, also lift a global "
                       "halt).", _SCOPE, "agent"),
    "ls": Verb("ls", "List agents and their state.", (
        Option(("--class",), "agent_class", "Only agents of this class.", complete="class"),
        Option(("--state",), "state", "Only agents in this state (active, idle, ...)."),
        Option(("--quiet", "-q"), "quiet", "Print only the names, one a line.", flag=True),
        JSON,
    )),
    "status": Verb("status", "The daemon's health.", (JSON,)),
}
SCOPED = ("kill", "pause", "resume", "stop", "reactivate")


def make_scope(agent: str | None, agent_class: str | None, all_agents: bool) -> Scope:
    given = [agent is not None, agent_class is not None, all_agents]
    if sum(given) != 1:
        raise InvalidRequest("name exactly one of AGENT, --class CLASS or --all", field="scope")
    if agent is not None:
        return {"agent": agent}
    if agent_class is not None:
        return {"class": agent_class}
    return {"all": True}


def checked_reason(reason: str) -> str:
    """The reason as it is sent: argv bytes that are not UTF-8 as U+FFFD (limits.reason_text),
    never a refused request; one longer than the daemon takes refused here."""
    reason = reason_text(reason)
    if len(reason) > REASON_MAX:
        raise InvalidRequest(f"--reason is {len(reason)} characters; the limit is {REASON_MAX}",
                             field="reason", length=len(reason), max_length=REASON_MAX)
    return reason


def grace_seconds(text: str) -> float | None:
    """A duration like 10s, 2m, 1.5h or 500ms, for the progress display only (the daemon
    validates the value itself); None when it does not parse."""
    units = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
    for suffix in ("ms", "s", "m", "h"):
        if text.endswith(suffix):
            number, scale = text[: -len(suffix)], units[suffix]
            break
    else:
        number, scale = text, 1.0
    try:
        return float(number) * scale
    except ValueError:
        return None


def print_action(result: ActionResult) -> None:
    rows = []
    for item in result["results"]:
        change = (f"skipped ({item['skipped']})" if item.get("skipped")
                  else f"{item['previous_state']} -> {item['new_state']}")
        rows.append([item["agent"], change, ms(item.get("time_to_halt_ms"))])
    if rows:
        table(rows, ["AGENT", "STATE", "TIME_TO_HALT_MS"])
    else:
        echo(f"no agents in scope {result['scope']}")  # global kill/reactivate: the halt
    if result.get("global_halt"):
        echo("global halt in force: new runs are refused")


def scoped(client: Client, verb: str, agent: str | None, agent_class: str | None,
           all_agents: bool, reason: str, as_json: bool, grace: str | None = None) -> None:
    """kill, pause, resume, stop or reactivate one agent, a class or every agent."""
    scope = make_scope(agent, agent_class, all_agents)
    if not reason.strip() and (verb == "kill" or agent is None):
        what = "kill" if verb == "kill" else f"{verb} --class/--all"
        raise ReasonRequired(f"{what} needs --reason", field="reason", verb=verb)
    reason = checked_reason(reason)

    def call() -> ActionResult:
        answer: ActionResult = client.action(verb, scope, reason, grace=grace)
        return answer

    if verb == "stop":
        from supervisor.cli import progress

        target = "every agent" if all_agents else agent or f"class {agent_class}"
        seconds = grace_seconds(grace) if grace else STOP_GRACE_DEFAULT
        result = progress.run_with_progress(
            call, f"stopping {target}: SIGTERM sent", seconds, quiet=as_json)
    else:
        result = call()
    if as_json:
        emit_json(result)
    else:
        print_action(result)
    if client.audit_pending:
        echo(AUDIT_PENDING_WARNING, err=True)


def ls(client: Client, as_json: bool, agent_class: str | None, state: str | None,
       quiet: bool) -> None:
    data = client.agents(agent_class=agent_class, state=state)
    if agent_class is not None and not data["agents"]:
        # A typo'd class must not read as "no agents": the same error, with suggestions, as
        # the verbs' --class (a class with agents, none in --state, is an empty list).
        classes = {agent["class"] for agent in client.agents()["agents"]}
        if agent_class not in classes:
            raise class_not_found(agent_class, classes)
    if as_json:
        emit_json(data)
        return
    if quiet:
        for agent in data["agents"]:
            echo(agent["name"])
        return
    if data.get("global_halt"):
        echo("GLOBAL HALT in force: new runs are refused until "
             "'agentctl reactivate --all --reason ...'")
    rows = []
    for agent in data["agents"]:
        run_view = agent.get("run")
        live = ["-", "-", "-"]
        if run_view and not run_view.get("ended_at"):
            live = [run_view.get("id", "-"), str(run_view.get("pid") or "-"),
                    ago(run_view.get("started_at"))]
        rows.append([
            agent["name"], agent["class"], agent["state"], agent["profile"], *live,
            ms(agent.get("time_to_halt_ms")),
            clip(agent.get("last_reason") or "", 40),
        ])
    table(rows, ["NAME", "CLASS", "STATE", "PROFILE", "RUN", "PID", "UP", "HALT_MS", "REASON"])


def status(client: Client, as_json: bool) -> None:
    data = client.health()
    if as_json:
        emit_json(data)
        return
    for key, value in data.items():
        echo(f"{key:12} {value}")


BODIES: dict[str, Callable[..., None]] = {"ls": ls, "status": status}
