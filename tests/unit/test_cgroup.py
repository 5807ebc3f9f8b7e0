"""The one `Cgroup` (supervisor/sandbox/cgroups.py) on fake hybrid and pure-v2 trees: where a
controller's file is, placing a process in the v2 tree and the v1 hierarchies asked for,
delegating controllers, the memory counters telemetry reads, removing a shared parent only
once it is empty; and the gateway worker's limits set through it (egress/confinement.py).
No privilege: directories and files under tmp_path stand in for cgroupfs, with the files the
kernel would make already there (a write to cgroupfs never creates a file)."""

from __future__ import annotations

from pathlib import Path

import pytest

from supervisor.egress.confinement import ConfinementFailed, WorkerLimits, confine
from supervisor.sandbox.cgroups import Cgroup

LIMITS = WorkerLimits(memory_max=512 << 20, pids_max=256, cpu_weight=50, cpu_max=1.5)


def hybrid(root: Path, *hierarchies: str) -> Path:
    (root / "unified").mkdir()
    (root / "unified" / "cgroup.controllers").write_text("")
    for name in hierarchies:
        (root / name).mkdir()
    return root


def pure_v2(root: Path) -> Path:
    root.mkdir(exist_ok=True)
    (root / "cgroup.controllers").write_text("cpu memory pids")
    (root / "cgroup.subtree_control").write_text("")
    return root


def kernel_files(directory: Path, *names: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name in names:
        (directory / name).write_text("")


def test_a_controllers_file_is_where_that_controller_is_mounted(tmp_path: Path) -> None:
    group = Cgroup("a/b", host_root=hybrid(tmp_path, "memory", "pids"))
    assert group.hybrid and group.path == tmp_path / "unified" / "a/b"
    assert group.file("memory.limit_in_bytes") == tmp_path / "memory" / "a/b" / (
        "memory.limit_in_bytes")
    assert group.file("pids.max") == tmp_path / "pids" / "a/b" / "pids.max"
    assert group.file("cgroup.kill") == tmp_path / "unified" / "a/b" / "cgroup.kill"
    v2 = Cgroup("a/b", host_root=pure_v2(tmp_path / "v2"))
    assert not v2.hybrid
    assert v2.file("pids.max") == v2.path / "pids.max"
    assert v2.file("memory.max") == v2.path / "memory.max"


def test_place_writes_the_pid_in_the_v2_tree_and_each_v1_hierarchy_the_host_has(
        tmp_path: Path) -> None:
    root = hybrid(tmp_path, "systemd", "memory")
    group = Cgroup("svc-watchdog", host_root=root)
    for directory in (group.path, root / "systemd" / "svc-watchdog",
                      root / "memory" / "svc-watchdog"):
        kernel_files(directory, "cgroup.procs")
    # "cpu" is not mounted on this fake host: skipped, as a hierarchy the host lacks.
    group.place(4242, ("systemd", "cpu"))
    assert (group.path / "cgroup.procs").read_text() == "4242"
    assert (root / "systemd" / "svc-watchdog" / "cgroup.procs").read_text() == "4242"
    assert (root / "memory" / "svc-watchdog" / "cgroup.procs").read_text() == ""
    assert group.directories(("systemd", "cpu")) == [group.path,
                                                     root / "systemd" / "svc-watchdog"]


def test_place_names_the_file_that_refused(tmp_path: Path) -> None:
    group = Cgroup("gone", host_root=hybrid(tmp_path, "systemd"))
    kernel_files(group.path, "cgroup.procs")
    with pytest.raises(OSError, match=r"systemd/gone/cgroup\.procs"):
        group.place(1, ("systemd",))  # no cgroup.procs made by a "kernel" there


def test_on_pure_v2_only_the_v2_tree_is_used(tmp_path: Path) -> None:
    root = pure_v2(tmp_path)
    (root / "systemd").mkdir()  # not a hierarchy on a pure v2 host
    group = Cgroup("x", host_root=root)
    kernel_files(group.path, "cgroup.procs")
    group.place(7, ("systemd",))
    assert group.directories(("systemd",)) == [group.path]
    assert not (root / "systemd" / "x").exists()


def test_delegate_enables_only_the_missing_controllers_down_to_the_parent(
        tmp_path: Path) -> None:
    root = pure_v2(tmp_path)
    (root / "cgroup.subtree_control").write_text("cpu")
    kernel_files(root / "a", "cgroup.subtree_control")
    (root / "a" / "cgroup.subtree_control").write_text("cpu memory pids")
    group = Cgroup("a/b", host_root=root)
    changed = group.delegate(("memory", "pids", "cpu"))
    assert changed == [root / "cgroup.subtree_control"]
    assert (root / "cgroup.subtree_control").read_text() == "+memory +pids"
    assert group.path.is_dir()


def test_memory_counters_v2_then_the_v1_memory_controller_then_none(tmp_path: Path) -> None:
    root = hybrid(tmp_path, "memory")
    group = Cgroup("run", host_root=root)
    group.path.mkdir(parents=True)
    assert group.memory_files() is None
    kernel_files(root / "memory" / "run", "memory.usage_in_bytes", "memory.oom_control")
    assert group.memory_files() == (root / "memory" / "run" / "memory.usage_in_bytes",
                                    root / "memory" / "run" / "memory.oom_control")
    kernel_files(group.path, "memory.current", "memory.events")
    assert group.memory_files() == (group.path / "memory.current",
                                    group.path / "memory.events")


def test_a_shared_parent_goes_only_once_it_is_empty_in_every_tree(tmp_path: Path) -> None:
    root = hybrid(tmp_path, "pids")
    shared = Cgroup("agent-supervisor-ci", host_root=root)
    slot = Cgroup("agent-supervisor-ci/slot1", host_root=root).create(("pids",))
    other = Cgroup("agent-supervisor-ci/slot2", host_root=root).create(("pids",))
    assert slot.remove(strict=False) == []
    assert not shared.remove_if_empty()  # slot2 still runs: it and the parent stay
    assert other.path.is_dir() and (root / "pids" / "agent-supervisor-ci/slot2").is_dir()
    other.remove()
    assert shared.remove_if_empty()
    assert not shared.path.exists() and not (root / "pids" / "agent-supervisor-ci").exists()


def test_the_gateway_workers_limits_on_a_hybrid_host(tmp_path: Path) -> None:
    root = hybrid(tmp_path, "memory", "pids", "cpu")
    group = Cgroup("as-gateway", host_root=root)
    kernel_files(root / "memory" / "as-gateway", "memory.limit_in_bytes")  # no memsw: optional
    kernel_files(root / "pids" / "as-gateway", "pids.max")
    kernel_files(root / "cpu" / "as-gateway", "cpu.shares", "cpu.cfs_period_us",
                 "cpu.cfs_quota_us")
    confine(group, LIMITS)
    assert group.path.is_dir()
    assert group.read("memory.limit_in_bytes") == str(512 << 20)
    assert group.read("pids.max") == "256"
    assert group.read("cpu.shares") == "512"
    assert (group.read("cpu.cfs_period_us"), group.read("cpu.cfs_quota_us")) == (
        "100000", "150000")


def test_the_gateway_workers_limits_on_pure_v2(tmp_path: Path) -> None:
    root = pure_v2(tmp_path)
    group = Cgroup("as-gateway", host_root=root)
    kernel_files(group.path, "memory.max", "pids.max", "cpu.weight", "cpu.max")
    confine(group, WorkerLimits(memory_max=1 << 30, pids_max=64, cpu_weight=10, cpu_max=0))
    assert (root / "cgroup.subtree_control").read_text() == "+memory +pids +cpu"
    assert (group.read("memory.max"), group.read("pids.max")) == (str(1 << 30), "64")
    assert (group.read("cpu.weight"), group.read("cpu.max")) == ("10", "max 100000")


def test_a_limit_that_cannot_be_set_refuses_the_worker_naming_the_file(tmp_path: Path) -> None:
    root = hybrid(tmp_path, "memory", "pids", "cpu")
    group = Cgroup("as-gateway", host_root=root)
    kernel_files(root / "memory" / "as-gateway", "memory.limit_in_bytes")
    with pytest.raises(ConfinementFailed) as refused:  # the pids controller has no pids.max
        confine(group, LIMITS)
    assert refused.value.path == root / "pids" / "as-gateway" / "pids.max"
    assert "pids.max" in str(refused.value)


def test_sigkill_of_a_pid_that_names_no_one_process_kills_nothing() -> None:
    """cgroup.procs reads 0 for a member in another pid namespace; kill(2) takes 0 as the
    caller's own process group. A child in a session of its own (so the old behaviour would
    end only it) survives sigkill of 0 and of a negative pid, and says so."""
    import subprocess
    import sys

    code = ("from supervisor.sandbox.cgroups import sigkill\n"
            "sigkill(0)\n"
            "sigkill(-2147483646)\n"
            "print('survived', flush=True)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, start_new_session=True)
    assert (done.returncode, done.stdout) == (0, "survived\n"), done.stderr
