"""agent-supervisord: the root daemon's entry point. Order of startup: config, directories,
subreaper, watchdog, state, reconcile leftovers, self-test, control socket, READY=1.
SIGTERM/SIGINT: orderly shutdown that kills every agent through the audited kill path."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import click
import pyprctl
from aiohttp import web

from supervisor import __version__
from supervisor.api.server import bind_control_socket, build_app, operators_gid
from supervisor.audit import AuditLog
from supervisor.config import Config, load_config
from supervisor.daemon.arbiter import SYSTEM, Arbiter
from supervisor.daemon.breakglass import BreakGlass, request_halt
from supervisor.daemon.containment import Containment
from supervisor.daemon.drills import Drills
from supervisor.daemon.selftest import run_self_test
from supervisor.daemon.store import Store, connect
from supervisor.errors import ConfigInvalid, EnforcementError, SupervisorError
from supervisor.events import DeliveryWorker, Outbox, load_endpoints
from supervisor.metrics import start_metrics
from supervisor.runtime.base import Runtime
from supervisor.runtime.containerized import DockerRuntime
from supervisor.runtime.docker_api import DockerEngine
from supervisor.runtime.router import RuntimeRouter
from supervisor.runtime.sandboxed import RuncRuntime
from supervisor.sandbox.cgroups import Cgroup, CgroupMode, detect_mode
from supervisor.sandbox.seccomp_notify import SeccompListener, unsupported_reason
from supervisor.telemetry.sampler import TelemetryHub
from supervisor.telemetry.store import SummaryStore

log = logging.getLogger("agent-supervisord")

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


def sd_notify(message: str) -> None:
    """The sd_notify(3) datagram; a no-op outside systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        sock.sendto(message.encode(), address)


class Watchdog:
    """Spawns the dead-man's-switch process and holds the write end of its pipe. If the
    watchdog itself dies, the daemon audits it and spawns a new one at once: agents are never
    left without a switch while the daemon lives."""

    def __init__(self, parent_cgroup: Path, record: Path, timeout: float) -> None:
        self.args = [sys.executable, "-m", "supervisor.daemon.watchdog", "--cgroup",
                     str(parent_cgroup), "--record", str(record), "--timeout", str(timeout)]
        self.record = record
        self.disarmed = False
        self.on_death: Callable[[int | None], None] | None = None
        self._pidfd: int | None = None
        self._spawn()

    def _spawn(self) -> None:
        read_fd, self.write_fd = os.pipe2(os.O_CLOEXEC)
        self.proc = subprocess.Popen(self.args, stdin=read_fd, start_new_session=True,
                                     close_fds=True)
        os.close(read_fd)

    def watch(self, loop: asyncio.AbstractEventLoop) -> None:
        self._pidfd = os.pidfd_open(self.proc.pid)
        loop.add_reader(self._pidfd, self._died, loop)

    def _died(self, loop: asyncio.AbstractEventLoop) -> None:
        assert self._pidfd is not None
        loop.remove_reader(self._pidfd)
        os.close(self._pidfd)
        self._pidfd = None
        code = self.proc.wait()
        if self.disarmed:
            return
        with contextlib.suppress(OSError):
            os.close(self.write_fd)
        self._spawn()
        self.watch(loop)
        if self.on_death is not None:
            self.on_death(code)

    def disarm(self) -> None:
        """Orderly shutdown: every agent is already dead; tell the watchdog to stand down."""
        self.disarmed = True
        with contextlib.suppress(OSError):
            os.write(self.write_fd, b"done\n")
            os.close(self.write_fd)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)


def audit_watchdog_records(record: Path, audit: AuditLog) -> None:
    """What a watchdog did after the previous daemon died goes into the audit log now."""
    if not record.exists():
        return
    consumed = record.with_suffix(".audited")
    for line in record.read_text().splitlines():
        try:
            report = json.loads(line)
        except json.JSONDecodeError:
            continue
        audit.append(actor="system:watchdog", verb="watchdog_kill", scope="global",
                     reason=str(report.get("trigger", "")),
                     time_to_halt_ms=report.get("time_to_halt_ms"),
                     outcome="ok" if report.get("confirmed_empty", True) else "unconfirmed",
                     detail=report)
    with open(consumed, "a") as handle:
        handle.write(record.read_text())
    record.unlink()


def docker_runtime_for(config: Config) -> DockerRuntime:
    return DockerRuntime(
        engine=DockerEngine(config.docker.socket, config.docker.api_timeout),
        streamer=DockerEngine(config.docker.socket, None),
        cgroup_parent=config.sandbox.cgroup_parent, name_prefix=config.sandbox.name_prefix,
        uid_base=config.sandbox.uid_base, agent_uid=config.sandbox.agent_uid,
        workspace_min_owner_uid=config.sandbox.workspace_min_owner_uid,
        max_runs=config.sandbox.max_runs, host_root_image=config.docker.host_root_image,
        state_dir=config.daemon.runtime_dir / "docker",
    )


async def serve(config: Config) -> int:
    if os.geteuid() != 0:
        raise EnforcementError("agent-supervisord must run as root to contain agents")
    mode = detect_mode()
    if mode is CgroupMode.NONE:
        raise EnforcementError("no cgroup v2 tree: cannot kill a run's cgroup atomically")
    # runtime_dir is 0751 and bundles 0711: a sandbox's root (an unprivileged host uid) must
    # traverse them to reach its rootfs, but nobody may list them; the socket itself is 0660.
    for directory, perms in ((config.daemon.runtime_dir, 0o751),
                             (config.daemon.runtime_dir / "bundles", 0o711),
                             (config.daemon.state_dir, 0o700)):
        directory.mkdir(parents=True, exist_ok=True)
        directory.chmod(perms)
    gid = operators_gid(config.daemon.socket_group)
    if gid >= 0:
        os.chown(config.daemon.runtime_dir, 0, gid)
    # Container inits are orphaned when `runc create` exits; as subreaper we inherit them and
    # waitpid gives each run's true exit status.
    pyprctl.set_child_subreaper(True)

    # --- seccomp notify (supervisor/sandbox/seccomp_notify.py): runc hands each run's notify fd
    # to this socket; every escape-class attempt is answered EPERM, then logged (debug) and
    # given to `seccomp.subscribers`. Up before the self-test, whose canary goes through it.
    # Off ([telemetry] seccomp_listener = "", or a kernel runc cannot notify on): the filter
    # itself answers the same syscalls EPERM, unreported.
    seccomp: SeccompListener | None = None
    if config.seccomp_listener is not None:
        if (why := unsupported_reason()) is None:
            seccomp = SeccompListener(config.seccomp_listener)
            await seccomp.start()
        else:
            log.warning("no syscall telemetry: %s; escape-class syscalls stay EPERM", why)
    # --- end seccomp notify
    runc = RuncRuntime(
        runc_binary=config.sandbox.runc_path, runc_root=config.daemon.runtime_dir / "runc",
        cgroup_parent=config.sandbox.cgroup_parent, name_prefix=config.sandbox.name_prefix,
        uid_base=config.sandbox.uid_base, agent_uid=config.sandbox.agent_uid,
        workspace_min_owner_uid=config.sandbox.workspace_min_owner_uid,
        workspaces_dir=config.daemon.runtime_dir / "workspaces",
        bundles_dir=config.daemon.runtime_dir / "bundles", max_runs=config.sandbox.max_runs,
        seccomp_listener=seccomp.path if seccomp else None,  # seccomp notify
    )
    runtimes: dict[str, Runtime] = {"runc": runc}
    # --- docker (supervisor/runtime/containerized.py): the engine must answer now, with the
    # cgroupfs driver, or the daemon does not start (fail closed).
    if config.docker_enabled:
        docker_runtime = docker_runtime_for(config)
        await docker_runtime.prepare()
        runtimes["docker"] = docker_runtime
    # --- end docker
    runtime = RuntimeRouter(runtimes, config.sandbox.runtime, config.sandbox.cgroup_parent)
    watchdog_record = config.daemon.state_dir / "watchdog.jsonl"
    runtime.parent_cgroup().mkdir(parents=True, exist_ok=True)
    watchdog = Watchdog(runtime.parent_cgroup(), watchdog_record, config.kill.confirm_timeout)

    db = connect(config.daemon.state_dir / "state.db")
    audit = AuditLog(db)
    # --- webhooks (supervisor/events.py): the outbox subscribes before any audit row that
    # becomes an event; a missing or world-readable secret stops the start here, naming it.
    outbox = Outbox(db, load_endpoints(config.webhooks))
    outbox.attach(audit)
    webhook_worker = DeliveryWorker(outbox, config.webhook_delivery, audit)
    # --- end webhooks
    store = Store(db)
    arbiter = Arbiter(config, store, audit, runtime)
    # --- telemetry (supervisor/telemetry/): one sampler thread reads every running run's cgroup
    # and processes and hands the samples to the loop (window, summary, `telemetry.subscribers`).
    # The arbiter registers a run once it runs; at its end the summary goes to SQLite.
    telemetry = TelemetryHub(config.telemetry.rate_hz, config.telemetry.process_every,
                             config.telemetry.window, asyncio.get_running_loop(),
                             store=SummaryStore(db))
    arbiter.run_started_hooks.append(
        lambda run_id, cgroup, started_at: telemetry.register(run_id, Cgroup(cgroup), started_at))

    def run_ended(run_id: str) -> None:
        telemetry.unregister(run_id)

    arbiter.run_ended_hooks.append(run_ended)
    telemetry.start()
    # --- end telemetry
    # Tripwires: samples and syscall attempts in, audited firings and pause/kill out.
    containment = Containment(arbiter)
    arbiter.run_started_hooks.append(containment.run_started)
    arbiter.run_ended_hooks.append(containment.run_ended)
    telemetry.subscribers.append(containment.on_sample)
    containment.attempt_listeners.append(telemetry.add_syscall_attempt)
    audit.subscribe(containment.on_audit)
    if seccomp is not None:
        seccomp.subscribers.append(containment.on_attempt)
        prefix = config.sandbox.name_prefix
        arbiter.run_ended_hooks.append(lambda run_id: seccomp.forget(f"{prefix}-{run_id}"))
    audit.append(actor=SYSTEM.label(), verb="daemon_start", scope="global",
                 detail={"version": __version__, "pid": os.getpid(), "cgroup_mode": mode.value,
                         **runtime.describe()})
    audit_watchdog_records(watchdog_record, audit)
    await arbiter.reconcile()

    if config.daemon.self_test:
        report = await run_self_test(arbiter, config)
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
    try:
        metrics_endpoint = await start_metrics(arbiter, audit, config.metrics.listen,
                                               __version__, backlog=outbox.backlog,
                                               socket_gid=gid)
    except SupervisorError:
        watchdog.disarm()
        raise
    # --- end metrics

    drills = Drills(arbiter, db, config.drill)
    sock = bind_control_socket(config.socket_path, gid)
    app = build_app(arbiter, config.roles, drills, telemetry=telemetry)
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    site = web.SockSite(runner, sock)
    await site.start()
    webhook_worker.start()  # webhooks: delivery never runs on the kill path

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def watchdog_died(code: int | None) -> None:
        log.critical("the watchdog exited (%s); a new one is running as pid %d",
                     code, watchdog.proc.pid)
        audit.append(actor=SYSTEM.label(), verb="watchdog_respawn", scope="global",
                     outcome="ok", detail={"exit_code": code, "new_pid": watchdog.proc.pid})

    watchdog.on_death = watchdog_died
    watchdog.watch(loop)
    drill_schedule = asyncio.create_task(drills.schedule())

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
    breakglass = BreakGlass(arbiter, config.halt_file)
    await breakglass.start()
    def on_signal(signum: int) -> None:
        log.warning("received %s", signal.Signals(signum).name)
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    sd_notify("READY=1\nSTATUS=accepting runs")
    log.info("agent-supervisord %s ready on %s (cgroups %s)", __version__, config.socket_path,
             mode.value)
    await stop.wait()

    sd_notify("STOPPING=1\nSTATUS=killing every agent")
    log.warning("shutting down: killing every agent")
    drill_schedule.cancel()
    log_pruning.cancel()
    breakglass.stop()
    await arbiter.shutdown(config.daemon.shutdown_reason)
    telemetry.stop()  # telemetry: every run has ended and been summarised
    if seccomp is not None:  # seccomp notify: every agent is dead; close the fds and socket
        await seccomp.stop()
    await webhook_worker.stop()  # webhooks: up to 2 s to flush; the rest waits for the next start
    audit.append(actor=SYSTEM.label(), verb="daemon_stop", scope="global",
                 reason=config.daemon.shutdown_reason)
    await runner.cleanup()
    if metrics_endpoint is not None:  # metrics
        await metrics_endpoint.stop()
    with contextlib.suppress(FileNotFoundError):
        config.socket_path.unlink()
    watchdog.disarm()
    db.close()
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


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_path", type=click.Path(path_type=Path), default=None,
              help="Configuration file (default /etc/agent-supervisor/daemon.toml if present).")
@click.option("--check-config", is_flag=True, help="Validate the configuration and exit.")
@click.option("--halt", "halt_reason", metavar="REASON", default=None,
              help="Break-glass: halt every agent through the HALT file (root; needs no socket "
                   "and no role config), wait for the daemon to apply it, and exit.")
@click.version_option(__version__)
def main(config_path: Path | None, check_config: bool, halt_reason: str | None) -> None:
    """The agent supervisor daemon (runs as root)."""
    if halt_reason is not None:
        sys.exit(break_glass(config_path, halt_reason))
    try:
        config = load_config(config_path)
        load_endpoints(config.webhooks)  # secrets present and private, before anything starts
    except ConfigInvalid as exc:
        click.echo(f"agent-supervisord: {exc.message}", err=True)
        sys.exit(exc.exit_status)
    if check_config:
        click.echo(json.dumps(config.model_dump(mode="json"), indent=2))
        return
    setup_logging(config.daemon.log_level)
    try:
        code = asyncio.run(serve(config))
    except SupervisorError as exc:
        log.critical("%s: %s", exc.code, exc.message)
        sys.exit(exc.exit_status)
    sys.exit(code)
