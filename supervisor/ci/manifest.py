"""The workspace manifest and the scope guard. A snapshot walks the workspace without following
a symlink (sha256 of every regular file, the target of every symlink); the manifest is the
difference of two snapshots, each change checked against `--allow-changes` globs and the
profile's read-only paths. Taken by root while no agent process is alive, so the agent cannot
race it. Reads the workspace only.

An agent makes as many paths as it likes, so after the run nothing holds them all (`guard`):
the workspace is walked in sorted order, one directory's listing per level in memory, and
merged with the snapshot taken before (the checkout's, which the agent did not make); each
change is judged as it comes, and the lists the report gets keep their first LISTED_AT_MOST
entries with the exact total and a sha256 over every entry (`Listed`). The changes themselves
wait in an unnamed temporary file for whoever applies them back (ci/checkout_copy.py)."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal

Kind = Literal["file", "symlink", "dir", "other"]
_CHUNK = 1 << 20


# The report lists at most this many entries of each list (changes, violations, quarantined
# paths), with each list's exact total and digest: ~350 bytes a change in the report's JSON, so
# a few MB at most, where an `npm install` alone makes ~50,000 paths (all judged).
LISTED_AT_MOST = 5000
# Inodes of files with more than one link whose links are counted (hardlinks out of the
# workspace); a file past this many such inodes is flagged as unverified (a violation).
LINKS_COUNTED_AT_MOST = 100_000


@dataclass(frozen=True, slots=True)
class Entry:
    kind: Kind
    mode: int
    size: int
    inode: tuple[int, int]
    nlink: int
    sha256: str | None = None  # regular files
    target: str | None = None  # symlinks


def _hash(name: str, dir_fd: int) -> str:
    digest = hashlib.sha256()
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK,
                 dir_fd=dir_fd)
    with os.fdopen(fd, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _entry(kind: Kind, st: os.stat_result, sha256: str | None = None,
           target: str | None = None) -> Entry:
    return Entry(kind, stat.S_IMODE(st.st_mode), st.st_size, (st.st_dev, st.st_ino), st.st_nlink,
                 sha256=sha256, target=target)


_DIRECTORY = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


def _listing(fd: int) -> list[tuple[str, str, bool]]:
    """A directory's entries as (sort key, name, descend), largest key first: a directory's
    own entry sorts by its name, its content by `name/`, so that taking them in key order
    gives the relative paths in sorted order (`a`, `a.b`, `a/x`)."""
    items: list[tuple[str, str, bool]] = []
    with os.scandir(fd) as listing:
        for item in listing:
            items.append((item.name, item.name, False))
            if item.is_dir(follow_symlinks=False):
                items.append((item.name + "/", item.name, True))
    items.sort(reverse=True)
    return items


def _identity(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def walk(root: Path) -> Iterator[tuple[str, Entry]]:
    """Every path under `root` (relative, '/'-separated) and what it is, in sorted order of
    the paths; the root itself is not an entry. Symlinks are recorded, never followed. In
    memory: one directory's listing per level of the current path, never every path. Each
    directory is opened from its parent's descriptor, never by path (a path longer than
    PATH_MAX is walked too), one descriptor at a time: back up, the parent is `..` of the
    child, checked to be the directory it left."""
    fd = os.open(root, _DIRECTORY)
    try:
        stack: list[tuple[str, list[tuple[str, str, bool]], tuple[int, int]]] = []
        prefix, items, identity = "", _listing(fd), _identity(fd)
        while True:
            while items:
                _, name, descend = items.pop()
                relative = prefix + name
                if descend:
                    child = os.open(name, _DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
                    stack.append((prefix, items, identity))
                    os.close(fd)
                    fd = child
                    prefix, items, identity = relative + "/", _listing(fd), _identity(fd)
                    continue
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                if stat.S_ISLNK(st.st_mode):
                    yield relative, _entry("symlink", st, target=os.readlink(name, dir_fd=fd))
                elif stat.S_ISREG(st.st_mode):
                    yield relative, _entry("file", st, sha256=_hash(name, fd))
                elif stat.S_ISDIR(st.st_mode):
                    yield relative, _entry("dir", st)
                else:
                    yield relative, _entry("other", st)
            if not stack:
                return
            parent = os.open("..", _DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = parent
            prefix, items, identity = stack.pop()
            if _identity(fd) != identity:
                raise OSError(errno.ESTALE, f"{root}: a directory moved while it was read")
    finally:
        os.close(fd)


def snapshot(root: Path) -> dict[str, Entry]:
    """Every path under `root` and what it is (`walk`), held: for the checkout before the run,
    which the agent did not make."""
    return dict(walk(root))


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


_FIELDS = ("path", "change", "kind", "sha256_before", "sha256_after", "target_before",
           "target_after")


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
    # The file's inode and link count after the run when it has more than one link (the
    # hardlink check needs every path's count first); not part of the record.
    links: tuple[int, int, int] | None = None

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k in _FIELDS if (v := getattr(self, k)) is not None} | {
            "flags": self.flags}

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> Change:
        links = record.get("links")
        return cls(**{k: record[k] for k in _FIELDS if k in record},
                   flags=list(record.get("flags") or ()),
                   links=(links[0], links[1], links[2]) if links else None)


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


def _change(root: Path, path: str, old: Entry | None, new: Entry | None) -> Change | None:
    if old is not None and new is not None:
        if not _changed(old, new) or (old.kind == new.kind == "dir"):
            return None
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
        if new.kind == "file" and new.nlink > 1:
            change.links = (*new.inode, new.nlink)
    return change


class LinkCount:
    """How many paths inside the workspace link each inode of a file with more than one link
    (at most LINKS_COUNTED_AT_MOST inodes)."""

    def __init__(self, limit: int = LINKS_COUNTED_AT_MOST) -> None:
        self.limit = limit
        self.inside: dict[tuple[int, int], int] = {}
        self.overflowed = False

    def see(self, entry: Entry) -> None:
        if entry.kind != "file" or entry.nlink < 2:
            return
        if entry.inode in self.inside:
            self.inside[entry.inode] += 1
        elif len(self.inside) < self.limit:
            self.inside[entry.inode] = 1
        else:
            self.overflowed = True

    def flag(self, change: Change) -> None:
        if change.links is None:
            return
        dev, ino, nlink = change.links
        seen = self.inside.get((dev, ino))
        if seen is None and self.overflowed:
            change.flags.append("hardlink_unverified")
        elif nlink > (seen or 0):
            change.flags.append("hardlink_out_of_workspace")


def _merged(root: Path, before: dict[str, Entry], after: Iterable[tuple[str, Entry]],
            links: LinkCount) -> Iterator[Change]:
    """The changes from `before` to `after` (sorted by path, as `walk` gives it), in path
    order; every entry of `after` is counted in `links` on the way."""
    gone = sorted(before)
    at = 0
    for path, new in after:
        links.see(new)
        while at < len(gone) and gone[at] < path:
            if (change := _change(root, gone[at], before[gone[at]], None)) is not None:
                yield change
            at += 1
        old = None
        if at < len(gone) and gone[at] == path:
            old = before[path]
            at += 1
        if (change := _change(root, path, old, new)) is not None:
            yield change
    for path in gone[at:]:
        if (change := _change(root, path, before[path], None)) is not None:
            yield change


def diff(root: Path, before: dict[str, Entry], after: dict[str, Entry]) -> list[Change]:
    """Every created, modified and deleted path, sorted; flags on links out of the workspace.
    Directories are listed only when created or deleted (their content is listed itself)."""
    links = LinkCount(limit=len(after))
    changes = list(_merged(root, before, sorted(after.items()), links))
    for change in changes:
        links.flag(change)
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


Violation = dict[str, str]


class Judge:
    """The scope guard over changes fed in path order (`feed`, then `finish`): each change that
    fails it goes to `found` with why and the rule ("readonly", "host_code", "link",
    "scope"). Without `allow` globs every path is in scope; read-only paths, host-code files
    and links out of the workspace are violations whatever the globs. A directory created (or
    deleted) on the way to an allowed path is allowed with it: `tests/**` covers the `tests`
    directory an agent creates for `tests/test_app.py`, and an empty directory the globs name
    (`tests/` matches `tests/**`). So a directory change is judged once the paths under it
    are: it comes after them. Only the directory changes on the current path are held."""

    def __init__(self, allow: list[str], readonly: list[str],
                 found: Callable[[Change, Violation], None]) -> None:
        self.allowed = AllowedChanges(allow)
        self.readonly = readonly
        self.found = found
        self._open: list[list[Any]] = []  # [directory change, in scope], outermost first

    def feed(self, change: Change) -> None:
        while self._open and not change.path.startswith(self._open[-1][0].path + "/"):
            self._decide(*self._open.pop())
        ok = self.allowed.matches(change.path, directory=change.kind == "dir")
        if ok:
            self._carry(change.path)
        # Only a directory change is carried: a symlink or file that replaced a directory is a
        # change of its own (its old content shows up as deleted paths under it).
        if change.kind == "dir":
            self._open.append([change, ok])
        else:
            self._decide(change, ok)

    def finish(self) -> None:
        while self._open:
            self._decide(*self._open.pop())

    def _carry(self, path: str) -> None:
        """`path` is in scope: so is each directory change it lies in, up to the first path
        on the way that is not one."""
        parent = path.rpartition("/")[0]
        for item in reversed(self._open):
            if item[0].path != parent or item[1]:
                return
            item[1] = True
            parent = parent.rpartition("/")[0]

    def _decide(self, change: Change, in_scope: bool) -> None:
        if (item := _protected(change.path, self.readonly)) is not None:
            self.found(change, {"path": change.path, "rule": "readonly",
                                "why": f"read-only path {item} {change.change}"})
        elif change.path.rpartition("/")[2] in HOST_CODE_NAMES and change.kind != "dir":
            self.found(change, {"path": change.path, "rule": "host_code",
                                "why": f"{change.change}: a git attributes or modules file "
                                       f"can make the host's git run a filter or driver"})
        elif change.flags:
            self.found(change, {"path": change.path, "why": ", ".join(change.flags),
                                "rule": "link"})
        elif not in_scope:
            self.found(change, {"path": change.path, "rule": "scope",
                                "why": f"{change.change} outside --allow-changes"})


def violations(changes: list[Change], allow: list[str], readonly: list[str]
               ) -> list[Violation]:
    """Each change of `changes` (sorted by path) that fails the scope guard (`Judge`)."""
    found: list[Violation] = []
    judge = Judge(allow, readonly, lambda _change, violation: found.append(violation))
    for change in changes:
        judge.feed(change)
    judge.finish()
    return found


# One encoder each, not one per call as json.dumps makes for any argument given.
_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":")).encode
_COMPACT = json.JSONEncoder(separators=(",", ":")).encode


class Listed:
    """A list the report carries: its first `limit` entries, its exact total, and the sha256
    of every entry's canonical JSON (keys sorted, no whitespace, ASCII), one a line, in the
    list's order: what was left out is fixed by the signed report all the same."""

    def __init__(self, limit: int = LISTED_AT_MOST) -> None:
        self.limit = limit
        self.items: list[dict[str, Any]] = []
        self.total = 0
        self._digest = hashlib.sha256()

    def add(self, item: dict[str, Any]) -> None:
        self._digest.update(_CANONICAL(item).encode() + b"\n")
        self.total += 1
        if len(self.items) < self.limit:
            self.items.append(item)

    @property
    def sha256(self) -> str:
        return self._digest.hexdigest()


def listed_digest(items: Iterable[dict[str, Any]]) -> str:
    """`Listed.sha256` of a complete list, to check a report's against."""
    listed = Listed(limit=0)
    for item in items:
        listed.add(item)
    return listed.sha256


@dataclass
class Guarded:
    """What `guard` found: the report's lists, and every change in path order for applying
    back (`forward`, `backward`) until `close`."""

    changes: Listed
    violations: Listed
    spill: IO[bytes]

    def forward(self) -> Iterator[Change]:
        self.spill.seek(0)
        for line in self.spill:
            yield Change.from_dict(json.loads(line))

    def backward(self) -> Iterator[Change]:
        for line in _lines_backward(self.spill):
            yield Change.from_dict(json.loads(line))

    def close(self) -> None:
        self.spill.close()


def _lines_backward(handle: IO[bytes], block: int = 1 << 16) -> Iterator[bytes]:
    """The lines of `handle` (each ending in a newline), last first, a block at a time."""
    position = handle.seek(0, os.SEEK_END)
    tail = b""
    while position > 0:
        step = min(block, position)
        position -= step
        handle.seek(position)
        chunk = handle.read(step) + tail
        lines = chunk.split(b"\n")
        tail = lines[0]
        for line in reversed(lines[1:]):
            if line:
                yield line
    if tail:
        yield tail


def guard(root: Path, before: dict[str, Entry], allow: list[str], readonly: list[str],
          found: Callable[[Change, Violation], None] | None = None) -> Guarded:
    """The workspace after the run against `before`, judged whole, held in part: every change
    is judged and counted, the report's lists keep LISTED_AT_MOST entries each (`Listed`), and
    `found` (quarantine) sees each violation as it is decided (a directory after the paths
    under it). The changes wait in an unnamed file of root's for `Guarded.forward`."""
    links = LinkCount()
    # Unnamed (O_TMPFILE), root's, gone with its descriptor; Guarded.close closes it.
    spill = tempfile.TemporaryFile()  # noqa: SIM115
    try:
        for change in _merged(root, before, walk(root), links):
            record = change.as_dict()
            if change.links is not None:
                record["links"] = change.links
            spill.write(_COMPACT(record).encode() + b"\n")
        changes, violated = Listed(), Listed()

        def decided(change: Change, violation: Violation) -> None:
            violated.add(violation)
            if found is not None:
                found(change, violation)

        judge = Judge(allow, readonly, decided)
        spill.seek(0)
        for line in spill:
            change = Change.from_dict(json.loads(line))
            links.flag(change)
            changes.add(change.as_dict())
            judge.feed(change)
        judge.finish()
    except BaseException:
        spill.close()
        raise
    return Guarded(changes, violated, spill)
