"""The runtime router (supervisor/runtime/router.py): each run goes to the runtime it names,
an image or a runtime this host has not enabled is refused before anything is made, and
reconcile sees each leftover once. Over in-memory fake runtimes; no root."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from supervisor.config import Config
from supervisor.errors import RuntimeUnsupported
from supervisor.profiles import Profile
from supervisor.runtime.base import Leftover, RunParams
from supervisor.runtime.fake import FakeRuntime
from supervisor.runtime.router import RuntimeRouter


def params(runtime: str, image: str | None = None, logs: Path = Path("/nonexistent")
           ) -> RunParams:
    return RunParams(run_id="r1", agent="a", container_id="as-r1", netns="as-r1",
                     cgroup="agent-supervisor/as-r1", bundle=Path("/nonexistent"),
                     log_path=logs / "run.log", profile=Profile(name="default"),
                     command=["true"], uid_slot=0, runtime=runtime, image=image)


def router(**runtimes: FakeRuntime) -> RuntimeRouter:
    return RuntimeRouter(dict(runtimes), "runc", "/agent-supervisor")


def test_each_run_goes_to_the_runtime_it_names(tmp_path: Path) -> None:
    runc, docker = FakeRuntime(), FakeRuntime()
    routed = router(runc=runc, docker=docker)
    asyncio.run(routed.launch(params("docker", image="agent:1", logs=tmp_path)))
    asyncio.run(routed.launch(params("runc", logs=tmp_path)))
    assert len(docker.handles) == 1 and len(runc.handles) == 1


def test_an_image_on_runc_and_a_runtime_not_enabled_are_refused() -> None:
    runc = FakeRuntime()
    routed = router(runc=runc)
    with pytest.raises(RuntimeUnsupported) as missing:
        asyncio.run(routed.launch(params("docker")))
    assert missing.value.detail["enabled"] == ["runc"]
    with pytest.raises(RuntimeUnsupported) as image:
        asyncio.run(routed.launch(params("runc", image="agent:1")))
    assert image.value.detail["field"] == "image"
    assert runc.handles == {}


def test_reconcile_sees_a_docker_run_once_and_reaps_it_through_docker() -> None:
    runc, docker = FakeRuntime(), FakeRuntime()
    # runc's listing by name also finds the docker run's cgroup and namespace.
    docker.leftover_list = [Leftover(container_id="as-d1", runtime="docker",
                                     cgroup="agent-supervisor/as-d1")]
    runc.leftover_list = [Leftover(netns="as-d1", cgroup="agent-supervisor/as-d1"),
                          Leftover(cgroup="agent-supervisor/as-r9")]
    routed = router(runc=runc, docker=docker)
    found = asyncio.run(routed.leftovers())
    assert [(f.runtime, f.container_id or f.cgroup) for f in found] == [
        ("docker", "as-d1"), ("runc", "agent-supervisor/as-r9")]
    for leftover in found:
        asyncio.run(routed.reap(leftover, 1.0))
    assert [r.container_id for r in docker.reaped] == ["as-d1"]
    assert [r.cgroup for r in runc.reaped] == ["agent-supervisor/as-r9"]


def test_docker_is_enabled_by_the_default_runtime_or_explicitly() -> None:
    assert not Config().docker_enabled
    assert Config.model_validate({"sandbox": {"runtime": "docker"}}).docker_enabled
    assert Config.model_validate({"docker": {"enabled": True}}).docker_enabled
