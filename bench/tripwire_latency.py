"""Tripwire latency: from the moment a workload crosses a threshold (it timestamps that moment
itself, inside the sandbox; same clock as the host) to the confirmed halt (the kill's audit row,
written after the kernel reported the cgroup empty and the network namespace was removed).

Rule kinds: memory_bytes, processes, cpu_seconds (resource rules, sampled at the daemon's
telemetry rate, 10 Hz by default) and syscall_attempts (seccomp user notification, evaluated at
the attempt). For comparison, the same run reports the daemon's own time_to_halt_ms.

    sudo .venv/bin/python bench/tripwire_latency.py [--runs 20] [--kinds memory,processes,...]

Targets (issue 4): resource rules <= 150 ms median at 10 Hz; syscall rule <= 20 ms median.
A benchmark, not a test: it prints a table and exits 0 whether or not the targets are met."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stats import nearest_rank

from tests.support.daemon import Daemon, new_daemon, wait_for

# Each workload prints "crossed <unix time>" at the moment it passes its own threshold.
WORKLOADS: dict[str, tuple[str, str, str]] = {
    # kind: (tripwire spec, python source, threshold argument)
    "memory": ("mem:memory_bytes>200M:kill", r"""
import sys, time
limit = int(sys.argv[1]); chunks = []; total = 0; said = False
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
while True:
    if total < 2 * limit:
        chunks.append(b"\x01" * (4 << 20)); total += 4 << 20
    if not said and rss() > limit:
        print("crossed", time.time(), flush=True); said = True
    time.sleep(0.002)
""", str(200 * 1024**2)),
    "processes": ("fork:processes>100:kill", r"""
import os, sys, time
limit = int(sys.argv[1]); n = 1; said = False
while True:
    if n <= 2 * limit and os.fork() == 0:
        while True:
            time.sleep(3600)
    n += 1
    if not said and n > limit:
        print("crossed", time.time(), flush=True); said = True
    time.sleep(0.002)
""", "100"),
    "cpu": ("cpu:cpu_seconds>0.5:kill", r"""
import sys, time
limit = float(sys.argv[1]); said = False; x = 0
while True:
    for _ in range(20000):
        x += 1
    if not said and time.process_time() > limit:
        print("crossed", time.time(), flush=True); said = True
""", "0.5"),
    "syscall": ("escape:syscall_attempts>0:kill", r"""
import ctypes, time
libc = ctypes.CDLL(None, use_errno=True)
time.sleep(0.3)
print("crossed", time.time(), flush=True)
libc.unshare(0x10000000)
while True:
    time.sleep(3600)
""", "0"),
}
TARGET_MS = {"memory": 150.0, "processes": 150.0, "cpu": 150.0, "syscall": 20.0}


def one_run(daemon: Daemon, kind: str, index: int) -> dict[str, Any]:
    spec, source, arg = WORKLOADS[kind]
    name = f"{kind}-{index}"
    daemon.agentctl("run", "--detach", "--name", name, "--tripwire", spec, "--",
                    "/usr/bin/python3", "-c", source, arg, check=True)
    wait_for(lambda: daemon.client.agent(name)["state"] == "killed", timeout=60,
             what=f"{name} to be killed")
    wait_for(lambda: daemon.client.agent(name)["run"].get("ended_at") is not None, timeout=30,
             what=f"{name}'s run to end")
    logs = daemon.agentctl("logs", name).stdout
    crossed = [float(line.split()[1]) for line in logs.splitlines()
               if line.startswith("crossed ")]
    rows = [r for r in daemon.client.audit(limit=10_000)["entries"] if r["target"] == name]
    kill = next(r for r in rows if r["verb"] == "kill")
    fired = next(r for r in rows if r["verb"] == "tripwire")
    if not crossed:
        raise RuntimeError(f"{name}: the workload never reported crossing: {logs!r}")
    return {"kind": kind, "crossed": crossed[0], "fired": fired["ts"], "halted": kill["ts"],
            "latency_ms": (kill["ts"] - crossed[0]) * 1000,
            "detect_ms": (fired["ts"] - crossed[0]) * 1000,
            "time_to_halt_ms": kill["time_to_halt_ms"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--kinds", default=",".join(WORKLOADS))
    parser.add_argument("--json", type=Path, default=None, help="write every sample here")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("tripwire_latency: run as root", file=sys.stderr)
        return 2
    kinds = [k for k in args.kinds.split(",") if k]
    tmp = Path(tempfile.mkdtemp(prefix="as-bench-", dir="/tmp"))
    tmp.chmod(0o755)
    daemon = new_daemon(tmp, daemon={"log_level": "info"})
    samples: list[dict[str, Any]] = []
    try:
        daemon.start()
        rate = 10.0
        for index in range(args.runs):
            for kind in kinds:  # interleaved, so machine noise spreads over every kind
                samples.append(one_run(daemon, kind, index))
                daemon.agentctl("reactivate", f"{kind}-{index}", check=True)
    finally:
        daemon.stop()
        daemon.cleanup_host()
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"machine: nproc={os.cpu_count()}, kernel={os.uname().release}, "
          f"telemetry rate {rate:g} Hz, {args.runs} runs per kind")
    print()
    header = (f"{'rule kind':<10} {'n':>3} {'median ms':>10} {'p95 ms':>8} {'min':>7} "
              f"{'max':>7} {'detect med':>11} {'tth med':>8} {'target':>7}  verdict")
    print(header)
    print("-" * len(header))
    for kind in kinds:
        lat = [s["latency_ms"] for s in samples if s["kind"] == kind]
        det = [s["detect_ms"] for s in samples if s["kind"] == kind]
        tth = [s["time_to_halt_ms"] for s in samples if s["kind"] == kind]
        median = statistics.median(lat)
        verdict = "met" if median <= TARGET_MS[kind] else "MISSED"
        print(f"{kind:<10} {len(lat):>3} {median:>10.1f} {nearest_rank(lat, 0.95):>8.1f} "
              f"{min(lat):>7.1f} {max(lat):>7.1f} {statistics.median(det):>11.1f} "
              f"{statistics.median(tth):>8.1f} {TARGET_MS[kind]:>7.0f}  {verdict}")
    print()
    print("latency = workload's own crossing timestamp -> kill audit row (halt confirmed);")
    print("detect = crossing -> tripwire audit row; tth = the daemon's time_to_halt_ms.")
    if args.json:
        args.json.write_text(json.dumps(samples, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
