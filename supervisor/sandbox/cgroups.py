"""A run's cgroup on the v2 tree: kill, freeze, thaw, confirm empty. Needs root.

Works on pure v2 hosts (`/sys/fs/cgroup`) and hybrid hosts, where runc also places each container
in the v2 tree at `/sys/fs/cgroup/unified` (no controllers there, but `cgroup.kill`,
`cgroup.freeze` and `cgroup.events` work)."""

from __future__ import annotations

import contextlib
import enum
import errno
import os
import select
import signal
import time
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
_POLL_SLICE_MS = 50  # re-read even without a notification, in case one was coalesced away


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
    """One cgroup in the v2 tree, addressed by its path relative to the tree's root."""

    def __init__(self, relative: str, root: Path | None = None) -> None:
        self.relative = relative.strip("/")
        self.path = (root or unified_root()) / self.relative

    def __repr__(self) -> str:
        return f"Cgroup({self.path})"

    def exists(self) -> bool:
        return self.path.is_dir()

    def _write(self, name: str, value: str) -> None:
        with open(self.path / name, "w") as handle:
            handle.write(value)

    def events(self) -> dict[str, str]:
        try:
            text = (self.path / "cgroup.events").read_text()
        except FileNotFoundError:
            return {"populated": "0", "frozen": "0"}
        return dict(line.split(" ", 1) for line in text.splitlines() if " " in line)

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
        for candidate in (self.path / "memory.current",
                          CGROUP_ROOT / "memory" / self.relative / "memory.usage_in_bytes"):
            with contextlib.suppress(OSError, ValueError):
                memory = int(candidate.read_text())
                break
        return {"cpu_usec": cpu_usec, "memory_bytes": memory, "processes": len(self.pids())}

    def has_kill_file(self) -> bool:
        return (self.path / "cgroup.kill").exists()

    def kill(self, *, force_fallback: bool = False) -> str:
        """SIGKILL every process in the cgroup; returns the mechanism used.

        `cgroup.kill` (Linux >= 5.14) kills the whole subtree atomically, forks in flight
        included. Without it: freeze so nothing can fork, SIGKILL each pid, thaw so the signals
        are delivered."""
        if self.has_kill_file() and not force_fallback:
            self._write("cgroup.kill", "1")
            return "cgroup.kill"
        self.freeze()
        self.wait_frozen(1.0)
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.thaw()
        return "freeze+sigkill"

    def signal_all(self, signum: int) -> int:
        sent = 0
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)
                sent += 1
        return sent

    def freeze(self) -> None:
        self._write("cgroup.freeze", "1")

    def thaw(self) -> None:
        self._write("cgroup.freeze", "0")

    def wait_frozen(self, timeout: float) -> bool:
        return self._wait_event("frozen", "1", timeout)

    def wait_empty(self, timeout: float) -> bool:
        """Block until the kernel reports `populated 0` (True) or the timeout passes (False).

        Uses poll(2) on cgroup.events, which the kernel signals with POLLPRI on every change,
        so the wait ends as soon as the last process is gone rather than on a polling tick."""
        return self._wait_event("populated", "0", timeout)

    def _wait_event(self, key: str, want: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        try:
            fd = os.open(self.path / "cgroup.events", os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return key == "populated" and want == "0"
        try:
            poller = select.poll()
            poller.register(fd, select.POLLPRI | select.POLLERR)
            while True:
                try:
                    os.lseek(fd, 0, os.SEEK_SET)
                    text = os.read(fd, 4096).decode()
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
            os.close(fd)

    def remove(self) -> None:
        """rmdir this cgroup (children first) in the v2 tree and in every v1 hierarchy."""
        trees = [self.path, *(h / self.relative for h in v1_hierarchies())]
        for tree in trees:
            if not tree.is_dir():
                continue
            for dirpath, _dirs, _files in sorted(os.walk(tree), key=lambda w: -len(w[0])):
                with contextlib.suppress(FileNotFoundError):
                    os.rmdir(dirpath)
