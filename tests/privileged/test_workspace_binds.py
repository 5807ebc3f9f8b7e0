"""Staging a workspace's binds from open files, on the real kernel: symlinks refused wherever
they are, placeholders for absent paths made and removed again, nothing left after a refusal
or an unstage. Needs root (mount)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from supervisor.sandbox.workspace_binds import load, misplaced, mount_points, stage, unstage

READONLY = [".git/hooks/", ".git/config", ".git/commondir", ".github/workflows/",
            ".github/actions/", ".gitlab-ci.yml"]


def mounts_under(path: Path) -> list[str]:
    with open("/proc/self/mountinfo") as table:
        return [line.split(" ")[4] for line in table if f" {path}/" in line]


def listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.fixture
def workspace(tmp_root: Path) -> Iterator[tuple[Path, int]]:
    ws = tmp_root / "ws"
    (ws / ".git" / "hooks").mkdir(parents=True)
    (ws / ".git" / "config").write_text("[core]\n")
    fd = os.open(ws, os.O_PATH | os.O_DIRECTORY)
    yield ws, fd
    os.close(fd)
    assert mounts_under(tmp_root) == []


def test_stage_binds_present_and_absent_paths_and_unstage_restores(
        workspace: tuple[Path, int], tmp_root: Path) -> None:
    ws, fd = workspace
    before = listing(ws)
    staged = stage(fd, READONLY, tmp_root / "staging")
    binds = {b.relative: b.readonly for b in staged.binds}
    # Ancestors read-write (immovable mount points), guarded paths read-only, and an absent
    # directory's first missing component held by one placeholder (nothing nested in it).
    assert binds == {"": False, ".git": False, ".git/hooks": True, ".git/config": True,
                     ".git/commondir": True, ".github": True, ".gitlab-ci.yml": True}
    assert {p.relative: p.kind for p in staged.placeholders} == {
        ".git/commondir": "file", ".github": "dir", ".gitlab-ci.yml": "file"}
    assert (ws / ".git" / "commondir").read_text() == ".\n"  # git reads it: names itself
    assert load(tmp_root / "staging").binds == staged.binds
    assert len(mounts_under(tmp_root / "staging")) == len(staged.binds)
    assert unstage(tmp_root / "staging") == []
    assert listing(ws) == before and not (tmp_root / "staging").exists()


@pytest.mark.parametrize("swapped", [".git/hooks", ".git", ".github"])
def test_a_symlink_anywhere_on_a_guarded_path_is_refused_and_leaves_nothing(
        workspace: tuple[Path, int], tmp_root: Path, swapped: str) -> None:
    ws, fd = workspace
    vault = tmp_root / "vault"
    (vault / "hooks").mkdir(parents=True)
    target = ws / swapped
    if target.exists():
        target.rename(target.with_name(target.name + ".aside"))
    target.symlink_to(vault)
    before = listing(ws)
    with pytest.raises(OSError) as caught:
        stage(fd, READONLY, tmp_root / "staging")
    assert caught.value.errno == 40  # ELOOP
    assert listing(ws) == before, "placeholders made before the refusal must be gone"
    assert not (tmp_root / "staging").exists()


def test_a_placeholder_someone_replaced_is_not_removed(
        workspace: tuple[Path, int], tmp_root: Path) -> None:
    ws, fd = workspace
    stage(fd, READONLY, tmp_root / "staging")
    (ws / ".gitlab-ci.yml").unlink()  # the host's owner, during the run
    (ws / ".gitlab-ci.yml").write_text("theirs\n")
    assert unstage(tmp_root / "staging") == []
    assert (ws / ".gitlab-ci.yml").read_text() == "theirs\n"


def test_binds_of_an_exiting_process_read_as_ended_not_as_an_error() -> None:
    """The engine's command can end before its binds are checked. Once a task has let go of its
    namespaces (a zombie, or one mid-exit) the kernel answers EINVAL for its mountinfo: that
    must read as "the command ended", as ENOENT does, never escape as an internal error."""
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    try:
        deadline = time.monotonic() + 10
        while Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z":
            assert time.monotonic() < deadline, "the child never became a zombie"
            time.sleep(0.001)
        with pytest.raises(ProcessLookupError):
            mount_points(pid)
        with pytest.raises(ProcessLookupError):  # what the runtime's check treats as "ended"
            misplaced(pid, [], "/workspace")
    finally:
        os.waitpid(pid, 0)
    with pytest.raises(FileNotFoundError):
        mount_points(pid)  # reaped: gone altogether
