"""A run's cleanup deletes its container at a lower CPU priority (supervisor/runtime/runc.py
`delete(nice=...)`, used by step 6): checked with a stand-in runc that records the niceness
it runs at and its arguments. No root, no runc."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from types import SimpleNamespace

from supervisor.runtime.output import Outputs
from supervisor.runtime.runc import Runc
from supervisor.runtime.sandboxed import CLEANUP_NICE, RuncRunHandle, RuncRuntime


def _fake_runc(tmp_path: Path) -> tuple[Path, Path]:
    record = tmp_path / "record"
    binary = tmp_path / "runc"
    binary.write_text(f'#!/bin/sh\necho "$(nice) $*" >> {record}\n')
    binary.chmod(0o755)
    return binary, record


def test_a_cleanup_delete_runs_niced_and_other_verbs_do_not(tmp_path: Path) -> None:
    binary, record = _fake_runc(tmp_path)
    runc = Runc(str(binary), tmp_path / "root")
    base = os.nice(0)
    asyncio.run(runc.delete("c1", force=True, nice=10))
    asyncio.run(runc.delete("c2", force=True))
    lines = record.read_text().splitlines()
    assert lines[0] == f"{min(19, base + 10)} --root {tmp_path / 'root'} delete --force c1"
    assert lines[1] == f"{base} --root {tmp_path / 'root'} delete --force c2"


def test_a_runs_cleanup_deletes_at_its_runtimes_nice_value(tmp_path: Path) -> None:
    """The daemon's runs at CLEANUP_NICE (background work after a kill); a runtime made with
    cleanup_nice=0 (an embedded CI run's, which answers once its cleanup is done) at none."""
    binary, record = _fake_runc(tmp_path)
    base = os.nice(0)
    for name, kwargs in (("daemon", {}), ("embedded", {"cleanup_nice": 0})):
        runtime = RuncRuntime(str(binary), tmp_path / name / "runc", "/unit-test", "as",
                              1000000, 1000, 1000, tmp_path / name / "workspaces",
                              tmp_path / name / "bundles", 4, Outputs(1 << 20), **kwargs)
        handle = SimpleNamespace(runtime=runtime, params=SimpleNamespace(container_id=name),
                                 _stopped=lambda: False)  # still running: runc deletes it
        asyncio.run(RuncRunHandle._delete(handle))  # type: ignore[arg-type]
    lines = record.read_text().splitlines()
    assert lines == [
        f"{min(19, base + CLEANUP_NICE)} --root {tmp_path / 'daemon' / 'runc'} delete --force "
        "daemon",
        f"{base} --root {tmp_path / 'embedded' / 'runc'} delete --force embedded"]


def test_a_stopped_runs_container_goes_without_a_runc_process(tmp_path: Path) -> None:
    """A run that has stopped (init dead, cgroup empty) loses its runc state directory
    without runc (Runc.remove_stopped; tests/privileged/test_runc_delete_stopped.py with the
    real runc); where the directory is not runc's, and for a run that has not stopped, runc
    deletes it."""
    binary, record = _fake_runc(tmp_path)
    runtime = RuncRuntime(str(binary), tmp_path / "state", "/unit-test", "as", 1000000, 1000,
                          1000, tmp_path / "workspaces", tmp_path / "bundles", 4,
                          Outputs(1 << 20), cleanup_nice=0)
    for name in ("stopped", "running"):
        (tmp_path / "state" / name).mkdir()
        (tmp_path / "state" / name / "state.json").write_text("{}")
    (tmp_path / "state" / "other").mkdir()
    for name, stopped in (("stopped", True), ("running", False), ("other", True)):
        handle = SimpleNamespace(runtime=runtime, params=SimpleNamespace(container_id=name),
                                 _stopped=lambda stopped=stopped: stopped)
        asyncio.run(RuncRunHandle._delete(handle))  # type: ignore[arg-type]
    base = os.nice(0)
    assert record.read_text().splitlines() == [
        f"{base} --root {tmp_path / 'state'} delete --force running",
        f"{base} --root {tmp_path / 'state'} delete --force other"]
    assert sorted(os.listdir(tmp_path / "state")) == ["other", "running"]
