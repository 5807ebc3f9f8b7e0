"""The systemd tier reads the machine's cgroups where this host's layout puts them
(tests/systemd/machine.py, cgroup_layout): pure cgroup v2 (a fresh Debian 12) or hybrid (v1
controllers, name=systemd and the v2 tree at unified/), as the daemon's own detection says.
Fake trees under a temporary directory; no root."""

from __future__ import annotations

from pathlib import Path

import pytest

from supervisor.sandbox.cgroups import CgroupMode
from tests.systemd.machine import cgroup_layout


def test_pure_v2_has_one_tree_for_everything(tmp_path: Path) -> None:
    (tmp_path / "cgroup.controllers").write_text("cpu memory pids\n")
    (tmp_path / "system.slice").mkdir()
    layout = cgroup_layout(tmp_path)
    assert layout.mode is CgroupMode.V2
    assert layout.v2 == tmp_path and layout.tracking == (tmp_path,)
    assert layout.all_trees == (tmp_path,)
    assert layout.agents("/agent-supervisor") == tmp_path / "agent-supervisor"


def test_hybrid_tracks_units_in_name_systemd_and_unified(tmp_path: Path) -> None:
    (tmp_path / "unified").mkdir()
    (tmp_path / "unified" / "cgroup.controllers").write_text("")
    for name in ("systemd", "memory", "pids", "cpu,cpuacct"):
        (tmp_path / name).mkdir()
    (tmp_path / "cpu").symlink_to("cpu,cpuacct")
    layout = cgroup_layout(tmp_path)
    assert layout.mode is CgroupMode.HYBRID
    assert layout.v2 == tmp_path / "unified"
    assert layout.tracking == (tmp_path / "systemd", tmp_path / "unified")
    assert layout.all_trees == (tmp_path / "unified", tmp_path / "cpu,cpuacct",
                                tmp_path / "memory", tmp_path / "pids", tmp_path / "systemd")
    assert layout.agents("/agent-supervisor") == tmp_path / "unified" / "agent-supervisor"


def test_no_v2_tree_is_refused(tmp_path: Path) -> None:
    (tmp_path / "memory").mkdir()
    with pytest.raises(AssertionError, match="no cgroup v2 tree"):
        cgroup_layout(tmp_path)


def test_this_host_is_one_of_the_two() -> None:
    layout = cgroup_layout()
    assert layout.mode in (CgroupMode.V2, CgroupMode.HYBRID)
    assert (layout.v2 / "cgroup.controllers").exists()
