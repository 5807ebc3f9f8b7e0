"""A run is adopted whole or not at all (issue 13, audit F14): a failure at any stage of taking
a run that passed every check leaves nothing half registered. Before the run is registered
(its output, its handle) everything its claim took is let go (output drain, pidfd, held
cgroup) and reconcile reaps it; from its registration on it is killed through the kill path,
with the stage and the error as the reason, and nothing it took is closed twice. A real output
pipe, a real child process's pidfd, the real arbiter over SQLite; the kill path is recorded
(its kernel side needs root: tests/e2e/test_handover.py). No root."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from supervisor.daemon import handover
from supervisor.daemon.handover import TAKE_STAGES, _Claim, _take
from supervisor.daemon.liverun import LiveRun
from supervisor.daemon.store import RunRecord
from supervisor.profiles import load_profile
from supervisor.runtime.base import NotAdopted
from supervisor.runtime.engine_log import LogCursor
from supervisor.runtime.output import Outputs
from supervisor.runtime.sandboxed import RuncRuntime
from tests.unit.conftest import WAIT, ArbiterEnv

# Before the run is registered: let go, not killed.
LET_GO = ("output", "handle", "register")


class Injected(RuntimeError):
    pass


@dataclass
class FakeCgroup:
    path: str = "/sys/fs/cgroup/unit-test/as-r1"
    released: int = 0

    def release(self) -> None:
        self.released += 1

    def pids(self) -> list[int]:
        return []


@dataclass
class Collaborators:
    """The core's parts `_take` registers a run with; `fail` names the one that raises."""

    fail: str | None = None
    seccomp_taken: list[int] = field(default_factory=list)
    expected: list[str] = field(default_factory=list)
    restored: list[str] = field(default_factory=list)
    started: list[str] = field(default_factory=list)

    def adopt(self, _container: str, fd: int, _pid: int) -> None:  # the seccomp listener
        if self.fail == "seccomp":
            raise OSError(9, "injected")
        self.seccomp_taken.append(fd)

    def expect(self, run_id: str, _carried: dict[str, Any]) -> None:  # telemetry
        if self.fail == "telemetry":
            raise Injected("telemetry")
        self.expected.append(run_id)

    def restore(self, run_id: str, _carried: dict[str, Any]) -> None:  # containment
        if self.fail == "containment":
            raise Injected("containment")
        self.restored.append(run_id)

    def run_started(self, run: RunRecord) -> None:  # the arbiter's observers
        if self.fail == "tripwires":
            raise Injected("tripwires")
        self.started.append(run.id)


@pytest.fixture
def child() -> Iterator[subprocess.Popen[bytes]]:
    """The run's init, as far as `_take` can tell: a process it holds a pidfd of."""
    proc = subprocess.Popen(["sleep", "600"], stdin=subprocess.DEVNULL)
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait(WAIT)


def _fd_open(fd: int, kind: str) -> bool:
    try:
        return kind in os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return False


def _scenario(env: ArbiterEnv, child: subprocess.Popen[bytes], stage: str | None,
              monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Take a claimed run with a failure injected at `stage` (None: none); what came of it."""
    seen: dict[str, Any] = {"killed": []}

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        arbiter = env.arbiter()
        parts = Collaborators(fail=stage)
        arbiter.observers = parts  # type: ignore[assignment]
        outputs = Outputs(1 << 20)
        core = SimpleNamespace(arbiter=arbiter, config=env.config, outputs=outputs,
                               seccomp=parts, telemetry=parts, containment=parts, egress=None)
        run = RunRecord(id="r1", agent="a", state="running", command=["sleep", "600"],
                        profile="default", workspace=None, container_id="as-r1", netns="n",
                        cgroup="unit-test/as-r1", bundle=str(env.root / "bundle"),
                        log_path=str(env.root / "r1.log"), uid_slot=0,
                        started_at=loop.time(), timeout=600.0)
        (env.root / "r1.log").write_bytes(b"before\n")
        out_r, out_w = os.pipe2(os.O_CLOEXEC)
        sec_r, sec_w = os.pipe2(os.O_CLOEXEC)  # stands for a seccomp notify fd
        fds = [out_r, sec_r]
        cgroup = FakeCgroup()
        runc = RuncRuntime("runc", env.root / "runc", "/unit-test", "as", 1000000, 1000, 1000,
                           env.root / "workspaces", env.root / "bundles", 4, outputs)
        pidfd = os.pidfd_open(child.pid)
        claim = _Claim(run=run, profile=load_profile("default", []), tripwires=[],
                       runtime="runc", runtime_state="running", pid=child.pid, pidfd=pidfd,
                       cgroup=cgroup, cursor=LogCursor.from_wire(None),  # type: ignore[arg-type]
                       output_fd=0, runc=runc)
        entry = {"run_id": "r1", "agent": "a", "produced": 7, "recorded": 7,
                 "seccomp_fds": [1], "carried": {"telemetry": {}, "containment": {}}}

        async def kill(_core: object, run_ids: list[str], reason: str) -> None:
            """The kill path's part here: the run must be there for it, whole enough to end
            (a handle); it ends it (finalise: unregistered, its handle's pidfd, cgroup and
            output let go)."""
            live = arbiter.live[run_ids[0]]
            seen["killed"].append((run_ids, reason, live.handle is not None))
            for handle in (live.watcher, live.timeout_handle):
                if handle is not None:
                    handle.cancel()
            assert live.handle is not None
            await live.handle.output.abort()  # type: ignore[attr-defined]
            live.handle.release()  # type: ignore[attr-defined]
            arbiter.live.pop(run_ids[0])

        monkeypatch.setattr(handover, "_kill", kill)
        if stage == "output":
            monkeypatch.setattr(outputs, "resume", _raise)
        elif stage == "handle":
            monkeypatch.setattr(handover, "RuncRunHandle", _raise)
        elif stage == "register":
            monkeypatch.setattr(handover, "LiveRun", _raise)
        elif stage == "exit watch":
            monkeypatch.setattr(arbiter, "_spawn", _raise)
        elif stage == "timeout":  # the run's window: the first call_later, only that one
            call_later = loop.call_later
            failed: list[bool] = []

            def once(*args: Any, **kwargs: Any) -> asyncio.TimerHandle:
                if not failed:
                    failed.append(True)
                    raise Injected("injected")
                return call_later(*args, **kwargs)

            monkeypatch.setattr(loop, "call_later", once)
        elif stage == "account":
            monkeypatch.setattr(handover, "_adopted_detail", _raise)
        try:
            try:
                seen["detail"] = await _take(core, claim, entry, fds, None, "none handed over")
            except NotAdopted as exc:
                seen["error"] = exc
            monkeypatch.undo()
            seen["live"] = dict(arbiter.live)
            seen["fds"] = list(fds)
            seen["released"] = cgroup.released
            seen["recorders"] = dict(outputs._recorders)
            seen["pidfd_open"] = _fd_open(pidfd, "pidfd")
            seen["seccomp_taken"] = parts.seccomp_taken
            try:  # the pipe's read end: closed once the run's output has let go of it
                os.write(out_w, b"x")
                seen["output_read_end_open"] = True
            except BrokenPipeError:
                seen["output_read_end_open"] = False
            live = arbiter.live.get("r1")
            if isinstance(live, LiveRun) and live.handle is not None:  # adopted: let it go
                for handle in (live.watcher, live.timeout_handle):
                    if handle is not None:
                        handle.cancel()
                await live.handle.output.abort()  # type: ignore[attr-defined]
                live.handle.release()  # type: ignore[attr-defined]
        finally:
            for fd in (out_w, sec_w, *(fd for fd in fds if fd >= 0)):
                with contextlib.suppress(OSError):
                    os.close(fd)
            if _fd_open(pidfd, "pidfd"):  # a failure of this test before the release
                os.close(pidfd)

    asyncio.run(scenario())
    return seen


def _raise(*_args: object, **_kwargs: object) -> Any:
    raise Injected("injected")


def test_a_run_taken_without_failure_is_adopted_whole(
        env: ArbiterEnv, child: subprocess.Popen[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = _scenario(env, child, None, monkeypatch)
    assert "error" not in seen and seen["killed"] == []
    assert seen["detail"]["run"] == "r1" and seen["detail"]["seccomp_fds"] == 1
    assert set(seen["live"]) == {"r1"} and "r1" in seen["recorders"]
    assert seen["fds"] == [-1, -1]  # both taken: the caller closes neither
    assert seen["output_read_end_open"] and seen["pidfd_open"]


@pytest.mark.parametrize("stage", TAKE_STAGES)
def test_a_failure_at_any_stage_leaves_no_run_half_adopted(
        env: ArbiterEnv, child: subprocess.Popen[bytes], monkeypatch: pytest.MonkeyPatch,
        stage: str) -> None:
    seen = _scenario(env, child, stage, monkeypatch)
    error = seen.get("error")
    assert isinstance(error, NotAdopted), seen
    assert error.code == "adopt_incomplete"
    assert f"{stage}: " in str(error)  # the cause, for the `adopt failed:` row
    assert seen["live"] == {}  # nothing registered is left behind
    assert "r1" not in seen["recorders"]
    assert not seen["output_read_end_open"] or stage == "output"
    assert not seen["pidfd_open"]
    if stage in LET_GO:
        assert seen["killed"] == []
        assert seen["released"] == 1
        assert "let go whole" in str(error)
        # Not taken by the output (it failed to): still the caller's to close, only then.
        assert (seen["fds"][0] >= 0) == (stage == "output")
    else:
        # Killed through the kill path, once, with the run registered whole enough for it.
        [(run_ids, reason, had_handle)] = seen["killed"]
        assert run_ids == ["r1"] and had_handle
        assert stage in reason and "not adopted whole" in reason
        assert "killed through the kill path" in str(error)
        assert seen["fds"][0] == -1  # the run's output took it and closed it at the kill
    # A seccomp fd the listener took is the listener's; one it did not, the caller's.
    taken = bool(seen["seccomp_taken"])
    assert (seen["fds"][1] == -1) == taken
    assert taken == (TAKE_STAGES.index(stage) > TAKE_STAGES.index("seccomp"))


def test_every_stage_is_one_the_code_names() -> None:
    """The stages the test injects at are the ones `_take` goes through, in its order."""
    source = Path(handover.__file__).read_text()
    body = source.split("async def _take(", 1)[1].split("\ndef _adopted_detail(", 1)[0]
    named = [line.split('"')[1] for line in body.splitlines()
             if line.strip().startswith("stage = \"")]
    assert ["output", *named] == list(TAKE_STAGES)
