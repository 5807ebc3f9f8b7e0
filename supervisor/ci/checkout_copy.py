"""Checkouts owned by root or a system user (GitLab's Docker executor, Jenkins agents, runners
that run jobs as root): the agent works on a copy owned by an unprivileged uid of this slot's
own, never by host root, and only after the scope guard passes are its changes applied back to
the checkout, as the checkout's owner, by root with every agent process gone.

Why a copy and not an id-mapped mount: runc 1.1 cannot make one, an id-mapped view would make
every file the agent writes root's on the host (files root's later steps trust), and the copy
gives an all-or-nothing result: a run with any violation changes nothing in the checkout. The
cost is one copy of the checkout (reflinked where the filesystem can) and the writes back.

Writes in the checkout never follow a symlink (openat2 RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS on
each parent); set-id bits are dropped. Needs root."""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from supervisor.ci import COPY_ROOT_ENV_VAR, DEFAULT_COPY_ROOT
from supervisor.ci.manifest import LISTED_AT_MOST, Change
from supervisor.sandbox.workspace_fs import openat2

# Copies are owned by COPY_UID_BASE + slot: far above every sandbox's host uid range (the
# daemon's and the embedded slots' start at [sandbox] uid_base, 65,536 uids each), unique per
# slot, and no account's.
COPY_UID_BASE = 3_900_000_000
_CHUNK = 1 << 20
__all__ = ["COPY_ROOT_ENV_VAR", "DEFAULT_COPY_ROOT", "CheckoutCopy", "make_copy", "needs_copy"]


def needs_copy(workspace: Path, min_owner_uid: int) -> bool:
    """The checkout belongs to root or a system user: the agent must not write it as them."""
    return os.stat(workspace).st_uid < min_owner_uid


@dataclass
class CheckoutCopy:
    original: Path
    directory: Path  # root-owned 0700, holds the copy
    uid: int
    owner: tuple[int, int] = (0, 0)
    applied: int = 0
    # The first LISTED_AT_MOST of each, and how many in all (an agent's paths are many).
    skipped: list[dict[str, str]] = field(default_factory=list)
    skipped_total: int = 0
    errors: list[dict[str, str]] = field(default_factory=list)
    errors_total: int = 0

    @property
    def path(self) -> Path:
        return self.directory / "checkout"

    def skip(self, path: str, why: str) -> None:
        self.skipped_total += 1
        if len(self.skipped) < LISTED_AT_MOST:
            self.skipped.append({"path": path, "why": why})

    def error(self, path: str, error: str) -> None:
        self.errors_total += 1
        if len(self.errors) < LISTED_AT_MOST:
            self.errors.append({"path": path, "error": error})

    def record(self, applied: bool) -> dict[str, Any]:
        return {"mode": "copy", "owner_uid": self.owner[0], "owner_gid": self.owner[1],
                "copy_uid": self.uid, "applied_back": applied, "paths_applied": self.applied,
                "skipped": self.skipped, "skipped_total": self.skipped_total,
                "errors": self.errors, "errors_total": self.errors_total}

    def remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


def make_copy(original: Path, root: Path, slot: int) -> CheckoutCopy:
    """A copy of `original` under root/slot<N>/, every path owned by the slot's copy uid. A
    copy a SIGKILLed run of this slot left is removed first."""
    directory = root / f"slot{slot}"
    root.mkdir(mode=0o711, parents=True, exist_ok=True)
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(mode=0o700)
    st = os.stat(original)
    copy = CheckoutCopy(original, directory, COPY_UID_BASE + slot, owner=(st.st_uid, st.st_gid))
    result = subprocess.run(["cp", "-a", "--reflink=auto", "--no-target-directory",
                             f"{original}/.", str(copy.path)],
                            capture_output=True, encoding="utf-8", errors="replace",
                            check=False)
    if result.returncode != 0:
        copy.remove()
        raise OSError(f"copying {original}: {result.stderr.strip()[:300]}")
    # chown clears set-id bits on regular files: nothing the agent gets is set-id root.
    os.lchown(copy.path, copy.uid, copy.uid)
    for dirpath, dirs, files in os.walk(copy.path):
        for name in (*dirs, *files):
            os.lchown(os.path.join(dirpath, name), copy.uid, copy.uid)
    return copy


def _parent_fd(root_fd: int, relative: str) -> tuple[int, str]:
    parent, _, name = relative.rpartition("/")
    return openat2(root_fd, parent or ".", os.O_PATH | os.O_DIRECTORY), name


def _remove(parent_fd: int, name: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
        if stat.S_ISDIR(st.st_mode):
            os.rmdir(name, dir_fd=parent_fd)
        else:
            os.unlink(name, dir_fd=parent_fd)


def _place(copy: CheckoutCopy, original_fd: int, change: Change) -> None:
    """Put the copy's `change.path` into the checkout, replacing what is there."""
    parent_fd, name = _parent_fd(original_fd, change.path)
    try:
        source = str(copy.path / change.path)
        st = os.lstat(source)
        mode = stat.S_IMODE(st.st_mode) & 0o777  # never set-id, never sticky
        temporary = f".{name}.agent-supervisor-{os.getpid()}"
        uid, gid = copy.owner
        if stat.S_ISDIR(st.st_mode):
            try:
                os.mkdir(name, mode, dir_fd=parent_fd)
            except FileExistsError:
                existing = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
                if stat.S_ISDIR(existing.st_mode):
                    return
                os.unlink(name, dir_fd=parent_fd)
                os.mkdir(name, mode, dir_fd=parent_fd)
            os.chown(name, uid, gid, dir_fd=parent_fd, follow_symlinks=False)
            return
        if stat.S_ISLNK(st.st_mode):
            os.symlink(os.readlink(source), temporary, dir_fd=parent_fd)
        elif stat.S_ISREG(st.st_mode):
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o600, dir_fd=parent_fd)
            with os.fdopen(fd, "wb") as target, open(source, "rb") as origin:
                while chunk := origin.read(_CHUNK):
                    target.write(chunk)
                os.fchown(target.fileno(), uid, gid)
                os.fchmod(target.fileno(), mode)
        else:
            copy.skip(change.path, "not a file, link or directory")
            return
        os.chown(temporary, uid, gid, dir_fd=parent_fd, follow_symlinks=False)
        with contextlib.suppress(FileNotFoundError):
            existing = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
            if stat.S_ISDIR(existing.st_mode):  # its content was deleted before
                os.rmdir(name, dir_fd=parent_fd)
        os.rename(temporary, name, src_dir_fd=parent_fd, dst_dir_fd=parent_fd)
    finally:
        os.close(parent_fd)


def apply_back(copy: CheckoutCopy, changes: list[Change]) -> None:
    """`apply_changes` of a list, in any order."""
    ordered = sorted(changes, key=lambda c: c.path)
    apply_changes(copy, reversed(ordered), ordered)


def apply_changes(copy: CheckoutCopy, backward: Iterable[Change],
                  forward: Iterable[Change]) -> None:
    """The agent's changes, from the copy into the checkout: deletions from `backward` (in
    reverse path order: a directory's content before it), then what was created or modified
    from `forward` (path order: directories before their content). Streams: an agent makes
    as many changes as it likes (ci/manifest.py `Guarded`)."""
    original_fd = os.open(copy.original, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for change in backward:
            if change.change != "deleted":
                continue
            try:
                parent_fd, name = _parent_fd(original_fd, change.path)
                try:
                    _remove(parent_fd, name)
                finally:
                    os.close(parent_fd)
                copy.applied += 1
            except OSError as exc:
                copy.error(change.path, exc.strerror or str(exc))
        for change in forward:
            if change.change == "deleted":
                continue
            try:
                _place(copy, original_fd, change)
                copy.applied += 1
            except OSError as exc:
                copy.error(change.path, exc.strerror or str(exc))
    finally:
        os.close(original_fd)
