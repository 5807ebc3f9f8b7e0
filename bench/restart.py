"""Benchmark: what a restart costs with agents handed over (issue 13) against a restart that
kills them (the old behaviour, still `systemctl stop` + start), in the same run.

Per round, with N running agents (`sleep`, default profile, runc) and the two kinds of restart
in alternating order:

- handover: SIGUSR2 to the daemon -> it has exited (its agents handed to the watchdog), then
  a new daemon started -> its control socket answers (the runs adopted before that);
- kill: SIGTERM -> it has exited (every agent killed through the kill path, cleanups done),
  then a new daemon started -> its control socket answers.

Each phase is the wall clock seen from outside (Python start-up of the daemon included, the
same on both sides). After a handover it checks every agent's processes are the same ones;
after a kill-restart it launches the agents again (not timed). Prints median, p95 (nearest
rank), min and max per phase. No target: the figure to watch is how long agents go without a
daemon (the handover's two phases together) and that it is not longer than a kill-restart.

Needs root and runc. Starts its own daemon (tests/support/daemon.py: own state directory,
cgroup parent and name prefix) and removes everything it made.

    sudo .venv/bin/python bench/restart.py [--agents 10] [--rounds 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from supervisor.sandbox.cgroups import Cgroup
from tests.support.daemon import Daemon, new_daemon, wait_for

BENCH_CGROUP_ROOT = "/agent-supervisor-bench"


def _launch(daemon: Daemon, count: int) -> None:
    for i in range(count):
        daemon.agentctl("run", "--detach", "--name", f"b{i}", "--", "sleep", "3600", check=True)
    wait_for(lambda: len(daemon.agent_pids()) >= count, timeout=60, what="the agents")


def _restart(daemon: Daemon, sig: int) -> tuple[float, float]:
    t0 = time.perf_counter()
    code = daemon.stop(sig)
    t1 = time.perf_counter()
    if code != 0:
        raise RuntimeError(f"daemon exited {code}:\n{daemon.logs()[-3000:]}")
    daemon.start(timeout=60)
    t2 = time.perf_counter()
    return (t1 - t0) * 1000, (t2 - t1) * 1000


def _summary(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    p95 = ordered[max(0, -(-len(ordered) * 95 // 100) - 1)]
    return {"median": round(statistics.median(ordered), 1), "p95": round(p95, 1),
            "min": round(ordered[0], 1), "max": round(ordered[-1], 1)}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--agents", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="as-bench-restart-"))
    root.chmod(0o755)
    daemon = new_daemon(root)
    # Not under tests' /agent-supervisor-test: a test session that ends elsewhere removes the
    # empty cgroups there, this daemon's parent between two runs among them.
    daemon.cgroup_parent = f"{BENCH_CGROUP_ROOT}/{daemon.prefix}"
    samples: dict[str, list[float]] = {k: [] for k in (
        "handover_exit_ms", "handover_start_ms", "kill_exit_ms", "kill_start_ms")}
    try:
        daemon.start()
        _launch(daemon, args.agents)
        for round_no in range(args.rounds):
            order = ("handover", "kill") if round_no % 2 == 0 else ("kill", "handover")
            for kind in order:
                if kind == "handover":
                    before = sorted(daemon.agent_pids())
                    exit_ms, start_ms = _restart(daemon, signal.SIGUSR2)
                    if sorted(daemon.agent_pids()) != before:
                        raise RuntimeError("the agents did not survive the handover")
                else:
                    exit_ms, start_ms = _restart(daemon, signal.SIGTERM)
                    if daemon.agent_pids():
                        raise RuntimeError("agents survived a kill-restart")
                    _launch(daemon, args.agents)
                samples[f"{kind}_exit_ms"].append(exit_ms)
                samples[f"{kind}_start_ms"].append(start_ms)
                print(f"round {round_no} {kind}: exit {exit_ms:.0f} ms, start {start_ms:.0f} ms",
                      flush=True)
    finally:
        daemon.stop()
        daemon.clean()
        daemon.cleanup_host()
        Cgroup(BENCH_CGROUP_ROOT).remove(strict=False)
        shutil.rmtree(root, ignore_errors=True)
    result = {"agents": args.agents, "rounds": args.rounds, "load": os.getloadavg(),
              **{k: _summary(v) for k, v in samples.items()}}
    print(json.dumps(result, indent=2))
    if args.json is not None:
        args.json.write_text(json.dumps({"result": result, "samples": samples}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
