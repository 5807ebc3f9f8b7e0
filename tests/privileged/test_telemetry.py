"""The telemetry sampler on the real kernel: a real cgroup (v2, plus the v1 memory controller on
hybrid hosts) holding real processes; a zombie made between listing and reading, a process that
exits in that gap, a cgroup removed under open files, a permission error (as nobody),
sockets in another network namespace, and fds counted without a lookup of each. Needs root."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from supervisor.sandbox.cgroups import Cgroup
from supervisor.telemetry import Sample
from supervisor.telemetry.procfs import Descriptors, fd_dir_sized, read_fds
from supervisor.telemetry.sampler import TelemetryHub
from tests.support.daemon import REPO, TEST_CGROUP_ROOT, wait_for

MIB = 1024 * 1024

# Waits on stdin (so the test can move it into the cgroup first), then allocates and touches
# 48 MiB, listens on a TCP socket, forks two sleepers and reports ready.
WORKLOAD = r"""
import os, socket, sys, time
sys.stdin.readline()
held = bytearray(48 * 1024 * 1024)
for i in range(0, len(held), 4096):
    held[i] = 1
server = socket.socket(); server.bind(("127.0.0.1", 0)); server.listen()
for _ in range(2):
    if os.fork() == 0:
        time.sleep(600)
        os._exit(0)
print("ready", flush=True)
time.sleep(600)
"""
SLEEPER = "import sys, time; sys.stdin.readline(); print('ready', flush=True); time.sleep(600)"


MEMORY = ("memory",)  # the v1 hierarchy that holds memory on a hybrid host


class RealCgroup:
    """A cgroup of the test's own in the v2 tree and, on hybrid hosts, in the v1 memory
    controller; processes are moved in before they do anything."""

    def __init__(self) -> None:
        self.relative = f"{TEST_CGROUP_ROOT.strip('/')}/telemetry-{secrets.token_hex(3)}"
        self.cgroup = Cgroup(self.relative).create(MEMORY)
        self.procs: list[subprocess.Popen[str]] = []

    def spawn(self, argv: list[str]) -> subprocess.Popen[str]:
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.procs.append(proc)
        self.cgroup.place(proc.pid, MEMORY)
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "ready"
        return proc

    def remove(self) -> None:
        if self.cgroup.exists():
            self.cgroup.kill()
            self.cgroup.wait_empty(5.0)
        for proc in self.procs:
            proc.kill()
            proc.wait()
            for pipe in (proc.stdin, proc.stdout):
                if pipe is not None:
                    pipe.close()
        self.cgroup.remove()


@pytest.fixture
def real() -> Iterator[RealCgroup]:
    cgroup = RealCgroup()
    try:
        yield cgroup
    finally:
        cgroup.remove()


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    event_loop = asyncio.new_event_loop()
    yield event_loop
    event_loop.close()


def tick(hub: TelemetryHub) -> dict[str, Sample]:
    batch = hub.sample_once()
    hub.deliver(batch)
    return dict(batch)


def skipped(hub: TelemetryHub, run_id: str = "r1") -> int:
    summary = hub.summary(run_id)
    assert summary is not None
    return summary.skipped


def test_a_real_run_is_measured(real: RealCgroup, loop: asyncio.AbstractEventLoop) -> None:
    real.spawn(["/usr/bin/python3", "-c", WORKLOAD])
    hub = TelemetryHub(10.0, 1, 600, loop)
    hub.register("r1", real.cgroup, started_at=0.0)
    try:
        first = tick(hub)["r1"]
        second = tick(hub)["r1"]
    finally:
        hub.stop()
    assert first.processes == 3 and second.processes == 3
    assert first.memory_bytes is not None and first.memory_bytes >= 48 * MIB
    assert first.oom_kills == 0
    assert first.cpu_seconds is not None and first.cpu_seconds > 0
    assert second.cpu_percent is not None and second.cpu_percent >= 0
    assert first.rss_bytes is not None and first.rss_bytes >= 48 * MIB
    assert first.threads is not None and first.threads >= 3
    assert first.open_fds is not None and first.open_fds >= 3
    assert first.children == 2
    assert first.connections == 1  # one listening socket, shared by three processes
    assert first.io_read_bytes is not None and first.io_write_bytes is not None
    assert any(name.startswith("python") for name in first.commands)
    assert skipped(hub) == 0


def test_connections_are_seen_in_the_process_own_network_namespace(
        real: RealCgroup, loop: asyncio.AbstractEventLoop) -> None:
    """psutil's per-process net_connections reads the *daemon's* /proc/net and sees nothing of
    a sandboxed agent; the sampler reads /proc/<pid>/net."""
    proc = real.spawn(["unshare", "--net", "/usr/bin/python3", "-c",
                       "import socket, sys, time; sys.stdin.readline(); s = socket.socket(); "
                       "s.bind(('127.0.0.1', 0)); s.listen(); u = socket.socket(type="
                       "socket.SOCK_DGRAM); u.bind(('127.0.0.1', 0)); print('ready', "
                       "flush=True); time.sleep(600)"])
    assert psutil.Process(proc.pid).net_connections(kind="inet") == []
    assert len(read_fds(proc.pid)[1]) == 2
    hub = TelemetryHub(10.0, 1, 600, loop)
    hub.register("r1", real.cgroup, started_at=0.0)
    assert tick(hub)["r1"].connections == 2


# In a network namespace of its own, holds 64 more fds (pipes), forks two sleepers that share
# them, reports ready; with argv[1] == "socket" it also binds a UDP socket first.
FDS_WORKLOAD = r"""
import os, socket, sys, time
sys.stdin.readline()
held = [os.pipe() for _ in range(32)]
if sys.argv[1:] == ["socket"]:
    udp = socket.socket(type=socket.SOCK_DGRAM); udp.bind(("127.0.0.1", 0))
for _ in range(2):
    if os.fork() == 0:
        time.sleep(600)
        os._exit(0)
print("ready", flush=True)
time.sleep(600)
"""


def _listed(pids: list[int]) -> int:
    return sum(len(os.listdir(f"/proc/{pid}/fd")) for pid in pids)


@pytest.mark.parametrize("socket", [False, True])
def test_fds_are_counted_without_looking_up_each_one(
        socket: bool, real: RealCgroup, loop: asyncio.AbstractEventLoop) -> None:
    """The count is the fd directory's size (Linux 6.2; a tripwire on open_fds sees the
    same number a listing gives), and a process's descriptors are looked up one by one only
    when its network namespace holds an inet socket: here none, or one shared by three."""
    assert fd_dir_sized()  # this kernel (>= 6.2) and CI's
    real.spawn(["unshare", "--net", sys.executable, "-c", FDS_WORKLOAD,
                *(["socket"] if socket else [])])
    reader = Descriptors()
    hub = TelemetryHub(10.0, 1, 600, loop, fd_reader=reader)
    hub.register("r1", real.cgroup, started_at=0.0)
    sample = tick(hub)["r1"]
    pids = [int(pid) for pid in (real.cgroup.path / "cgroup.procs").read_text().split()]
    assert sample.processes == len(pids) == 3
    assert sample.open_fds == _listed(pids) and sample.open_fds >= 3 * 64
    if socket:
        assert sample.connections == 1 and reader.listings == 3
    else:
        assert sample.connections == 0 and reader.listings == 0
    plain = Descriptors(sized=False, by_namespace=False)  # a kernel before 6.2 and 6.11
    assert [plain(pid, {}) for pid in pids] == [reader(pid, {}) for pid in pids]
    assert plain.listings == 3


def _source(target: int, before_reading: Callable[[psutil.Process | None], None]
            ) -> Callable[[int], psutil.Process]:
    """psutil.Process, except that for `target` something happens between the sampler's
    listing of cgroup.procs and its reading of the process."""

    def source(pid: int) -> psutil.Process:
        if pid != target:
            return psutil.Process(pid)
        process = psutil.Process(pid)
        before_reading(process)
        return process

    return source


def test_a_process_turned_zombie_between_listing_and_reading(
        real: RealCgroup, loop: asyncio.AbstractEventLoop) -> None:
    keeper = real.spawn([sys.executable, "-c", SLEEPER])
    victim = real.spawn([sys.executable, "-c", SLEEPER])

    def make_zombie(process: psutil.Process | None) -> None:
        victim.send_signal(signal.SIGKILL)  # not reaped: a zombie until victim.wait()
        wait_for(lambda: process is not None and process.status() == psutil.STATUS_ZOMBIE,
                 timeout=10, what="the zombie")

    hub = TelemetryHub(10.0, 1, 600, loop, process_source=_source(victim.pid, make_zombie))
    hub.register("r1", real.cgroup, started_at=0.0)
    sample = tick(hub)["r1"]
    assert sample.processes == 2  # both listed
    assert sample.threads is not None and sample.threads >= 1  # the keeper was measured
    assert skipped(hub) >= 1
    victim.wait()
    after = tick(hub)["r1"]
    assert after.processes == 1 and psutil.pid_exists(keeper.pid)


@pytest.mark.parametrize("when", ["before_open", "after_open"])
def test_a_process_that_exits_between_listing_and_reading(
        when: str, real: RealCgroup, loop: asyncio.AbstractEventLoop) -> None:
    real.spawn([sys.executable, "-c", SLEEPER])
    victim = real.spawn([sys.executable, "-c", SLEEPER])

    def vanish(_process: psutil.Process | None) -> None:
        victim.kill()
        victim.wait()  # reaped: the pid is gone

    def source(pid: int) -> psutil.Process:
        if pid == victim.pid and when == "before_open":
            vanish(None)
            return psutil.Process(pid)  # raises NoSuchProcess
        return _source(victim.pid, vanish)(pid)

    hub = TelemetryHub(10.0, 1, 600, loop, process_source=source)
    hub.register("r1", real.cgroup, started_at=0.0)
    sample = tick(hub)["r1"]
    assert sample.processes == 2
    assert sample.rss_bytes is not None and sample.rss_bytes > 0
    assert skipped(hub) == 1
    assert tick(hub)["r1"].processes == 1


def _fds_into(directory: Path) -> int:
    count = 0
    for name in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
        except FileNotFoundError:
            continue
        if target.startswith(f"{directory}/"):
            count += 1
    return count


def test_a_cgroup_removed_under_open_files_is_skipped(
        real: RealCgroup, loop: asyncio.AbstractEventLoop) -> None:
    real.spawn([sys.executable, "-c", SLEEPER])
    other = RealCgroup()
    try:
        other.spawn([sys.executable, "-c", SLEEPER])
        hub = TelemetryHub(10.0, 1, 600, loop)
        hub.register("r1", real.cgroup, started_at=0.0)
        hub.register("r2", other.cgroup, started_at=0.0)
        assert set(tick(hub)) == {"r1", "r2"}
        assert _fds_into(real.cgroup.path) >= 2  # cgroup.procs and cpu.stat stay open
        before = skipped(hub)
        real.remove()  # killed and rmdir'd while the sampler holds its files: ENODEV
        assert set(tick(hub)) == {"r2"}
        assert skipped(hub) > before
        assert tick(hub)["r2"].processes == 1
        hub.unregister("r2")
        tick(hub)  # the sampler thread's turn to close what r2 held
        assert _fds_into(other.cgroup.path) == 0
        hub.stop()
        assert _fds_into(real.cgroup.path) == 0
    finally:
        other.remove()


_AS_NOBODY = r"""
import asyncio, json, os, sys
from pathlib import Path
from supervisor.sandbox.cgroups import Cgroup
from supervisor.telemetry.sampler import TelemetryHub

directory = Path(sys.argv[1])
(directory / "cgroup.procs").write_text(f"1\n{os.getpid()}\n")
(directory / "cpu.stat").write_text("usage_usec 1\n")
(directory / "cgroup.stat").write_text("nr_descendants 0\n")
hub = TelemetryHub(10.0, 1, 600, asyncio.new_event_loop())
hub.register("r1", Cgroup(directory.name, root=directory.parent, host_root=directory.parent),
             started_at=0.0)
batch = hub.sample_once()
hub.deliver(batch)
[(run_id, sample)] = batch
print(json.dumps({"uid": os.getuid(), "processes": sample.processes,
                  "open_fds": sample.open_fds, "threads": sample.threads,
                  "skipped": hub.summary("r1").skipped}))
"""


def test_permission_errors_skip_data_not_the_run(tmp_root: Path) -> None:
    """As nobody, pid 1's fds and I/O are refused (EACCES: a real psutil.AccessDenied)."""
    directory = tmp_root / "cgroup"
    directory.mkdir()
    os.chown(directory, 65534, 65534)
    result = subprocess.run([sys.executable, "-c", _AS_NOBODY, str(directory)], cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, user=65534,
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["uid"] == 65534 and report["processes"] == 2
    assert report["open_fds"] is not None and report["open_fds"] >= 3  # its own fds count
    assert report["threads"] is not None and report["threads"] >= 2  # pid 1's are readable
    assert report["skipped"] >= 2  # pid 1: num_fds, io_counters (and its sockets)
