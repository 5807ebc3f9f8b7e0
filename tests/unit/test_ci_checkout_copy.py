"""Applying a copy's changes back to a checkout (supervisor/ci/checkout_copy.py) on real files
in tmp: created, modified and deleted paths land, set-id bits do not, and no write follows a
symlink the checkout holds out of it. No root (the owner is the test's own user)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from supervisor.ci.checkout_copy import CheckoutCopy, apply_back
from supervisor.ci.manifest import diff, snapshot


def setup(tmp_path: Path) -> tuple[Path, CheckoutCopy]:
    original = tmp_path / "checkout"
    (original / "src").mkdir(parents=True)
    (original / "src" / "a.py").write_text("a = 1\n")
    (original / "old").mkdir()
    (original / "old" / "gone.txt").write_text("bye\n")
    (original / "out").symlink_to(tmp_path / "elsewhere")
    (tmp_path / "elsewhere").mkdir()
    directory = tmp_path / "copies" / "slot0"
    directory.mkdir(parents=True)
    copy = CheckoutCopy(original, directory, uid=os.getuid(),
                        owner=(os.getuid(), os.getgid()))
    shutil.copytree(original, copy.path, symlinks=True)
    return original, copy


def test_changes_land_in_the_checkout_without_set_id_bits(tmp_path: Path) -> None:
    original, copy = setup(tmp_path)
    before = snapshot(copy.path)
    (copy.path / "src" / "a.py").write_text("a = 2\n")
    (copy.path / "src" / "new" / "deep").mkdir(parents=True)
    (copy.path / "src" / "new" / "deep" / "b.py").write_text("b = 1\n")
    (copy.path / "src" / "tool").write_text("#!/bin/sh\n")
    (copy.path / "src" / "tool").chmod(0o6755)
    (copy.path / "src" / "link").symlink_to("a.py")
    shutil.rmtree(copy.path / "old")
    apply_back(copy, diff(copy.path, before, snapshot(copy.path)))
    assert copy.errors == [] and copy.applied == 8
    assert (original / "src" / "a.py").read_text() == "a = 2\n"
    assert (original / "src" / "new" / "deep" / "b.py").read_text() == "b = 1\n"
    assert (original / "src" / "tool").stat().st_mode & 0o7777 == 0o755
    assert os.readlink(original / "src" / "link") == "a.py"
    assert not (original / "old").exists()
    assert sorted(p.name for p in (original / "src").iterdir()) == ["a.py", "link", "new",
                                                                    "tool"]


def test_no_write_follows_a_symlink_out_of_the_checkout(tmp_path: Path) -> None:
    original, copy = setup(tmp_path)
    before = snapshot(copy.path)
    # In the copy `out` became a directory with a file; in the checkout it is a link out.
    (copy.path / "out").unlink()
    (copy.path / "out").mkdir()
    (copy.path / "out" / "planted").write_text("x\n")
    (copy.path / "src" / "a.py").write_text("a = 2\n")
    changes = diff(copy.path, before, snapshot(copy.path))
    # Meanwhile the checkout's src/ became a link out (it cannot, in a run: nothing else
    # writes the checkout; the write must still refuse to follow it).
    (original / "src" / "a.py").unlink()
    (original / "src").rmdir()
    (original / "src").symlink_to(tmp_path / "elsewhere")
    apply_back(copy, changes)
    assert list((tmp_path / "elsewhere").iterdir()) == []
    assert [e["path"] for e in copy.errors] == ["src/a.py"]
    assert (original / "out").is_dir() and not (original / "out").is_symlink()
    assert (original / "out" / "planted").read_text() == "x\n"
