"""The workspace manifest and the scope guard. A snapshot walks the workspace without following
a symlink (sha256 of every regular file, the target of every symlink); the manifest is the
difference of two snapshots, each change checked against `--allow-changes` globs and the
profile's read-only paths. Taken by root while no agent process is alive, so the agent cannot
race it. Reads the workspace only."""

from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

Kind = Literal["file", "symlink", "dir", "other"]
_CHUNK = 1 << 20


@dataclass(frozen=True)
class Entry:
    kind: Kind
    mode: int
    size: int
    inode: tuple[int, int]
    nlink: int
    sha256: str | None = None  # regular files
    target: str | None = None  # symlinks


def _hash(path: str) -> str:
    digest = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    with os.fdopen(fd, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _entry(kind: Kind, st: os.stat_result, sha256: str | None = None,
           target: str | None = None) -> Entry:
    return Entry(kind, stat.S_IMODE(st.st_mode), st.st_size, (st.st_dev, st.st_ino), st.st_nlink,
                 sha256=sha256, target=target)


def snapshot(root: Path) -> dict[str, Entry]:
    """Every path under `root` (relative, '/'-separated) and what it is; the root itself is
    not an entry. Symlinks are recorded, never followed."""
    entries: dict[str, Entry] = {}
    pending = [""]
    while pending:
        relative_dir = pending.pop()
        with os.scandir(os.path.join(root, relative_dir)) as listing:
            for item in listing:
                relative = f"{relative_dir}/{item.name}" if relative_dir else item.name
                st = item.stat(follow_symlinks=False)
                if stat.S_ISLNK(st.st_mode):
                    entries[relative] = _entry("symlink", st, target=os.readlink(item.path))
                elif stat.S_ISREG(st.st_mode):
                    entries[relative] = _entry("file", st, sha256=_hash(item.path))
                elif stat.S_ISDIR(st.st_mode):
                    entries[relative] = _entry("dir", st)
                    pending.append(relative)
                else:
                    entries[relative] = _entry("other", st)
    return entries


class AllowedChanges:
    """`--allow-changes` globs with gitignore's matching rules (the `pathspec` library's
    GitIgnoreSpec, as git itself matches .gitignore): `*` and `?` stay within one path segment,
    `**` crosses them, a pattern without a slash in it (`*.md`) matches at any depth, one with a
    slash is anchored at the workspace root, a trailing `/` means the directory and everything
    under it, and `!pattern` takes paths back out. No globs: every path is in scope."""

    def __init__(self, globs: list[str]) -> None:
        self.globs = list(globs)
        self._spec: Any = None
        if globs:
            import pathspec  # only the scope guard needs it; agentctl's start does not pay
            self._spec = pathspec.GitIgnoreSpec.from_lines(globs)

    def matches(self, path: str, *, directory: bool = False) -> bool:
        if self._spec is None:
            return True
        return bool(self._spec.match_file(path + "/" if directory else path))


def check_glob(pattern: str) -> str | None:
    """Why `pattern` is not a usable --allow-changes glob, or None."""
    body = pattern[1:] if pattern.startswith("!") else pattern
    parts = body.rstrip("/").split("/")
    if not body or body.startswith("/") or ".." in parts or "\0" in pattern or "\n" in pattern:
        return "must be a non-empty glob relative to the workspace, without '..'"
    return None


@dataclass
class Change:
    path: str
    change: Literal["created", "modified", "deleted"]
    kind: Kind
    sha256_before: str | None = None
    sha256_after: str | None = None
    target_before: str | None = None
    target_after: str | None = None
    flags: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None and v != []} | {
            "flags": self.flags}


def _escapes(root: Path, relative: str, target: str) -> bool:
    """Does a symlink at `relative` with `target` point outside the workspace, as the host
    (any later CI step) would follow it? Absolute targets leave it unless they name a path
    under the workspace's host path."""
    base = os.path.normpath(root)
    if os.path.isabs(target):
        resolved = os.path.normpath(target)
    else:
        resolved = os.path.normpath(os.path.join(base, os.path.dirname(relative), target))
    return not (resolved == base or resolved.startswith(base + os.sep))


def _changed(old: Entry, new: Entry) -> bool:
    return (old.kind, old.sha256, old.target, old.mode) != (new.kind, new.sha256, new.target,
                                                           new.mode)


def diff(root: Path, before: dict[str, Entry], after: dict[str, Entry]) -> list[Change]:
    """Every created, modified and deleted path, sorted; flags on links out of the workspace.
    Directories are listed only when created or deleted (their content is listed itself)."""
    links_inside: dict[tuple[int, int], int] = {}
    for entry in after.values():
        if entry.kind == "file":
            links_inside[entry.inode] = links_inside.get(entry.inode, 0) + 1
    changes: list[Change] = []
    for path in sorted(before.keys() | after.keys()):
        old, new = before.get(path), after.get(path)
        if old is not None and new is not None:
            if not _changed(old, new) or (old.kind == new.kind == "dir"):
                continue
            change = Change(path, "modified", new.kind)
        elif new is not None:
            change = Change(path, "created", new.kind)
        else:
            assert old is not None
            change = Change(path, "deleted", old.kind)
        if old is not None:
            change.sha256_before, change.target_before = old.sha256, old.target
        if new is not None:
            change.sha256_after, change.target_after = new.sha256, new.target
            if new.kind == "symlink" and new.target is not None and _escapes(root, path,
                                                                               new.target):
                change.flags.append("symlink_out_of_workspace")
            if new.kind == "file" and new.nlink > links_inside.get(new.inode, 0):
                change.flags.append("hardlink_out_of_workspace")
        changes.append(change)
    return changes


# Files that can make the host's git run a filter, diff driver or fetch wherever they appear
# (not only at a fixed path a bind can hold): changing one is a violation whatever the globs.
HOST_CODE_NAMES = frozenset({".gitattributes", ".gitmodules"})


def _protected(path: str, readonly: list[str]) -> str | None:
    for item in readonly:
        item = item.rstrip("/")
        if path == item or path.startswith(item + "/"):
            return item
    return None


def _in_scope(changes: list[Change], allowed: AllowedChanges) -> set[str]:
    """The paths the globs allow. A directory created (or deleted) on the way to an allowed
    path is allowed with it: `tests/**` covers the `tests` directory an agent creates for
    `tests/test_app.py`, and an empty directory the globs name (`tests/` matches `tests/**`)."""
    ok = {c.path for c in changes if allowed.matches(c.path, directory=c.kind == "dir")}
    # Only a directory change is carried: a symlink or file that replaced a directory is a
    # change of its own (its old content shows up as deleted paths under it).
    directories = {c.path for c in changes if c.kind == "dir"}
    for path in list(ok):
        parent = path.rpartition("/")[0]
        while parent in directories and parent not in ok:
            ok.add(parent)
            parent = parent.rpartition("/")[0]
    return ok


def violations(changes: list[Change], allow: list[str], readonly: list[str]
               ) -> list[dict[str, str]]:
    """Each change that fails the scope guard, with why and the rule ("readonly",
    "host_code", "link", "scope"). Without `allow` globs every path is in scope; read-only
    paths, host-code files and links out of the workspace are violations whatever the globs."""
    in_scope = _in_scope(changes, AllowedChanges(allow))
    found: list[dict[str, str]] = []
    for change in changes:
        if (item := _protected(change.path, readonly)) is not None:
            found.append({"path": change.path, "why": f"read-only path {item} {change.change}",
                          "rule": "readonly"})
            continue
        if change.path.rpartition("/")[2] in HOST_CODE_NAMES and change.kind != "dir":
            found.append({"path": change.path, "rule": "host_code",
                          "why": f"{change.change}: a git attributes or modules file can make "
                                 f"the host's git run a filter or driver"})
            continue
        if change.flags:
            found.append({"path": change.path, "why": ", ".join(change.flags), "rule": "link"})
            continue
        if change.path not in in_scope:
            found.append({"path": change.path, "rule": "scope",
                          "why": f"{change.change} outside --allow-changes"})
    return found
