"""A run's cleanup deletes its container at a lower CPU priority (supervisor/runtime/runc.py
`delete(nice=...)`, used by step 6): checked with a stand-in runc that records the niceness
it runs at and its arguments. No root, no runc."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from supervisor.runtime.runc import Runc


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
