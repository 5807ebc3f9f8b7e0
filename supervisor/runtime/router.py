"""One `Runtime` for the daemon over the runtimes enabled on this host: each run goes to the one
its profile names (else the daemon's default); reconcile asks them all. No privilege itself."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from supervisor.errors import RuntimeUnsupported
from supervisor.runtime.base import Leftover, RunHandle, RunParams, Runtime
from supervisor.sandbox import budget
from supervisor.sandbox.cgroups import unified_root


class RuntimeRouter:
    name = "router"

    def __init__(self, runtimes: dict[str, Runtime], default: str, cgroup_parent: str,
                 runs_budget: budget.RunsBudget | None = None) -> None:
        self.runtimes = runtimes
        self.default = default
        self.cgroup_parent = cgroup_parent.strip("/")
        # All runs' pids and memory on the parent cgroup (sandbox/budget.py), written again at
        # each launch: a parent removed while empty comes back without limits.
        self.runs_budget = runs_budget

    def _pick(self, params: RunParams) -> Runtime:
        runtime = self.runtimes.get(params.runtime)
        if runtime is None:
            raise RuntimeUnsupported(
                f"the {params.runtime} runtime is not enabled on this host (daemon config: "
                f"[sandbox] runtime, [docker] enabled)", runtime=params.runtime,
                enabled=sorted(self.runtimes))
        if params.image is not None and params.runtime != "docker":
            raise RuntimeUnsupported(
                f"an image needs the docker runtime; profile {params.profile.name!r} runs on "
                f"{params.runtime}", runtime=params.runtime, field="image")
        return runtime

    async def launch(self, params: RunParams) -> RunHandle:
        runtime = self._pick(params)
        if self.runs_budget is not None:
            budget.apply(self.cgroup_parent, self.runs_budget)
        return await runtime.launch(params)

    async def leftovers(self) -> list[Leftover]:
        """Each leftover once, claimed by the first runtime that knows it: docker's labelled
        containers before runc's listing by name (which also finds docker runs' cgroups and
        namespaces when the engine is down, so those are still killed)."""
        found: list[Leftover] = []
        claimed: set[str] = set()
        for name in sorted(self.runtimes, key=lambda n: n != "docker"):
            for leftover in await self.runtimes[name].leftovers():
                key = (leftover.container_id or leftover.netns
                       or (leftover.cgroup or "").rsplit("/", 1)[-1])
                if key in claimed:
                    continue
                claimed.add(key)
                found.append(leftover)
        return found

    async def reap(self, leftover: Leftover, timeout: float) -> dict[str, Any]:
        return await self.runtimes[leftover.runtime].reap(leftover, timeout)

    def describe(self) -> dict[str, Any]:
        return {**self.runtimes[self.default].describe(), "runtimes": sorted(self.runtimes)}

    def parent_cgroup(self) -> Path:
        return unified_root() / self.cgroup_parent
