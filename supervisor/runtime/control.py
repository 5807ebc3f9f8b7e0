"""What every runtime does the same way, through the kernel rather than through the runtime:
a run is controlled by its cgroup on the v2 tree (kill, confirm empty, freeze, thaw, signal,
count, sample). Needs root."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from supervisor.runtime.base import RunParams
from supervisor.sandbox import netns
from supervisor.sandbox.cgroups import Cgroup

log = logging.getLogger(__name__)
UndoStep = Callable[[], Awaitable[None] | None]

# Waiting for cgroup.events blocks in poll(2); kills of a whole class or of every agent wait in
# parallel, so they get their own threads instead of queueing behind the default executor.
CGROUP_WAITERS = ThreadPoolExecutor(max_workers=64, thread_name_prefix="cgroup-wait")


class CgroupControl:
    """The kernel half of a RunHandle; `cgroup` holds every process of the run and `params`
    names its network namespace."""

    cgroup: Cgroup
    params: RunParams

    def kill(self, *, force_fallback: bool = False) -> str:
        return self.cgroup.kill(force_fallback=force_fallback)

    async def wait_empty(self, timeout: float) -> bool:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(CGROUP_WAITERS, self.cgroup.wait_empty, timeout)

    async def freeze(self, timeout: float) -> bool:
        self.cgroup.freeze()
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(CGROUP_WAITERS, self.cgroup.wait_frozen, timeout)

    async def thaw(self) -> None:
        self.cgroup.thaw()

    def signal_all(self, signum: int) -> int:
        return self.cgroup.signal_all(signum)

    def process_count(self) -> int:
        return len(self.cgroup.pids())

    def stats(self) -> dict[str, int | None]:
        return self.cgroup.stats()

    def hush(self) -> None:
        """Nothing to hush by default (a docker run's exit comes from its engine)."""

    def teardown_network(self) -> bool:
        if self.params.network is not None:  # the egress veth and its nftables table
            self.params.network.detach()
        return netns.remove(self.params.netns)

    def kernel_residue(self) -> dict[str, Any]:
        """What of the run the kernel still holds: processes, its namespace, its cgroup."""
        left: dict[str, Any] = {}
        if self.cgroup.exists() and self.cgroup.pids():
            left["processes"] = self.cgroup.pids()
        if netns.exists(self.params.netns):
            left["netns"] = self.params.netns
        if self.cgroup.exists():
            left["cgroup"] = str(self.cgroup.path)
        return left


async def undo_all(undo: list[UndoStep]) -> None:
    """A launch failed: undo the steps done so far, last first."""
    for step in reversed(undo):
        result = step()
        if result is not None:
            await result


def quiet(func: Callable[..., Any], *args: Any) -> None:
    try:
        func(*args)
    except Exception as exc:  # undo steps must all run; log and go on
        log.warning("cleanup step %s%r failed: %s", getattr(func, "__name__", func), args, exc)


async def kill_and_confirm(cgroup: Cgroup, timeout: float) -> dict[str, object]:
    """Reconcile's kill of a leftover cgroup: SIGKILL it all and wait for the kernel."""
    done: dict[str, object] = {}
    if cgroup.populated():
        done["killed_pids"] = cgroup.pids()
        done["mechanism"] = cgroup.kill()
        loop = asyncio.get_running_loop()
        done["confirmed_empty"] = await loop.run_in_executor(CGROUP_WAITERS, cgroup.wait_empty,
                                                             timeout)
    return done
