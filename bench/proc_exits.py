"""What the process exit socket of a restart costs and holds (supervisor/sandbox/proc_exits.py,
issue 13: an adopted run's exit status).

Two figures, each from a storm of processes that exit at once (a shell running /bin/true in a
loop), the host's worst case for the socket; every other exit on the host counts too:

- capacity: the socket opened and subscribed, then nobody reads it (as between a handover and
  the next daemon's adoption); after a storm of CAPACITY_STORM, how many exits it held before
  the kernel dropped the rest (ENOBUFS). Twice: filtered to one pid that does not exit (as a
  handover opens it, for its runs' inits: it should hold none of the storm), and unfiltered
  (every whole-process exit: past FILTERED_PIDS runs), which bounds how many host-wide exits a
  handover of that many runs survives without losing an adopted run's status.
- reader cost: a storm of STORM with the daemon's reader thread running (watching one pid that does
  not exit: the filter keeps the storm out), against the same storm with no socket at all,
  alternating per round: the storm's rate both ways and the reader thread's CPU time
  (utime+stime of its task) per 1,000 exits.

    sudo .venv/bin/python bench/proc_exits.py [--capacity-storm 30000] [--storm 5000]
        [--rounds 3]
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from supervisor.sandbox.proc_exits import ExitEvents, open_socket

TICKS = os.sysconf("SC_CLK_TCK")


def storm(count: int) -> float:
    """`count` processes that exit at once, one after another (a shell running /bin/true:
    fork and exec, far faster than forking this interpreter); seconds taken."""
    started = time.perf_counter()
    subprocess.run(["/bin/sh", "-c", f"i=0; while [ $i -lt {count} ]; do /bin/true; "
                    "i=$((i+1)); done"], check=True)
    return time.perf_counter() - started


def capacity(count: int, pids: list[int] | None) -> dict[str, Any]:
    sock = open_socket(pids)
    try:
        storm(count)
        held, dropped = 0, False
        while True:
            try:
                sock.recv(4096)
                held += 1
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno != errno.ENOBUFS:
                    raise
                dropped = True
        return {"storm": count, "held": held, "enobufs": dropped,
                "filtered": pids is not None}
    finally:
        sock.close()


def thread_cpu_seconds(native_id: int) -> float:
    with open(f"/proc/self/task/{native_id}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime


def reader_round(count: int) -> dict[str, float]:
    events = ExitEvents(open_socket())
    events.watch(1)  # never exits here: every event is read and dropped
    events.start()
    try:
        thread = next(t for t in threading.enumerate() if t.name == "proc-exits")
        assert thread.native_id is not None
        cpu0 = thread_cpu_seconds(thread.native_id)
        seconds = storm(count)
        time.sleep(0.5)  # let it read the tail
        cpu = thread_cpu_seconds(thread.native_id) - cpu0
        return {"rate": count / seconds, "reader_cpu_ms_per_1000": cpu * 1e6 / count,
                "lost": 1.0 if events.lost else 0.0}
    finally:
        events.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--capacity-storm", type=int, default=30000)
    parser.add_argument("--storm", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", help="write the raw figures here")
    args = parser.parse_args()
    load = os.getloadavg()
    caps = [capacity(args.capacity_storm, None)]
    filtered = capacity(args.capacity_storm, [1])
    with_reader: list[dict[str, float]] = []
    without: list[float] = []
    for index in range(args.rounds):
        order = (True, False) if index % 2 == 0 else (False, True)
        for reading in order:
            if reading:
                with_reader.append(reader_round(args.storm))
            else:
                without.append(args.storm / storm(args.storm))
    result = {
        "load_before": load, "load_after": os.getloadavg(), "storm": args.storm,
        "rounds": args.rounds, "capacity": caps, "capacity_filtered": filtered,
        "rate_no_socket": without, "rate_with_reader": [r["rate"] for r in with_reader],
        "reader_cpu_ms_per_1000": [r["reader_cpu_ms_per_1000"] for r in with_reader],
        "reader_lost": [r["lost"] for r in with_reader],
    }
    held = [c["held"] for c in caps]
    print(f"load before {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print(f"capacity (nobody reads, storm {args.capacity_storm}): held median "
          f"{statistics.median(held):.0f} (min {min(held)}, max {max(held)}), ENOBUFS in "
          f"{sum(c['enobufs'] for c in caps)}/{len(caps)} rounds")
    print(f"capacity filtered to one pid that does not exit (storm {args.capacity_storm}): "
          f"held {filtered['held']}, ENOBUFS {filtered['enobufs']}")
    print(f"storm rate, no socket:     median {statistics.median(without):8.0f} exits/s")
    print(f"storm rate, reader thread: median "
          f"{statistics.median(result['rate_with_reader']):8.0f} exits/s")
    print(f"reader CPU per 1000 exits: median "
          f"{statistics.median(result['reader_cpu_ms_per_1000']):.1f} ms; events lost in "
          f"{int(sum(result['reader_lost']))}/{len(with_reader)} rounds")
    after = result["load_after"]
    print(f"load after {after[0]:.2f} {after[1]:.2f} {after[2]:.2f}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=1)


if __name__ == "__main__":
    main()
