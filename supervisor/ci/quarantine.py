"""After an embedded run: what the agent planted where the host would run it (a created file
under a read-only path, a git attributes or modules file anywhere) is moved out of the
workspace into a root-only quarantine directory, so no later CI step's git picks it up, and
the report names it. The binds already keep the agent out of the read-only paths; this is the
second line, for whatever gets past them and for the files no fixed path can hold. Runs as
root after every agent process is gone; opens nothing in the workspace through a symlink."""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path
from typing import Any

from supervisor.ci.manifest import Change, Listed
from supervisor.sandbox.workspace_fs import openat2

QUARANTINED_RULES = frozenset({"readonly", "host_code"})
# A planted file larger than this is deleted, not kept (its sha256 is in the manifest); so is
# one past MAX_KEPT_TOTAL of what one run keeps, all files and link targets together: the
# quarantine is root's, in the state root (/run: memory), and an agent plants as many files
# as it likes.
MAX_KEPT_BYTES = 16 << 20
MAX_KEPT_TOTAL = 64 << 20


def _take(workspace_fd: int, relative: str, into: Path, room: int) -> dict[str, Any]:
    """Move `relative` out into `into`, keeping at most `room` bytes of it (the entry's
    `kept_bytes`; `kept` False: deleted, not kept)."""
    parent, _, name = relative.rpartition("/")
    parent_fd = openat2(workspace_fd, parent or ".", os.O_PATH | os.O_DIRECTORY)
    try:
        st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
        entry: dict[str, Any] = {"path": relative}
        if stat.S_ISDIR(st.st_mode):
            os.rmdir(name, dir_fd=parent_fd)  # created and emptied by the files before it
            entry["removed"] = "directory"
            return entry
        target = into / relative
        target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        link = os.readlink(name, dir_fd=parent_fd) if stat.S_ISLNK(st.st_mode) else None
        if link is not None and len(os.fsencode(link)) <= room:
            target.write_text(link)
            entry["symlink"] = True
            entry["kept_bytes"] = len(os.fsencode(link))
        elif stat.S_ISREG(st.st_mode) and st.st_size <= min(MAX_KEPT_BYTES, room):
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK,
                         dir_fd=parent_fd)
            kept = 0
            with os.fdopen(fd, "rb") as source, open(target, "xb") as copy:
                # No further than its size: a file that grew since is cut, not read on.
                while kept < st.st_size and (chunk := source.read(min(1 << 20,
                                                                       st.st_size - kept))):
                    copy.write(chunk)
                    kept += len(chunk)
            entry["kept_bytes"] = kept
        else:
            entry["kept"] = False
        os.unlink(name, dir_fd=parent_fd)
        if entry.get("kept", True):
            entry["moved_to"] = str(target)
        return entry
    finally:
        os.close(parent_fd)


class Quarantine:
    """Takes each created path behind a read-only or host-code violation out of `workspace`
    into `into` (created root, 0700) as the scope guard decides it (`take`: a created
    directory after the paths under it, so it has emptied out), and a host-code file the agent
    modified (one the checkout had: the original is in git, a planted filter line must not stay
    on disk). What is kept, in all, stays within MAX_KEPT_TOTAL; the rest is deleted. The
    report lists the first LISTED_AT_MOST of what was taken (`taken`), with the total."""

    def __init__(self, workspace: Path, into: Path) -> None:
        self.workspace = workspace
        self.into = into
        self.taken = Listed()
        self.room = MAX_KEPT_TOTAL
        self._workspace_fd: int | None = None

    def take(self, change: Change, violation: dict[str, str]) -> None:
        if violation.get("rule") not in QUARANTINED_RULES:
            return
        if change.change != "created" and not (
                change.change == "modified" and change.kind != "dir"
                and change.path.rpartition("/")[2] in (".gitattributes", ".gitmodules")):
            return
        if self._workspace_fd is None:
            self.into.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._workspace_fd = os.open(self.workspace,
                                         os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            self.taken.add(entry := _take(self._workspace_fd, change.path, self.into,
                                          self.room))
            self.room -= entry.get("kept_bytes", 0)
        except OSError as exc:
            self.taken.add({"path": change.path, "error": exc.strerror or str(exc)})

    def close(self) -> None:
        if self._workspace_fd is None:
            return
        os.close(self._workspace_fd)
        self._workspace_fd = None
        with contextlib.suppress(OSError):
            self.into.rmdir()  # only directories were removed: nothing kept


def quarantine(workspace: Path, changes: list[Change], found: list[dict[str, str]],
               into: Path) -> list[dict[str, Any]]:
    """`Quarantine` over a judged list: `found` in the order the scope guard decides."""
    by_path = {change.path: change for change in changes}
    taking = Quarantine(workspace, into)
    try:
        for violation in found:
            taking.take(by_path[violation["path"]], violation)
    finally:
        taking.close()
    return taking.taken.items
