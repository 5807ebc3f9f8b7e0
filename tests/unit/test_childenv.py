"""The environment of the programs the supervisor starts on the host (sandbox/childenv.py): a
fixed allow-list, and a $PATH of absolute directories only, so that nothing is looked up in
the directory a supervisor runs in (an embedded run's: the CI job's checkout). The attack for
real: tests/e2e/test_ci_embedded.py
::test_no_host_program_of_a_run_is_found_in_the_checkout_through_a_relative_path_entry.
No privilege."""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import pytest

from supervisor.sandbox.childenv import SYSTEM_PATH, child_env, confine_path, host_path


@pytest.mark.parametrize("given,kept", [
    (":/usr/bin:/bin", "/usr/bin:/bin"),
    ("/usr/bin:/bin:", "/usr/bin:/bin"),
    ("/usr/bin::/bin", "/usr/bin:/bin"),
    (".:/usr/bin", "/usr/bin"),
    ("bin:./tools:/usr/sbin:node_modules/.bin", "/usr/sbin"),
    ("/opt/x:/usr/bin", "/opt/x:/usr/bin"),
    ("", SYSTEM_PATH), (":", SYSTEM_PATH), (".", SYSTEM_PATH), (None, SYSTEM_PATH),
])
def test_only_absolute_path_entries_are_kept(given: str | None, kept: str) -> None:
    assert host_path(given) == kept


def test_a_program_in_the_current_directory_is_not_found_through_path(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With "" first on $PATH, shutil.which (and exec) found ./runc before the system's; once
    confined, the same lookup and child_env's $PATH reach only absolute directories."""
    planted = tmp_path / "runc"
    planted.write_text("#!/bin/sh\nexit 1\n")
    planted.chmod(stat.S_IRWXU)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", ":/nonexistent-bin")
    assert shutil.which("runc") is not None  # the current directory's: what is closed
    confine_path()
    assert os.environ["PATH"] == "/nonexistent-bin"
    assert shutil.which("runc") is None
    assert child_env()["PATH"] == "/nonexistent-bin"
    assert shutil.which("runc", path=child_env()["PATH"]) is None
