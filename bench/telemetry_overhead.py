"""Benchmark: the daemon's own CPU while telemetry samples idle agents.

For each sampling rate it starts a fresh daemon (tests/support/daemon.py: own state directory,
cgroup parent and name prefix; metrics off; log level info), launches N idle agents
(`sleep 600`), lets them settle, then measures the daemon process's CPU time (psutil
`cpu_times()` user + system: every thread of the daemon, the sampler's included; its children,
runc and the watchdog, excluded) over D seconds. The daemons run one after the other, since the
rate is per daemon configuration. The telemetry section has no off switch, so the baseline is
a rate of 0.01 Hz (one tick per 100 s: at most one inside the window): the daemon's CPU with
the same agents and next to no sampling.

It prints, per rate: the daemon's CPU seconds and percent of one core, the share attributed to
sampling (minus the baseline), and the sampling rate each agent actually got (samples over
wall time, from the runs' telemetry summaries) with the ticks missed (overruns). The target:
the daemon under 5% of one core with 50 idle agents at 10 Hz. A miss prints MISSED but exits
0: this is a benchmark, not a test.

Needs root and runc. Every agent, container, cgroup and temporary directory it made is
removed, also on Ctrl-C.

    sudo .venv/bin/python bench/telemetry_overhead.py [--agents 50] [--duration 30]
                                                      [--rates 10,1,0.01] [--settle 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # tests.support is not installed; run from anywhere

from tests.support.daemon import Daemon, new_daemon  # noqa: E402

TARGET_RATE = 10.0
TARGET_PERCENT = 5.0
BASELINE_RATE = 0.01


@dataclass
class Result:
    rate_hz: float
    agents: int
    duration: float
    cpu_seconds: float
    per_agent_hz: float
    overruns: int
    skipped: int

    @property
    def percent(self) -> float:
        return self.cpu_seconds / self.duration * 100.0


def measure(root: Path, rate: float, agents: int, duration: float, settle: float) -> Result:
    daemon: Daemon = new_daemon(root, telemetry={"rate_hz": rate},
                                daemon={"log_level": "info"})
    daemon.start(timeout=120)
    try:
        assert daemon.proc is not None
        client = daemon.client
        run_ids = []
        for index in range(agents):
            view = client.run({"name": f"idle-{index:03d}", "command": ["sleep", "600"]})
            run_ids.append(view["id"])
        time.sleep(settle)
        process = psutil.Process(daemon.proc.pid)
        before = process.cpu_times()
        started = time.monotonic()
        time.sleep(duration)
        after = process.cpu_times()
        elapsed = time.monotonic() - started
        cpu = (after.user - before.user) + (after.system - before.system)
        rates, overruns, skipped = [], 0, 0
        for run_id in run_ids:
            summary = client.telemetry(run_id, limit=0)["summary"]
            if summary and summary["wall_seconds"] > 0:
                rates.append(summary["samples"] / summary["wall_seconds"])
                overruns = max(overruns, summary["overruns"])
                skipped += summary["skipped"]
        return Result(rate_hz=rate, agents=agents, duration=elapsed, cpu_seconds=cpu,
                      per_agent_hz=statistics.median(rates) if rates else 0.0,
                      overruns=overruns, skipped=skipped)
    finally:
        daemon.stop()
        residue = daemon.residue()
        daemon.cleanup_host()
        if residue:
            print(f"warning: the daemon left {residue}", file=sys.stderr)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--agents", type=int, default=50)
    parser.add_argument("--duration", type=float, default=30.0, help="seconds measured per rate")
    parser.add_argument("--rates", default=f"{TARGET_RATE:g},1,{BASELINE_RATE:g}",
                        help="comma-separated sampling rates in Hz (the lowest is the baseline)")
    parser.add_argument("--settle", type=float, default=3.0,
                        help="seconds between the last launch and the measurement")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0 or shutil.which("runc") is None:
        print("needs root and runc", file=sys.stderr)
        return 2
    rates = [float(r) for r in args.rates.split(",")]
    root = Path(tempfile.mkdtemp(prefix="as-bench-telemetry-", dir="/tmp"))
    root.chmod(0o755)
    results: list[Result] = []
    try:
        for rate in rates:
            print(f"rate {rate:g} Hz: {args.agents} agents, {args.duration:g} s ...",
                  file=sys.stderr, flush=True)
            results.append(measure(root, rate, args.agents, args.duration, args.settle))
    except KeyboardInterrupt:
        print("interrupted; cleaned up", file=sys.stderr)
        return 130
    finally:
        shutil.rmtree(root, ignore_errors=True)

    baseline = min(results, key=lambda r: r.rate_hz)
    print(f"telemetry overhead: daemon CPU (user+system, children excluded), "
          f"{args.agents} idle agents, {args.duration:g} s per rate")
    print(f"host: {platform.node()} {platform.release()}, {psutil.cpu_count()} CPUs, "
          f"python {platform.python_version()}")
    header = ["rate_hz", "agents", "cpu_s", "%_one_core", "sampling_%", "per_agent_hz",
              "overruns", "skipped"]
    rows = [[f"{r.rate_hz:g}", str(r.agents), f"{r.cpu_seconds:.3f}", f"{r.percent:.2f}",
             "baseline" if r is baseline else f"{r.percent - baseline.percent:.2f}",
             f"{r.per_agent_hz:.2f}", str(r.overruns), str(r.skipped)] for r in results]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(cell.rjust(width) for cell, width in zip(row, widths, strict=True)))
    target = next((r for r in results if r.rate_hz == TARGET_RATE), None)
    if target is not None:
        verdict = "MET" if target.percent < TARGET_PERCENT else "MISSED"
        print(f"target: daemon < {TARGET_PERCENT:g}% of one core at {TARGET_RATE:g} Hz with "
              f"{target.agents} agents: {target.percent:.2f}% -> {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
