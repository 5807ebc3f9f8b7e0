"""`agentctl run --embedded`: CI mode's runner. The supervisor core (daemon/core.py: the same
sandbox, seccomp, tripwires, kill path and audit as the daemon) in this process for one run, then
torn down completely. It drives the core only through the methods the daemon's API uses
(launch, act, get_run, reconcile, shutdown), never the arbiter's internals. agentctl execs
`python -I -m supervisor.ci` (ci/__main__.py) with the run in $AGENT_SUPERVISOR_EMBEDDED_RUN, so
the CI job's SIGINT/SIGTERM reach this process directly: they kill the run through the audited
kill path and the run ends with status 80 (killed).

Each embedded run claims a slot (an flock'ed file under $AGENT_SUPERVISOR_CI_ROOT) that gives it
its own runtime directory, cgroup parent, name prefix, host uid range and gateway address, so
concurrent runs on one host never meet, and a run SIGKILLed before its teardown is reaped (the
daemon's reconcile) by the next run of its slot. Its watchdog kills the agent meanwhile; a
watchdog that dies during the run is replaced at once, as the daemon's is, or the run is killed
(Core.watch_watchdog).
Needs root. It sits in the daemon's layer (it assembles the core), the rest of supervisor/ci
below it."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import gc
import json
import logging
import os
import signal
import stat
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from supervisor import __version__
from supervisor.ci import COPY_ROOT_ENV_VAR, DEFAULT_COPY_ROOT, REPORT_SCHEMA, printable
from supervisor.ci.outcome import Ending, ending_of, exit_status
from supervisor.ci.spec import DEFAULT_ROOT, ENV_VAR, ROOT_ENV_VAR, EmbeddedRun
from supervisor.config import Config, load_config
from supervisor.daemon.arbiter import SYSTEM
from supervisor.daemon.core import Core
from supervisor.egress import nft
from supervisor.errors import (
    AgentBusy,
    ConfigInvalid,
    EmbeddedNeedsRoot,
    EmbeddedRunFailed,
    EnforcementError,
    InvalidRequest,
    SupervisorError,
    WatchdogLost,
    WorkspaceInvalid,
    launch_exit_status,
)
from supervisor.models import ActionRequest, Actor, Scope
from supervisor.profiles import Profile, load_profile
from supervisor.sandbox.bundle import SANDBOX_UID_COUNT
from supervisor.sandbox.cgroups import Cgroup
from supervisor.sandbox.childenv import confine_path
from supervisor.sandbox.fstree import remove_tree
from supervisor.sandbox.seccomp_notify import AttemptTally

# The workspace's modules (its manifest and scope guard, provenance, quarantine, the copy of a
# system user's checkout) load with the first run that has a workspace; the report's signing
# with a report, a summary or a signing key; the self-test with --self-test.
if TYPE_CHECKING:
    from supervisor.ci import checkout_copy, manifest

log = logging.getLogger("agentctl")

CI = Actor(kind="system", name="ci")
_MAX_SLOTS = 4096
_CGROUP_ROOT = "agent-supervisor-ci"


def claim_slot(locks: Path, prefer: list[int] | None = None) -> tuple[int, int]:
    """(slot, fd of its held lock). The lock dies with the process, so a slot is free again the
    moment its run ends, however it ends; lock files stay (unlinking one would race). The lock
    directory is one per host whatever $AGENT_SUPERVISOR_CI_ROOT says: slots decide cgroup
    names and host uid ranges, which are per host too. `prefer`: slots tried first, in order
    (`left_slots`), then the lowest free one."""
    locks.mkdir(mode=0o700, parents=True, exist_ok=True)
    for slot in [*(prefer or ()), *range(_MAX_SLOTS)]:
        fd = os.open(locks / f"slot{slot}", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        return slot, fd
    raise AgentBusy(f"all {_MAX_SLOTS} embedded run slots ({locks}) are in use",
                    locks=str(locks))


def left_slots(root: Path) -> list[int]:
    """The slots whose directory is under the state root `root`: a run's teardown removes its
    slot's, so each is a run of this state root killed before its teardown (or one still
    going, whose slot is taken). The next run of the state root takes one of them when it is
    free, and its reconcile reaps what the killed run left (its bundle, mounts, netns, tables
    and state), at once rather than whenever a run of that state root next happens to get
    that slot: slots are claimed host-wide, lowest first, so on a host with concurrent runs
    that could be never."""
    try:
        names = os.listdir(root)
    except OSError:
        return []
    return sorted(int(name[4:]) for name in names
                  if name.startswith("slot") and name[4:].isdigit() and int(name[4:]) < _MAX_SLOTS)


def state_root(environ: Mapping[str, str]) -> Path:
    """Where embedded runs keep their state: $AGENT_SUPERVISOR_CI_ROOT, made absolute against
    the current directory as it is read. Left relative, every path built under it (the slot's
    runtime and state directories, the seccomp listener's socket, the quarantine) named
    another place for each process that resolves it from another directory."""
    return Path(os.path.abspath(environ.get(ROOT_ENV_VAR) or DEFAULT_ROOT))


def copy_root(environ: Mapping[str, str]) -> Path:
    """Where copies of checkouts owned by root or a system user go (ci/checkout_copy.py):
    $AGENT_SUPERVISOR_CI_COPY_ROOT, made absolute as `state_root` is, so that the check that
    it lies outside the workspace and the copy itself name the same place."""
    return Path(os.path.abspath(environ.get(COPY_ROOT_ENV_VAR) or DEFAULT_COPY_ROOT))


def embedded_config(base: Config, root: Path, slot: int) -> Config:
    """The daemon's configuration narrowed to one run in `slot`: its own directories, cgroup
    parent and name prefix, host uids above the daemon's whole range, one range per slot, and
    gateway addresses from the egress pool's upper half, one /30 per slot (the daemon's runs
    take the lower half: config.py `pool_share`). The four sections are copied with the new
    values, not validated again: the values are made here in the forms validation gives
    (tests/unit/test_embedded_config.py holds the result equal to validating the narrowed
    configuration), and what depends on the base is checked by the checks validation runs:
    the slot's uids below the highest uid, its /30 inside the pool, the audit's anchors
    outside the new state directory. So a run without a configuration file builds no
    configuration model (buildmode.py). `root` must be absolute (`state_root` makes it so):
    validation refuses a relative seccomp listener, which a relative root would give."""
    if not root.is_absolute():
        raise ConfigInvalid(f"the embedded runs' state directory {str(root)[:200]!r} is not an "
                            f"absolute path", root=str(root)[:200],
                            hint=f"set ${ROOT_ENV_VAR} to an absolute path")
    runtime_dir = root / f"slot{slot}"
    listener = base.telemetry.seccomp_listener
    sandbox = base.sandbox.model_copy(update={
        "cgroup_parent": f"/{_CGROUP_ROOT}/slot{slot}", "name_prefix": f"asci{slot}",
        "max_runs": 1,
        "uid_base": base.sandbox.uid_base + (base.sandbox.max_runs + slot) * SANDBOX_UID_COUNT})
    egress = base.egress.model_copy(update={"ci_slot": slot})
    config = base.model_copy(update={
        "daemon": base.daemon.model_copy(update={
            "runtime_dir": runtime_dir, "state_dir": runtime_dir / "state",
            "socket_path": None}),
        "sandbox": sandbox,
        "egress": egress,
        "telemetry": base.telemetry.model_copy(update={
            "seccomp_listener": listener if listener is None or listener == ""
            else str(runtime_dir / "seccomp.sock")})})
    if (problem := egress.slot_problem()) is not None:
        raise ConfigInvalid(f"the configuration narrowed to embedded run slot {slot} is not "
                            f"valid: {problem}", slot=slot, reason=problem, pool=egress.pool,
                            hint="give [egress] pool a larger network in the configuration "
                            "file (--config): its upper half holds one slot per /30, a /16 "
                            "(the default) all of them; or run fewer jobs at once on this host")
    if (problem := sandbox.uids_problem() or config.anchors_problem()) is not None:
        raise ConfigInvalid(f"the configuration narrowed to embedded run slot {slot} is not "
                            f"valid: {problem}", slot=slot, reason=problem)
    return config


def _outside(path: str | None, workspace: Path | None, what: str, *,
             within: str = "the workspace", hint: str | None = None) -> None:
    """Root writes the report, summary and audit and reads the signing key, and keeps the
    run's state (its database and audit, the slot's runtime directory with the seccomp
    listener's socket, the quarantine) and the checkout's copy under the embedded roots: none
    of them may live where the agent can write (a symlink planted there would redirect root's
    write; a file there, root's read). Both are resolved, symlinks followed, and taken as
    given too (made absolute): a path that leads out through a directory of the workspace (a
    symlink there to outside) is the agent's to point elsewhere while root works under it."""
    if path is None or workspace is None:
        return
    real = os.path.realpath(path)
    spaces = {os.path.realpath(workspace), os.path.abspath(workspace)}
    if any(p == ws or p.startswith(ws + os.sep)
           for p in (real, os.path.abspath(path)) for ws in spaces):
        hinted = {"hint": hint} if hint else {}
        raise InvalidRequest(f"{what} {path} is inside {within}, where the agent could "
                             f"replace it; put it outside {workspace}", field=what, path=path,
                             resolved=real, **hinted)


def _roots_outside(root: Path, copies: Path, workspace: Path | None) -> None:
    """The embedded roots (absolute: `state_root`, `copy_root`) outside the workspace, and
    the state root outside the copy root (a copy there is the agent's to write, and each run
    of a slot removes the slot's copy directory whole)."""
    for what, path in ((ROOT_ENV_VAR, root), (COPY_ROOT_ENV_VAR, copies)):
        _outside(str(path), workspace, what,
                 hint=f"set ${what} to a directory outside the checkout (the default is "
                 f"{DEFAULT_ROOT if what == ROOT_ENV_VAR else DEFAULT_COPY_ROOT})")
    _outside(str(root), copies, ROOT_ENV_VAR, within=f"${COPY_ROOT_ENV_VAR}",
             hint=f"set ${ROOT_ENV_VAR} and ${COPY_ROOT_ENV_VAR} to separate directories")


# The per-host directory of the slots' locks (claim_slot): one per host whatever
# $AGENT_SUPERVISOR_CI_ROOT says, checked as the roots are (`_root_only`) under this name.
SLOT_LOCKS = "slot_locks"


def _make_dirs(path: Path, mode: int) -> None:
    """`path` and whichever directories above it are missing, each made with an explicit mode
    (`mode` for `path`, 0711 above it), never the umask's: under umask 0 `mkdir -p` would
    leave them writable by anyone."""
    missing: list[Path] = []
    for directory in (path, *path.parents):
        if os.path.lexists(directory):
            break
        missing.append(directory)
    for directory in reversed(missing):
        with contextlib.suppress(FileExistsError):  # made meanwhile: judged as it is, below
            os.mkdir(directory, mode if directory == path else 0o711)


def _root_only(path: Path, what: str, *, mode: int = 0o711) -> None:
    """Root makes, writes, reads back and removes everything under the embedded roots, by path:
    nobody else may be able to change where any of it leads. `path` (absolute; made with `mode`
    if it is not there, or refused if it cannot be: a dangling symlink another user left) must
    be reached, as given and resolved, only through entries of root's: every directory root's
    and writable by root alone, or sticky (/tmp, /var/tmp: others cannot move root's entries
    there) except `path` itself; a symlink on the way root's. Otherwise a local user who made
    the directory first (any user can, in /var/tmp) could swap what root works in for a path of
    theirs: the copy read back into the checkout after the agent, the quarantine, the slot's
    state, the slots' locks. Refused with the variable to change (`what`: its name, or
    SLOT_LOCKS for the slots' lock directory, which no variable moves)."""
    if what == SLOT_LOCKS:
        named = f"the slot lock directory {path}"
        hint = (f"remove {path} or the directory on its path that another user made or can "
                f"write; embedded runs make it root's (mode 0700)")
    else:
        named = f"${what} {path}"
        hint = (f"use a directory only root can write, on a path of root's directories (the "
                f"default is {DEFAULT_ROOT if what == ROOT_ENV_VAR else DEFAULT_COPY_ROOT}); "
                f"remove one another user made")
    try:
        _make_dirs(path, mode)
    except OSError as exc:
        raise InvalidRequest(f"{named} cannot be made: {exc.strerror}", field=what,
                             path=str(path), problem=f"cannot be made ({exc.strerror})",
                             hint=hint) from exc
    for candidate in dict.fromkeys((str(path), os.path.realpath(path))):
        parts = candidate.strip("/").split("/")
        for depth in range(len(parts) + 1):
            directory = "/" + "/".join(parts[:depth])
            why = None
            try:
                st = os.lstat(directory)
            except OSError as exc:
                why = f"cannot be examined ({exc.strerror})"
            else:
                others = st.st_mode & stat.S_IWOTH or (st.st_mode & stat.S_IWGRP and st.st_gid)
                if st.st_uid != 0:
                    why = f"is owned by uid {st.st_uid}"
                elif stat.S_ISDIR(st.st_mode) and others and (
                        depth == len(parts) or not st.st_mode & stat.S_ISVTX):
                    why = f"can be written by others (mode {stat.S_IMODE(st.st_mode):04o})"
                elif not stat.S_ISDIR(st.st_mode) and not stat.S_ISLNK(st.st_mode):
                    why = "is not a directory"
            if why is not None:
                raise InvalidRequest(f"{named} is not root's alone: {directory} {why}, "
                                     f"so another user could redirect what root does there",
                                     field=what, path=str(path), directory=directory,
                                     problem=why, hint=hint)


def _write_private(path: str, data: bytes, *, append: bool = False) -> None:
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    flags |= os.O_APPEND if append else os.O_TRUNC
    fd = os.open(path, flags, 0o644)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


class EmbeddedRunner:
    """One run, start to report. Attributes fill in as the run goes, so a report can be
    written whatever point it reached."""

    def __init__(self, spec: EmbeddedRun, profile: Profile, config: Config,
                 copy: checkout_copy.CheckoutCopy | None = None) -> None:
        self.spec = spec
        self.profile = profile
        self.config = config
        # The checkout the CI job gave, and the directory the agent works on: the same, or a
        # copy for a checkout owned by root or a system user (ci/checkout_copy.py).
        self.checkout = Path(spec.run.workspace) if spec.run.workspace else None
        self.copy = copy
        self.workspace = copy.path if copy is not None else self.checkout
        self.applied_back = False
        self.name = spec.run.name or "ci-agent"
        self.core: Core | None = None
        self.run_id: str | None = None
        self.cancel_reason: str | None = None
        # Counted, never stored one by one: an agent can make millions of attempts a minute.
        self.attempts = AttemptTally()
        self.ending = Ending.NOT_STARTED
        self.end_reason: str | None = None
        self.agent_status: int | None = None
        self.error: SupervisorError | None = None
        self.supervisor_errors: list[str] = []
        self.before: dict[str, manifest.Entry] | None = None
        # The repository's refs before the agent ran: its new commits are the ones on top.
        self.refs_before: dict[str, str] | None = None
        self.provenance_error: str | None = None
        self.kill_task: asyncio.Future[None] | None = None
        self.resources: dict[str, Any] | None = None
        self.denied: dict[str, Any] | None = None
        self.egress: dict[str, Any] | None = None
        self.audit_head: dict[str, Any] | None = None
        # Where the watchdog stood with the OOM killer (Watchdog.oom), and how often it was
        # replaced or that it could not be; None: no core.
        self.watchdog: dict[str, Any] | None = None
        # The watchdog died and no new one could be started: the run is killed (fail closed).
        self.watchdog_lost: WatchdogLost | None = None
        self.audit_rows: list[dict[str, Any]] = []
        # Where planted host-code files go after the run (ci/quarantine.py); root only.
        self.quarantine_dir: Path | None = None
        # Present while a run of this slot may have left an nftables table (gateway_mark).
        self.gateway_mark: Path | None = None
        # The slot's directory being removed on a thread (teardown); awaited before exit.
        self.removing: asyncio.Future[None] | None = None

    # ------------------------------------------------------------------ signals

    def on_signal(self, signum: int) -> None:
        name = signal.Signals(signum).name
        if self._cancel(f"cancelled: {name} to agentctl"):
            log.warning("agentctl: %s: killing the run", name)

    def on_watchdog_lost(self, exc: Exception) -> None:
        """The watchdog died and no new one could be started (Core.watch_watchdog): were this
        process to die now, nothing would kill the agent. Fail closed: the run is killed
        through the audited kill path, as a cancel is (one not yet launched never is), and
        ends as a supervisor error (`watchdog_lost`, status 84) that the report names."""
        reason = "the watchdog died and no new one could be started"
        if self.watchdog_lost is None:
            self.watchdog_lost = WatchdogLost(
                f"{reason}: the run was killed, since nothing would have killed the agent had "
                f"agentctl died next", reason=str(exc)[:500])
        self._cancel(reason)

    def _cancel(self, reason: str) -> bool:
        """Kill the run (or keep it from launching) for `reason`; False: already under way."""
        if self.cancel_reason is not None:
            return False
        self.cancel_reason = reason
        if self.core is not None and self.name in self.core.arbiter.agents:
            self.kill_task = asyncio.ensure_future(self._kill(reason))
        return True

    def _cancelled(self) -> str | None:
        return self.cancel_reason

    async def _kill(self, reason: str) -> None:
        assert self.core is not None
        with contextlib.suppress(SupervisorError):
            await self.core.arbiter.act("kill", ActionRequest(scope=Scope(agent=self.name),
                                                              reason=reason), CI)

    # ------------------------------------------------------------------ the run

    async def run(self) -> None:
        if self.workspace is not None:
            from supervisor.ci import manifest, provenance

            self.before = await asyncio.to_thread(manifest.snapshot, self.workspace)
            if provenance.is_repository(self.workspace):
                try:
                    self.refs_before = await asyncio.to_thread(provenance.refs, self.workspace)
                except provenance.GitUnavailable as exc:
                    self.provenance_error = str(exc)
        # The slot's state directory goes at teardown: its database needs no WAL (Core).
        # Its cleanup is no background work: the run is answered once it is done (a niced
        # `runc delete`, with the exec of nice, was ~2 ms more on its way).
        self.core = core = await Core.assemble(self.config, ephemeral=True, cleanup_nice=0,
                                               settle_at_start=True)
        # A watchdog that dies is replaced at once, as the daemon's is; one that cannot be
        # kills the run. Its pidfd is one more reader of the loop: nothing polls.
        core.watch_watchdog(self.on_watchdog_lost)
        core.audit.append(actor=CI.label(), verb="ci_run_start", scope=f"agent:{self.name}",
                          target=self.name, detail={
                              "version": __version__, "pid": os.getpid(),
                              "watchdog_pid": core.watchdog.proc.pid,
                              "command": self.spec.run.command, "profile": self.profile.name,
                              "workspace": self.spec.run.workspace,
                              "allow_changes": self.spec.allow_changes,
                              "env_keys": sorted(self.spec.run.env), **core.runtime.describe()})
        if core.egress is not None and self.gateway_mark is not None:
            # Only a gateway run makes nftables tables: reconcile lists them (an `nft`
            # process) only if a run of this slot may have left one, as its mark says.
            core.egress.leftover_tables_possible = self.gateway_mark.exists()
            if self.profile.network.mode != "none" or self.spec.self_test:
                self.gateway_mark.touch(mode=0o600)  # before any table; gone once none is left
        await core.arbiter.reconcile()  # what a SIGKILLed run of this slot left behind
        if core.seccomp is not None:
            core.seccomp.observers.ci = self.attempts.add
        if self.spec.self_test:
            from supervisor.daemon.selftest import run_self_test

            report = await run_self_test(core.arbiter, self.config, seccomp=core.seccomp)
            core.audit.append(actor=SYSTEM.label(), verb="self_test", scope="global",
                              outcome="ok" if report["ok"] else "failed", detail=report)
            if not report["ok"]:
                raise EnforcementError("self-test failed, refusing to run the agent",
                                       **report)
        if self.cancel_reason is not None:
            self.end_reason = self.cancel_reason
            self.ending = Ending.KILLED
            if self.watchdog_lost is not None:
                raise self.watchdog_lost
            return
        update: dict[str, Any] = {"name": self.name, "profile": self.profile.name}
        if self.copy is not None:
            update["workspace"] = str(self.copy.path)
        request = self.spec.run.model_copy(update=update)
        view = await core.arbiter.launch(request, CI)
        self.run_id = view.id
        record, live = core.arbiter.get_run(view.id)  # as the API's `logs --follow` does
        if (reason := self._cancelled()) is not None:  # a signal arrived during the launch
            await self._kill(reason)
        await self._stream(Path(record.log_path), live.done if live is not None else None)
        record, _ = core.arbiter.get_run(view.id)
        self.agent_status = record.exit_code
        self.end_reason = record.end_reason
        self.ending = ending_of(record.end_cause)
        if self.watchdog_lost is not None:
            raise self.watchdog_lost

    async def _stream(self, path: Path, done: asyncio.Event | None) -> None:
        """The agent's output (stdout and stderr, merged) to our stdout as it is written."""
        out = sys.stdout.buffer
        waiter = asyncio.ensure_future(done.wait()) if done is not None else None
        try:
            with open(path, "rb") as log_file:
                while True:
                    chunk = log_file.read(1 << 16)
                    if chunk:
                        out.write(chunk)
                        out.flush()
                        continue
                    if waiter is None or waiter.done():
                        break
                    await asyncio.wait([waiter], timeout=0.05)
        finally:
            if waiter is not None and not waiter.done():
                waiter.cancel()

    # ------------------------------------------------------------------ teardown and evidence

    async def teardown(self) -> dict[str, Any]:
        """Everything of the run goes; what is still there afterwards is named (and makes the
        run a supervisor error). Never deletes a directory that is still a mount."""
        core = self.core
        residue: dict[str, Any] = {}
        discarding: asyncio.Future[None] | None = None
        if core is not None:
            await core.arbiter.shutdown("embedded run complete")
            await core.stop_observers()
            # The run is over: the disk reserve goes on a thread while the rest is torn down.
            discarding = asyncio.ensure_future(core.discard_reserve())
            leftovers = await core.runtime.leftovers()
            for leftover in leftovers:  # a kill that could not be confirmed, a stuck mount
                with contextlib.suppress(Exception):
                    await core.runtime.reap(leftover, self.config.kill.confirm_timeout)
            # Listed again only when something had to be reaped (each list is a runc call).
            if leftovers and (remaining := await core.runtime.leftovers()):
                residue["runs"] = [vars(item) for item in remaining]
            if self.gateway_mark is not None and self.gateway_mark.exists():
                if tables := _nft_tables_left(self.config.sandbox.name_prefix):
                    residue["nft_tables"] = tables  # the mark stays: the next run reaps them
                else:
                    self.gateway_mark.unlink(missing_ok=True)
            # Every agent is gone: the watchdog stands down now and exits while the evidence
            # is gathered; core.close() below only reaps it.
            core.watchdog.disarm(wait=False)
        runtime_dir = self.config.daemon.runtime_dir
        mounted = _mounts_under(runtime_dir)
        if mounted:
            residue["mounts"] = mounted
        if core is not None:
            self._collect(core)
            self._finish_audit(core)
            core.close()
        if discarding is not None:
            await discarding
        if not mounted and runtime_dir.exists():
            # Nothing reads the slot's directory any more (the database is closed, the audit
            # rows read): it goes on a thread while the evidence is gathered and written, and
            # the runner waits for it before it exits (run_embedded).
            self.removing = asyncio.ensure_future(asyncio.to_thread(remove_tree, runtime_dir))
        cgroup_residue = _remove_cgroups(self.config.sandbox.cgroup_parent)
        if cgroup_residue:
            residue["cgroups"] = cgroup_residue
        if residue:
            self.supervisor_errors.append(f"teardown left {sorted(residue)} behind")
        return {"clean": not residue, "residue": residue}

    def _collect(self, core: Core) -> None:
        """Telemetry peaks, denied syscalls and egress of the run, before the core closes."""
        summary = core.summaries.get(self.run_id) if self.run_id is not None else None
        if summary is not None:
            self.resources = {k: getattr(summary, k) for k in (
                "peak_memory_bytes", "peak_processes", "peak_threads", "peak_open_fds",
                "cpu_seconds", "max_cpu_percent", "io_read_bytes", "io_write_bytes",
                "oom_kills", "output_bytes", "output_recorded_bytes", "samples")}
        if core.seccomp is not None:  # None: no notify on this kernel (the filter still denies)
            # The agent's own attempts; the self-test canary's are in its audit row.
            container = f"{self.config.sandbox.name_prefix}-{self.run_id}"
            self.denied = {"count": self.attempts.count(container),
                           "by_syscall": self.attempts.by_syscall(container)}
        if self.run_id is not None:
            self.egress = core.egress_record(self.run_id)
        self.watchdog = dict(core.watchdog.oom)
        if core.watchdog.respawned:
            self.watchdog["respawned"] = core.watchdog.respawned
        if self.watchdog_lost is not None:
            self.watchdog["lost"] = self.watchdog_lost.detail.get("reason")

    def _finish_audit(self, core: Core) -> None:
        core.audit.append(actor=CI.label(), verb="ci_run_end", scope=f"agent:{self.name}",
                          target=self.name, outcome=self.ending.value,
                          detail={"run": self.run_id, "exit_code": self.agent_status,
                                  "reason": self.end_reason})
        if not self.spec.wants_evidence:
            return  # no report, summary or audit file: nobody would read the chain's head
        verified = core.audit.verify()
        self.audit_head = {"head_hash": verified.head_hash, "rows": verified.rows,
                           "intact": verified.ok}
        self.audit_rows = [e.model_dump(mode="json") for e in core.audit.list(limit=1_000_000)]

    def evidence(self, teardown: dict[str, Any], started: float, duration_ms: float
                 ) -> tuple[dict[str, Any], int]:
        changes = violations = quarantined = None
        if self.workspace is not None and self.before is not None:
            from supervisor.ci import checkout_copy, manifest
            from supervisor.ci.quarantine import Quarantine

            # Every path judged, none of them all held: an agent makes as many as it likes.
            taking = (Quarantine(self.workspace, self.quarantine_dir)
                      if self.quarantine_dir is not None else None)
            try:
                guarded = manifest.guard(self.workspace, self.before, self.spec.allow_changes,
                                         list(self.profile.workspace.readonly),
                                         taking.take if taking is not None else None)
            finally:
                if taking is not None:
                    taking.close()
            changes, violations = guarded.changes, guarded.violations
            quarantined = taking.taken if taking is not None else None
            try:
                if self.copy is not None and not violations.total:
                    # The scope guard passed: the checkout gets the changes, as its owner.
                    checkout_copy.apply_changes(self.copy, guarded.backward(),
                                                guarded.forward())
                    self.applied_back = True
                    if self.copy.errors_total:
                        self.supervisor_errors.append(
                            f"{self.copy.errors_total} change(s) could not be applied back to "
                            f"{self.checkout}")
            finally:
                guarded.close()
        commits = self._provenance()
        status = exit_status(self.ending, self.agent_status,
                             scope_violation=violations is not None and violations.total > 0,
                             supervisor_error=bool(self.supervisor_errors)
                             or self.watchdog_lost is not None,
                             launch_error_status=(launch_exit_status(self.error)
                                                  if self.error else None))
        # A watchdog lost while the run went is raised as its error; one lost in teardown is not.
        failed = [self.error] if self.error is not None else []
        if self.watchdog_lost is not None and self.watchdog_lost is not self.error:
            failed.append(self.watchdog_lost)
        report: dict[str, Any] = {
            "schema": REPORT_SCHEMA,
            "supervisor_version": __version__,
            "run": {"id": self.run_id, "agent": self.name, "command": self.spec.run.command,
                    "profile": self.profile.name, "workspace": self.spec.run.workspace,
                    "timeout": self.spec.run.timeout or self.profile.limits.wall_clock},
            "ending": self.ending.value,
            "end_reason": self.end_reason,
            "agent_exit_status": self.agent_status,
            "exit_status": status,
            "started_at": started,
            "duration_ms": round(duration_ms, 1),
            "resources": self.resources,
            "denied_syscalls": self.denied,
            "network": {"mode": self.profile.network.mode},
            "egress": self.egress,
            "manifest": _listed("changes", changes),
            "scope": {"allowed": self.spec.allow_changes,
                      "readonly": list(self.profile.workspace.readonly),
                      **_listed("violations", violations), **_listed("quarantined", quarantined)},
            "audit": self.audit_head,
            "provenance": commits,
            "checkout": (self.copy.record(self.applied_back) if self.copy is not None
                         else {"mode": "in_place"} if self.workspace is not None else None),
            "watchdog": self.watchdog,
            "teardown": teardown,
            "errors": [e.to_body()["error"] for e in failed]
            + [{"code": "embedded_run_failed", "message": m} for m in self.supervisor_errors],
        }
        return report, status


    def _provenance(self) -> dict[str, Any] | None:
        """The commits the agent created, read after every agent process is gone (the scope
        guard already judged the files; quarantine has run). None: not a git checkout."""
        if self.workspace is None or self.before is None:
            return None
        if self.provenance_error is not None:
            return {"error": self.provenance_error}
        if self.refs_before is None:
            return None
        from supervisor.ci import provenance

        try:
            record = provenance.collect(self.workspace, self.refs_before, run_id=self.run_id,
                                        agent=self.name)
        except provenance.GitUnavailable as exc:
            return {"error": str(exc)}
        # A copy's commits are the checkout's once applied back (same objects, same hashes).
        record["repository"] = str(self.checkout)
        return record


def _listed(name: str, listed: manifest.Listed | None) -> dict[str, Any]:
    """A list of the report (ci/manifest.py `Listed`): its first entries, its total and the
    digest of all of them; what each list holds at most is in the report too."""
    if listed is None:
        return {name: [], f"{name}_total": 0}
    return {name: listed.items, f"{name}_total": listed.total,
            f"{name}_sha256": listed.sha256, f"{name}_listed_at_most": listed.limit}


def _mounts_under(directory: Path) -> list[str]:
    prefix = os.path.realpath(directory) + "/"
    with open("/proc/self/mountinfo") as table:
        points = [line.split(" ", 5)[4].encode().decode("unicode_escape") for line in table]
    return sorted(p for p in points if p.startswith(prefix))


def _nft_tables_left(prefix: str) -> list[str]:
    """The slot's nftables tables still in the ruleset (the gateway's teardown removes each
    run's); those that could not be listed count as left."""
    try:
        return nft.tables_with_prefix(prefix)
    except SupervisorError as exc:
        return [f"unknown: {exc.message}"]


def _remove_cgroups(parent: str) -> list[str]:
    """rmdir the slot's cgroup, children first, in the v2 tree and every v1 hierarchy, and the
    gateway worker's beside it (egress/worker_process.py `worker_cgroup_path`): a gateway run
    removes that one as it stops its worker, but a gateway run killed before its teardown
    leaves it, empty (its worker dies with it: parent-death signal), and a later run without a
    gateway never made it; then the shared root if no other slot uses it. Returns what could
    not be removed."""
    left = Cgroup(parent).remove(strict=False)
    left += Cgroup(f"{parent.rstrip('/')}-gateway").remove(strict=False)
    Cgroup(_CGROUP_ROOT).remove_if_empty()  # busy while another slot runs
    return left


async def run_embedded(spec: EmbeddedRun, early_signals: list[int] | None = None) -> int:
    """The run, start to evidence. `early_signals`: those that arrived before this loop could
    take them (python -m supervisor.ci remembers them from its first line); the first one
    cancels the run as a later one would."""
    started, t0 = time.time(), time.perf_counter()
    if os.geteuid() != 0:
        raise EmbeddedNeedsRoot("agentctl run --embedded builds the sandbox itself and needs "
                                "root; run it as root or use a daemon's socket")
    base = load_config(Path(spec.config) if spec.config else None)
    if base.daemon.log_level == "debug":  # what the run logs below a warning, on stderr
        logging.getLogger().setLevel(logging.DEBUG)
    profile = load_profile(spec.run.profile or base.daemon.default_profile,
                           base.daemon.profile_dirs)
    workspace = Path(spec.run.workspace) if spec.run.workspace else None
    if workspace is not None and not workspace.is_dir():
        raise InvalidRequest(f"workspace {workspace} is not a directory", field="workspace")
    for what, path in (("report", spec.report), ("summary", spec.summary),
                       ("audit", spec.audit), ("signing_key", spec.signing_key)):
        _outside(path, workspace, what)
    key = None
    if spec.signing_key:
        from supervisor.ci.report import load_private_key

        key = load_private_key(Path(spec.signing_key))
    root = state_root(os.environ)
    copies = copy_root(os.environ)
    _roots_outside(root, copies, workspace)
    _root_only(root, ROOT_ENV_VAR)
    locks = Path(DEFAULT_ROOT) / "locks"
    _root_only(locks, SLOT_LOCKS, mode=0o700)
    slot, _lock_fd = claim_slot(locks, left_slots(root))
    config = embedded_config(base, root, slot)
    copy = None
    if workspace is not None:
        from supervisor.ci import checkout_copy

        if checkout_copy.needs_copy(workspace, config.sandbox.workspace_min_owner_uid):
            _root_only(copies, COPY_ROOT_ENV_VAR)
            try:
                copy = await asyncio.to_thread(checkout_copy.make_copy, workspace, copies,
                                               slot)
            except OSError as exc:
                raise WorkspaceInvalid(f"workspace {workspace} belongs to a system user and "
                                       f"could not be copied for the agent: {exc}",
                                       workspace=str(workspace)) from exc
    runner = EmbeddedRunner(spec, profile, config, copy)
    runner.quarantine_dir = root / "quarantine" / f"{time.strftime('%Y%m%dT%H%M%S')}-slot{slot}"
    runner.gateway_mark = locks / f"slot{slot}.gateway"
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.add_signal_handler(signum, runner.on_signal, signum)
    if early_signals:
        runner.on_signal(early_signals[0])
    try:
        await runner.run()
    except SupervisorError as exc:
        runner.error = exc
        if runner.run_id is None:
            runner.ending = Ending.NOT_STARTED
        log.error("agentctl: %s: %s", exc.code, exc.message)
        if exc.hint and exc.hint != type(exc).default_hint:  # the class's speaks of a daemon
            log.error("agentctl: hint: %s", exc.hint)
    except Exception as exc:  # the evidence must still be written and the host cleaned
        log.exception("agentctl: embedded run failed")
        runner.supervisor_errors.append(f"{type(exc).__name__}: {exc}")
    finally:
        teardown = await runner.teardown()
    try:
        return _conclude(spec, runner, teardown, key, copy, started, t0)
    finally:
        if runner.removing is not None:
            await runner.removing


def _conclude(spec: EmbeddedRun, runner: EmbeddedRunner, teardown: dict[str, Any], key: Any,
              copy: checkout_copy.CheckoutCopy | None, started: float, t0: float) -> int:
    """The report, summary and audit file written, and the exit status."""
    try:
        report, status = runner.evidence(teardown, started, (time.perf_counter() - t0) * 1000)
    finally:
        if copy is not None:
            copy.remove()
    try:
        _write_evidence(spec, runner, report, key)
    except (OSError, SupervisorError) as exc:
        log.error("agentctl: writing the report failed: %s", exc)
        return EmbeddedRunFailed.exit_status
    _say_how_it_ended(report)
    return status


def _write_evidence(spec: EmbeddedRun, runner: EmbeddedRunner, report: dict[str, Any],
                    key: Any) -> None:
    audit_path = spec.audit or (f"{spec.report}.audit.jsonl" if spec.report else None)
    rows = runner.audit_rows
    if audit_path is not None:
        _write_private(audit_path, b"".join(json.dumps(r, sort_keys=True).encode() + b"\n"
                                            for r in rows))
        if report.get("audit"):
            report["audit"]["file"] = audit_path
    if spec.report is not None or spec.summary is not None:
        from supervisor.ci.report import generate_key, sign, summary_markdown

        signed = sign(report, key or generate_key(), ephemeral=key is None)
        if spec.report is not None:
            _write_private(spec.report, json.dumps(signed, indent=2, sort_keys=True).encode()
                           + b"\n")
        if spec.summary is not None:  # $GITHUB_STEP_SUMMARY is appended to, step by step
            _write_private(spec.summary, summary_markdown(signed).encode(), append=True)


# Paths listed on stderr (the CI job's log) per list: an agent makes as many as it likes; the
# report lists more (ci/manifest.py LISTED_AT_MOST), with the count and digest of them all.
SAID_AT_MOST = 50


def _said_more(count: int) -> None:
    if count > SAID_AT_MOST:
        print(f"  ... and {count - SAID_AT_MOST} more (the report lists up to its limit of "
              f"them)", file=sys.stderr)


def _say_how_it_ended(report: dict[str, Any]) -> None:
    scope = report["scope"]
    violations = scope["violations"]
    if report["ending"] != "exited":
        print(f"agentctl: run {report['ending']} ({report['end_reason'] or '-'})",
              file=sys.stderr)
    if total := scope.get("violations_total", len(violations)):
        print(f"agentctl: {total} change(s) outside the allowed scope:", file=sys.stderr)
        for item in violations[:SAID_AT_MOST]:
            print(printable(f"  {item['path']}: {item['why']}"), file=sys.stderr)
        _said_more(total)
    quarantined = scope["quarantined"]
    if total := scope.get("quarantined_total", len(quarantined)):
        print(f"agentctl: quarantined {total} planted path(s) out of the workspace "
              f"(read-only or host-code files):", file=sys.stderr)
        for item in quarantined[:SAID_AT_MOST]:
            where = item.get("moved_to") or item.get("removed") or item.get("error", "deleted")
            print(printable(f"  {item['path']}: {where}"), file=sys.stderr)
        _said_more(total)
    if not report["teardown"]["clean"]:
        print(f"agentctl: teardown left {report['teardown']['residue']}", file=sys.stderr)


def main(early_signals: list[int] | None = None) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    confine_path()  # it runs in the job's checkout: "" or "." on $PATH would name it
    raw = os.environ.pop(ENV_VAR, None)
    try:
        if raw is None:
            raise InvalidRequest(f"run through 'agentctl run --embedded' ({ENV_VAR} unset)")
        try:
            spec = EmbeddedRun.model_validate_json(raw)
        except ValidationError as exc:
            first = exc.errors()[0]
            raise InvalidRequest(f"{'.'.join(str(p) for p in first['loc'])}: {first['msg']}",
                                 field=".".join(str(p) for p in first["loc"])) from exc
        # Objects made by the imports never need collecting: keep the collector off them
        # (python -m supervisor.ci imports with it disabled; the run itself needs it).
        gc.freeze()
        gc.enable()
        _wait_on_pidfds()
        code = asyncio.run(run_embedded(spec, early_signals))
        # The loop's close gave SIGINT back to KeyboardInterrupt: the run is over and its
        # evidence written, so a late Ctrl-C must not put a traceback in front of the exit.
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, signal.SIG_IGN)
    except SupervisorError as exc:
        print(f"agentctl: {exc.code}: {exc.message}", file=sys.stderr)
        if exc.hint and exc.hint != type(exc).default_hint:  # as run() says it (run_embedded)
            print(f"agentctl: hint: {exc.hint}", file=sys.stderr)
        code = exc.exit_status
    _exit(code)


def _wait_on_pidfds() -> None:
    """The run's processes (`runc create`, `nsenter`, `runc delete`...) waited on through their
    pidfds on the loop, as Python 3.12 does by default: 3.11's default watcher starts a thread
    per process to wait on it, and each start holds the loop until the new thread runs (0.1-1.5
    ms each on an idle host, more when the other CPU is busy). Each waits for its own pid only,
    as before: the container inits the runner reaps as subreaper are not touched."""
    if sys.version_info < (3, 12):
        asyncio.set_child_watcher(asyncio.PidfdChildWatcher())


def _exit(code: int) -> None:
    """Leave without the interpreter's teardown. Everything the run owns is already gone and
    its evidence written (the audit database closed, the report and summary flushed); what is
    left is garbage collection of every imported module (~50 ms) and the finalisers of objects
    the event loop no longer runs, which print `Event loop is closed` noise into CI logs."""
    logging.shutdown()
    with contextlib.suppress(OSError, ValueError):
        sys.stdout.flush()
    with contextlib.suppress(OSError, ValueError):
        sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
