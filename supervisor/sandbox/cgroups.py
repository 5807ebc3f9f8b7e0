"""Every cgroup this project touches, through one class: a run's (kill, freeze, thaw, confirm
empty), the runs' parent (its budget, break-glass), the watchdog's own, the gateway worker's
(its limits). Needs root.

Works on pure v2 hosts (`/sys/fs/cgroup`) and hybrid hosts, where runc also places each container
in the v2 tree at `/sys/fs/cgroup/unified` (no controllers there, but `cgroup.kill`,
`cgroup.freeze` and `cgroup.events` work) and the controllers live in v1 hierarchies
(`/sys/fs/cgroup/<controller>`): a `Cgroup` is the same path in all of them, and a controller's
file is read and written where that controller is mounted (`Cgroup.file`)."""

from __future__ import annotations

import contextlib
import enum
import errno
import os
import select
import signal
import time
from collections.abc import Sequence
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
_POLL_SLICE_MS = 50  # re-read even without a notification, in case one was coalesced away
_HELD_FILES = {"cgroup.kill": os.O_WRONLY, "cgroup.events": os.O_RDONLY,
               "cgroup.freeze": os.O_WRONLY, "cgroup.procs": os.O_RDONLY}


def sigkill(pid: int) -> None:
    """SIGKILL `pid` through a pidfd (no pid-reuse race); plain kill(2) when no descriptor can
    be had (a full table must not stop a kill). A pid already gone is not an error.

    A pid of 0 or less names no one process: kill(2) would take it as this process's group
    (0) or every process it may signal (-1). cgroup.procs reads 0 for a member outside this
    process's pid namespace, which cannot be signalled from here anyway; such a pid is
    skipped (the cgroup's own kill reaches it)."""
    if pid <= 0:
        return
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    except OSError:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        return
    try:
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    except ProcessLookupError:
        pass
    finally:
        os.close(pidfd)


class CgroupMode(enum.StrEnum):
    V2 = "v2"
    HYBRID = "hybrid"
    NONE = "none"


def detect_mode(root: Path = CGROUP_ROOT) -> CgroupMode:
    if (root / "cgroup.controllers").exists():
        return CgroupMode.V2
    if (root / "unified" / "cgroup.controllers").exists():
        return CgroupMode.HYBRID
    return CgroupMode.NONE


def unified_root(root: Path = CGROUP_ROOT) -> Path:
    mode = detect_mode(root)
    if mode is CgroupMode.V2:
        return root
    if mode is CgroupMode.HYBRID:
        return root / "unified"
    raise FileNotFoundError(f"no cgroup v2 tree under {root}")


def v1_hierarchies(root: Path = CGROUP_ROOT) -> list[Path]:
    """The v1 hierarchies on a hybrid host (empty on pure v2)."""
    if detect_mode(root) is not CgroupMode.HYBRID:
        return []
    return sorted(
        p for p in root.iterdir() if p.is_dir() and not p.is_symlink() and p.name != "unified"
    )


class Cgroup:
    """One cgroup, addressed by its path relative to the hierarchies' roots: `path` is its
    directory in the v2 tree, and on a hybrid host the same path in each v1 hierarchy holds
    its controllers' files. The one owner of every cgroup the project makes: the kill path,
    the watchdog, telemetry, the gateway worker's limits, the runs' budget and CI teardown
    all act through it.

    `hold()` opens the files the kill path needs (cgroup.kill, cgroup.events, cgroup.freeze,
    cgroup.procs) once, at launch, so a kill needs no new file descriptor: it still works with
    the daemon's descriptor table full."""

    def __init__(self, relative: str, root: Path | None = None, *,
                 host_root: Path = CGROUP_ROOT) -> None:
        self.relative = relative.strip("/")
        # Where every hierarchy is mounted (/sys/fs/cgroup; a directory in tmp for tests).
        self.host_root = host_root
        self.root = root or unified_root(host_root)  # the v2 tree's
        self.path = self.root / self.relative
        self._held: dict[str, int] = {}
        # Why the last kill left `cgroup.kill` for the fallback (for the record and the audit).
        self.kill_error: str | None = None

    def __repr__(self) -> str:
        return f"Cgroup({self.path})"

    def exists(self) -> bool:
        return self.path.is_dir()

    # ------------------------------------------------------- hierarchies and their files

    @property
    def hybrid(self) -> bool:
        return detect_mode(self.host_root) is CgroupMode.HYBRID

    def in_v1(self, hierarchy: str) -> Path:
        """This cgroup's directory in v1 hierarchy `hierarchy` ("memory", "pids", "cpu",
        "systemd" for systemd's name=systemd tracking tree)."""
        return self.host_root / hierarchy / self.relative

    def directories(self, v1: Sequence[str] = ()) -> list[Path]:
        """Its v2 directory and, on a hybrid host, its directory in each of the v1 hierarchies
        `v1` that the host has."""
        found = [self.path]
        if self.hybrid:
            found.extend(self.in_v1(h) for h in v1
                         if (self.host_root / h).is_dir())
        return found

    def file(self, name: str) -> Path:
        """Where the controller file `name` is: in the v2 directory, except a controller's own
        file on a hybrid host (`memory.limit_in_bytes`, `pids.max`, `cpu.shares`), which lives
        in that controller's v1 hierarchy. `cgroup.*` files are always the v2 tree's."""
        controller = name.split(".", 1)[0]
        if controller != "cgroup" and self.hybrid:
            return self.in_v1(controller) / name
        return self.path / name

    def read(self, name: str) -> str:
        return self.file(name).read_text().strip()

    def write(self, name: str, value: str) -> None:
        """One write(2) of `value` to the file `name` (its held descriptor if it has one); an
        OSError names the file that refused."""
        fd = self._held.get(name)
        if fd is not None:
            os.write(fd, value.encode())
            return
        path = self.file(name)
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)  # the OSError names the file
        try:
            os.write(fd, value.encode())
        except OSError as exc:
            raise type(exc)(exc.errno, exc.strerror, str(path)) from exc
        finally:
            os.close(fd)

    def create(self, v1: Sequence[str] = ()) -> Cgroup:
        """Make its directory in the v2 tree and in the v1 hierarchies `v1` (hybrid hosts)."""
        for directory in self.directories(v1):
            directory.mkdir(parents=True, exist_ok=True)
        return self

    def delegate(self, controllers: Sequence[str]) -> list[Path]:
        """Enable `controllers` in every `cgroup.subtree_control` from the v2 root down to this
        cgroup's parent, making the directories on the way, so this cgroup has their files (a
        v2 child has a controller only if its parent delegates it). Only the missing ones
        are written; the files changed are returned."""
        changed: list[Path] = []
        current = self.root
        for part in Path(self.relative).parts:
            control = current / "cgroup.subtree_control"
            enabled = control.read_text().split()
            missing = [c for c in controllers if c not in enabled]
            if missing:
                control.write_text(" ".join(f"+{c}" for c in missing))
                changed.append(control)
            current = current / part
            current.mkdir(exist_ok=True)
        return changed

    def place(self, pid: int, v1: Sequence[str] = ()) -> None:
        """Move `pid` into this cgroup in the v2 tree and in the v1 hierarchies `v1` (hybrid
        hosts), making the directories first; OSError naming the file that refused."""
        for directory in self.directories(v1):
            directory.mkdir(parents=True, exist_ok=True)
            target = directory / "cgroup.procs"
            fd = os.open(target, os.O_WRONLY | os.O_CLOEXEC)
            try:
                os.write(fd, str(pid).encode())
            except OSError as exc:
                raise type(exc)(exc.errno, f"cannot move pid {pid} into {target}: "
                                f"{exc.strerror}") from exc
            finally:
                os.close(fd)

    def memory_files(self) -> tuple[Path, Path] | None:
        """Its memory use and OOM counters: the v2 files when the v2 tree has the memory
        controller here, else the v1 memory controller's (hybrid hosts), else None."""
        if (self.path / "memory.current").exists():
            return self.path / "memory.current", self.path / "memory.events"
        v1 = self.in_v1("memory")
        if self.hybrid and (v1 / "memory.usage_in_bytes").exists():
            return v1 / "memory.usage_in_bytes", v1 / "memory.oom_control"
        return None

    # ------------------------------------------------------------------ the kill path

    def hold(self) -> Cgroup:
        """Open and keep the kill path's files; idempotent. Raises if the cgroup is missing."""
        for name, flags in _HELD_FILES.items():
            if name in self._held:
                continue
            try:
                self._held[name] = os.open(self.path / name, flags | os.O_CLOEXEC)
            except FileNotFoundError:
                if name != "cgroup.kill" or not self.exists():
                    self.release()
                    raise
                # A kernel before 5.14: kills use the freeze + SIGKILL fallback.
        return self

    def release(self) -> None:
        held, self._held = self._held, {}
        for fd in held.values():
            with contextlib.suppress(OSError):
                os.close(fd)

    @property
    def held(self) -> bool:
        return bool(self._held)

    def held_file(self, name: str) -> int | None:
        """The descriptor `hold()` keeps for `name` (None: not held). It is closed by
        `release()`: a holder on another thread keeps a copy of its own (sandbox/killindex.py)."""
        return self._held.get(name)

    def stale(self) -> bool:
        """The held files belong to a directory removed since `hold()` (perhaps made again
        at the same path, as runc makes a missing parent for a new run): a write to them
        fails with ENODEV and a read says empty. A stat each, no new descriptor."""
        fd = self._held.get("cgroup.events")
        if fd is None:
            return False
        try:
            return os.fstat(fd).st_ino != os.stat(self.path / "cgroup.events").st_ino
        except OSError:
            return True

    def held_broken(self) -> list[str]:
        """Held files whose descriptor is no longer open (closed behind our back by a bug):
        the kill path could not act through them."""
        broken = []
        for name, fd in self._held.items():
            try:
                os.fstat(fd)
            except OSError:
                broken.append(name)
        return broken

    def events(self) -> dict[str, str]:
        try:
            text = self._read_held("cgroup.events")
        except FileNotFoundError:
            return {"populated": "0", "frozen": "0"}
        except OSError as exc:
            if exc.errno == errno.ENODEV:  # removed while held: certainly empty
                return {"populated": "0", "frozen": "0"}
            raise
        return dict(line.split(" ", 1) for line in text.splitlines() if " " in line)

    def _read_held(self, name: str) -> str:
        fd = self._held.get(name)
        if fd is None:
            return (self.path / name).read_text()
        chunks: list[bytes] = []
        offset = 0
        while chunk := os.pread(fd, 65536, offset):
            chunks.append(chunk)
            offset += len(chunk)
        return b"".join(chunks).decode()

    def populated(self) -> bool:
        return self.events().get("populated") == "1"

    def pids(self) -> list[int]:
        """Every pid in this cgroup and its descendants."""
        found: list[int] = []
        for dirpath, _dirs, files in os.walk(self.path):
            if "cgroup.procs" in files:
                with contextlib.suppress(FileNotFoundError):
                    text = Path(dirpath, "cgroup.procs").read_text()
                    found.extend(int(line) for line in text.split())
        return found

    def _pids_without_new_fds(self) -> list[int]:
        """The pids of this cgroup itself through the held cgroup.procs, then (best effort, it
        needs descriptors) those of any sub-cgroup an agent may have made."""
        found: set[int] = set()
        with contextlib.suppress(OSError, ValueError):
            found.update(int(pid) for pid in self._read_held("cgroup.procs").split())
        with contextlib.suppress(OSError, ValueError):
            found.update(self.pids())
        return sorted(found)

    def stats(self) -> dict[str, int | None]:
        """CPU time, memory and process count: cpu.stat is core to the v2 tree; memory comes
        from v2 memory.current, or the v1 memory controller on hybrid hosts."""
        cpu_usec = None
        with contextlib.suppress(OSError, ValueError):
            for line in (self.path / "cpu.stat").read_text().splitlines():
                key, value = line.split()
                if key == "usage_usec":
                    cpu_usec = int(value)
        memory = None
        if (files := self.memory_files()) is not None:
            with contextlib.suppress(OSError, ValueError):
                memory = int(files[0].read_text())
        return {"cpu_usec": cpu_usec, "memory_bytes": memory, "processes": len(self.pids())}

    def has_kill_file(self) -> bool:
        return "cgroup.kill" in self._held or (self.path / "cgroup.kill").exists()

    def kill(self, *, force_fallback: bool = False) -> str:
        """SIGKILL every process in the cgroup; returns the mechanism used. Never gives up on
        the first error: a failed `cgroup.kill` write falls back to freeze + SIGKILL.

        `cgroup.kill` (Linux >= 5.14) kills the whole subtree atomically, forks in flight
        included. Without it: freeze so nothing can fork, SIGKILL each pid, thaw so the signals
        are delivered."""
        if not force_fallback:
            try:
                self.write("cgroup.kill", "1")
                return "cgroup.kill"
            except FileNotFoundError:
                if not self.exists():
                    raise
            except OSError as exc:
                # EMFILE, EIO, a kernel without the file: the fallback needs no new fd.
                self.kill_error = f"cgroup.kill: {exc.strerror or exc}"
        return self.kill_fallback()

    def kill_fallback(self) -> str:
        """Freeze, SIGKILL each pid (through a pidfd when one can be had, so a recycled pid is
        never hit), thaw. Each step is tried whatever the previous one did."""
        frozen = True
        try:
            self.freeze()
            self.wait_frozen(1.0)
        except OSError as exc:
            frozen = False
            self.kill_error = f"{self.kill_error or ''}; freeze: {exc.strerror or exc}".lstrip("; ")
        for pid in self._pids_without_new_fds():
            sigkill(pid)
        with contextlib.suppress(OSError):
            self.thaw()
        return "freeze+sigkill" if frozen else "sigkill"

    def signal_all(self, signum: int) -> int:
        sent = 0
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)
                sent += 1
        return sent

    def freeze(self) -> None:
        self.write("cgroup.freeze", "1")

    def thaw(self) -> None:
        self.write("cgroup.freeze", "0")

    def wait_frozen(self, timeout: float) -> bool:
        return self._wait_event("frozen", "1", timeout)

    def wait_empty(self, timeout: float) -> bool:
        """Block until the kernel reports `populated 0` (True) or the timeout passes (False).

        Uses poll(2) on cgroup.events, which the kernel signals with POLLPRI on every change,
        so the wait ends as soon as the last process is gone rather than on a polling tick.
        A held cgroup waits on its held descriptor and opens nothing."""
        return self._wait_event("populated", "0", timeout)

    def _wait_event(self, key: str, want: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        held = self._held.get("cgroup.events")
        if held is not None:
            fd = held
        else:
            try:
                fd = os.open(self.path / "cgroup.events", os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                return key == "populated" and want == "0"
        try:
            poller = select.poll()  # no descriptor of its own, unlike epoll
            poller.register(fd, select.POLLPRI | select.POLLERR)
            while True:
                try:
                    text = os.pread(fd, 4096, 0).decode()
                except OSError as exc:
                    # ENODEV: the cgroup was removed while we waited, so it is certainly empty.
                    if exc.errno == errno.ENODEV:
                        return key == "populated" and want == "0"
                    raise
                if f"{key} {want}" in text.splitlines():
                    return True
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                poller.poll(min(remaining * 1000, _POLL_SLICE_MS))
        finally:
            if held is None:
                os.close(fd)

    def remove_if_empty(self) -> bool:
        """rmdir this directory alone (not its children) in the v2 tree and every v1
        hierarchy, where it is empty; True if it is gone from all of them. For a cgroup other
        processes may still use, such as a parent shared by several CI slots."""
        gone = True
        for tree in [self.path, *(h / self.relative for h in v1_hierarchies(self.host_root))]:
            try:
                tree.rmdir()
            except FileNotFoundError:
                pass
            except OSError:
                gone = False  # busy: a child or a process is still there
        return gone

    def remove(self, *, strict: bool = True) -> list[str]:
        """rmdir this cgroup (children first) in the v2 tree and in every v1 hierarchy. Every
        directory is tried; those that could not go are returned (`strict`: the first error
        is raised once all were tried)."""
        self.release()
        left: list[str] = []
        first: OSError | None = None
        trees = [self.path, *(h / self.relative for h in v1_hierarchies(self.host_root))]
        for tree in trees:
            if not tree.is_dir():
                continue
            for dirpath, _dirs, _files in sorted(os.walk(tree), key=lambda w: -len(w[0])):
                try:
                    os.rmdir(dirpath)
                except FileNotFoundError:
                    pass
                except OSError as exc:
                    left.append(dirpath)
                    first = first or exc
        if strict and first is not None:
            raise first
        return left
