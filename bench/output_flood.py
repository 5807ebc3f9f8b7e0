"""Output flood: does an agent writing stdout as fast as it can (past its output cap, so the
supervisor drains and discards) slow the kill of another agent, and what does the drain cost?

Each iteration runs, in an order that alternates, one quiet agent (`sleep`) beside an idle
neighbour and one quiet agent beside a neighbour flooding stdout and stderr from four
processes (`[output] max_bytes = 1M`, action alert: it keeps flooding), kills the quiet agent
and records its `time_to_halt_ms`. Over the flooded phases it also measures the drain's rate
(the neighbour's `output_bytes` per second) and the daemon's CPU (utime+stime of its process,
all threads) per second of flood. The log file of the flooder is checked to stay under the
cap plus the marker lines.

    sudo .venv/bin/python bench/output_flood.py [--iterations 15] [--runtime docker]
                                                [--json samples.json]

A benchmark, not a test: it prints a table and exits 0."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stats import cpu_model, nearest_rank

from tests.support.daemon import Daemon, new_daemon, runtime_config, wait_for

CAP = 1024 * 1024
FLOOD = ("for i in 1 2 3; do yes flood-$i >&2 & done; "
         "/usr/bin/python3 -c 'import os\nwhile True: os.write(1, b\"x\" * 65536)'")


def daemon_cpu_seconds(daemon: Daemon) -> float:
    assert daemon.proc is not None
    fields = Path(f"/proc/{daemon.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def produced(daemon: Daemon, run_id: str) -> int:
    sample = daemon.client.telemetry(run_id, limit=1)["samples"]
    return int(sample[-1]["output_bytes"] or 0) if sample else 0


def one(daemon: Daemon, flooded: bool, index: int) -> dict[str, Any]:
    tag = f"{'f' if flooded else 'q'}{index}"
    neighbour = f"nb-{tag}"
    command = FLOOD if flooded else "exec sleep 600"
    daemon.agentctl("run", "--detach", "--name", neighbour, "--profile", "flood", "--",
                    "/bin/sh", "-c", command, check=True)
    run_id = str(daemon.client.agent(neighbour)["run"]["id"])
    result: dict[str, Any] = {"flooded": flooded}
    if flooded:
        wait_for(lambda: produced(daemon, run_id) > 4 * CAP, timeout=60, what="the flood")
        cpu0, bytes0, t0 = daemon_cpu_seconds(daemon), produced(daemon, run_id), time.time()
    victim = f"v-{tag}"
    daemon.agentctl("run", "--detach", "--name", victim, "--", "/bin/sleep", "600", check=True)
    time.sleep(1.0)
    killed = daemon.agentctl_json("kill", victim, "--reason", "bench")
    result["time_to_halt_ms"] = killed["results"][0]["time_to_halt_ms"]
    if flooded:
        elapsed = time.time() - t0
        result["drain_mib_s"] = (produced(daemon, run_id) - bytes0) / elapsed / 1024**2
        result["daemon_cpu_per_s"] = (daemon_cpu_seconds(daemon) - cpu0) / elapsed
    daemon.agentctl("kill", neighbour, "--reason", "bench", check=True)
    log = daemon.root / "state" / "logs" / f"{run_id}.log"
    result["log_bytes"] = log.stat().st_size
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=15)
    parser.add_argument("--runtime", choices=("runc", "docker"), default="runc")
    parser.add_argument("--json", type=Path, default=None, help="write every sample here")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("output_flood: run as root", file=sys.stderr)
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="as-bench-", dir="/tmp"))
    tmp.chmod(0o755)
    daemon = new_daemon(tmp, daemon={"log_level": "info"}, **runtime_config(args.runtime))
    (daemon.root / "profiles" / "flood.toml").write_text(
        f'[output]\nmax_bytes = {CAP}\naction = "alert"\n')
    samples: list[dict[str, Any]] = []
    try:
        daemon.start()
        for index in range(args.iterations):
            order = (False, True) if index % 2 == 0 else (True, False)
            for flooded in order:  # interleaved: machine noise falls on both alike
                samples.append(one(daemon, flooded, index))
    finally:
        daemon.stop()
        daemon.cleanup_host()
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"machine: {cpu_model()}, nproc={os.cpu_count()}, kernel={os.uname().release}, "
          f"runtime {args.runtime}, {args.iterations} iterations")
    print()
    header = f"{'neighbour':<22} {'n':>3} {'tth median ms':>14} {'p95':>8} {'min':>7} {'max':>7}"
    print(header)
    print("-" * len(header))
    for flooded, label in ((False, "idle"), (True, "flooding past its cap")):
        tth = [s["time_to_halt_ms"] for s in samples if s["flooded"] is flooded]
        print(f"{label:<22} {len(tth):>3} {statistics.median(tth):>14.2f} "
              f"{nearest_rank(tth, 0.95):>8.2f} {min(tth):>7.2f} {max(tth):>7.2f}")
    floods = [s for s in samples if s["flooded"]]
    print()
    print(f"drain rate (discarding): median "
          f"{statistics.median(s['drain_mib_s'] for s in floods):.0f} MiB/s; daemon CPU "
          f"during the flood: median {statistics.median(s['daemon_cpu_per_s'] for s in floods):.2f}"
          f" s/s; largest flooder log: {max(s['log_bytes'] for s in floods)} bytes "
          f"(cap {CAP})")
    if args.json:
        args.json.write_text(json.dumps(samples, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
