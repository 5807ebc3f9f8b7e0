"""Restart without dropping agents: an orderly restart hands the running runs to the next
daemon instead of killing them, and the next daemon adopts them before it accepts a verb.
Needs root.

What a run needs that only a live descriptor keeps, the daemon gives to its watchdog process
(SCM_RIGHTS over the watchdog's channel, supervisor/daemon/watchdog.py): the read end of each
run's output pipe (the agent's stdout and stderr would get EPIPE without it) and each run's
seccomp notify fd (without it the kernel answers the notified syscalls ENOSYS, still denied,
but uncounted), and one proc connector socket subscribed to process exits before the runs'
watchers stop (supervisor/sandbox/proc_exits.py: the inits are this daemon's children, so
their exit statuses reach the next daemon only that way). The watchdog also gets the
listening socket the next daemon connects to (`<runtime_dir>/handover.sock`, root only).
Everything else survives on its own: runc's state, the cgroup, the network namespace, the
bundle, the run's records in SQLite.

While no daemon holds them the watchdog keeps them contained and killable: SIGUSR1 to it or
the HALT file kills every agent, and so does the end of `[daemon] adopt_window` with no new
daemon; each is recorded for the next daemon's audit (`watchdog_kill`). A run that cannot be
handed over whole (not yet running) is killed through the kill path first; a run that cannot
be adopted whole is audited (`adopt`, outcome failed:...) and reaped. Adoption is all or
nothing per run: the checks hold nothing of a run they refuse, and a failure while taking a
run that passed them (`_take`, TAKE_STAGES) either lets go of all it took before the run was
registered (reaped then like any run not adopted) or, once registered, kills it through the
kill path; both are `adopt failed:adopt_incomplete` with the stage and the error.

A docker run needs no descriptor: its container is the engine's (containerd's shim is its
init's parent, not the daemon), so it runs on across the restart, in the run's cgroup
(`cgroup_parent`) under the agents' parent, where the watchdog's kill reaches it like any
runc run's. Its output goes on into the engine's own bounded log of the run, which the
supervisor follows with timestamps: the old daemon stops following and records how far it
read (`output_since`), the next one reads on from there (supervisor/runtime/engine_log.py:
nothing lost or doubled while the engine still has the last line read). The next daemon
adopts it if the engine names the same running init and that pid is in the run's cgroup;
the exit status of a container that ended meanwhile is the engine's (`docker inspect`),
taken as the run's own only when the kernel says its cgroup is empty
(DockerRuntime.adoptable). An engine that does not answer at the adoption, a container
gone, a cgroup gone: not adopted, reaped through the cgroup (fail closed).

A run behind the egress gateway keeps its veth, nft table, address, port and token (what the
agent holds in HTTP_PROXY); the gateway worker does not survive the restart. Its gate closes in
the old worker, whose counts go into the record (with the token: the record travels only over
root-only sockets, and the copy on disk leaves the token out; no secret is ever in it), and the
next daemon's worker listens at the same address with those counts carried on and the route
secrets read again from its own configuration (EgressControl.hand_over and .adopt). A gateway
session that cannot be restored fails the run's adoption: it is reaped, audited with why.

A gateway run's stdio MCP servers outlive the old worker: they run in sandboxes and cgroups of
their own beside the run's (under the agents' parent, so the watchdog's kill takes them with
the agents), and the daemon's end of each one's socketpair goes to the watchdog with the run's
other descriptors and on to the next daemon, whose worker bridges to them. A call in flight at
the handover is answered with a JSON-RPC error (`supervisor_restarting`, retryable) and
cancelled at the server; the MCP call counters, remote sessions and audit counts go on
(EgressControl.hand_over and .adopt, supervisor/mcp/gateway.py). A server that is gone or not
the one the record names fails the run's adoption (reaped, audited, servers with it).

Both sides are here: `hand_over` (the daemon that stops) and `adopt` (the one that starts)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from supervisor.config import normal_parent
from supervisor.daemon import ending
from supervisor.daemon.liverun import SYSTEM, LiveRun
from supervisor.daemon.store import RunRecord
from supervisor.daemon.watchdog import ADOPTED, GIVE_TIMEOUT, RECORD_MAX, receive_fds
from supervisor.egress.grant import carried_from_wire
from supervisor.errors import SupervisorError
from supervisor.models.mcp import MAX_STDIO_SERVERS
from supervisor.models.tripwire import TripwireRule
from supervisor.profiles import Profile, load_profile
from supervisor.runtime.base import NotAdopted, RunParams
from supervisor.runtime.engine_log import LogCursor
from supervisor.runtime.output import OUTPUT_FINISH_TIMEOUT, OutputRecorder
from supervisor.runtime.sandboxed import RuncRunHandle, RuncRuntime
from supervisor.sandbox import proc_exits
from supervisor.sandbox.cgroups import Cgroup
from supervisor.sandbox.fdpass import peer_credentials
from supervisor.sandbox.proc_exits import Exit, ExitEvents
from supervisor.states import (
    AgentState,
    EndCause,
    IllegalTransitionError,
    RunState,
    Verb,
    agent_at_end,
    run_end,
)
from supervisor.telemetry.sampler import CARRIED_WINDOW_BYTES

if TYPE_CHECKING:
    from supervisor.config import Config
    from supervisor.daemon.core import Core
    from supervisor.daemon.egress import RunNetwork
    from supervisor.runtime.containerized import DockerRunHandle, DockerRuntime
    from supervisor.runtime.docker_api import OutputStream

log = logging.getLogger(__name__)

VERSION = 1
# The telemetry samples of every run in a record together (a run carries at most
# CARRIED_WINDOW_BYTES of them): a quarter of watchdog.RECORD_MAX, which the rest of the record
# of the most runs a daemon may hold (sandbox.max_runs) leaves free.
CARRIED_WINDOWS_TOTAL = RECORD_MAX // 4
_HANDED = frozenset({RunState.RUNNING.value, RunState.PAUSED.value})


def socket_path(config: Config) -> Path:
    return config.daemon.runtime_dir / "handover.sock"


def record_path(config: Config) -> Path:
    return config.daemon.state_dir / "handover.json"


def handed_parent(config: Config) -> str | None:
    """The runs' parent named by a handover waiting for this start (None: none, or its
    record is unreadable: root's alone)."""
    try:
        record = json.loads(record_path(config).read_text())
    except (OSError, ValueError):
        return None
    parent = record.get("cgroup_parent") if isinstance(record, dict) else None
    return normal_parent(parent) if isinstance(parent, str) and parent.strip("/") else None


def why_not(live: LiveRun) -> str | None:
    """Why a run cannot be handed over whole; None when it can."""
    if live.ending is not None:
        return f"it is ending ({live.ending.value})"
    if live.record.state not in _HANDED:
        return f"it is {live.record.state}"
    if not isinstance(live.handle, RuncRunHandle) and _docker(live.handle) is None:
        return "it has no runtime handle"
    return None


def _docker(handle: object) -> DockerRunHandle | None:
    """`handle` if it is a docker run's (containerized.py is imported only where docker is
    enabled, so with it not loaded there is none)."""
    module = sys.modules.get("supervisor.runtime.containerized")
    if module is not None and isinstance(handle, module.DockerRunHandle):
        return handle  # type: ignore[no-any-return]
    return None


def _handed(live: LiveRun) -> RuncRunHandle | DockerRunHandle:
    """The handle of a run `why_not` lets go."""
    docker = _docker(live.handle)
    if docker is not None:
        return docker
    assert isinstance(live.handle, RuncRunHandle)
    return live.handle


def _docker_runtime(core: Core) -> DockerRuntime:
    module = sys.modules.get("supervisor.runtime.containerized")
    docker = core.runtime.runtimes.get("docker")
    if module is None or not isinstance(docker, module.DockerRuntime):
        raise NotAdopted("runtime_missing", "this daemon has no docker runtime")
    return docker  # type: ignore[no-any-return]


def _behind_gateway(live: LiveRun) -> bool:
    return live.profile is not None and live.profile.network.mode == "gateway"


def _gateway_refusal(core: Core, live: LiveRun) -> str | None:
    """Why a run behind the egress gateway cannot take its gateway session along."""
    if not _behind_gateway(live):
        return None
    if core.egress is None:
        return "this daemon has no egress gateway"
    return core.egress.handover_refusal(live.record.id)


async def hand_over(core: Core, reason: str) -> dict[str, Any]:
    """Give every run that can go whole to the watchdog and leave it running; kill the rest
    through the kill path. The control socket and break-glass have stopped already (the
    watchdog's break-glass takes over). Returns the `daemon_handover` row's detail. Any
    failure on the way kills whatever is left through the kill path (fail closed)."""
    arbiter, config = core.arbiter, core.config
    arbiter.shutting_down = True
    unsafe = core.watchdog.cannot_hold()
    if unsafe is not None:
        # It would die with this daemon's unit and leave the agents with no killer.
        log.critical("no handover: %s; killing every run instead", unsafe)
        refused = {run_id: f"the watchdog cannot hold them: {unsafe}"
                   for run_id in arbiter.live}
        await _kill(core, list(refused), f"{reason}: not handed over ({unsafe})")
        return {"window_s": config.daemon.adopt_window, "refused": unsafe, "runs": [],
                "killed": refused}
    refused = {run_id: why for run_id, live in arbiter.live.items()
               if (why := why_not(live) or _gateway_refusal(core, live)) is not None}
    if refused:
        await _kill(core, list(refused), f"{reason}: not handed over")
    keep = [live for live in arbiter.live.values() if live.record.id not in refused]
    # Subscribed before any run's exit stops being watched here: an init that exits from now
    # on (its status lost to whoever reaps it) is in this socket's buffer for the next daemon.
    exits, exits_note = _exit_events(
        [live.handle.pid for live in keep if live.handle is not None and live.handle.pid]
    ) if keep else (None, None)
    fds: list[int] = []
    runs: list[dict[str, Any]] = []
    for live in keep:
        handle = _handed(live)
        gateway: dict[str, Any] | None = None
        stdio_fds: list[int] = []
        if _behind_gateway(live):
            # Its gate closes in this daemon's worker (the next daemon's listens at the same
            # address with the same token); the counts it answers with go in the record,
            # and its stdio MCP servers' ends with the descriptors.
            assert core.egress is not None
            try:
                gateway, stdio_fds = await core.egress.hand_over(live.record.id)
            except SupervisorError as exc:
                refused[live.record.id] = f"its gateway session: {exc.message}"
                continue
        if live.watcher is not None:
            live.watcher.cancel()
        if live.timeout_handle is not None:
            live.timeout_handle.cancel()
        pipe: int | None = None
        if not isinstance(handle, RuncRunHandle):  # docker: the engine keeps the output
            source = await handle.hand_over(OUTPUT_FINISH_TIMEOUT)
        else:
            pipe = await handle.output.hand_over(OUTPUT_FINISH_TIMEOUT)
            source = None if pipe is None else {"output_fd": len(fds)}
        if source is None:
            refused[live.record.id] = "its output drain did not stop"
            for fd in stdio_fds:
                os.close(fd)
            continue
        if gateway is not None and "mcp" in gateway:
            for index, server in enumerate(gateway["mcp"]["stdio"]):
                # after the output pipe's (a docker run hands over none)
                server["fd"] = len(fds) + (pipe is not None) + index
        runs.append({"run_id": live.record.id, "agent": live.record.agent,
                     "container_id": live.record.container_id, "pid": handle.pid,
                     **source, "produced": handle.output.produced,
                     "recorded": handle.output.recorded, "seccomp_fds": [],
                     "tripwires": [t.model_dump(mode="json") for t in live.tripwires],
                     **({"gateway": gateway} if gateway is not None else {})})
        if pipe is not None:
            fds.append(pipe)
        fds += stdio_fds
    handed = {entry["container_id"]: entry for entry in runs}
    if core.seccomp is not None:
        for container_id, kept in (await core.seccomp.stop(keep=list(handed))).items():
            handed[container_id]["seccomp_fds"] = list(range(len(fds), len(fds) + len(kept)))
            fds += kept
    # Each run's newest telemetry samples, within a share of the record's bound.
    window_bytes = min(CARRIED_WINDOW_BYTES, CARRIED_WINDOWS_TOTAL // max(1, len(runs)))
    for entry in runs:
        # After the listener's last counts are in (its stop hands them over): the windows
        # and counters the next daemon goes on with, so no tripwire starts again from zero
        # and `agentctl telemetry` shows the samples from before the restart.
        entry["carried"] = {"telemetry": core.telemetry.carry(entry["run_id"], window_bytes),
                            "containment": core.containment.carry(entry["run_id"])}
    exits_fd: int | None = None
    if exits is not None:
        if runs:
            exits_fd = len(fds)
            fds.append(exits.detach())
        else:
            exits.close()
    path = socket_path(config)
    message = {"version": VERSION, "from_pid": os.getpid(), "ts": time.time(),
               "window": config.daemon.adopt_window, "halt_file": str(config.halt_file),
               "cgroup_parent": config.sandbox.cgroup_parent,
               "socket": str(path), "runs": runs, "exits_fd": exits_fd,
               "exits_note": exits_note}
    listener: socket.socket | None = None
    try:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        listener.bind(str(path))
        path.chmod(0o600)
        listener.listen(4)
        _write_record(record_path(config), message)
        core.watchdog.hand_over(message, listener, fds)
    except OSError as exc:
        log.critical("the handover failed (%s): killing the runs instead", exc)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        record_path(config).unlink(missing_ok=True)
        refused.update({entry["run_id"]: f"the handover failed: {exc}" for entry in runs})
        runs = []
    finally:
        if listener is not None:
            listener.close()
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)
    late = [run_id for run_id in refused if run_id in arbiter.live]
    if late:
        await _kill(core, late, f"{reason}: not handed over")
    for entry in runs:
        _handed(arbiter.live.pop(entry["run_id"])).release()
    detail = {"window_s": config.daemon.adopt_window, "socket": str(path),
              "runs": [{k: entry[k] for k in ("run_id", "agent", "pid", "produced", "recorded")}
                       | {"seccomp_fds": len(entry["seccomp_fds"]),
                          "tripwires": entry["carried"]["containment"].get("tripwires")}
                       | ({"gateway": _gateway_summary(entry["gateway"])}
                          if "gateway" in entry else {}) for entry in runs],
              "killed": refused, "exit_events": exits_note or "handed over"}
    log.warning("handed %d run(s) over to the watchdog (adopt_window %g s); killed %d",
                len(runs), config.daemon.adopt_window, len(refused))
    return detail


async def _kill(core: Core, run_ids: list[str], reason: str) -> None:
    arbiter = core.arbiter
    agents = [arbiter.agents[arbiter.live[r].record.agent] for r in run_ids if r in arbiter.live]
    for result in await arbiter._kill(agents, SYSTEM, reason, "global", verb="shutdown",
                                      agent_verb=Verb.SHUTDOWN, cause=EndCause.SHUTDOWN):
        if isinstance(result, SupervisorError):
            log.critical("kill at handover failed: %s", result.message)


def _exit_events(pids: list[int]) -> tuple[socket.socket | None, str | None]:
    """The process exit socket to hand over, filtered to the inits of `pids`, or None and why
    not (the runs are handed over all the same: only their exit statuses would be unknown)."""
    try:
        return proc_exits.open_socket(pids), None
    except OSError as exc:
        note = f"no process exit events (proc connector: {exc.strerror or exc})"
        log.error("%s: the adopted runs' exit statuses come from their inits' pidfds (Linux "
                  "6.15+; unknown before)", note)
        return None, note


def _gateway_summary(gateway: dict[str, Any]) -> dict[str, Any]:
    """A gateway entry of the record as the audit shows it: no token."""
    mcp = gateway.get("mcp")
    return {"address": f"{gateway['host_ip']}:{gateway['port']}",
            "token_expires_at": gateway["expires_at"], "usage": gateway["usage"],
            "breaker": gateway["breaker"], "budget_fired": gateway["budget_fired"],
            **({"mcp": _mcp_summary(mcp)} if isinstance(mcp, dict) else {})}


def _mcp_summary(mcp: dict[str, Any]) -> dict[str, Any]:
    """A handed-over run's MCP state as the audit shows it: calls and cost, its stdio
    servers (name, container, pid); no session id."""
    gateway = mcp.get("gateway")
    carried: dict[str, Any] = gateway if isinstance(gateway, dict) else {}
    return {"calls": carried.get("calls", 0), "cost": carried.get("cost", 0.0),
            "remote_sessions": len(carried.get("sessions") or []),
            "stdio_servers": [{k: server.get(k) for k in ("name", "container_id", "pid")}
                              for server in mcp.get("stdio") or [] if isinstance(server, dict)]}


def _write_record(path: Path, message: dict[str, Any]) -> None:
    """The record on disk (root-only, for an operator who looks), without the gateway
    tokens and MCP session ids: those go only over the watchdog's socketpair and the
    root-only handover socket."""
    shown = {**message, "runs": [
        {**entry, "gateway": _shown_gateway(entry["gateway"])}
        if "gateway" in entry else entry for entry in message["runs"]]}
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump(shown, handle)
    os.rename(tmp, path)


def _shown_gateway(gateway: dict[str, Any]) -> dict[str, Any]:
    shown = {k: v for k, v in gateway.items() if k != "token"}
    mcp = gateway.get("mcp")
    if isinstance(mcp, dict) and isinstance(mcp.get("gateway"), dict):
        sessions = mcp["gateway"].get("sessions") or []
        shown["mcp"] = {**mcp, "gateway": {**mcp["gateway"],
                                           "sessions": f"{len(sessions)} (ids withheld)"}}
    return shown


# --------------------------------------------------------------------------- the next daemon


@dataclass
class Adoption:
    """What a start found of a handover: runs adopted, runs not adopted (with why)."""

    adopted: list[str] = field(default_factory=list)
    failed: dict[str, dict[str, str]] = field(default_factory=dict)
    from_pid: int | None = None
    # The `adopt` rows (agent, outcome, detail), appended by `audit` after daemon_start.
    rows: list[tuple[str, str, dict[str, Any]]] = field(default_factory=list)
    # Runs whose init exited while no daemon held them: `exit` rows (agent, previous state,
    # new state, detail).
    exited: list[tuple[str, str, str, dict[str, Any]]] = field(default_factory=list)
    exit_events: str = "none handed over"

    def audit(self, core: Core) -> None:
        for agent, outcome, detail in self.rows:
            core.audit.append(actor=SYSTEM.label(), verb="adopt", scope=f"agent:{agent}",
                              target=agent, outcome=outcome, detail=detail,
                              reason="handed over by the previous daemon at a restart")
        for agent, previous, new, detail in self.exited:
            core.audit.append(actor=SYSTEM.label(), verb="exit", scope=f"agent:{agent}",
                              target=agent, previous_state=previous, new_state=new,
                              detail=detail, reason="exited while no daemon held it")
        core.audit.append(actor=SYSTEM.label(), verb="daemon_adopt", scope="global",
                          outcome="ok" if not self.failed else "partial",
                          detail={"from_pid": self.from_pid, "adopted": self.adopted,
                                  "failed": self.failed, "exit_events": self.exit_events})


async def adopt(core: Core) -> Adoption | None:
    """Before this daemon serves: take the runs the previous one handed over from its
    watchdog, and adopt each whole or not at all (those not adopted are left to reconcile,
    which kills and audits them). None when there was no handover to take."""
    config = core.config
    path = socket_path(config)
    record = record_path(config)
    if not path.exists():
        record.unlink(missing_ok=True)  # the window ended: the watchdog's record says so
        return None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.settimeout(GIVE_TIMEOUT)
    try:
        try:
            await asyncio.to_thread(sock.connect, str(path))
            # The listening socket's credentials are those of the process that called
            # listen(): the daemon that handed over, which the record names.
            pid, uid = peer_credentials(sock)
            if uid != 0:
                raise ValueError(f"not made by root (uid {uid})")
            message, fds = await asyncio.to_thread(receive_fds, sock, "record", GIVE_TIMEOUT)
            handover = message.get("record")
            try:
                if not isinstance(handover, dict) or handover.get("from_pid") != pid:
                    raise ValueError(f"the record is not that of the daemon that made the "
                                     f"socket (pid {pid})")
                # Named before the watchdog's absence, which a changed parent also causes:
                # this daemon looks for it in its own parent's -watchdog sibling.
                handed = normal_parent(str(handover.get("cgroup_parent",
                                                        config.sandbox.cgroup_parent)))
                if handed != config.sandbox.cgroup_parent:
                    raise ValueError(
                        f"the previous daemon's runs live under [sandbox] cgroup_parent "
                        f"{handed!r} and this daemon's is "
                        f"{config.sandbox.cgroup_parent!r}: a changed cgroup_parent does not "
                        f"take them (set it back and restart within the adopt window to keep "
                        f"them; runbook, \"Changing cgroup_parent\")")
                if not core.watchdog.previous():
                    raise ValueError(f"no watchdog of an earlier daemon is running in "
                                     f"{core.watchdog.cgroup.path}")
                check_record(handover, len(fds))
            except ValueError:
                for fd in fds:
                    os.close(fd)
                raise
        except (OSError, ValueError) as exc:
            log.critical("no handover taken from %s: %s (its runs are reaped)", path, exc)
            return None
        # From here on the descriptors are this daemon's: what it cannot adopt, it kills.
        with contextlib.suppress(OSError):
            sock.send(ADOPTED)
    finally:
        sock.close()
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        record.unlink(missing_ok=True)
    result = Adoption()
    result.from_pid = handover["from_pid"]
    used: set[int] = set()
    exits, result.exit_events = _take_exit_events(handover, fds, used)
    for entry in handover["runs"]:
        mine = [*_output_fd(entry), *entry["seccomp_fds"]]
        used.update(mine)
        # The stdio MCP servers' ends: the gateway's adoption duplicates what it takes.
        used.update(stdio := _stdio_fds(entry))
        run_id = entry["run_id"]
        try:
            try:
                detail = await _adopt_run(core, entry, fds, exits, result.exit_events)
            except NotAdopted:
                raise
            except Exception as exc:  # one bad entry must not take the others with it
                log.exception("adopting run %s failed", run_id)
                raise NotAdopted("malformed", f"{type(exc).__name__}: {exc}") from exc
            finally:
                for index in stdio:
                    with contextlib.suppress(OSError):
                        os.close(fds[index])
        except NotAdopted as exc:
            # Those still this daemon's: one the run's output or the seccomp listener took
            # (a run adopted only in part, then killed) is -1, closed by whoever took it.
            for fd in (fds[i] for i in mine if fds[i] >= 0):
                with contextlib.suppress(OSError):
                    os.close(fd)
            row = {"run": run_id, "error": str(exc)}
            # Gone before this daemon could take it: its exit waits in the socket (a docker
            # run's: the engine's word first). Only an init that ended in its own cgroup
            # ended by itself; a cgroup gone or changed is someone else's doing, reaped and
            # held like any leftover (the code is only noted).
            status = Exit(exc.exit_code) if exc.exit_code is not None else None
            if exits is not None:
                status = status or exits.exited(entry["pid"])
                exits.forget(entry["pid"])
            if status is not None:
                row["exit_code"] = status.code
                if exc.code in _ENDED_BY_ITSELF:
                    _ended_meanwhile(core, run_id, status, result)
            result.failed[run_id] = {"code": exc.code, "message": str(exc)}
            result.rows.append((entry["agent"], f"failed:{exc.code}", row))
            log.error("run %s not adopted: %s", run_id, exc)
            continue
        result.adopted.append(run_id)
        result.rows.append((entry["agent"], "ok", detail))
    for index, fd in enumerate(fds):
        if index not in used:
            with contextlib.suppress(OSError):
                os.close(fd)
    return result


# An init gone from a cgroup that is still there: whichever check noticed first (the cgroup
# empty, runc's state no longer running, the pid gone), the run ended as a launched run would.
_ENDED_BY_ITSELF = frozenset({"no_processes", "runtime_state", "init_gone"})


def _take_exit_events(handover: dict[str, Any], fds: list[int], used: set[int]
                      ) -> tuple[ExitEvents | None, str]:
    """The process exit socket the previous daemon opened before it stopped watching its
    runs, watching every handed-over init before anything is read from it (an exit already
    queued is kept); None and why when there is none."""
    index = handover.get("exits_fd")
    if index is None:
        return None, str(handover.get("exits_note") or "none handed over")
    used.add(index)
    try:
        exits = ExitEvents.from_fd(fds[index])
    except (OSError, ValueError) as exc:
        log.error("the process exit socket handed over is unusable: %s", exc)
        return None, f"the socket handed over is unusable: {exc}"
    exits.watch(*(entry["pid"] for entry in handover["runs"]))
    exits.start()
    return exits, "handed over"


def _ended_meanwhile(core: Core, run_id: str, status: Exit, result: Adoption) -> bool:
    """Record a run whose init exited while no daemon held it as exited with its status (the
    rest of it is reaped by reconcile like any leftover). False if it cannot end that way."""
    run = core.store.run(run_id)
    if run is None or run.ended_at is not None:
        return False
    try:
        run.state = run_end(RunState(run.state), EndCause.EXITED).value
    except (IllegalTransitionError, ValueError):
        return False
    run.end_cause = EndCause.EXITED.value
    run.end_reason = "exited while no daemon held it (handed over at a restart)"
    run.exit_code = status.code
    run.ended_at = time.time()
    core.store.put_run(run)
    agent = core.arbiter.agents.get(run.agent)
    previous = new = ""
    if agent is not None and agent.current_run == run.id:
        previous = agent.state
        agent.current_run = None
        agent.last_run = run.id
        agent.state = agent_at_end(AgentState(agent.state), EndCause.EXITED).value
        agent.updated_at = time.time()
        core.store.put_agent(agent)
        new = agent.state
    result.exited.append((run.agent, previous, new, {
        "run": run.id, "exit_code": status.code, "cause": EndCause.EXITED.value,
        **({"exit_status": f"unknown: {status.why}"} if status.code is None else {})}))
    return True


# What each handed-over run must carry, and of what type (bool is no int here).
_RUN_KEYS: dict[str, type] = {"run_id": str, "agent": str, "container_id": str, "pid": int,
                              "output_fd": int, "produced": int, "recorded": int,
                              "seccomp_fds": list, "tripwires": list}


# A gateway run's entry (EgressControl.hand_over), when there is one.
_GATEWAY_KEYS: dict[str, tuple[type, ...]] = {
    "ifname": (str,), "table": (str,), "host_ip": (str,), "sandbox_ip": (str,),
    "prefixlen": (int,), "port": (int,), "token": (str,), "expires_at": (int, float),
    "usage": (dict,), "breaker": (str, type(None)), "budget_fired": (bool,),
    "denials": (dict,), "denial_rows": (int,)}


def _check_runtime(entry: dict[str, Any], n: int) -> bool:
    """Whether the entry is a docker run's (ValueError unless it is runc's or docker's, and a
    docker run's has its `output_since` and no descriptor: the engine keeps its output)."""
    runtime = entry.get("runtime", "runc")
    if runtime not in ("runc", "docker"):
        raise ValueError(f"run {n} of the record: runtime {runtime!r} is not runc or docker")
    if runtime == "runc":
        return False
    if "output_fd" in entry or entry.get("seccomp_fds") != []:
        raise ValueError(f"run {n} of the record: a docker run hands over no descriptor")
    LogCursor.from_wire(entry.get("output_since"))
    return True


def _output_fd(entry: dict[str, Any]) -> list[Any]:
    """The index of the run's output pipe, if it handed one over (runc's; not docker's)."""
    return [] if entry.get("runtime", "runc") == "docker" else [entry["output_fd"]]


def check_record(handover: dict[str, Any], nfds: int) -> None:
    """ValueError unless the record is of this version and every run in it has the keys and
    types `hand_over` writes, with descriptor indexes among the `nfds` received, each owned
    by one run. Checked before the watchdog is told ADOPTED: a record this daemon cannot read
    stays the watchdog's (it kills at the end of the window)."""
    if handover.get("version") != VERSION:
        raise ValueError(f"a handover of version {handover.get('version')!r}, not {VERSION}")
    runs = handover.get("runs")
    if not isinstance(runs, list):
        raise ValueError("the record's runs are not a list")
    seen: set[int] = set()
    for n, entry in enumerate(runs):
        if not isinstance(entry, dict):
            raise ValueError(f"run {n} of the record is not an object")
        docker = _check_runtime(entry, n)
        for key, kind in _RUN_KEYS.items():
            value = entry.get(key)
            if docker and key == "output_fd":
                continue
            if not isinstance(value, kind) or isinstance(value, bool):
                raise ValueError(f"run {n} of the record: {key} is not a {kind.__name__}")
        gateway = entry.get("gateway")
        if gateway is not None:
            if not isinstance(gateway, dict):
                raise ValueError(f"run {n} of the record: gateway is not an object")
            for key, kinds in _GATEWAY_KEYS.items():
                value = gateway.get(key)
                if not isinstance(value, kinds) or (isinstance(value, bool)
                                                    and bool not in kinds):
                    raise ValueError(f"run {n} of the record: gateway {key} is not of its type")
        indexes = [*_output_fd(entry), *entry["seccomp_fds"], *_stdio_fds(entry, n)]
        for index in indexes:
            if not isinstance(index, int) or isinstance(index, bool) \
                    or not 0 <= index < nfds or index in seen:
                raise ValueError(f"run {n} of the record: descriptor index {index!r} is not "
                                 f"one of the {nfds} received, or not its own")
            seen.add(index)
    exits_fd = handover.get("exits_fd")
    if exits_fd is not None and (not isinstance(exits_fd, int) or isinstance(exits_fd, bool)
                                 or not 0 <= exits_fd < nfds or exits_fd in seen):
        raise ValueError(f"the record's exits_fd {exits_fd!r} is not one of the {nfds} "
                         f"descriptors received, or not its own")


def _stdio_fds(entry: dict[str, Any], n: int = 0) -> list[int]:
    """The descriptor indexes of a run's stdio MCP servers' ends (ValueError unless its
    gateway entry's `mcp.stdio` is a list of at most MAX_STDIO_SERVERS objects, each with
    one)."""
    gateway = entry.get("gateway")
    mcp = gateway.get("mcp") if isinstance(gateway, dict) else None
    if mcp is None:
        return []
    stdio = mcp.get("stdio") if isinstance(mcp, dict) else None
    if not isinstance(stdio, list) or len(stdio) > MAX_STDIO_SERVERS \
            or not all(isinstance(server, dict) for server in stdio):
        raise ValueError(f"run {n} of the record: gateway mcp.stdio is not a list of at most "
                         f"{MAX_STDIO_SERVERS} servers")
    return [server.get("fd") for server in stdio]


@dataclass
class _Claim:
    """What the checks of a handed-over run found whole and took hold of: its init's pidfd,
    its held cgroup, a docker run's log stream, a gateway run's restored session. `_take`
    makes it this daemon's run, or lets go of all of it."""

    run: RunRecord
    profile: Profile
    tripwires: list[TripwireRule]
    runtime: str
    runtime_state: str
    pid: int
    pidfd: int
    cgroup: Cgroup
    cursor: LogCursor
    output_fd: int | None = None  # the index of a runc run's output pipe among the fds
    runc: RuncRuntime | None = None
    docker: DockerRuntime | None = None
    stream: OutputStream | None = None
    network: RunNetwork | None = None


# A failure after the checks, at any of these stages of `_take`, leaves no run half adopted:
# before the run is registered (output, handle) what was taken is let go and the run is reaped
# as one not adopted; from its registration on it is killed through the kill path.
TAKE_STAGES = ("output", "handle", "register", "seccomp", "telemetry", "tripwires",
               "containment", "exit watch", "timeout", "account")


async def _adopt_run(core: Core, entry: dict[str, Any], fds: list[int],
                     exits: ExitEvents | None, exits_note: str) -> dict[str, Any]:
    """Check the run is whole, then take it: runtime state, cgroup, init pidfd, output,
    seccomp fds, observers, exit watching, the execution window. NotAdopted if any part is
    missing (nothing of it is registered then) or if taking it failed part way (then it is
    killed through the kill path, `adopt_incomplete` with the stage and the error). A
    descriptor this daemon took into a run's output or seccomp listener is set to -1 in
    `fds`: the caller closes only those still its own."""
    claim = await _claim(core, entry, fds)
    return await _take(core, claim, entry, fds, exits, exits_note)


async def _claim(core: Core, entry: dict[str, Any], fds: list[int]) -> _Claim:
    """The checks: NotAdopted unless every part of the run is there; nothing is held then."""
    arbiter, config = core.arbiter, core.config
    run_id = str(entry.get("run_id"))
    run = core.store.run(run_id)
    if run is None or run.ended_at is not None or run.container_id != entry.get("container_id"):
        raise NotAdopted("unknown_run", f"run {run_id} is not a running run of this host")
    agent = arbiter.agents.get(run.agent)
    if agent is None or agent.current_run != run.id:
        raise NotAdopted("unknown_run", f"agent {run.agent} does not hold run {run_id}")
    cgroup = Cgroup(run.cgroup)
    pid = entry.get("pid")
    runtime = str(entry.get("runtime", "runc"))
    docker: DockerRuntime | None = None
    if runtime == "docker":  # the engine first: a container that ended says with what
        docker = _docker_runtime(core)
        runtime_state = await docker.adoptable(run.container_id, int(pid or 0), cgroup)
    if not cgroup.exists():
        raise NotAdopted("cgroup_missing", f"its cgroup {cgroup.path} is gone")
    if not cgroup.populated():
        raise NotAdopted("no_processes", f"its cgroup {cgroup.path} is empty")
    runc = core.runtime.runtimes.get("runc")
    if docker is None:
        if not isinstance(runc, RuncRuntime):
            raise NotAdopted("runtime_missing", "this daemon has no runc runtime")
        state = await runc.runc.state(run.container_id)
        if state is None or state.status not in ("running", "paused"):
            raise NotAdopted("runtime_state", f"runc state of {run.container_id}: "
                             f"{state.status if state else 'none'}")
        if state.pid != pid or not isinstance(pid, int):
            raise NotAdopted("init_changed",
                             f"runc names init pid {state.pid}, the handover {pid}")
        runtime_state = state.status
    assert isinstance(pid, int)
    try:
        pidfd = os.pidfd_open(pid)
    except OSError as exc:
        raise NotAdopted("init_gone", f"init pid {pid}: {exc.strerror}") from exc
    stream = None
    try:
        if pid not in cgroup.pids():  # held by pidfd now: a reused pid would be elsewhere
            raise NotAdopted("init_changed", f"pid {pid} is not in {cgroup.path}")
        try:
            profile = load_profile(run.profile, config.daemon.profile_dirs)
            tripwires = [TripwireRule.model_validate(t) for t in entry.get("tripwires", [])]
        except (SupervisorError, ValueError) as exc:
            raise NotAdopted("profile_invalid", f"profile {run.profile}: {exc}") from exc
        behind_gateway = profile.network.mode == "gateway"
        if profile.runtime not in (None, runtime) or behind_gateway != ("gateway" in entry):
            raise NotAdopted("profile_changed", f"profile {run.profile} no longer describes "
                             f"a {runtime} run {'with' if 'gateway' in entry else 'without'} "
                             f"the egress gateway")
        cursor = LogCursor.from_wire(entry.get("output_since"))
        output_fd = entry.get("output_fd")
        if docker is not None:
            try:
                stream = await docker.open_log(run.container_id, cursor)
            except SupervisorError as exc:
                raise NotAdopted("output_missing", f"the engine's log: {exc.message}") from exc
        elif not isinstance(output_fd, int) or not 0 <= output_fd < len(fds):
            raise NotAdopted("output_missing", "no output pipe was handed over")
        try:
            cgroup.hold()
        except OSError as exc:
            raise NotAdopted("cgroup_unheld", f"cannot hold {cgroup.path}: {exc}") from exc
        try:
            network = await _adopt_gateway(core, run, profile, entry, fds) \
                if behind_gateway else None
        except BaseException:
            cgroup.release()
            raise
    except BaseException:
        os.close(pidfd)
        if stream is not None:
            stream.close()
        raise
    return _Claim(run=run, profile=profile, tripwires=tripwires, runtime=runtime,
                  runtime_state=runtime_state, pid=pid, pidfd=pidfd, cgroup=cgroup,
                  cursor=cursor, output_fd=output_fd if docker is None else None,
                  runc=runc if isinstance(runc, RuncRuntime) and docker is None else None,
                  docker=docker, stream=stream,
                  network=network)


async def _take(core: Core, claim: _Claim, entry: dict[str, Any], fds: list[int],
                exits: ExitEvents | None, exits_note: str) -> dict[str, Any]:
    """Make the claimed run this daemon's, all of it or none (TAKE_STAGES)."""
    arbiter, run, pid, docker = core.arbiter, claim.run, claim.pid, claim.docker
    stage = TAKE_STAGES[0]
    output: OutputRecorder | None = None
    handle: RuncRunHandle | DockerRunHandle | None = None
    live: LiveRun | None = None
    try:
        output = core.outputs.resume(run.id, Path(run.log_path), claim.profile,
                                     None if docker is not None else fds[int(claim.output_fd
                                                                              or 0)],
                                     int(entry.get("produced", 0)),
                                     int(entry.get("recorded", 0)))
        if claim.output_fd is not None:
            fds[claim.output_fd] = -1  # the recorder's: it closes it when the drain ends
        stage = "handle"
        params = RunParams(
            run_id=run.id, agent=run.agent, container_id=run.container_id, netns=run.netns,
            cgroup=run.cgroup, bundle=Path(run.bundle), log_path=Path(run.log_path),
            profile=claim.profile, command=run.command, uid_slot=run.uid_slot,
            workspace=run.workspace, network=claim.network, runtime=claim.runtime)
        if docker is not None:
            assert claim.stream is not None
            handle = docker.adopted(params, pid, claim.pidfd, output, claim.cursor,
                                    claim.stream)
            handle.cgroup = claim.cgroup
            if exits is not None:
                exits.forget(pid)  # its status is the engine's (DockerRunHandle.wait_exit)
            exit_status = "from the engine once its init's pidfd says it ended"
        else:
            assert isinstance(claim.runc, RuncRuntime)
            handle = RuncRunHandle(claim.runc, params, pid, claim.pidfd, output)
            handle.cgroup = claim.cgroup
            handle.exits = exits
            if exits is None:
                handle.exit_unknown = (f"the previous daemon handed over no exit events: "
                                       f"{exits_note}")
            exit_status = "from the kernel's process exit events" if exits is not None \
                else f"from its init's pidfd ({handle.exit_unknown})"
        stage = "register"
        registered = LiveRun(record=run, handle=handle, profile=claim.profile,
                             tripwires=claim.tripwires, adopted=True)
        registered.ready.set()
        arbiter.live[run.id] = live = registered  # from here on the kill path can end it
        stage = "seccomp"
        seccomp = 0
        if core.seccomp is not None:
            for index in entry.get("seccomp_fds", []):
                with contextlib.suppress(ValueError, IndexError, TypeError):
                    core.seccomp.adopt(run.container_id, fds[index], pid)
                    fds[index] = -1  # the listener's now
                    seccomp += 1
        stage = "telemetry"
        carried = entry.get("carried")
        carried = carried if isinstance(carried, dict) else {}
        if isinstance(carried.get("telemetry"), dict):
            core.telemetry.expect(run.id, carried["telemetry"])
        stage = "tripwires"
        arbiter.observers.run_started(run)  # tripwires armed, then telemetry
        arbiter.index_run(live)
        stage = "containment"
        if isinstance(carried.get("containment"), dict):
            core.containment.restore(run.id, carried["containment"])
        stage = "exit watch"
        watching = ending.watch(arbiter, live)
        try:
            live.watcher = arbiter._spawn(watching)
        except BaseException:
            watching.close()  # never started: no coroutine left unawaited
            raise
        stage = "timeout"
        left: float | None = None
        if run.timeout is not None:
            left = max(0.0, run.started_at + run.timeout - time.time())
            ending_live = live
            live.timeout_handle = asyncio.get_running_loop().call_later(
                left, lambda: arbiter._spawn(ending.expire(arbiter, ending_live,
                                                           time.perf_counter())))
        stage = "account"
        detail = _adopted_detail(claim, entry, output, seccomp, left, carried, exit_status)
    except Exception as exc:
        why = f"{stage}: {type(exc).__name__}: {exc}"
        log.exception("run %s adopted only in part (at %s)", run.id, stage)
        if live is None:
            await _let_go(core, claim, output, handle)
            raise NotAdopted("adopt_incomplete", f"not adopted: taking it failed at {why}; "
                             f"let go whole, reaped as a run not adopted") from exc
        await _kill_part_adopted(core, live, why)
        raise NotAdopted("adopt_incomplete", f"adopted only in part (failed at {why}): "
                         f"killed through the kill path") from exc
    log.info("adopted agent %s run %s (pid %d)", run.agent, run.id, pid)
    return detail


def _adopted_detail(claim: _Claim, entry: dict[str, Any], output: OutputRecorder,
                    seccomp: int, left: float | None, carried: dict[str, Any],
                    exit_status: str) -> dict[str, Any]:
    """The `adopt` row's detail of a run taken whole."""
    run = claim.run
    return {"run": run.id, "pid": claim.pid, "container": run.container_id,
            "cgroup": run.cgroup, "runtime": claim.runtime,
            "runtime_state": claim.runtime_state,
            "output": {"produced": output.produced, "recorded": output.recorded,
                       **({"since": claim.cursor.as_wire()}
                          if claim.docker is not None else {})},
            "seccomp_fds": seccomp, "timeout_left_s": left,
            **({"gateway": _gateway_adopted(entry["gateway"])}
               if claim.network is not None else {}),
            "carried": {"telemetry": isinstance(carried.get("telemetry"), dict),
                        "tripwires": (carried.get("containment") or {}).get("tripwires")},
            "exit_status": exit_status}


async def _let_go(core: Core, claim: _Claim, output: OutputRecorder | None,
                  handle: RuncRunHandle | DockerRunHandle | None) -> None:
    """A run that failed before it was registered: give back all that its claim took, so
    that reconcile reaps it (killed through its cgroup, runtime state, network) as any run
    not adopted. Each step is tried whatever the one before did."""
    steps: list[tuple[str, Callable[[], object]]] = []
    if output is not None:
        steps.append(("output", output.abort))  # the drain ends, closing the pipe
    elif claim.stream is not None:
        steps.append(("log stream", claim.stream.close))
    if handle is not None:  # it holds the pidfd and the cgroup now
        steps.append(("handle", handle.release))
    else:
        steps.append(("pidfd", lambda: os.close(claim.pidfd)))
        steps.append(("cgroup", claim.cgroup.release))
    if claim.network is not None and core.egress is not None:
        egress = core.egress
        steps.append(("gateway session", lambda: egress.run_ended(claim.run.id)))
    for what, step in steps:
        try:
            result = step()
            if asyncio.iscoroutine(result):
                await result
        except Exception:
            log.exception("run %s: letting go of its %s failed", claim.run.id, what)


async def _kill_part_adopted(core: Core, live: LiveRun, why: str) -> None:
    """A run registered but not taken whole: killed through the kill path (its tokens
    revoked, its cgroup killed and confirmed empty, its network torn down, audited), then
    cleaned up, before reconcile looks at what is left."""
    run_id = live.record.id
    try:
        await _kill(core, [run_id], f"not adopted whole at the restart ({why})")
        with contextlib.suppress(TimeoutError):
            await core.arbiter.settled(run_id, 2 * core.config.kill.confirm_timeout)
    except Exception:
        # The run stays registered, its kill the arbiter's to finish: reconcile leaves a
        # registered run alone, and no other start can take it.
        log.exception("run %s: the kill of a run adopted only in part failed", run_id)


async def _adopt_gateway(core: Core, run: RunRecord, profile: Profile,
                         entry: dict[str, Any], fds: list[int]) -> RunNetwork:
    """The run's gateway session, restored by this daemon's worker (EgressControl.adopt), or
    NotAdopted: the run is then reaped (killed, audited) rather than left with a network no
    gateway answers on, or one whose secrets this daemon cannot read."""
    if core.egress is None:
        raise NotAdopted("gateway_not_restored", "this daemon has no egress gateway")
    gateway = entry["gateway"]
    try:
        # Checked here as the gateway worker checks it, before anything is taken.
        # (its MCP part: by EgressControl.adopt, which takes it apart)
        carried_from_wire({**gateway, "suspended": False, "mcp": None})
        return await core.egress.adopt(run, profile.network.gateway, gateway,
                                       [fds[i] for i in _stdio_fds(entry)])
    except SupervisorError as exc:
        raise NotAdopted("gateway_not_restored", exc.message) from exc
    except (KeyError, TypeError, ValueError) as exc:
        raise NotAdopted("gateway_not_restored", f"its gateway entry: {exc}") from exc


def _gateway_adopted(gateway: dict[str, Any]) -> dict[str, Any]:
    """The adopt row's account of the gateway session: what was carried over and what was
    reset, so an operator reads both in the audit."""
    return {**_gateway_summary(gateway),
            "carried": ["token", "token_expires_at", "address", "usage (the run's budgets "
                        "go on from it)", "breaker (an open one stays open)", "budget_fired",
                        "refusal tally"],
            "reread": ["routes, allow list, budgets and approval rules from the profile",
                       "route secrets from this daemon's configuration"],
            "reset": ["the breaker's window of recent requests",
                      "requests held for an operator (cancelled at the handover)",
                      "connections and tunnels open at the handover (cut)",
                      *(["MCP calls in flight at the handover (answered "
                         "supervisor_restarting, cancelled at their server)"]
                        if "mcp" in gateway else [])],
            **({"mcp_carried": ["call counters (the MCP budgets go on from them)",
                                "remote sessions", "stdio servers (still running; their "
                                "socketpairs handed over)", "audit row counts"]}
               if "mcp" in gateway else {})}
