"""The runs' budget on the parent cgroup (sandbox/budget.py) on fake hybrid and pure-v2 trees,
and the per-run user-namespace limits with host root's limits raised to hold them
(sandbox/userns.py). No privilege: files under tmp_path stand in for cgroupfs and procfs."""

from __future__ import annotations

from pathlib import Path

import pytest

from supervisor.config import Config, ResourcesSection
from supervisor.errors import EnforcementError
from supervisor.sandbox import budget, userns

BUDGET = budget.RunsBudget(pids_max=28672, memory_max=20 * 1024**3)


def kernel_files(directory: Path, *names: str) -> None:
    """What the kernel makes with a cgroup's directory (a write never creates a file)."""
    directory.mkdir(parents=True, exist_ok=True)
    for name in names:
        (directory / name).write_text("max\n")


def test_hybrid_hosts_hold_the_budget_in_the_v1_controllers(tmp_path: Path) -> None:
    (tmp_path / "unified").mkdir()
    (tmp_path / "unified" / "cgroup.controllers").write_text("")
    kernel_files(tmp_path / "pids" / "agent-supervisor", "pids.max")
    kernel_files(tmp_path / "memory" / "agent-supervisor", "memory.limit_in_bytes")
    written = budget.apply("/agent-supervisor", BUDGET, root=tmp_path)
    assert (tmp_path / "pids" / "agent-supervisor" / "pids.max").read_text() == "28672"
    assert (tmp_path / "memory" / "agent-supervisor" / "memory.limit_in_bytes").read_text() == (
        str(20 * 1024**3))
    assert len(written) == 2


def test_pure_v2_hosts_delegate_the_controllers_down_to_the_parent(tmp_path: Path) -> None:
    (tmp_path / "cgroup.controllers").write_text("cpu memory pids")
    (tmp_path / "cgroup.subtree_control").write_text("cpu")
    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "cgroup.subtree_control").write_text("memory pids")
    kernel_files(tmp_path / "test" / "agent-supervisor", "pids.max", "memory.max")
    budget.apply("/test/agent-supervisor", BUDGET, root=tmp_path)
    # A fake file keeps only the last write; the kernel would add to the set.
    assert (tmp_path / "cgroup.subtree_control").read_text() == "+pids +memory"
    assert (tmp_path / "test" / "cgroup.subtree_control").read_text() == "memory pids"
    assert (tmp_path / "test" / "agent-supervisor" / "pids.max").read_text() == "28672"
    assert (tmp_path / "test" / "agent-supervisor" / "memory.max").read_text() == (
        str(20 * 1024**3))


def test_no_cgroup_tree_refuses(tmp_path: Path) -> None:
    with pytest.raises(EnforcementError):
        budget.apply("/agent-supervisor", BUDGET, root=tmp_path)


def test_the_budget_leaves_the_host_its_reserve() -> None:
    defaults = ResourcesSection()
    auto = budget.RunsBudget.for_host(None, defaults.host_pids_reserve, None,
                                      defaults.host_memory_reserve)
    assert auto.pids_max == budget.host_pid_limit() - defaults.host_pids_reserve
    assert auto.memory_max == budget.mem_total() - defaults.host_memory_reserve
    assert budget.RunsBudget.for_host(300, 64, 10**9, 1) == budget.RunsBudget(300, 10**9)
    with pytest.raises(EnforcementError) as refused:
        budget.RunsBudget.for_host(None, 10**9, None, 1)
    assert "hint" in refused.value.detail


def test_every_run_gets_zero_namespaces_and_its_own_inotify_share() -> None:
    limits = userns.UsernsLimits.for_runs(32, 16384)
    assert limits.values["max_inotify_instances"] == 32
    assert limits.values["max_inotify_watches"] == 16384
    assert all(limits.values[name] == 0 for name in userns.ZERO)
    assert {"max_user_namespaces", "max_net_namespaces", "max_mnt_namespaces"} <= set(
        userns.ZERO)


def test_only_keys_the_kernel_has_are_written(tmp_path: Path) -> None:
    (tmp_path / "max_inotify_instances").write_text("128")
    present = userns.UsernsLimits.for_runs(32, 16384).present(tmp_path)
    assert present.values == {"max_inotify_instances": 32}


def test_host_root_limits_are_raised_to_hold_every_run_and_never_lowered(tmp_path: Path
                                                                         ) -> None:
    instances, watches = tmp_path / "max_user_instances", tmp_path / "max_user_watches"
    instances.write_text("128\n")
    watches.write_text("10000000\n")
    files = {"max_inotify_instances": instances, "max_inotify_watches": watches}
    limits = userns.UsernsLimits.for_runs(32, 16384)
    reserve = {"max_inotify_instances": 128, "max_inotify_watches": 65536}
    changed = userns.raise_host_limits(limits, 8, reserve, files)
    assert changed == {"max_inotify_instances": {"from": 128, "to": 128 + 8 * 32}}
    assert instances.read_text() == str(128 + 8 * 32)
    assert watches.read_text() == "10000000\n"  # already enough: untouched
    assert userns.raise_host_limits(limits, 8, reserve, files) == {}  # idempotent
    with pytest.raises(EnforcementError):
        userns.raise_host_limits(limits, 8, reserve,
                                 {"max_inotify_instances": tmp_path / "missing" / "x"})


def test_resources_survive_a_config_round_trip() -> None:
    # Embedded runs rebuild their config from a dump of the daemon's.
    for resources in ({}, {"runs_pids_max": 300, "runs_memory_max": "2G"}):
        config = Config.model_validate({"resources": resources})
        assert Config.model_validate(config.model_dump()) == config
