"""How loudly a watchdog within the OOM killer's reach is reported: quiet where the host
withholds the capability and the runs' memory budget leaves the rest of the host memory of its
own (the agents cannot bring the OOM killer to the watchdog), loud where it weakens
containment. The runs' budget against the limits above it, on fake cgroup trees; the
capability and user namespace read from /proc's text. No root."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from supervisor.ci.action import annotation_lines
from supervisor.ci.report import summary_markdown
from supervisor.daemon.watchdog import (
    CAP_SYS_RESOURCE,
    has_capability,
    in_initial_user_namespace,
    oom_exposure,
)
from supervisor.sandbox.budget import RunsBudget, leaves_host_memory, mem_total

DENIED = OSError(errno.EACCES, os.strerror(errno.EACCES))


def test_a_host_that_withholds_the_capability_is_quiet_when_the_budget_leaves_memory() -> None:
    exposure = oom_exposure(DENIED, capable=False, runs_leave_host_memory=True)
    assert exposure["oom_protected"] is False
    assert exposure["weakens_containment"] is False
    assert "CAP_SYS_RESOURCE" in exposure["why"]


def test_runs_that_may_fill_the_memory_make_it_loud() -> None:
    exposure = oom_exposure(DENIED, capable=False, runs_leave_host_memory=False)
    assert exposure["weakens_containment"] is True
    assert "take the kill switch" in exposure["why"]


@pytest.mark.parametrize("exc,capable", [
    (DENIED, True),  # the capability held, and still refused: unexplained
    (OSError(errno.EROFS, os.strerror(errno.EROFS)), False),  # not a missing capability
    (OSError(errno.ENOENT, os.strerror(errno.ENOENT)), True),
])
def test_an_unexplained_refusal_is_loud_whatever_the_budget(exc: OSError,
                                                             capable: bool) -> None:
    exposure = oom_exposure(exc, capable=capable, runs_leave_host_memory=True)
    assert exposure["weakens_containment"] is True
    assert exc.strerror in exposure["why"]


def test_the_capability_is_read_from_the_effective_set() -> None:
    # The bounding and permitted sets may hold it; only CapEff counts.
    without = "CapPrm:\t000001ffffffffff\nCapEff:\t000001fffeffffff\n"
    assert not has_capability(CAP_SYS_RESOURCE, without)
    assert has_capability(CAP_SYS_RESOURCE, "CapEff:\t0000000001000000\n")
    assert not has_capability(CAP_SYS_RESOURCE, "Name:\tx\n")


def test_only_the_hosts_user_namespace_has_the_hosts_capabilities() -> None:
    assert in_initial_user_namespace("         0          0 4294967295\n")
    assert not in_initial_user_namespace("         0     100000      65536\n")
    assert not in_initial_user_namespace("         0          0 4294967295\n"
                                         "4294967295 0 1\n")


def _v2(tmp_path: Path, limits: dict[str, str]) -> Path:
    (tmp_path / "cgroup.controllers").write_text("memory pids\n")
    for relative, value in limits.items():
        (tmp_path / relative).mkdir(parents=True, exist_ok=True)
        (tmp_path / relative / "memory.max").write_text(value + "\n")
    return tmp_path


def test_a_limit_above_the_runs_that_the_budget_fills_is_found_on_v2(tmp_path: Path) -> None:
    # A container's own limit shows at its cgroup namespace's root.
    root = _v2(tmp_path, {"": str(2 << 30), "agent-supervisor-ci": "max"})
    parent = "/agent-supervisor-ci/slot0"
    assert not leaves_host_memory(parent, RunsBudget(100, 4 << 30), root)
    assert not leaves_host_memory(parent, RunsBudget(100, 2 << 30), root)  # all of it
    assert leaves_host_memory(parent, RunsBudget(100, 1 << 30), root)
    # The parent's own limit is the budget, not a limit above it.
    (root / "agent-supervisor-ci" / "slot0").mkdir()
    (root / "agent-supervisor-ci" / "slot0" / "memory.max").write_text(f"{1 << 20}\n")
    assert not leaves_host_memory(parent, RunsBudget(100, 4 << 30), root)


def test_with_no_limit_above_the_runs_the_hosts_ram_decides(tmp_path: Path) -> None:
    root = _v2(tmp_path, {"agent-supervisor": "max"})
    assert leaves_host_memory("/agent-supervisor", RunsBudget(100, mem_total() - 1), root)
    assert not leaves_host_memory("/agent-supervisor", RunsBudget(100, mem_total()), root)


def test_a_limit_above_the_runs_is_found_in_the_v1_memory_hierarchy(tmp_path: Path) -> None:
    (tmp_path / "unified").mkdir()
    (tmp_path / "unified" / "cgroup.controllers").write_text("")
    (tmp_path / "memory" / "ci").mkdir(parents=True)
    (tmp_path / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    (tmp_path / "memory" / "ci" / "memory.limit_in_bytes").write_text(f"{1 << 30}\n")
    assert not leaves_host_memory("/ci/slot0", RunsBudget(100, 2 << 30), tmp_path)
    assert leaves_host_memory("/ci/slot0", RunsBudget(100, 512 << 20), tmp_path)
    assert leaves_host_memory("/other", RunsBudget(100, 2 << 30), tmp_path)


def _report(watchdog: dict[str, object]) -> dict[str, object]:
    return {"exit_status": 0, "ending": "exited", "end_reason": None, "agent_exit_status": 0,
            "duration_ms": 1.0, "run": {"command": ["true"], "profile": "default"},
            "scope": {"violations": []}, "teardown": {"clean": True}, "watchdog": watchdog}


def test_the_ci_job_hears_of_it_only_when_it_weakens_containment() -> None:
    quiet = oom_exposure(DENIED, capable=False, runs_leave_host_memory=True)
    assert annotation_lines(_report(quiet)) == []
    assert "OOM killer" not in summary_markdown(_report(quiet))
    loud = oom_exposure(DENIED, capable=False, runs_leave_host_memory=False)
    [line] = annotation_lines(_report(loud))
    assert line.startswith("::warning title=agent-supervisor%3A kill switch exposed::")
    assert "take the kill switch" in line
    assert "within the OOM killer's reach" in summary_markdown(_report(loud))
