"""Telling `systemctl restart` from `systemctl stop` (supervisor/daemon/stopintent.py): the
unit from the daemon's cgroup path, the job type from systemctl's listing. No privilege."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from supervisor.daemon import stopintent
from supervisor.daemon.stopintent import job_type, own_unit, stop_intent

HYBRID = """12:pids:/docker/abc/system.slice/agent-supervisor.service
1:name=systemd:/docker/abc/system.slice/agent-supervisor.service
0::/docker/abc/system.slice/agent-supervisor.service
"""
PURE_V2 = "0::/system.slice/agent-supervisor.service\n"
DELEGATED = "0::/system.slice/agent-supervisor.service/supervisor\n"
OUTSIDE = "0::/user.slice/user-1000.slice/session-3.scope\n"
LISTING = """1417 agent-supervisor.service restart running
1418 other.service start waiting
"""


@pytest.mark.parametrize(("text", "unit"), [
    (HYBRID, "agent-supervisor.service"), (PURE_V2, "agent-supervisor.service"),
    (DELEGATED, "agent-supervisor.service"), (OUTSIDE, None)])
def test_the_unit_comes_from_the_cgroup_path(tmp_path: Path, text: str, unit: str | None
                                             ) -> None:
    path = tmp_path / "cgroup"
    path.write_text(text)
    assert own_unit(path) == unit


def test_the_job_type_is_the_units_own() -> None:
    assert job_type(LISTING, "agent-supervisor.service") == "restart"
    assert job_type(LISTING, "other.service") == "start"
    assert job_type("", "agent-supervisor.service") is None
    assert job_type("garbage\n", "agent-supervisor.service") is None


def test_outside_systemd_nothing_is_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stopintent, "own_unit", lambda: None)
    assert asyncio.run(stop_intent(True)) == {}
    monkeypatch.undo()
    assert asyncio.run(stop_intent(False)) == {}  # not a service: nothing is asked


def test_a_systemctl_that_answers_nothing_leaves_the_job_unknown(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake = tmp_path / "systemctl"
    fake.write_text("#!/bin/sh\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setattr(stopintent, "own_unit", lambda: "agent-supervisor.service")
    monkeypatch.setattr(stopintent.shutil, "which", lambda name: str(fake))
    assert asyncio.run(stop_intent(True)) == {"unit": "agent-supervisor.service",
                                          "systemd_job": None}
