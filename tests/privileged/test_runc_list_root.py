"""What `Runc.list` skipping runc rests on (supervisor/runtime/runc.py): with the real runc, a
container's directory is in the root from `create` until `delete`, and once the last one is
deleted the root holds no directory, and runc itself lists nothing there. A container left
behind (created, never deleted: what a SIGKILLed run leaves) is still listed, so reconcile
still finds it. Real runc, cgroups and a network namespace; needs root."""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from supervisor.runtime.runc import Runc
from tests.support.runc_bundle import runc_bundle


@pytest.fixture
def bundle(tmp_root: Path) -> Iterator[tuple[Path, str]]:
    """(bundle, container name prefix); the containers go with it whatever the test reached."""
    with runc_bundle(tmp_root, "rl", "runc-list", containers=("-a", "-b")) as made:
        yield made


def _container_dirs(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.is_symlink())


def test_the_root_holds_a_directory_exactly_while_a_container_exists(
        tmp_root: Path, bundle: tuple[Path, str]) -> None:
    path, name = bundle
    root = tmp_root / "runc-root"
    runc = Runc("runc", root)

    async def cycle() -> tuple[list[str], list[str], list[str], list[str]]:
        log = tmp_root / "runc.log"
        with open(os.devnull, "wb") as null:
            await runc.create(f"{name}-a", path, tmp_root / "a.pid", null.fileno(), log)
            await runc.create(f"{name}-b", path, tmp_root / "b.pid", null.fileno(), log)
        listed_both = [s.id for s in await runc.list()]
        await runc.delete(f"{name}-a", force=True)
        listed_left = [s.id for s in await runc.list()]  # b: as a SIGKILLed run leaves one
        dirs_left = _container_dirs(root)
        await runc.delete(f"{name}-b", force=True)
        return listed_both, listed_left, dirs_left, [s.id for s in await runc.list()]

    both, left, dirs_left, after = asyncio.run(cycle())
    assert sorted(both) == [f"{name}-a", f"{name}-b"]
    assert left == [f"{name}-b"] and dirs_left == [f"{name}-b"]
    assert after == [] and _container_dirs(root) == []
    # runc agrees: it lists nothing in a root with no container directory.
    real = subprocess.run(["runc", "--root", str(root), "list", "--format", "json"],
                          capture_output=True, text=True, check=True)
    assert real.stdout.strip() in ("", "null", "[]")
