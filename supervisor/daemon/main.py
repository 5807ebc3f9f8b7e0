"""agent-supervisord: the root daemon's entry point. Order of startup: config, the
single-instance lock (daemon/instance.py: a second daemon on the same state or runtime
directory exits 69 here, having touched nothing), the core
(directories, subreaper, seccomp listener, runtime, watchdog, state, arbiter, telemetry,
tripwires: daemon/core.py, shared with embedded CI runs), webhooks, reconcile leftovers,
self-test, metrics, control socket, READY=1.
SIGTERM/SIGINT: orderly shutdown that kills every agent through the audited kill path. SIGUSR2:
a restart, which hands them to the next daemon instead (daemon/handover.py); the unit makes
systemd's restart job send it (RestartKillSignal=SIGUSR2), and under systemd the daemon then
exits EXIT_RESTART, which the unit restarts on (so a bare `systemctl kill -s USR2` restarts the
service too, rather than leaving it inactive with the agents held until the window ends)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import json
import logging
import os
import signal
import sys
import tomllib
from collections.abc import Awaitable
from pathlib import Path

import click

from supervisor import __version__
from supervisor.api.client import owner_socket_of
from supervisor.api.listener import ControlListener
from supervisor.api.presignal import PreSigner
from supervisor.api.server import (
    FOLLOW_STREAMS,
    RoleTable,
    bind_control_socket,
    build_app,
    operators_gid,
)
from supervisor.audit import AuditLog
from supervisor.config import Config, load_config
from supervisor.config import config_path as chosen_config
from supervisor.daemon import presignalled
from supervisor.daemon.arbiter import SYSTEM
from supervisor.daemon.auditing import housekeeping, start_audit, verify_fully
from supervisor.daemon.breakglass import BreakGlass, HaltSignal, block_halt_signal, request_halt
from supervisor.daemon.configcheck import CheckedConfig, check_config, host_errors
from supervisor.daemon.core import Core
from supervisor.daemon.drills import Drills
from supervisor.daemon.fleet import FleetMember
from supervisor.daemon.handover import adopt, hand_over
from supervisor.daemon.instance import SERVING, STOPPING, InstanceLock
from supervisor.daemon.notify import HealthCheck, Notifier
from supervisor.daemon.reload import ConfigReloader
from supervisor.daemon.selftest import run_self_test
from supervisor.daemon.startsignals import START_DEFERRED
from supervisor.daemon.stopintent import restart_warning, stop_intent
from supervisor.errors import ConfigInvalid, DaemonRunning, EnforcementError, SupervisorError
from supervisor.events import DeliveryWorker, Outbox, load_endpoints
from supervisor.metrics import MetricsEndpoint, start_metrics
from supervisor.sandbox.cgroups import Cgroup, unified_root
from supervisor.sandbox.childenv import confine_path
from supervisor.telemetry.sampler import load_psutil

log = logging.getLogger("agent-supervisord")

# A handover's exit under systemd (EX_TEMPFAIL): the unit counts it a success
# (SuccessExitStatus=) and always starts the next daemon on it (RestartForceExitStatus=).
EXIT_RESTART = 75
# A stop (SIGTERM, SIGINT: every agent killed) or a restart (SIGUSR2: handed over).
STOP_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGUSR2})


def take_pending(signums: frozenset[int]) -> set[int]:
    """Those of `signums` (blocked) that are pending, each taken off (its handler never runs
    for it): what arrived while the daemon was starting."""
    pending = signal.sigpending() & signums
    for signum in pending:
        while signal.sigtimedwait({signum}, 0) is not None:
            pass
    return set(pending)

_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3,
             logging.CRITICAL: 2}


class JournalFormatter(logging.Formatter):
    """Under systemd (JOURNAL_STREAM set), prefix <N> so journald keeps the priority;
    elsewhere, a timestamped line."""

    def __init__(self, journal: bool) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        if self.journal:
            return f"<{_PRIORITY.get(record.levelno, 6)}>{record.name}: {record.getMessage()}"
        return super().format(record)


def setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JournalFormatter("JOURNAL_STREAM" in os.environ))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    # The Docker SDK's HTTP requests, one line each, would drown the daemon's own debug log.
    logging.getLogger("urllib3").setLevel(logging.WARNING)


def kill_path_checks(core: Core) -> list[tuple[str, HealthCheck]]:
    """What the watchdog heartbeat proves besides a turning loop (daemon/notify.py)."""

    def watchdog_process() -> str | None:
        proc = core.watchdog.proc
        code = proc.poll()
        if code is not None:
            return f"exited with {code}, not yet respawned"
        # Alive is not enough: a stopped (SIGSTOP, ptrace) watchdog could not kill anything.
        try:
            state = Path(f"/proc/{proc.pid}/stat").read_text().rpartition(")")[2].split()[0]
        except (OSError, IndexError):
            return None  # gone between the two reads: the next turn sees its exit code
        return f"pid {proc.pid} is stopped" if state in ("T", "t") else None

    def watchdog_cgroup() -> str | None:
        # Moved back into the unit's cgroup (or never out of it), the watchdog dies with the
        # daemon at a `systemctl kill` or a stop, and the agents are left with no killer.
        return core.watchdog.cannot_hold()

    def audit_writer() -> str | None:
        return None if core.audit.writer_alive else "the writer thread is dead"

    def held_cgroups() -> str | None:
        held: list[tuple[str, object]] = [("parent", core.arbiter.parent)]
        held += [(run_id, live.handle.cgroup) for run_id, live in core.arbiter.live.items()
                 if live.handle is not None]
        for owner, cgroup in held:
            if isinstance(cgroup, Cgroup) and (broken := cgroup.held_broken()):
                return f"{owner}: descriptors of {', '.join(broken)} are closed"
        return None

    return [("watchdog process", watchdog_process), ("watchdog cgroup", watchdog_cgroup),
            ("audit writer", audit_writer), ("held cgroups", held_cgroups)]


# What stays of the watchdog's records once audited: `watchdog.audited` (the newest records,
# whole: the audit row's detail is capped at 8 KiB, and a kill's list of runs can pass that)
# and, when it passes this size, one older generation `watchdog.audited.1`, replaced then.
AUDITED_MAX_BYTES = 1 << 20
AUDIT_FLUSH_TIMEOUT = 30.0


async def audit_watchdog_records(record: Path, audit: AuditLog) -> None:
    """What a watchdog did after the previous daemon died goes into the audit log now. The
    record is removed only once those rows are committed (a record audited twice after a
    crash in between is possible, one lost is not); what it held stays in the bounded
    `watchdog.audited` (AUDITED_MAX_BYTES, one older generation)."""
    if not record.exists():
        return
    text = record.read_text()
    for line in text.splitlines():
        try:
            report = json.loads(line)
        except json.JSONDecodeError:
            continue
        audit.append(actor="system:watchdog", verb="watchdog_kill", scope="global",
                     reason=str(report.get("trigger", "")),
                     time_to_halt_ms=report.get("time_to_halt_ms"),
                     outcome="ok" if report.get("confirmed_empty", True) else "unconfirmed",
                     detail=report)
    if not await audit.flushed(AUDIT_FLUSH_TIMEOUT):
        log.error("the watchdog's records are not yet committed to the audit log after %gs: "
                  "%s stays for the next start to audit", AUDIT_FLUSH_TIMEOUT, record)
        return
    keep_audited(record.with_suffix(".audited"), text)
    record.unlink()


def keep_audited(consumed: Path, text: str, max_bytes: int = AUDITED_MAX_BYTES) -> None:
    """Append records already in the audit log to `consumed`, rotated to one older generation
    (`<consumed>.1`) once it passes `max_bytes`: at most about twice that is kept."""
    with open(consumed, "a") as handle:
        handle.write(text)
    if consumed.stat().st_size > max_bytes:
        os.replace(consumed, consumed.with_name(consumed.name + ".1"))


async def serve(config: Config, notifier: Notifier, config_file: Path | None = None,
                signals: HaltSignal | None = None, instance: InstanceLock | None = None) -> int:
    core = await Core.assemble(config)
    load_psutil()  # the sampler's process walks: loaded now, never during a kill
    runtime, watchdog, audit, arbiter = core.runtime, core.watchdog, core.audit, core.arbiter
    db = core.store.db
    # The runtime directory stays root:root (0751 lets everyone traverse it; the socket's
    # own group decides who connects). Under systemd that is not taste: before each Exec*
    # command (ExecReload= too) systemd chowns a RuntimeDirectory= whose top is not the
    # service's user and group recursively, which would reset control.sock's group and reach
    # the runs' bundles and workspace mounts below it.
    gid = operators_gid(config.daemon.socket_group, config.socket_path)
    # --- webhooks (supervisor/events/): the outbox subscribes before any audit row that
    # becomes an event; a missing or world-readable secret stops the start here, naming it.
    outbox = Outbox(db, load_endpoints(config.webhooks))
    outbox.attach(audit)
    webhook_worker = DeliveryWorker(outbox, config.webhook_delivery, audit)
    # --- end webhooks
    telemetry = core.telemetry
    # Audit (supervisor/daemon/auditing.py): verified from its last anchor before anything is
    # served, then written by its own thread; the full verification runs off the loop.
    try:
        await start_audit(config, audit)
    except SupervisorError:
        watchdog.disarm()
        raise
    # An earlier daemon's watchdog (outside the service's cgroup, so it outlives the daemon)
    # finishes its kill and record before this one audits it and reaps what is left.
    # Its watchdog holds the runs of a handover: take them first (it exits once they are).
    adoption = await adopt(core)
    # Break-glass from here on: the watchdog that held the runs just adopted has stood down,
    # so nothing later in the start (the wait for earlier watchdogs, reconcile, the fleet, the
    # self-test, the sockets) may hold a HALT file back while they run.
    breakglass = BreakGlass(arbiter, config.halt_file, signals)
    await breakglass.start()
    previous_watchdogs = await watchdog.await_previous()
    audit.append(actor=SYSTEM.label(), verb="daemon_start", scope="global",
                 detail={"version": __version__, "pid": os.getpid(),
                         "cgroup_mode": core.mode.value, **runtime.describe(),
                         "watchdog": {"pid": watchdog.proc.pid,
                                      "cgroup": str(watchdog.cgroup.path),
                                      "escape_error": watchdog.escape_error,
                                      "previous": previous_watchdogs}})
    await audit_watchdog_records(core.watchdog_record, audit)
    # The adoption (above, before the control socket opens) is audited here; reconcile then
    # reaps what no daemon holds, the runs that were not adopted among them.
    if adoption is not None:
        adoption.audit(core)
    await arbiter.reconcile()

    # Fleet (supervisor/daemon/fleet.py): holds read and applied before the control socket
    # opens, so no launch can slip in ahead of a fleet kill issued while this host was down.
    fleet: FleetMember | None = None
    if config.fleet is not None:
        fleet = FleetMember(config.fleet, arbiter, audit, core.store, asyncio.get_running_loop(),
                            config.daemon.state_dir / "state.db")
        # Its launch gate refuses launches until the holds are read; agents' changes are
        # republished in its registration.
        arbiter.observers.fleet = fleet
        await fleet.start()

    if config.daemon.self_test:
        notifier.status("running the startup self-test")
        report = await run_self_test(arbiter, config, seccomp=core.seccomp)
        audit.append(actor=SYSTEM.label(), verb="self_test", scope="global",
                     outcome="ok" if report["ok"] else "failed", detail=report)
        if not report["ok"]:
            watchdog.disarm()
            failed = [k for k, v in report["checks"].items() if v != "PASS"]
            why = report.get("error") or f"checks failed: {', '.join(failed)}"
            raise EnforcementError(f"startup self-test failed, refusing to run agents: {why}",
                                   **report)
        log.info("self-test passed in %.0f ms", report["duration_ms"])

    # --- metrics (supervisor/metrics.py): an address that is not allowed or is in use stops
    # the start here, naming it.
    def metrics_at(listen: str) -> Awaitable[MetricsEndpoint | None]:
        return start_metrics(arbiter, audit, listen, __version__, backlog=outbox.backlog,
                             socket_gid=gid, web_config_file=config.metrics.web_config_file,
                             seccomp=core.seccomp,
                             breakers=core.egress.open_breakers if core.egress else None,
                             outputs=core.outputs.totals)

    try:
        metrics_endpoint = await metrics_at(config.metrics.listen)
    except SupervisorError:
        watchdog.disarm()
        raise
    # --- end metrics

    drills = Drills(arbiter, db, config.drill)
    sock = bind_control_socket(config.socket_path, gid)
    # The owners' socket: a kill's connect never waits behind the control socket's callers.
    owner_socket = owner_socket_of(config.socket_path)
    owner_gid = (operators_gid(config.control.owner_socket_group, owner_socket)
                 if config.control.owner_socket_group else -1)
    owner_sock = bind_control_socket(owner_socket, owner_gid,
                                     0o660 if owner_gid >= 0 else 0o600)
    roles = RoleTable(config.roles)
    # Reload (daemon/reload.py): what the running daemon was started with, to diff against.
    baseline = await asyncio.to_thread(check_config, config_file)
    started = CheckedConfig(source=baseline.source, config=config,
                            endpoints=list(outbox.endpoints.values()),
                            profiles=baseline.profiles, secrets=baseline.secrets)
    for error in baseline.profile_errors:
        log.error("%s: %s: %s (launches with that profile are refused)", error["path"],
                  error["key"] or "-", error["reason"])
    admission: list[ControlListener] = []
    reloader = ConfigReloader(
        config_file, started, arbiter=arbiter, audit=audit, roles=roles, outbox=outbox,
        webhook_worker=webhook_worker, drills=drills, notifier=notifier,
        start_metrics=metrics_at, metrics_endpoint=metrics_endpoint,
        admission_roles=lambda new: setattr(admission[0].admission, "roles", new),
        egress=core.egress)
    app = build_app(arbiter, roles, drills, telemetry=telemetry, egress=core.egress,
                    control=config.control, reloader=reloader)
    # An owner's kill on the owners' socket is SIGKILLed on its acceptor's thread, before
    # the loop sees it (api/presignal.py); what it signalled the loop then accounts for.
    presigner = PreSigner(arbiter.kill_index, lambda: roles.current,
                          max_body=config.control.max_body, max_line=config.control.max_line,
                          finish=functools.partial(presignalled.finish, arbiter))
    listener = ControlListener(app, sock, config.control, config.roles, owner_sock,
                               presigner=presigner)
    admission.append(listener)
    await listener.start()
    webhook_worker.start()  # webhooks: delivery never runs on the kill path

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    core.watch_watchdog()

    async def prune_logs_hourly() -> None:
        while True:
            try:
                removed = arbiter.prune_logs(config.daemon.log_retention)
                if removed:
                    log.info("deleted the output of %d runs past log_retention", removed)
            except OSError as exc:
                log.error("pruning run output failed: %s", exc)
            await asyncio.sleep(3600)

    log_pruning = asyncio.create_task(prune_logs_hourly())
    full_verification = asyncio.create_task(verify_fully(audit))
    audit_housekeeping = asyncio.create_task(housekeeping(audit, core.store, core.reserve))
    handover_asked: list[int] = []

    def on_signal(signum: int) -> None:
        log.warning("received %s", signal.Signals(signum).name)
        if signum == signal.SIGUSR2:
            handover_asked.append(signum)
        if instance is not None:  # a start by hand meanwhile waits for this one's exit
            instance.mark(STOPPING)
        stop.set()

    # SIGUSR2: a restart, agents kept (hand them over); systemd sends it for a restart job.
    for signum in STOP_SIGNALS:
        loop.add_signal_handler(signum, on_signal, signum)
    loop.add_signal_handler(signal.SIGHUP, reloader.on_sighup)
    # Blocked since the first line (entry.py, main): a restart or stop asked during the start
    # is taken now, before READY=1 (a restart hands over what was adopted, a stop kills it
    # through the audited path), and a SIGHUP is delivered once unblocked: that reload runs
    # once the daemon serves.
    for arrived in sorted(take_pending(STOP_SIGNALS)):
        log.warning("%s arrived while the daemon was starting", signal.Signals(arrived).name)
        on_signal(arrived)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, START_DEFERRED)
    if not stop.is_set():
        notifier.start_heartbeat(kill_path_checks(core))
        # What start-up made (modules, models, the registry as loaded) lives as long as the
        # daemon: out of the collector's reach, so a full collection that falls on a kill
        # walks only what was made since (about 60,000 objects frozen: a 10 ms collection
        # before, docs/benchmarks.md run 13).
        gc.freeze()
        notifier.ready(f"accepting runs; {len(arbiter.live)} running")
        if instance is not None:
            instance.mark(SERVING)
        log.info("agent-supervisord %s ready on %s (cgroups %s)", __version__,
                 config.socket_path, core.mode.value)
        # Whether `systemctl restart` would kill the agents (systemd < 244): said now, once.
        restart_check = asyncio.create_task(restart_warning(notifier.service))
        await stop.wait()
        restart_check.cancel()
    # Never fatal while stopping (the loop's handlers go with the loop, before the exit).
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    # The signal says restart or stop: SIGUSR2 (systemd's restart job sends it, the unit's
    # RestartKillSignal=) hands the agents to the next daemon (daemon/handover.py), SIGTERM
    # kills them. Nothing is asked in front of the kill: systemd's job (daemon/stopintent.py)
    # is asked meanwhile, for daemon_stop's record only.
    asking = asyncio.ensure_future(stop_intent(notifier.service))
    restarting = bool(handover_asked)
    handing_over = restarting and config.daemon.adopt_window > 0

    notifier.stopping("handing agents over to the next daemon" if handing_over else
                      f"killing every agent ({len(arbiter.live)} running)")
    # Nothing a caller holds open delays the handover or the kill: every follow stream ends
    # now with a last line saying why (agentctl exits 75 on it), and every graceful stop in
    # its grace goes on to the kill path and answers its caller; the listener then waits a
    # bounded time for what is in flight (api/listener.py LISTENER_DRAIN).
    why = "restarting" if handing_over else "stopping"
    ended = app[FOLLOW_STREAMS].end(why)
    await arbiter.cut_graces(f"the daemon is {why}")
    if ended:
        log.warning("ending %d follow stream(s): the daemon is %s", ended, why)
    await notifier.stop_heartbeat()
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})  # never fatal while stopping
    loop.remove_signal_handler(signal.SIGHUP)
    await reloader.stop()
    log_pruning.cancel()
    full_verification.cancel()
    audit_housekeeping.cancel()
    breakglass.stop()
    if handing_over:
        log.warning("restarting: handing the agents over to the next daemon")
        await listener.stop()  # no verb may reach a run while it is handed over
        detail = await hand_over(core, config.daemon.shutdown_reason)
        audit.append(actor=SYSTEM.label(), verb="daemon_handover", scope="global",
                     reason="restart", detail=detail)
    else:
        log.warning("shutting down: killing every agent")
    if fleet is not None:
        fleet.settle_now()  # the runs' cleanups wait for no fleet ack's settle_delay
    await arbiter.shutdown(config.daemon.shutdown_reason)
    intent = await asking
    if restarting and not handing_over:
        log.warning("restarting: every agent was killed ([daemon] adopt_window is 0: running "
                    "agents are not handed to the next daemon)")
    elif not restarting and intent.get("systemd_job") == "restart":
        log.critical("systemd is restarting %s but sent SIGTERM, not SIGUSR2: every agent was "
                     "killed (the unit lacks RestartKillSignal=SIGUSR2, or systemd is older "
                     "than 244)", intent["unit"])
    if fleet is not None:
        await fleet.stop()
    await core.stop_observers()  # telemetry and seccomp notify: every agent is dead
    await webhook_worker.stop()  # webhooks: up to 2 s to flush; the rest waits for the next start
    audit.append(actor=SYSTEM.label(), verb="daemon_stop", scope="global",
                 reason=config.daemon.shutdown_reason,
                 detail={**intent, "handover": True} if handing_over else intent or None)
    if not handing_over:
        await listener.stop()
    if reloader.metrics_endpoint is not None:  # metrics (a reload may have moved it)
        await reloader.metrics_endpoint.stop()
    for path in (config.socket_path, owner_socket):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    core.close()
    if restarting and notifier.service:
        # Under systemd the unit restarts on this status, whoever sent SIGUSR2.
        log.warning("exiting %d: systemd starts the next daemon", EXIT_RESTART)
        return EXIT_RESTART
    return 0


def break_glass(config_path: Path | None, reason: str) -> int:
    """--halt: works with a broken config too (then the default HALT file is used)."""
    if os.geteuid() != 0:
        click.echo("agent-supervisord: --halt needs root", err=True)
        return 5
    try:
        halt_file = load_config(config_path).halt_file
    except ConfigInvalid as exc:
        halt_file = Config().halt_file
        click.echo(f"agent-supervisord: {exc.message}; using {halt_file}", err=True)
    if request_halt(halt_file, reason or "break-glass"):
        click.echo(f"global halt applied by the running daemon ({halt_file})")
        return 0
    click.echo(f"no running daemon took {halt_file} within 10s; it stays there and is applied "
               f"when the daemon starts. For an unresponsive daemon: kill -9 it (its watchdog "
               f"then kills every agent)", err=True)
    return 1


def reload_socket(config_path: Path | None) -> Path:
    """The control socket of the daemon that reads `config_path` (the unit's ExecReload=:
    `agent-supervisord --reload`, whose config is the one its ExecStart= reads). A file with
    errors still names its socket by [daemon] socket_path or runtime_dir where those read,
    so the daemon is asked all the same: it refuses the file, listing every error, and
    audits the refusal."""
    try:
        return load_config(config_path).socket_path
    except ConfigInvalid:
        pass
    daemon: object = {}
    with contextlib.suppress(OSError, ValueError, AttributeError):
        path = chosen_config(config_path)
        if path is not None:
            daemon = tomllib.loads(path.read_text()).get("daemon", {})
    if isinstance(daemon, dict):
        if isinstance(daemon.get("socket_path"), str):
            return Path(daemon["socket_path"])
        if isinstance(daemon.get("runtime_dir"), str):
            return Path(daemon["runtime_dir"]) / "control.sock"
    return Config().socket_path


def ask_reload(config_path: Path | None) -> None:
    """--reload: becomes `agentctl reload` on the configured socket (same answer, output and
    exit status), run from this same interpreter and installed package (never one from the
    working directory); with no signal blocked, as this process has started nothing that
    needs it (entry.py blocked them)."""
    socket_path = reload_socket(config_path)
    signal.pthread_sigmask(signal.SIG_SETMASK, ())
    # -I: `-m` would put the working directory first on sys.path, and an operator who runs
    # --reload by hand from an agent's workspace would run, as root, a `supervisor` package
    # found there; isolated mode takes neither the directory nor PYTHON* variables.
    os.execv(sys.executable, [sys.executable, "-I", "-m", "supervisor.cli", "--socket",
                              str(socket_path), "reload"])


def report_config(config_path: Path | None) -> int:
    """--check-config: every error, one line each, on stderr; 78 if there is any."""
    checked = check_config(config_path)
    for error in checked.all_errors:
        click.echo(f"agent-supervisord: {error['path']}: {error['key'] or '-'}: "
                   f"{error['reason']}", err=True)
    if not checked.ok:
        click.echo(f"agent-supervisord: {len(checked.all_errors)} error(s) in "
                   f"{checked.source}; nothing was started", err=True)
        return ConfigInvalid.exit_status
    assert checked.config is not None
    click.echo(json.dumps(checked.config.model_dump(mode="json"), indent=2))
    return 0


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_path", type=click.Path(path_type=Path), default=None,
              help="Configuration file (default /etc/agent-supervisor/daemon.toml if present).")
@click.option("--check-config", "check_only", is_flag=True,
              help="Report every error a start or reload would meet (the file, webhook and "
                   "route secrets, metrics address, every profile), each with its file and "
                   "key, and exit 78 if there is any; else print the effective configuration.")
@click.option("--halt", "halt_reason", metavar="REASON", default=None,
              help="Break-glass: halt every agent through the HALT file (root; needs no socket "
                   "and no role config), wait for the daemon to apply it, and exit.")
@click.option("--reload", "reload_only", is_flag=True,
              help="Ask the running daemon to reload its configuration (`agentctl reload` on "
                   "the control socket this configuration names; the unit's ExecReload=) and "
                   "exit with its answer: 78 with every error when it refuses the file.")
@click.version_option(__version__, prog_name="agent-supervisord")
def main(config_path: Path | None, check_only: bool, halt_reason: str | None,
         reload_only: bool) -> None:
    """The agent supervisor daemon (runs as root)."""
    confine_path()  # programs found in $PATH's absolute directories only, wherever it starts
    if halt_reason is not None:
        sys.exit(break_glass(config_path, halt_reason))
    if reload_only:
        ask_reload(config_path)
    if check_only:
        sys.exit(report_config(config_path))
    try:
        config = load_config(config_path)
        load_endpoints(config.webhooks)  # secrets present and private, before anything starts
        # What the file names on the host (groups, users, files, the runs' parent cgroup),
        # all of it before anything is touched: a socket group that does not exist would leave
        # the socket to root alone, a foreign parent cgroup would be limited and killed.
        where = str(chosen_config(config_path) or "(defaults: no configuration file)")
        if errors := host_errors(config, where):
            CheckedConfig(source=where, errors=errors).raise_for_errors()
    except ConfigInvalid as exc:
        click.echo(f"agent-supervisord: {exc.message}", err=True)
        sys.exit(exc.exit_status)
    setup_logging(config.daemon.log_level)
    # One daemon per state and runtime directory (daemon/instance.py), taken before anything
    # else is touched; held to the process's exit.
    try:
        instance = InstanceLock.acquire(config)
    except DaemonRunning as exc:
        detail = {k: v for k, v in exc.detail.items() if k != "hint"}
        log.critical("%s: %s %s; hint: %s", exc.code, exc.message,
                     json.dumps(detail, sort_keys=True), exc.hint)
        sys.exit(exc.exit_status)
    # Before any child exists: systemd's variables leave the environment here.
    notifier = Notifier()
    block_halt_signal()  # done by entry.py already; again for a caller of main() alone
    signal.pthread_sigmask(signal.SIG_BLOCK, START_DEFERRED)  # as entry.py: until serve
    # SIGUSR1 from here to the exit: break-glass's trigger while it is up, and a kill in the
    # kernel plus the HALT file before (the start, an adoption) and after (a handover, a stop).
    signals = HaltSignal(config.halt_file,
                         unified_root() / config.sandbox.cgroup_parent.strip("/"),
                         config.kill.confirm_timeout)
    signals.start()
    try:
        code = asyncio.run(serve(config, notifier, config_path, signals, instance))
    except SupervisorError as exc:
        log.critical("%s: %s", exc.code, exc.message)
        code = exc.exit_status
    finally:
        signals.close()
        instance.release()  # last: the handover is with the watchdog and the state closed
    sys.exit(code)
