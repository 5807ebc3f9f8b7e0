"""An in-memory Runtime for unit tests of the control plane (no root, no kernel). It keeps the
same contract as the runc one: runs hold "processes" until killed or exited, freezing stops
them, and a run can be told to leave a survivor so tests can prove a kill is not reported done
when something outlived it."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from supervisor.runtime.base import Leftover, RunParams


class FakeCgroup:
    """The run's cgroup as the kill path sees it: `kill` empties the fake run (unless the
    runtime leaves a survivor), and every call is counted so tests can prove each step."""

    def __init__(self, handle: FakeRunHandle) -> None:
        self.handle = handle
        self.held = False
        self.kills: list[str] = []
        self.fail_kill: OSError | None = None  # what the cgroup.kill write raises, if anything

    def hold(self) -> FakeCgroup:
        self.held = True
        return self

    def release(self) -> None:
        self.held = False

    def kill(self, *, force_fallback: bool = False) -> str:
        if force_fallback:
            return self.kill_fallback()
        if self.fail_kill is not None:
            self.kills.append("cgroup.kill failed")
            raise self.fail_kill
        self.kills.append("cgroup.kill")
        return self.handle.kill()

    def kill_fallback(self) -> str:
        self.kills.append("fallback")
        self.handle.kill(force_fallback=True)
        return "fake.fallback"

    def wait_empty(self, timeout: float) -> bool:
        """Blocking, like the real one (the kill path calls it on a thread of its own)."""
        deadline = time.monotonic() + timeout
        while self.handle.processes:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)
        return True

    def pids(self) -> list[int]:
        return [self.handle.pid or 0] if self.handle.processes else []


class FakeRunHandle:
    def __init__(self, runtime: FakeRuntime, params: RunParams) -> None:
        self.runtime = runtime
        self.params = params
        self.cgroup = FakeCgroup(self)
        self.pid: int | None = 10_000 + len(runtime.handles)
        self.processes = 1
        self.started = False
        self.frozen = False
        self.network = True
        self.cleaned = False
        self.hushed = False
        self.signals: list[int] = []
        self._exit: asyncio.Future[int | None] | None = None

    def _future(self) -> asyncio.Future[int | None]:
        if self._exit is None:
            self._exit = asyncio.get_running_loop().create_future()
        return self._exit

    async def start(self) -> None:
        self.started = True
        self.processes = self.runtime.start_processes
        self._future()

    def kill(self, *, force_fallback: bool = False) -> str:
        self.processes = 1 if self.runtime.leave_survivor else 0
        if not self.runtime.leave_survivor:
            self._died(137)
        return "fake.kill"

    def _died(self, status: int) -> None:
        """The init's exit, reported on the loop like a pidfd would (kill may run anywhere)."""
        fut = self._future()
        loop = fut.get_loop()

        def settle() -> None:
            if not fut.done():
                fut.set_result(status)

        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            settle()
        else:
            loop.call_soon_threadsafe(settle)

    async def wait_empty(self, timeout: float) -> bool:
        if self.processes == 0:
            return True
        await asyncio.sleep(timeout)
        return self.processes == 0

    async def freeze(self, timeout: float) -> bool:
        self.frozen = True
        return True

    async def thaw(self) -> None:
        self.frozen = False

    def signal_all(self, signum: int) -> int:
        self.signals.append(signum)
        if self.runtime.exit_on_signal and not self.frozen:
            self.finish(128 + signum)
        return self.processes

    def process_count(self) -> int:
        return self.processes

    def stats(self) -> dict[str, int | None]:
        return {"cpu_usec": 0, "memory_bytes": 0, "processes": self.processes}

    def finish(self, status: int) -> None:
        """The agent's command ends by itself (as the test decides)."""
        self.processes = 0
        fut = self._future()
        if not fut.done():
            fut.set_result(status)

    def wait_exit(self) -> asyncio.Future[int | None]:
        return self._future()

    def teardown_network(self) -> bool:
        had, self.network = self.network, False
        return had

    def hush(self) -> None:
        self.hushed = True

    async def cleanup(self) -> None:
        self.cleaned = True

    def residue(self) -> dict[str, Any]:
        left: dict[str, Any] = {}
        if self.processes:
            left["processes"] = [self.pid]
        if self.network:
            left["netns"] = self.params.netns
        return left


class FakeRuntime:
    name = "fake"

    def __init__(self, *, leave_survivor: bool = False, exit_on_signal: bool = True,
                 fail_launch: Exception | None = None, start_processes: int = 1) -> None:
        self.leave_survivor = leave_survivor
        self.start_processes = start_processes
        self.exit_on_signal = exit_on_signal
        self.fail_launch = fail_launch
        self.handles: dict[str, FakeRunHandle] = {}
        self.leftover_list: list[Leftover] = []
        self.reaped: list[Leftover] = []

    async def launch(self, params: RunParams) -> FakeRunHandle:
        if self.fail_launch is not None:
            raise self.fail_launch
        handle = FakeRunHandle(self, params)
        self.handles[params.run_id] = handle
        # Like the real runtime: a created run always has its (possibly empty) output file.
        params.log_path.parent.mkdir(parents=True, exist_ok=True)
        params.log_path.touch()
        return handle

    async def leftovers(self) -> list[Leftover]:
        return list(self.leftover_list)

    async def reap(self, leftover: Leftover, timeout: float) -> dict[str, Any]:
        self.reaped.append(leftover)
        self.leftover_list.remove(leftover)
        return {"mechanism": "fake.kill", "killed_pids": leftover.pids}

    def describe(self) -> dict[str, Any]:
        return {"runtime": "fake", "cgroup_mode": "none"}
