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


def test_a_restart_that_would_kill_the_agents_is_named() -> None:
    unit = "agent-supervisor.service"
    assert stopintent.restart_kills("12\n", unit) is None  # SIGUSR2: handed over
    older = stopintent.restart_kills("\n", unit)  # systemd < 244 has no such property
    assert older is not None and "older than 244" in older
    assert f"systemctl kill -s USR2 {unit}" in older
    other = stopintent.restart_kills("15\n", unit)  # the unit lost its RestartKillSignal=
    assert other is not None and "RestartKillSignal=SIGTERM" in other and "kills" in other


@pytest.mark.parametrize(("printed", "warned"), [("12", False), ("", True), ("15", True)])
def test_the_start_asks_systemctl_for_the_restart_signal(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture,
        printed: str, warned: bool) -> None:
    """A real program in systemctl's place, printing what `systemctl show --value` prints for
    each case, and recording what it was asked."""
    asked = tmp_path / "asked"
    fake = tmp_path / "systemctl"
    fake.write_text(f'#!/bin/sh\necho "$@" > {asked}\necho "{printed}"\n')
    fake.chmod(0o755)
    monkeypatch.setattr(stopintent, "own_unit", lambda: "agent-supervisor.service")
    monkeypatch.setattr(stopintent.shutil, "which", lambda name: str(fake))
    with caplog.at_level("WARNING", logger=stopintent.__name__):
        warning = asyncio.run(stopintent.restart_warning(True))
    assert asked.read_text().split() == ["show", "--value", "--property=RestartKillSignal",
                                         "agent-supervisor.service"]
    assert (warning is not None) == warned
    assert (warning in caplog.text) if warning else "RestartKillSignal" not in caplog.text
    # Not a service, or a systemctl that cannot tell: nothing is said.
    assert asyncio.run(stopintent.restart_warning(False)) is None
    fake.write_text("#!/bin/sh\nexec sleep 30\n")
    monkeypatch.setattr(stopintent, "_ASK_TIMEOUT", 0.2)
    assert asyncio.run(stopintent.restart_warning(True)) is None
