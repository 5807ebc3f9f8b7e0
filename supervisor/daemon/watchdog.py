"""The dead-man's switch: a separate process that holds the read end of a pipe from the daemon.
When the pipe closes without the daemon's "done" line (the daemon was SIGKILLed or crashed), it
SIGKILLs every agent by writing `cgroup.kill` on the agents' parent cgroup, waits for the kernel
to report it empty and records what it did for the next daemon to audit. Needs root.

Standard library only and small, so it is running before any agent starts and does nothing but
wait until then."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import signal
import sys
import time
from pathlib import Path

DONE = b"done\n"


def kill_tree(parent: Path, timeout: float) -> dict[str, object]:
    children = sorted(p.name for p in parent.iterdir() if p.is_dir()) if parent.is_dir() else []
    report: dict[str, object] = {"ts": time.time(), "cgroup": str(parent), "runs": children}
    if not parent.is_dir():
        report["note"] = "no agent cgroups"
        return report
    started = time.monotonic()
    kill_file = parent / "cgroup.kill"
    if kill_file.exists():
        kill_file.write_text("1")
        report["mechanism"] = "cgroup.kill"
    else:  # kernels before 5.14: freeze, SIGKILL each pid, thaw
        (parent / "cgroup.freeze").write_text("1")
        for dirpath, _dirs, files in os.walk(parent):
            if "cgroup.procs" in files:
                for pid in Path(dirpath, "cgroup.procs").read_text().split():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(int(pid), signal.SIGKILL)
        (parent / "cgroup.freeze").write_text("0")
        report["mechanism"] = "freeze+sigkill"
    deadline = started + timeout
    fd = os.open(parent / "cgroup.events", os.O_RDONLY)
    try:
        poller = select.poll()
        poller.register(fd, select.POLLPRI)
        while True:
            os.lseek(fd, 0, os.SEEK_SET)
            if b"populated 0" in os.read(fd, 4096):
                report["confirmed_empty"] = True
                break
            if time.monotonic() >= deadline:
                report["confirmed_empty"] = False
                break
            poller.poll(50)
    finally:
        os.close(fd)
    report["time_to_halt_ms"] = round((time.monotonic() - started) * 1000, 3)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="agent-supervisor-watchdog")
    parser.add_argument("--cgroup", required=True, type=Path, help="agents' parent cgroup (v2)")
    parser.add_argument("--record", required=True, type=Path, help="JSON-lines file to append to")
    parser.add_argument("--timeout", type=float, default=5.0)
    args = parser.parse_args(argv)
    # The daemon's death is the only trigger: stray signals must not take the switch away.
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)
    data = b""
    while chunk := os.read(0, 64):
        data += chunk
    if data.endswith(DONE):
        return 0
    report = kill_tree(args.cgroup, args.timeout)
    report["trigger"] = "the daemon's pipe closed without an orderly shutdown"
    line = json.dumps(report, sort_keys=True)
    print(f"<2>agent-supervisor watchdog: daemon gone, killed agents: {line}", file=sys.stderr,
          flush=True)
    args.record.parent.mkdir(parents=True, exist_ok=True)
    with open(args.record, "a") as handle:
        handle.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
