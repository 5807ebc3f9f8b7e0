"""Kernel reads for telemetry: cgroup files kept open and re-read with pread, a process's
numbers from /proc/<pid>/stat, statm and io, its open fds counted and its inet connections
seen from its own network namespace, "key value" parsing. Needs root to read other users'
/proc/<pid>/fd and /proc/<pid>/net; used only by the sampler thread.

Every name the sampler looks up under /proc/<pid> leaves a dentry that the process's exit has
to invalidate (`proc_flush_pid`): with a hundred agents of twenty processes killed at once,
the dentries of the sampler's walks lengthened the kernel's own kill by several milliseconds.
So the walk looks up as few as it can: /proc/<pid>/stat, /statm and /io (not psutil's
status besides), the fd directory's size for the count (no entry per descriptor), and the
descriptors themselves only in a network namespace that has inet sockets at all."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

log = logging.getLogger(__name__)

_INET_TABLES = ("tcp", "tcp6", "udp", "udp6")
_CHUNK = 65536


class CgroupReader(Protocol):
    """How the sampler reads cgroup files (the seam for tests)."""

    def read(self, path: str) -> bytes:
        """The file's whole content; OSError when it cannot be read (ENOENT, ENODEV, ...)."""
        ...

    def release(self, directories: Iterable[str]) -> None:
        """Forget every file under these directories (their run is no longer sampled)."""
        ...


def read_file(path: str) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks = []
        while chunk := os.read(fd, _CHUNK):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


class OpenFiles:
    """Cgroup files kept open and re-read with pread(2) at offset 0, which regenerates a
    cgroupfs file: one syscall per reading instead of open, read and close (about 2 µs instead
    of 8; the sampler reads four files per run ten times a second).

    An open fd does not keep a cgroup alive: once the cgroup is removed, pread fails with
    ENODEV, and the fd is closed. At most `max_open` files stay open (the daemon's own fds
    matter more); beyond that a file is read the plain way. Not thread-safe: the sampler
    thread owns it."""

    def __init__(self, max_open: int = 2048) -> None:
        self.max_open = max_open
        self._fds: dict[str, int] = {}

    def read(self, path: str) -> bytes:
        fd = self._fds.get(path)
        if fd is None:
            if len(self._fds) >= self.max_open:
                return read_file(path)
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            self._fds[path] = fd
        try:
            data = os.pread(fd, _CHUNK, 0)
            if len(data) < _CHUNK:
                return data
            chunks = [data]
            while chunk := os.pread(fd, _CHUNK, _CHUNK * len(chunks)):
                chunks.append(chunk)
            return b"".join(chunks)
        except OSError:
            self._close(path)
            raise

    def release(self, directories: Iterable[str]) -> None:
        prefixes = tuple(d.rstrip("/") + "/" for d in directories)
        for path in [p for p in self._fds if p.startswith(prefixes)]:
            self._close(path)

    def close(self) -> None:
        for path in list(self._fds):
            self._close(path)

    def _close(self, path: str) -> None:
        fd = self._fds.pop(path, None)
        if fd is not None:
            os.close(fd)

    def __len__(self) -> int:
        return len(self._fds)


def value_of(data: bytes, key: bytes) -> int | None:
    """The value of `key` in a "key value" per line file (cpu.stat, memory.events, ...)."""
    for line in data.splitlines():
        name, _, value = line.partition(b" ")
        if name == key:
            return int(value)
    return None


def read_fds(pid: int, proc: Path = Path("/proc")) -> tuple[int, set[str]]:
    """One listing of /proc/<pid>/fd: the number of open fds (psutil's `num_fds`) and the
    inodes of the TCP and UDP sockets among them that the process's network namespace lists
    (what psutil's `net_connections(kind="inet")` would find, if it could see them). A socket
    shared by several processes (inherited over fork) is one inode: counted once per run.

    psutil matches socket inodes against /proc/net/*, which is the *reader's* network
    namespace, so from the host it finds none of a sandboxed agent's sockets; /proc/<pid>/net/*
    are the tables of the process's own namespace. The listing looks up every descriptor
    (a dentry each): `Descriptors` lists only where a socket may be found."""
    fd_dir = f"{proc}/{pid}/fd"
    names = os.listdir(fd_dir)
    sockets = set()
    for name in names:
        try:
            target = os.readlink(f"{fd_dir}/{name}")
        except FileNotFoundError:  # closed since the listing
            continue
        if target.startswith("socket:["):
            sockets.add(target[8:-1])
    if not sockets:
        return len(names), sockets
    found = set()
    for table in _INET_TABLES:
        try:
            data = read_file(f"{proc}/{pid}/net/{table}")
        except FileNotFoundError:  # tcp6 and udp6 are absent when IPv6 is disabled
            continue
        for line in data.splitlines()[1:]:
            fields = line.split()
            if len(fields) > 9 and (inode := fields[9].decode()) in sockets:
                found.add(inode)
    return len(names), found


def has_inet_sockets(pid: int, proc: Path = Path("/proc")) -> bool:
    """Whether the network namespace of `pid` has any TCP or UDP socket in its tables: the
    namespace's counts in /proc/<pid>/net/sockstat and sockstat6 ("inuse": the sockets hashed
    in the tables /proc/<pid>/net/tcp and the others list). Microseconds, where reading the
    tables walks the kernel's whole hash tables (about 6 ms for the four on a small host)."""
    for name, keys in (("sockstat", (b"TCP:", b"UDP:")), ("sockstat6", (b"TCP6:", b"UDP6:"))):
        try:
            data = read_file(f"{proc}/{pid}/net/{name}")
        except FileNotFoundError:  # sockstat6 is absent when IPv6 is disabled
            continue
        for line in data.splitlines():
            fields = line.split()
            if fields and fields[0] in keys and fields[1:2] == [b"inuse"] and int(fields[2]):
                return True
    return False


# _IO(PIDFS_IOCTL_MAGIC, 4) (linux/pidfd.h, Linux 6.11): a pidfd's process's network namespace.
PIDFD_GET_NET_NAMESPACE = 0xFF04


def fd_dir_sized(proc: Path = Path("/proc")) -> bool:
    """Whether the kernel gives the number of a process's open fds as the size of its
    /proc/<pid>/fd (Linux 6.2; before, 0). This process always has some open."""
    try:
        return os.stat(f"{proc}/self/fd").st_size > 0
    except OSError:
        return False


class Descriptors:
    """The sampler's fd reader: a process's open fd count and the inodes of its inet sockets
    (`read_fds`'s answer), with fewer lookups under /proc/<pid>:

    - the count is the size of /proc/<pid>/fd where the kernel gives it (`sized`), not a
      listing, which looks up every descriptor;
    - the descriptors are listed only when the process's network namespace, found through a
      pidfd (`PIDFD_GET_NET_NAMESPACE`, no /proc lookup), has any inet socket at all
      (`has_inet_sockets`): a process's connections are sockets of its own namespace's
      tables, so in a namespace without any it has none. `namespaces` holds the answer for
      each namespace met in one walk (the caller's dict: one look per namespace and walk).

    On a kernel without either (before 6.2, 6.11), and for a process whose namespace is not
    ours to see (EPERM), the listing answers as `read_fds` does."""

    def __init__(self, proc: Path = Path("/proc"), *, sized: bool | None = None,
                 by_namespace: bool | None = None) -> None:
        self.proc = proc
        self.sized = fd_dir_sized(proc) if sized is None else sized
        self.by_namespace = proc == Path("/proc") if by_namespace is None else by_namespace
        self.listings = 0  # processes whose descriptors were listed (for tests)

    def __call__(self, pid: int, namespaces: dict[int, bool]) -> tuple[int, set[str]]:
        if not self.sized:
            return self._listed(pid)
        count = os.stat(f"{self.proc}/{pid}/fd").st_size
        if count == 0:  # a zombie's too
            return 0, set()
        namespace = self._namespace(pid)
        if namespace is None:
            return self._listed(pid)
        busy = namespaces.get(namespace)
        if busy is None:
            busy = namespaces[namespace] = has_inet_sockets(pid, self.proc)
        if not busy:
            return count, set()
        return self._listed(pid)

    def _listed(self, pid: int) -> tuple[int, set[str]]:
        self.listings += 1
        return read_fds(pid, self.proc)

    def _namespace(self, pid: int) -> int | None:
        """The inode of the process's network namespace; None when the kernel cannot say
        through a pidfd (then never asked again) or not to us."""
        if not self.by_namespace:
            return None
        pidfd = os.pidfd_open(pid)  # ProcessLookupError (an OSError): gone since the listing
        try:
            namespace = fcntl.ioctl(pidfd, PIDFD_GET_NET_NAMESPACE)
        except OSError as exc:
            if exc.errno in (errno.ENOTTY, errno.EINVAL, errno.EOPNOTSUPP):
                self.by_namespace = False
            return None  # also EPERM, and ESRCH for a process on its way out
        finally:
            os.close(pidfd)
        try:
            return os.fstat(namespace).st_ino
        finally:
            os.close(namespace)


# ----------------------------------------------------------------------------- a process

STATUS_ZOMBIE = "zombie"  # psutil.STATUS_ZOMBIE
_STATES = {b"R": "running", b"S": "sleeping", b"D": "disk-sleep", b"T": "stopped",
           b"t": "tracing-stop", b"Z": STATUS_ZOMBIE, b"X": "dead", b"x": "dead",
           b"K": "wake-kill", b"W": "waking", b"I": "idle", b"P": "parked"}
_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
_COMM_MAX = 15  # TASK_COMM_LEN - 1: a longer name is cut; psutil then looks in the cmdline


@dataclass(frozen=True)
class Memory:
    """A process's resident set size, in bytes."""
    rss: int


@dataclass(frozen=True)
class IoCounters:
    """A process's bytes read and written through storage."""
    read_bytes: int
    write_bytes: int


class ProcStat:
    """What the sampler reads of one process, psutil.Process's way (same values, same
    exceptions: psutil.NoSuchProcess, psutil.AccessDenied) but from /proc/<pid>/stat (name,
    state, parent, threads), /statm (RSS) and /io alone, where psutil also reads status: a
    lookup, and a dentry for the process's exit to drop, fewer. (stat's own RSS field is the
    kernel's per-CPU estimate, statm's the exact sum psutil reports.)"""

    def __init__(self, pid: int, proc: Path = Path("/proc")) -> None:
        self.pid = pid
        self._base = f"{proc}/{pid}"
        self._stat: tuple[bytes, list[bytes]] | None = None
        self._in_oneshot = False

    @contextlib.contextmanager
    def oneshot(self) -> Iterator[None]:
        """/proc/<pid>/stat read once for the readings inside (as psutil's oneshot)."""
        self._in_oneshot = True
        try:
            yield
        finally:
            self._in_oneshot = False
            self._stat = None

    def _read(self, name: str) -> bytes:
        try:
            return read_file(f"{self._base}/{name}")
        except (FileNotFoundError, ProcessLookupError):
            import psutil
            raise psutil.NoSuchProcess(self.pid) from None
        except PermissionError:
            import psutil
            raise psutil.AccessDenied(self.pid) from None

    def _fields(self) -> tuple[bytes, list[bytes]]:
        """(comm, the fields after it: state first)."""
        stat = self._stat
        if stat is None:
            data = self._read("stat")
            close = data.rfind(b")")
            stat = (data[data.find(b"(") + 1:close], data[close + 2:].split())
            if self._in_oneshot:
                self._stat = stat
        return stat

    def name(self) -> str:
        comm = self._fields()[0].decode("utf-8", "replace")
        if len(comm) >= _COMM_MAX:  # cut: the command line's first word, if it begins so
            with contextlib.suppress(Exception):
                first = self._read("cmdline").split(b"\0", 1)[0]
                full = os.path.basename(first.decode("utf-8", "replace"))
                if full.startswith(comm):
                    return full
        return comm

    def status(self) -> str:
        state = self._fields()[1][0]
        return _STATES.get(state, state.decode("ascii", "replace"))

    def ppid(self) -> int:
        return int(self._fields()[1][1])

    def num_threads(self) -> int:
        return int(self._fields()[1][17])

    def memory_info(self) -> Memory:
        return Memory(rss=int(self._read("statm").split()[1]) * _PAGE_SIZE)

    def io_counters(self) -> IoCounters:
        values: dict[bytes, bytes] = {}
        for line in self._read("io").splitlines():
            key, _, value = line.partition(b": ")
            values[key] = value
        try:
            return IoCounters(read_bytes=int(values[b"read_bytes"]),
                              write_bytes=int(values[b"write_bytes"]))
        except (KeyError, ValueError):
            raise OSError(f"{self._base}/io: not of its form") from None
