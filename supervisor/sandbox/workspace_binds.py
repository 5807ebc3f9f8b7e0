"""A run's workspace as bind mounts made from open files, and the read-only paths in it held for
the whole run (root, host mount namespace).

Three rules close the ways around a read-only path:
- Bound by inode: every source is opened with openat2 beneath the (already pinned) workspace,
  refusing any symlink or magic link, and bound from that fd into a private staging directory,
  <workspaces_dir>/<container>/<n>. The runtime (runc, or dockerd) only ever sees those staging
  paths, root-owned and out of the agent's reach, so a path swapped in the workspace after the
  check (another agent on the same checkout) can no longer redirect a bind to a host directory.
- Ancestors are mount points: each directory between the workspace root and a read-only path
  is bound onto itself (read-write). The kernel refuses to rename or remove a mount point, so
  the agent cannot move `.git` aside and make a fresh `.git/hooks`.
- Absent paths get a placeholder: the first missing component of a read-only path is created
  (an empty directory, or an empty file for a last component not written with a trailing '/'),
  root-owned and bound read-only, so the agent cannot create it. Placeholders are recorded in
  the staging directory and removed after the run (only if still the inode made here).

Removal unmounts and then only rmdirs (or unlinks an empty mount-point file): a staging entry
still holding files is a mount that did not go away, never something to delete."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import stat
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from supervisor.sandbox.libc import libc
from supervisor.sandbox.mounts import MNT_DETACH, MS_BIND, MS_PRIVATE
from supervisor.sandbox.workspace_fs import openat2

MS_RDONLY = 1
UMOUNT_NOFOLLOW = 8
MS_REMOUNT = 32
MS_NOSUID, MS_NODEV, MS_NOEXEC = 2, 4, 8
MS_NOATIME, MS_NODIRATIME, MS_RELATIME = 1024, 2048, 1 << 21
# statvfs flag -> mount flag, for the flags a read-only remount must keep (some are locked).
_KEPT_FLAGS = {os.ST_NOSUID: MS_NOSUID, os.ST_NODEV: MS_NODEV, os.ST_NOEXEC: MS_NOEXEC,
               os.ST_NOATIME: MS_NOATIME, os.ST_NODIRATIME: MS_NODIRATIME,
               os.ST_RELATIME: MS_RELATIME}
RECORD = "binds.json"
# A placeholder file is empty, except where git reads a file by its mere existence: an empty
# commondir makes every git command die, "." names the git dir itself (what it already is).
_CONTENT = {".git/commondir": b".\n"}


@dataclass(frozen=True)
class Bind:
    """One bind of the run: `relative` inside the workspace ("" is the root itself), bound
    from the staging mount point `source`."""

    relative: str
    source: str
    readonly: bool


@dataclass(frozen=True)
class Placeholder:
    """A file or directory made in the workspace to bind another over."""
    relative: str
    kind: Literal["dir", "file"]
    inode: tuple[int, int]


@dataclass
class StagedWorkspace:
    """A run's workspace binds and the placeholders made for them, recorded for cleanup."""
    directory: Path
    binds: list[Bind] = field(default_factory=list)
    placeholders: list[Placeholder] = field(default_factory=list)

    def save(self) -> None:
        data = {"binds": [asdict(b) for b in self.binds],
                "placeholders": [asdict(p) for p in self.placeholders]}
        path = self.directory / RECORD
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
        with os.fdopen(fd, "w") as handle:
            json.dump(data, handle)


def _check(result: int, what: str, path: Path) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what} {path}: {os.strerror(err)}", str(path))


def _bind_fd(fd: int, target: Path, readonly: bool) -> None:
    source = f"/proc/self/fd/{fd}".encode()
    _check(libc.mount(source, str(target).encode(), None, MS_BIND, None), "bind onto", target)
    _check(libc.mount(None, str(target).encode(), None, MS_PRIVATE, None), "make private",
           target)
    if readonly:
        kept = os.statvfs(target).f_flag
        flags = MS_REMOUNT | MS_BIND | MS_RDONLY
        for st_flag, ms_flag in _KEPT_FLAGS.items():
            if kept & st_flag:
                flags |= ms_flag
        _check(libc.mount(None, str(target).encode(), None, flags, None), "remount read-only",
               target)


def _protected_paths(entries: list[str]) -> list[tuple[list[str], bool]]:
    """(components, written as a directory) per entry, shallowest first, without entries that
    lie under another entry (the read-only bind above them covers them)."""
    parsed = sorted(((e.strip("/").split("/"), e.endswith("/")) for e in entries),
                    key=lambda item: len(item[0]))
    kept: list[tuple[list[str], bool]] = []
    for parts, as_dir in parsed:
        if not any(parts[:len(k)] == k for k, _ in kept):
            kept.append((parts, as_dir))
    return kept


def _placeholder(workspace_fd: int, relative: str, kind: Literal["dir", "file"]
                 ) -> tuple[int, Placeholder | None]:
    """Create `relative` (its parent exists) as an empty root-owned placeholder; returns its
    O_PATH fd and the record, or (fd, None) when someone else created it first."""
    parent, _, name = relative.rpartition("/")
    parent_fd = openat2(workspace_fd, parent or ".", os.O_PATH | os.O_DIRECTORY)
    try:
        try:
            if kind == "dir":
                os.mkdir(name, 0o555, dir_fd=parent_fd)
            else:
                file_fd = os.open(name, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW
                                  | os.O_CLOEXEC, 0o444, dir_fd=parent_fd)
                with os.fdopen(file_fd, "wb") as handle:
                    handle.write(_CONTENT.get(relative, b""))
            made = True
        except FileExistsError:
            made = False
        fd = openat2(parent_fd, name, os.O_PATH)
    finally:
        os.close(parent_fd)
    st = os.fstat(fd)
    wanted = stat.S_ISDIR if kind == "dir" else stat.S_ISREG
    if not made or st.st_uid != 0 or not wanted(st.st_mode):
        return fd, None  # not ours: it is bound read-only like any present path
    return fd, Placeholder(relative, kind, (st.st_dev, st.st_ino))


def stage(workspace_fd: int, readonly: list[str], directory: Path) -> StagedWorkspace:
    """Bind the workspace and its read-only paths into `directory` (created here, root, 0711:
    a user-namespaced runc must traverse it, nobody may list it). Undone by `unstage`, also
    when this raises half-way."""
    directory = Path(os.path.realpath(directory))  # as the mount table names it
    directory.mkdir(mode=0o711, parents=False, exist_ok=False)
    directory.chmod(0o711)
    staged = StagedWorkspace(directory)
    # relative path -> (O_PATH fd, read-only)
    targets: dict[str, tuple[int, bool]] = {}
    try:
        targets[""] = (os.dup(workspace_fd), False)
        for parts, as_dir in _protected_paths(readonly):
            for depth in range(1, len(parts) + 1):
                relative = "/".join(parts[:depth])
                last = depth == len(parts)
                if relative in targets:
                    if last:
                        targets[relative] = (targets[relative][0], True)
                    if targets[relative][1]:
                        break  # under a read-only bind (a placeholder): covered by it
                    continue
                try:
                    # No O_NOFOLLOW: with it O_PATH would open a final symlink itself instead
                    # of refusing it (ELOOP under RESOLVE_NO_SYMLINKS).
                    fd = openat2(workspace_fd, relative, os.O_PATH)
                except FileNotFoundError:
                    kind: Literal["dir", "file"] = "dir" if (as_dir or not last) else "file"
                    fd, made = _placeholder(workspace_fd, relative, kind)
                    if made is not None:
                        staged.placeholders.append(made)
                        staged.save()
                    targets[relative] = (fd, True)
                    break
                mode = os.fstat(fd).st_mode
                if not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
                    os.close(fd)
                    raise OSError(errno.EINVAL, "a read-only workspace path must be a regular "
                                  "file or a directory", relative)
                is_dir = stat.S_ISDIR(mode)
                # A non-directory on the way (a `.git` file naming the git dir elsewhere) is
                # what would redirect the host's git, so it is the read-only one.
                targets[relative] = (fd, last or not is_dir)
                if not is_dir:
                    break
        ordered = sorted(targets.items(), key=lambda item: item[0].count("/") + bool(item[0]))
        staged.binds = [Bind(relative, str(directory / str(index)), ro)
                        for index, (relative, (_fd, ro)) in enumerate(ordered)]
        staged.save()  # the whole plan first: unstage skips what was never mounted
        for bind, (_relative, (fd, _ro)) in zip(staged.binds, ordered, strict=True):
            point = Path(bind.source)
            if stat.S_ISDIR(os.fstat(fd).st_mode):
                point.mkdir(mode=0o711)
            else:
                point.touch(mode=0o600, exist_ok=False)
            _bind_fd(fd, point, bind.readonly)
    except BaseException:
        with contextlib.suppress(OSError):
            unstage(directory, workspace_fd)
        raise
    finally:
        for fd, _ro in targets.values():
            os.close(fd)
    return staged


def load(directory: Path) -> StagedWorkspace:
    staged = StagedWorkspace(directory)
    with contextlib.suppress(FileNotFoundError, ValueError, KeyError, TypeError):
        data = json.loads((directory / RECORD).read_text())
        staged.binds = [Bind(**b) for b in data["binds"]]
        staged.placeholders = [Placeholder(p["relative"], p["kind"], tuple(p["inode"]))
                               for p in data["placeholders"]]
    return staged


def _remove_placeholder(parent_fd: int, item: Placeholder) -> bool:
    name = item.relative.rpartition("/")[2]
    try:
        st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
        if (st.st_dev, st.st_ino) != item.inode:
            return True  # replaced by someone else after the run: not ours to remove
        if item.kind == "dir":
            os.rmdir(name, dir_fd=parent_fd)
        elif st.st_size == len(_CONTENT.get(item.relative, b"")):
            os.unlink(name, dir_fd=parent_fd)
        else:
            return False
        return True
    except FileNotFoundError:
        return True
    except OSError:
        return False


def _placeholder_parent(item: Placeholder, sources: dict[str, str], mounted: Counter[str],
                        workspace_fd: int | None) -> int | None:
    """An O_PATH fd of the placeholder's parent directory: through its staging bind when there
    is one (every parent of a placeholder is bound, and a bind follows the inode, whatever the
    workspace's names became meanwhile), else beneath `workspace_fd`."""
    parent = item.relative.rpartition("/")[0]
    source = sources.get(parent)
    try:
        if source is not None and source in mounted:
            return os.open(source, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        if workspace_fd is not None:
            return openat2(workspace_fd, parent or ".", os.O_PATH | os.O_DIRECTORY)
    except OSError:
        pass
    return None


def _mount_points() -> Counter[str]:
    """Each mount point of this namespace, with how many mounts are stacked on it."""
    with open("/proc/self/mountinfo") as table:
        return Counter(line.split(" ", 5)[4].encode().decode("unicode_escape")
                       for line in table)


def _unmount(point: Path) -> None:
    # Never through a symlink: a staging entry is only ever a mount point of our own.
    _check(libc.umount2(str(point).encode(), MNT_DETACH | UMOUNT_NOFOLLOW), "unmount", point)


def unstage(directory: Path, workspace_fd: int | None = None) -> list[str]:
    """Remove the placeholders (through `workspace_fd`, else the still-mounted workspace
    bind), then every staging mount, then the directory. Returns the placeholders that could
    not be removed; raises (after trying everything) if a staging entry could not go. Also
    takes the old layout, where the directory itself was the workspace's bind."""
    directory = Path(os.path.realpath(directory))  # as the mount table names it
    if not directory.exists():
        return []
    mounted = _mount_points()
    if str(directory) in mounted:
        _unmount(directory)
        directory.rmdir()
        return []
    staged = load(directory)
    left: list[str] = []
    sources = {b.relative: b.source for b in staged.binds}
    for item in reversed(staged.placeholders):
        parent_fd = _placeholder_parent(item, sources, mounted, workspace_fd)
        if parent_fd is None:
            left.append(item.relative)
            continue
        try:
            if not _remove_placeholder(parent_fd, item):
                left.append(item.relative)
        finally:
            os.close(parent_fd)
    failed: list[OSError] = []
    for point in sorted((p for p in directory.iterdir() if p.name.isdigit()),
                        key=lambda p: -int(p.name)):
        try:
            for _stacked in range(mounted[str(point)]):
                _unmount(point)
            st = point.lstat()
            if stat.S_ISDIR(st.st_mode):
                point.rmdir()  # raises if not empty: never recurse into what may be a workspace
            elif stat.S_ISREG(st.st_mode) and st.st_size == 0:
                point.unlink()
            else:
                raise OSError(errno.EBUSY, f"{point} still holds data", str(point))
        except OSError as exc:
            failed.append(exc)
    if failed:
        raise failed[0]
    with contextlib.suppress(FileNotFoundError):
        (directory / RECORD).unlink()
    directory.rmdir()
    return left


def mount_points(pid: int) -> dict[str, list[str]]:
    """The mount points of `pid`'s mount namespace (as it sees them) -> per-mount options of
    the topmost mount there."""
    found: dict[str, list[str]] = {}
    try:
        table = open(f"/proc/{pid}/mountinfo")  # noqa: SIM115 - closed below
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            # The kernel answers EINVAL once the task has let go of its namespaces: it is
            # exiting, and its mount namespace is gone with it.
            raise ProcessLookupError(errno.ESRCH, f"process {pid} is exiting") from exc
        raise
    with table:
        for line in table:
            fields = line.split(" ")
            point = fields[4].encode().decode("unicode_escape")
            found[point] = fields[5].split(",")
    return found


def misplaced(pid: int, binds: list[Bind], mount_root: str) -> list[str]:
    """The binds that are not where the runtime was told to put them in `pid`'s namespace (a
    destination swapped for a symlink while the runtime mounted), or not read-only there."""
    points = mount_points(pid)
    wrong: list[str] = []
    for bind in binds:
        where = f"{mount_root}/{bind.relative}" if bind.relative else mount_root
        options = points.get(where)
        if options is None or (bind.readonly and "ro" not in options):
            wrong.append(where)
    return wrong
