"""remove_tree (supervisor/sandbox/fstree.py): removes a directory tree in rounds, as
shutil.rmtree(ignore_errors=True) would, without following a symlink."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from supervisor.sandbox import fstree
from supervisor.sandbox.fstree import remove_tree


def _bundle_like(root: Path, outside: Path) -> Path:
    """A bundle's shape: files at the top, a rootfs of empty and nested directories, symlinks
    (one to a directory outside, one to a file outside) among them."""
    tree = root / "bundle"
    (tree / "rootfs" / "dev" / "pts").mkdir(parents=True)
    (tree / "rootfs" / "dev" / "mqueue").mkdir()
    (tree / "rootfs" / "usr").mkdir()
    (tree / "rootfs" / "a" / "b" / "c" / "d").mkdir(parents=True)
    (tree / "rootfs" / "a" / "b" / "c" / "d" / "deep.txt").write_text("x")
    (tree / "rootfs" / "a" / "b" / "mid.txt").write_text("x")
    (tree / "config.json").write_text("{}")
    (tree / "init.pid").write_text("1")
    (tree / "rootfs" / "bin").symlink_to(outside)
    (tree / "rootfs" / "lib").symlink_to(outside / "kept.txt")
    (tree / "rootfs" / "dangling").symlink_to(root / "nowhere")
    return tree


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    directory = tmp_path / "outside"
    directory.mkdir()
    (directory / "kept.txt").write_text("kept")
    (directory / "sub").mkdir()
    return directory


def test_removes_the_whole_tree_and_follows_no_symlink(tmp_path: Path, outside: Path) -> None:
    tree = _bundle_like(tmp_path, outside)
    remove_tree(tree)
    assert not tree.exists() and not tree.is_symlink()
    assert (outside / "kept.txt").read_text() == "kept" and (outside / "sub").is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["outside"]


def test_a_path_that_is_no_directory_is_left_alone(tmp_path: Path, outside: Path) -> None:
    """As shutil.rmtree: a symlink to a directory, a file, or nothing at all: no error,
    nothing removed."""
    link = tmp_path / "link"
    link.symlink_to(outside)
    remove_tree(link)
    assert link.is_symlink() and (outside / "kept.txt").exists() and (outside / "sub").is_dir()
    remove_tree(outside / "kept.txt")
    assert (outside / "kept.txt").exists()
    remove_tree(tmp_path / "absent")


def test_a_tree_too_large_to_hold_open_is_removed_all_the_same(
        tmp_path: Path, outside: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fstree, "_MAX_DIRECTORIES", 3)
    tree = _bundle_like(tmp_path, outside)
    remove_tree(tree)
    assert not tree.exists()
    assert (outside / "kept.txt").read_text() == "kept" and (outside / "sub").is_dir()


def test_what_cannot_be_removed_stays_with_its_parents_and_nothing_raises(
        tmp_path: Path, outside: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tree = _bundle_like(tmp_path, outside)
    real_unlink = os.unlink

    def unlink(path: str, *, dir_fd: int | None = None) -> None:
        if os.path.basename(path) == "deep.txt":
            raise PermissionError(13, "refused", path)
        real_unlink(path, dir_fd=dir_fd)

    monkeypatch.setattr(os, "unlink", unlink)
    remove_tree(tree)
    left = sorted(str(p.relative_to(tree)) for p in tree.rglob("*"))
    assert left == ["rootfs", "rootfs/a", "rootfs/a/b", "rootfs/a/b/c", "rootfs/a/b/c/d",
                    "rootfs/a/b/c/d/deep.txt"]
    assert (outside / "kept.txt").exists()


def test_the_removers_threads_are_kept_for_the_next_tree(tmp_path: Path, outside: Path) -> None:
    """Trees one after another (a run's bundle, then its slot's directory) reuse the threads
    the first one started; none is started per tree any more."""

    def removers() -> set[int]:
        return {t.ident or 0 for t in threading.enumerate() if t.name.startswith("remove-tree")}

    first = _bundle_like(tmp_path / "one", outside)
    remove_tree(first)
    kept = removers()
    assert kept and not first.exists()
    for n in range(5):
        tree = _bundle_like(tmp_path / f"next{n}", outside)
        remove_tree(tree)
        assert not tree.exists()
    assert kept <= removers() and len(removers()) <= fstree._WORKERS  # the same, kept
