"""How long the kernel's own `cgroup.kill` write takes, with no daemon and no Python threads.

Makes a cgroup of this project (`agent-supervisor-halt-probe` under the v2 root) with AGENTS
children of PROCESSES processes each (a shell and its sleeps), then times, on this single
thread with `time.perf_counter_ns`, the one write(2) of "1" to the parent's `cgroup.kill` and
the wait for `populated 0` after it. Removes everything it made.

The daemon's sweep logs the same write's duration ("the parent's cgroup.kill write(2)"); this
shows what part of it is the kernel's (issue 12: a global halt's "SIGKILL sent in ~120 ms").

    sudo .venv/bin/python bench/cgroup_kill_write.py [--agents 100] [--processes 20] [--rounds 3]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import select
import time
from pathlib import Path


def v2_root() -> Path:
    for candidate in (Path("/sys/fs/cgroup/unified"), Path("/sys/fs/cgroup")):
        if (candidate / "cgroup.controllers").exists():
            return candidate
    raise SystemExit("no cgroup v2 hierarchy")


def fill(root: Path, agents: int, processes: int) -> list[int]:
    children = []
    for index in range(agents):
        cgroup = root / f"r{index}"
        cgroup.mkdir()
        pid = os.fork()
        if pid == 0:
            (cgroup / "cgroup.procs").write_text(str(os.getpid()))
            os.execvp("sh", ["sh", "-c",
                             f"for i in $(seq {processes - 1}); do sleep 1000 & done; wait"])
        children.append(pid)
    deadline = time.monotonic() + 30
    while count(root, agents) < agents * processes:
        if time.monotonic() > deadline:
            raise SystemExit("the workload did not start in 30 s")
        time.sleep(0.1)
    return children


def count(root: Path, agents: int) -> int:
    return sum(len((root / f"r{i}" / "cgroup.procs").read_text().split())
               for i in range(agents))


def one_round(root: Path) -> tuple[float, float]:
    events = os.open(root / "cgroup.events", os.O_RDONLY | os.O_CLOEXEC)
    kill = os.open(root / "cgroup.kill", os.O_WRONLY | os.O_CLOEXEC)
    try:
        t0 = time.perf_counter_ns()
        os.write(kill, b"1")
        t1 = time.perf_counter_ns()
        poller = select.poll()
        poller.register(events, select.POLLPRI | select.POLLERR)
        while b"populated 0" not in os.pread(events, 4096, 0):
            poller.poll(100)
        t2 = time.perf_counter_ns()
    finally:
        os.close(kill)
        os.close(events)
    return (t1 - t0) / 1e6, (t2 - t1) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, default=100)
    parser.add_argument("--processes", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    root = v2_root() / "agent-supervisor-halt-probe"
    root.mkdir()
    try:
        for _ in range(args.rounds):
            children = fill(root, args.agents, args.processes)
            write_ms, empty_ms = one_round(root)
            for pid in children:
                os.waitpid(pid, 0)
            print(f"{args.agents} x {args.processes}: write(2) {write_ms:.1f} ms, populated 0 "
                  f"{empty_ms:.1f} ms after it, total {write_ms + empty_ms:.1f} ms")
            for index in range(args.agents):
                (root / f"r{index}").rmdir()
    finally:
        if any(root.glob("r*")):  # interrupted mid-round: kill and reap what is left
            (root / "cgroup.kill").write_text("1")
            with contextlib.suppress(ChildProcessError):
                while os.waitpid(-1, 0)[0] > 0:
                    pass
            for child in root.glob("r*"):
                child.rmdir()
        root.rmdir()


if __name__ == "__main__":
    main()
