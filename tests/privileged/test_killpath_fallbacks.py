"""The kill path when resources run out, on the real kernel: a held cgroup kills and confirms
with the descriptor table full; a cgroup.kill write that fails falls back to freeze + SIGKILL
and still confirms; a global halt whose held parent was removed and made again kills and
confirms run by run, and break-glass holds such a parent again; break-glass (SIGUSR1 and the
HALT file) kills with the event loop stuck and every descriptor in use. Real cgroups on the
v2 tree, real processes; needs root.

The tests make their own cgroups under agent-supervisor-test/ and remove them."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import resource
import secrets
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from supervisor.config import Config, KillSection
from supervisor.daemon.breakglass import BreakGlass
from supervisor.daemon.killpath import NoCredentials, RunKill, sweep
from supervisor.models import ActionRequest, ActionResult, Actor
from supervisor.sandbox.cgroups import Cgroup, unified_root
from supervisor.states import EndCause

WAIT = 10.0


@dataclass
class Tree:
    """A parent cgroup with run cgroups under it, each holding real `sleep` processes."""

    parent: Cgroup
    runs: list[Cgroup]
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def alive(self) -> list[int]:
        return [p.pid for p in self.procs if p.poll() is None]


def _spawn_into(cgroup: Cgroup, count: int) -> list[subprocess.Popen[bytes]]:
    procs = []
    for _ in range(count):
        proc = subprocess.Popen(["sleep", "600"], stdin=subprocess.DEVNULL)
        (cgroup.path / "cgroup.procs").write_text(str(proc.pid))
        procs.append(proc)
    return procs


@pytest.fixture
def tree() -> Iterator[Tree]:
    top = unified_root() / "agent-supervisor-test"
    created_top = not top.exists()
    relative = f"agent-supervisor-test/kp-{secrets.token_hex(3)}"
    (unified_root() / relative).mkdir(parents=True)
    runs = []
    for i in range(2):
        (unified_root() / relative / f"run{i}").mkdir()
        runs.append(Cgroup(f"{relative}/run{i}"))
    made = Tree(Cgroup(relative), runs)
    try:
        for run in runs:
            made.procs += _spawn_into(run, 3)
        yield made
    finally:
        for proc in made.procs:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait()
        for run in runs:
            run.remove(strict=False)
        made.parent.remove(strict=False)
        if created_top:
            with contextlib.suppress(OSError):
                top.rmdir()


@contextlib.contextmanager
def descriptors_exhausted() -> Iterator[int]:
    """Every descriptor this process may have is in use (RLIMIT_NOFILE lowered to what is
    open, the rest filled), as when ~20,000 half-open connections took the table."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    filler: list[int] = []
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
    try:
        while True:
            try:
                filler.append(os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC))
            except OSError as exc:
                assert exc.errno == errno.EMFILE
                break
        with pytest.raises(OSError) as full:
            os.open("/dev/null", os.O_RDONLY)
        assert full.value.errno == errno.EMFILE
        yield len(filler)
    finally:
        for fd in filler:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def _reap(procs: list[subprocess.Popen[bytes]]) -> list[int]:
    """Until these (killed) processes are reaped, or WAIT: the pids still alive. Only these:
    the other run's processes live on by design, and waiting for them too cost every test the
    whole WAIT."""
    deadline = time.monotonic() + WAIT
    while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
        time.sleep(0.01)
    return [p.pid for p in procs if p.poll() is None]


@contextlib.contextmanager
def remade_parent(tree: Tree) -> Iterator[tuple[Cgroup, list[subprocess.Popen[bytes]]]]:
    """A parent held, then removed while empty and made again with a run of three `sleep`s
    under it (as a test session's teardown or an operator can, and runc then does): its held
    files are stale. Yields it (still holding those files) and the processes; removes both."""
    stale = Cgroup(f"{tree.parent.relative}-again")
    stale.path.mkdir()
    stale.hold()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        stale.path.rmdir()
        (stale.path / "run").mkdir(parents=True)
        procs = _spawn_into(Cgroup(f"{stale.relative}/run"), 3)
        assert stale.stale()
        yield stale, procs
    finally:
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait()
        Cgroup(stale.relative).remove(strict=False)
        stale.release()


class Network:
    def teardown_network(self) -> bool:
        return False


def test_a_global_halt_whose_parent_was_made_again_kills_every_run(tree: Tree) -> None:
    """The parent held at startup, removed while empty and made again for new runs (as a
    test session's teardown or an operator can, and runc then does): its held files would
    kill nothing and read `populated 0` at once. The sweep sees it and kills run by run,
    through each run's own held files; the arbiter's next launch holds the new parent."""
    with remade_parent(tree) as (stale, procs):
        assert not tree.parent.hold().stale()
        run = Cgroup(f"{stale.relative}/run").hold()
        kill = RunKill("r0", credentials=NoCredentials(), cgroup=run, network=Network(),
                       confirm_timeout=WAIT)
        [report] = asyncio.run(sweep([kill], stale, frozenset({"r0"})))
        assert report.mechanism == "cgroup.kill" and report.confirmed, report
        assert not run.populated()
        assert _reap(procs) == []
        assert tree.alive(), "the kill reached beyond the stale parent's runs"


def test_a_held_cgroup_kills_and_confirms_with_no_descriptor_left(tree: Tree) -> None:
    run = tree.runs[0].hold()
    kill = RunKill("r0", credentials=NoCredentials(), cgroup=run, network=Network(),
                   confirm_timeout=WAIT)

    async def halt() -> None:
        with descriptors_exhausted():
            report = await kill.halt()
            assert report.mechanism == "cgroup.kill" and report.confirmed, report
            assert not report.errors, report
            assert not run.populated()

    asyncio.run(halt())
    assert _reap(tree.procs[:3]) == []
    assert tree.runs[1].populated(), "the kill reached beyond its run"


def test_a_failing_cgroup_kill_falls_back_and_confirms_with_no_descriptor_left(
        tree: Tree) -> None:
    run = tree.runs[0].hold()
    # The held cgroup.kill is swapped for a read-only descriptor: the write fails (EBADF) on
    # the real kernel, as a failing write would, and nothing new can be opened.
    held = run._held["cgroup.kill"]
    os.close(held)
    run._held["cgroup.kill"] = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
    kill = RunKill("r0", credentials=NoCredentials(), cgroup=run, network=Network(),
                   confirm_timeout=WAIT)

    async def halt() -> None:
        with descriptors_exhausted():
            report = await kill.halt()
        assert report.confirmed, report
        # The failed write was not the end of it: the cgroup fell back by itself.
        assert report.mechanism in ("freeze+sigkill", "sigkill"), report
        assert not run.populated()

    asyncio.run(halt())
    assert _reap(tree.procs[:3]) == []
    assert tree.runs[1].populated()


class Audit:
    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def append(self, **row: Any) -> None:
        self.rows.append(row)


class LoopArbiter:
    """What break-glass needs of the arbiter: its held parent, the halt flag, the audited kill
    (here recorded, so the test can see when the loop got to it)."""

    def __init__(self, parent: Cgroup) -> None:
        self.parent = parent
        self.global_halt = False
        self.config = Config(kill=KillSection(confirm_timeout=WAIT))
        self.audit = Audit()
        self.acts: list[tuple[str, EndCause, float | None]] = []
        self._tasks: set[asyncio.Task[Any]] = set()

    def track(self, task: asyncio.Task[Any]) -> asyncio.Task[Any]:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def act(self, verb: str, request: ActionRequest, actor: Actor, *,
                  cause: EndCause = EndCause.KILLED, arrived: float | None = None
                  ) -> ActionResult:
        self.acts.append((verb, cause, arrived))
        return ActionResult(verb=verb, scope="global", reason=request.reason,
                            actor=actor.label(), results=[])


@pytest.mark.parametrize("trigger", ["signal", "file"])
def test_break_glass_kills_with_the_loop_stuck_and_every_descriptor_in_use(
        tree: Tree, tmp_path: Path, trigger: str) -> None:
    previous_mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
    parent = tree.parent.hold()
    arbiter = LoopArbiter(parent)
    halt_file = tmp_path / "run" / "HALT"
    glass = BreakGlass(arbiter, halt_file)  # type: ignore[arg-type]
    seen: dict[str, Any] = {}
    halt_file.parent.mkdir(parents=True)
    prepared = halt_file.with_name(".HALT.tmp")
    prepared.write_text("stuck loop drill\n")  # the renaming needs no descriptor

    def stuck() -> None:
        """A callback that holds the loop, as a starved or wedged loop would, while the
        descriptor table is full; it returns once the kernel says everything is dead."""
        with descriptors_exhausted():
            if trigger == "signal":
                # To the break-glass thread itself: other threads of this test process (unlike
                # the daemon's, masked from main() on) would take a process-wide SIGUSR1.
                [waiter] = [t for t in threading.enumerate() if t.name == "break-glass-signal"]
                assert waiter.ident is not None
                signal.pthread_kill(waiter.ident, signal.SIGUSR1)
            else:  # root's --halt writes it elsewhere and renames it into place
                os.rename(prepared, halt_file)
            seen["empty"] = parent.wait_empty(WAIT)
            seen["acts_while_stuck"] = len(arbiter.acts)
            seen["halt_flag"] = arbiter.global_halt

    async def body() -> None:
        await glass.start()
        try:
            asyncio.get_running_loop().call_soon(stuck)
            await asyncio.sleep(0)
            deadline = time.monotonic() + WAIT
            while not arbiter.acts and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
        finally:
            glass.stop()

    try:
        asyncio.run(body())
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous_mask)
    assert seen["empty"] is True, "break-glass did not kill while the loop was stuck"
    assert seen["acts_while_stuck"] == 0, "the kill must not have needed the loop"
    assert seen["halt_flag"] is True, "launches must be refused before the loop runs again"
    assert _reap(tree.procs) == []
    # Once the loop ran again, the halt went through the audited kill path, timed from the
    # trigger.
    [(verb, cause, arrived)] = arbiter.acts
    assert (verb, cause) == ("kill", EndCause.BREAK_GLASS) and arrived is not None
    [row] = [r for r in arbiter.audit.rows if r["verb"] == "break_glass"]
    assert row["detail"]["kernel"]["confirmed_empty"] is True
    if trigger == "file":
        assert row["reason"] == "break-glass: stuck loop drill"
        assert not halt_file.exists() and list(halt_file.parent.glob("HALT.done.*"))


def test_break_glass_holds_a_parent_made_again_and_kills_through_it(tree: Tree,
                                                                    tmp_path: Path) -> None:
    """Break-glass's one write reaches a parent that was removed and made again since the
    daemon held it, and its confirmation is the live parent's, not a removed one's."""
    with remade_parent(tree) as (stale, procs):
        glass = BreakGlass(LoopArbiter(stale), tmp_path / "HALT")  # type: ignore[arg-type]
        kernel = glass._kill_parent()
        assert kernel["mechanism"] == "cgroup.kill" and kernel["confirmed_empty"] is True, kernel
        assert not stale.stale() and not stale.populated()
        assert _reap(procs) == []
        assert tree.alive(), "the kill reached beyond the parent"
