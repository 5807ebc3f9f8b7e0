"""The kill path, steps 2-5 of DESIGN.md, for one run (`RunKill`) and for a scoped halt
(`sweep`). Runs in the daemon's event loop; the blocking waits on `cgroup.events` run on
threads of their own, except a scoped halt's first CONFIRM_ON_LOOP of waiting. Needs root
for the real collaborators; the unit tier uses fakes.

Step 1 (mark the agent killed) is the arbiter's, before it calls in here; step 6 (runtime state
and bundle) happens after the answer (`Arbiter._cleanup`). What a kill touches is exactly what
`RunKill` is given:

    credentials  revoke the run's session tokens (the egress gateway)    step 2
    cgroup       SIGKILL every process; wait for the kernel to say empty  steps 3, 4
    network      delete the run's veth, nftables table and netns          step 5

A sweep is also given `hush`: what of the daemon would wake on the runs' deaths goes quiet
before its SIGKILL and catches up after the answer (`sweep`).

No step can stop the ones after it: a failed revocation, a failed `cgroup.kill` write or a
failed network teardown is recorded and the kill goes on (the cgroup falls back to freeze +
SIGKILL, and an unconfirmed kill is retried until the kernel confirms it)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent import futures
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

log = logging.getLogger(__name__)

# Waiting for cgroup.events blocks in poll(2); a scoped halt confirms every run at once, so the
# waits get threads of their own instead of queueing behind the default executor.
CONFIRMERS = ThreadPoolExecutor(max_workers=128, thread_name_prefix="kill-confirm")
# A scoped halt waits for the kernel in the loop's own thread this long at most (the verb
# holds the reads meanwhile, VerbsFirst), then on a CONFIRMERS thread until its deadline: a
# class halt is confirmed in a few ms, and the hand-off to a thread and back cost about as
# much as the kernel's work beyond raw's (docs/benchmarks.md run 12).
CONFIRM_ON_LOOP = 0.01


class RevocationCheck(Protocol):
    """A drill's test of step 2, taken before its kill: after it, `result()` presents the
    run's token to the gateway that held it and says "pass" only if the gateway refused it as
    revoked. Until `result()` or `release()`, the gateway keeps the run's side (its listener),
    so what answers is the revocation, not the run's end."""

    async def result(self) -> str: ...

    def release(self) -> None: ...


class Credentials(Protocol):
    """Step 2: the session tokens a run holds (the egress gateway)."""

    async def revoke(self, run_id: str) -> bool:
        """Make the run's tokens stop working at once; True if it held any."""
        ...

    def revocation_check(self, run_id: str) -> RevocationCheck | None:
        """For a drill, before its kill: the check of the run's token (None: it holds none)."""
        ...


class NoCredentials:
    """A supervisor without a credential gateway: runs hold no tokens."""

    async def revoke(self, run_id: str) -> bool:
        return False

    def revocation_check(self, run_id: str) -> RevocationCheck | None:
        return None


class RunCgroup(Protocol):
    """Steps 3 and 4: supervisor.sandbox.cgroups.Cgroup, held open since the launch."""

    def kill(self, *, force_fallback: bool = False) -> str: ...

    def kill_fallback(self) -> str: ...

    def wait_empty(self, timeout: float) -> bool:
        """Blocking; called on a CONFIRMERS thread."""
        ...

    def pids(self) -> list[int]: ...


class ParentCgroup(RunCgroup, Protocol):
    """The runs' parent, held open from startup: a global halt's one write (step 3)."""

    def stale(self) -> bool:
        """Its held files are of a directory removed since (runc made it again)."""
        ...

    def hold(self) -> object: ...

    def release(self) -> None: ...


class RunNetwork(Protocol):
    """Step 5: the run's network (veth, nftables table, network namespace)."""

    def teardown_network(self) -> bool:
        """Remove it; True if a namespace was there to remove."""
        ...


@dataclass
class HaltReport:
    """What the kill path did to one run; its `detail()` goes into the audit row."""

    run_id: str
    credentials_revoked: bool | None = None
    mechanism: str | None = None
    escalated: str | None = None
    confirmed: bool = False
    netns_removed: bool | None = None
    survivors: list[int] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)
    halted_at: float | None = None  # perf_counter() once step 5 is done

    def detail(self) -> dict[str, Any]:
        out: dict[str, Any] = {"run": self.run_id, "mechanism": self.mechanism,
                               "confirmed_empty": self.confirmed,
                               "netns_removed": self.netns_removed,
                               "credentials_revoked": self.credentials_revoked}
        if self.escalated is not None:
            out["escalated"] = self.escalated
        if self.survivors:
            out["survivors"] = self.survivors
        if self.errors:
            out["errors"] = self.errors
        return out


class RunKill:
    """Steps 2-5 for one run, each a method so a scoped halt can do every run's step 3 before
    any run's step 4."""

    def __init__(self, run_id: str, *, credentials: Credentials, cgroup: RunCgroup,
                 network: RunNetwork, confirm_timeout: float) -> None:
        self.credentials = credentials
        self.cgroup = cgroup
        self.network = network
        self.confirm_timeout = confirm_timeout
        self.report = HaltReport(run_id)

    async def halt(self) -> HaltReport:
        await self.revoke()
        self.sigkill()
        await self.confirm()
        await self.teardown_off_loop()
        return self.report

    async def revoke(self) -> None:
        """Step 2: before any process dies, so no dying agent spends a credential."""
        try:
            self.report.credentials_revoked = await self.credentials.revoke(self.report.run_id)
        except Exception as exc:  # the kill goes on; the row says what failed
            log.exception("run %s: revoking credentials failed", self.report.run_id)
            self.report.errors["credentials"] = f"{type(exc).__name__}: {exc}"

    def sigkill(self, mechanism: str | None = None) -> None:
        """Step 3; `mechanism` names a kill already done for this run (the parent's write)."""
        if mechanism is not None:
            self.report.mechanism = mechanism
            return
        try:
            self.report.mechanism = self.cgroup.kill()
        except FileNotFoundError:
            self.report.mechanism = "none: the cgroup was already gone"
        except OSError as exc:
            self.report.errors["kill"] = f"{type(exc).__name__}: {exc}"
            self.report.mechanism = self._fallback()

    async def confirm(self) -> bool:
        """Step 4: the kernel's `populated 0`; once more with the fallback if it is late."""
        return await self.settle(await self._wait_empty())

    async def settle(self, confirmed: bool) -> bool:
        """Step 4 after the first wait (`confirmed`: the kernel said empty in time): if it
        did not, escalate and wait once more; an unconfirmed run's survivors are recorded."""
        if not confirmed:
            log.critical("run %s: cgroup not empty %.1fs after kill; escalating",
                         self.report.run_id, self.confirm_timeout)
            self.report.escalated = self._fallback()
            confirmed = await self._wait_empty()
        return self._record(confirmed)

    def _record(self, confirmed: bool) -> bool:
        """The one place step 4's outcome goes into the report (`settle`, `keep_killing`):
        the kernel's word, and if it is not empty, the processes it still holds."""
        self.report.confirmed = confirmed
        self.report.survivors = []
        if not confirmed:
            try:
                self.report.survivors = self.cgroup.pids()
            except OSError as exc:
                self.report.errors["survivors"] = f"{type(exc).__name__}: {exc}"
        return confirmed

    def teardown(self) -> None:
        """Step 5: the network goes, whatever the confirmation said."""
        try:
            self.report.netns_removed = self.network.teardown_network()
        except Exception as exc:
            log.exception("run %s: network teardown failed", self.report.run_id)
            self.report.errors["network"] = f"{type(exc).__name__}: {exc}"
        self.report.halted_at = time.perf_counter()

    def wait_empty_by(self, deadline: float) -> bool:
        """Blocking (a CONFIRMERS thread): the first wait of step 4, until `deadline`
        (monotonic); an error is recorded and counts as not confirmed."""
        try:
            return self.cgroup.wait_empty(max(0.0, deadline - time.monotonic()))
        except OSError as exc:
            self.report.errors["confirm"] = f"{type(exc).__name__}: {exc}"
            return False

    async def teardown_off_loop(self) -> None:
        """Step 5 on a thread: unmounting a namespace can wait on the kernel for a while, and
        a scoped halt tears every run's down at once."""
        await asyncio.get_running_loop().run_in_executor(CONFIRMERS, self.teardown)

    async def keep_killing(self, interval_log: int = 10) -> int:
        """An unconfirmed kill is not done: SIGKILL again (alternating the mechanism) until the
        kernel reports the cgroup empty; returns the number of attempts."""
        attempts = 0
        while True:
            attempts += 1
            if attempts % 2:
                self.sigkill()
            else:
                self._fallback()
            if await self._wait_empty():
                self._record(True)
                return attempts
            if attempts % interval_log == 0:
                log.critical("run %s: still not empty after %d kill attempts",
                             self.report.run_id, attempts)

    def _fallback(self) -> str:
        try:
            return self.cgroup.kill_fallback()
        except OSError as exc:
            self.report.errors["fallback"] = f"{type(exc).__name__}: {exc}"
            return "failed"

    async def _wait_empty(self) -> bool:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(CONFIRMERS, self.cgroup.wait_empty,
                                              self.confirm_timeout)
        except OSError as exc:
            self.report.errors["confirm"] = f"{type(exc).__name__}: {exc}"
            return False


async def sweep(kills: Sequence[RunKill], parent: ParentCgroup | None = None,
                covered: frozenset[str] = frozenset(),
                beside: Callable[[], object] | None = None,
                hush: Callable[[], object] | None = None,
                signalled: Mapping[str, str] | None = None,
                log_line: list[str] | None = None) -> list[HaltReport]:
    """A scoped halt in one sweep: every run's credentials, then every run's SIGKILL (with a
    `parent`, one `cgroup.kill` write for the runs in `covered`, which live under it), then
    every confirmation and every network at once. Nothing here waits on a runtime.

    Revocations are awaited one after the other, not gathered: a revocation does not wait
    (`Credentials`), so each completes inline, where a hundred tasks each waited a turn of the
    loop (170 ms in front of a global halt's SIGKILL on a busy host, docs/benchmarks.md run 8).
    With more than one run, step 5 starts as soon as every SIGKILL is sent and runs beside
    step 4: a process with a SIGKILL pending never returns to user space, so removing its
    network now cuts off nothing that could still act, and the teardown threads' work overlaps
    the kernel's instead of following it. A run's `halted_at` is when both are done.

    `beside` (the kill's store write of step 1) is called once on the loop after every
    SIGKILL is sent, before the confirmation's wait: the kernel empties the cgroups
    meanwhile, so the write costs the answer nothing unless it outlasts them.

    With more than one run, step 4 waits in the loop's thread first (`_confirm_together`),
    and the networks' threads are joined there too, both within CONFIRM_ON_LOOP of the
    wait's start: a class halt goes from its SIGKILLs to its audit rows without a hop
    between threads or a turn of the loop.

    `hush` (with more than one run) is called once after the revocations and before the
    first SIGKILL: what of the daemon wakes on the runs' deaths (their inits' exit watchers,
    their seccomp fds) stops listening until after the answer. On two cores the daemon's
    reactions to a global halt's 2,100 deaths took the CPU the dying processes needed, and
    the confirmation lagged raw `cgroup.kill` by as much (docs/benchmarks.md run 12). One
    that fails is logged; the kill goes on.

    `signalled` (run id -> what was written): runs whose own `cgroup.kill` was written for
    this kill already (the owners' acceptor, before the loop saw the request). The kernel
    has every process of such a subtree dying, and those forked meanwhile too, so step 3 is
    not written again: while the kernel is killing in it, a second write waited 1.4-4.3 ms
    in 12 of 30 class halts (docs/benchmarks.md run 16). Its confirmation is step 4 as for
    any run, and a run not confirmed escalates as ever.

    `log_line`: the sweep's line (with more than one run) is appended to it for the caller
    to log once the answer is out, instead of logged here, between the confirmation and the
    audit rows (0.1 ms of a class halt's answer, docs/benchmarks.md run 18)."""
    t_start = time.perf_counter()
    for kill in kills:
        await kill.revoke()
    t_revoked = time.perf_counter()
    if hush is not None and len(kills) > 1:
        try:
            hush()
        except Exception:
            log.exception("kill: hushing the runs' listeners failed")
    t_hushed = time.perf_counter()
    parent_mechanism: str | None = None
    parent_write_ms = 0.0
    if parent is not None and covered and parent.stale():
        # Its files would kill nothing (ENODEV) and read empty at once; each run's own are
        # live. The arbiter holds the parent again at the next launch.
        log.error("global halt: the parent cgroup held open was removed since; killing run "
                  "by run")
        parent = None
    if parent is not None and covered:
        try:
            t_write = time.perf_counter_ns()
            parent_mechanism = f"{parent.kill()} (parent)"
            # The kernel signals every task of the subtree inside this one write(2), and on a
            # small host the dying tasks preempt the writer: 65-103 ms for 2,000 processes
            # with no daemon at all (docs/benchmarks.md run 9). Logged apart from the rest.
            parent_write_ms = (time.perf_counter_ns() - t_write) / 1e6
        except OSError as exc:
            log.error("global halt: the parent's cgroup.kill failed (%s); killing run by run",
                      exc)
    sent = signalled or {}
    for kill in kills:
        run_id = kill.report.run_id
        kill.sigkill(parent_mechanism if run_id in covered else sent.get(run_id))
    t_killed = time.perf_counter()
    loop = asyncio.get_running_loop()
    aside = _Beside(beside)
    if beside is not None:  # first in the loop's queue: before any confirmation's answer
        loop.call_soon(aside.run)
    networks: list[Future[None]] | None = [
        CONFIRMERS.submit(_tear_down_all, chunk)
        for chunk in _chunks(kills, _TEARDOWNS_PER_THREAD)] if len(kills) > 1 else None
    if parent is not None and parent_mechanism is not None and kills:
        # One wait on the parent's cgroup.events instead of one per run while the kernel
        # works; each run's own confirmation after it is then immediate.
        try:
            await loop.run_in_executor(CONFIRMERS, parent.wait_empty, kills[0].confirm_timeout)
        except OSError as exc:
            log.error("global halt: waiting on the parent failed (%s); confirming run by run",
                      exc)
    on_loop = 0.0  # until when this thread may block for step 5's threads (monotonic)
    if len(kills) > 1:
        aside.run()  # unless the parent's wait let it run: before this thread waits too
        on_loop = await _confirm_together(kills)
    else:
        for kill in kills:  # inline: its wait is on a thread before `beside` runs
            await kill.confirm()
    aside.run()  # ran already unless nothing above waited (no runs)
    t_confirmed = time.perf_counter()
    if networks is None:
        await asyncio.gather(*(kill.teardown_off_loop() for kill in kills))
    else:
        # Joined in this thread, within what is left of CONFIRM_ON_LOOP: a turn of the loop
        # for their futures cost ~0.15 ms of its CPU after the confirmation, in 3 of 5 class
        # halts (docs/benchmarks.md run 20). Beyond that, on the loop.
        late = futures.wait(networks, max(0.0, on_loop - time.monotonic())).not_done
        if late:
            await asyncio.wait([asyncio.wrap_future(future) for future in late])
        for future in networks:
            future.result()  # what the teardown threads raised, as awaiting them did
        for kill in kills:  # halted once its network is down and its cgroup confirmed
            kill.report.halted_at = max(kill.report.halted_at or t_confirmed, t_confirmed)
    if len(kills) > 1:
        in_write = (f" (of which the parent's cgroup.kill write(2) {parent_write_ms:.1f} ms)"
                    if parent_mechanism is not None else
                    f" ({sum(1 for kill in kills if kill.report.run_id in sent)} written "
                    "already)" if sent else "")
        line = (f"sweep of {len(kills)} runs: revoked in {(t_revoked - t_start) * 1000:.1f} "
                f"ms, hushed in {(t_hushed - t_revoked) * 1000:.1f} ms, SIGKILL sent in "
                f"{(t_killed - t_hushed) * 1000:.1f} ms{in_write}, confirmed "
                f"{(t_confirmed - t_killed) * 1000:.1f} ms after the kill, networks down "
                f"{(time.perf_counter() - t_confirmed) * 1000:.1f} ms after that (torn down "
                "beside the confirmation)")
        if log_line is not None:
            log_line.append(line)
        else:
            log.info("%s", line)
    return [kill.report for kill in kills]


class _Beside:
    """A sweep's `beside`, run once: from the loop's queue, or after the confirmation."""

    def __init__(self, call: Callable[[], object] | None) -> None:
        self.call = call

    def run(self) -> None:
        call, self.call = self.call, None
        if call is not None:
            try:
                call()
            except Exception:  # the kill goes on; what failed is the caller's to alarm
                log.exception("kill: the work beside the confirmation failed")


# A scoped halt's network teardowns, this many runs to a CONFIRMERS thread.
_TEARDOWNS_PER_THREAD = 25


def _chunks(kills: Sequence[RunKill], size: int) -> list[Sequence[RunKill]]:
    return [kills[i:i + size] for i in range(0, len(kills), size)]


def _tear_down_all(kills: Sequence[RunKill]) -> None:
    for kill in kills:
        kill.teardown()


async def _confirm_together(kills: Sequence[RunKill]) -> float:
    """Step 4 for many runs in one thread: each run's cgroup waited for in turn, against one
    deadline (they all die at once, so the first wait is the long one and the others are
    a read each), as raw `cgroup.kill` followed by a wait per cgroup does; a thread per run
    woke and handed its answer to the loop one by one. The wait is the loop's own for at
    most CONFIRM_ON_LOOP (a class halt's whole wait on a quiet host: no thread to wake and
    no answer to hand back); the runs still populated then are waited for on a CONFIRMERS
    thread until the deadline. Runs not confirmed by the deadline escalate, each as a
    single kill does. Returns until when the loop's thread could wait (monotonic), which
    bounds its join of the networks' threads after."""
    deadline = time.monotonic() + max(kill.confirm_timeout for kill in kills)
    here = min(deadline, time.monotonic() + CONFIRM_ON_LOOP)
    waited = [kill.wait_empty_by(here) for kill in kills]
    late = [index for index, confirmed in enumerate(waited) if not confirmed]
    if late and here < deadline:

        def wait_late() -> list[bool]:
            return [kills[index].wait_empty_by(deadline) for index in late]

        again = await asyncio.get_running_loop().run_in_executor(CONFIRMERS, wait_late)
        for index, confirmed in zip(late, again, strict=True):
            waited[index] = confirmed
    for kill, confirmed in zip(kills, waited, strict=True):
        if confirmed:  # settle(True) awaits nothing: inline, no task and no turn of the loop
            await kill.settle(True)
    await asyncio.gather(*(kill.settle(False)
                           for kill, confirmed in zip(kills, waited, strict=True)
                           if not confirmed))
    return here
