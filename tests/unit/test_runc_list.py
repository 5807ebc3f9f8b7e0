"""`Runc.list` asks runc only when its root holds a container's directory (runc keeps one per
container there and lists nothing else): checked with a stand-in runc that records each call
and answers a list. No root, no runc; tests/privileged/test_runc_list_root.py checks the
assumption against the real runc."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from supervisor.runtime.runc import ContainerState, Runc

LISTED = [{"id": "asci0-abc", "status": "stopped", "pid": 0, "bundle": "/b"}]


def _stand_in(tmp_path: Path) -> tuple[Runc, Path]:
    record = tmp_path / "calls"
    binary = tmp_path / "runc"
    binary.write_text(f"#!/bin/sh\necho \"$*\" >> {record}\necho '{json.dumps(LISTED)}'\n")
    binary.chmod(0o755)
    return Runc(str(binary), tmp_path / "root"), record


def _calls(record: Path) -> list[str]:
    return record.read_text().splitlines() if record.exists() else []


def test_no_root_or_no_container_directory_lists_nothing_without_runc(tmp_path: Path) -> None:
    runc, record = _stand_in(tmp_path)
    assert asyncio.run(runc.list()) == []  # no root at all
    runc.root.mkdir()
    assert asyncio.run(runc.list()) == []  # empty, as after the last delete
    (runc.root / "stray-file").write_text("x")
    (tmp_path / "elsewhere").mkdir()
    (runc.root / "link").symlink_to(tmp_path / "elsewhere")  # runc does not follow it either
    assert asyncio.run(runc.list()) == []
    assert _calls(record) == []


def test_a_container_directory_is_listed_by_runc(tmp_path: Path) -> None:
    runc, record = _stand_in(tmp_path)
    (runc.root / "asci0-abc").mkdir(parents=True)
    assert asyncio.run(runc.list()) == [ContainerState("asci0-abc", "stopped", 0, "/b")]
    assert _calls(record) == [f"--root {runc.root} list --format json"]


def test_a_root_that_cannot_be_read_is_left_to_runc(tmp_path: Path) -> None:
    """Not a directory: runc's own answer (here the stand-in's) decides, as before."""
    runc, record = _stand_in(tmp_path)
    runc.root.write_text("not a directory")
    assert asyncio.run(runc.list()) == [ContainerState("asci0-abc", "stopped", 0, "/b")]
    assert len(_calls(record)) == 1
