"""Benchmark: a fleet-wide halt through etcd against the way it is done today, host by host.

A fleet of N daemons (default 10), each in its own network namespace on a bridge, with a real
etcd (TLS, client certificates, users and roles; tests/fleet/support.py), each running A agents
(default 10) of P processes (default 10). Each round halts every agent three ways, in an order
that rotates from round to round so machine noise falls on all alike:

- fleet: `agentctl fleet kill --all` (its `issue()`: one etcd transaction, then the watch for
  every host's acknowledgement), timed from the call to every host confirmed; the CLI's own
  Python start-up is reported separately (the `agentctl` process wall time, measured once);
- sequential: each host's control socket, `POST /v1/actions/kill {"all": true}`, one host
  after the other (the ad-hoc way without fleet mode);
- parallel: the same calls, one thread per host, all at once;
- floor: no daemon at all: with the ten daemons stopped (SIGSTOP, resumed after), this
  process writes `cgroup.kill` of every host's cgroup parent (ten writes) and waits until the
  kernel reports every one empty. What the machine itself needs to kill the 1,000 processes;
  no way of asking for a halt can beat it.

For the fleet method the hosts' own timestamps (each ack's `timings`) split the time into
stages: the call to the action committed (read of the registrations, the watch opened, the
transaction), committed -> each host saw it (etcd's watch), seen -> the local verb done (the
kill path: kernel confirmed, networks down), done -> the ack handed to the writer, and sent ->
the ack arrived at the CLI (put, etcd, watch). Each stage is reported for the host that
answered last (the one the operator waits for) and as the median over all hosts. And for each
method, the CPU time used while it was timed (/proc, 10 ms ticks): the ten daemons together,
etcd, and this process (the caller). The kernel's own work of ending the processes is charged
to the dying processes and shows only in the floor's wall time.

After each halt the hold is lifted (fleet lift, or reactivate --all per host) and the agents
are launched again. Prints median and p95 (nearest rank) per method and the verdict on the
target: fleet p95 <= 250 ms and below the parallel per-host p95. A missed target prints MISSED
and still exits 0: this is a benchmark, not a test.

Needs root, runc and etcd-server. Everything it makes (netns, veths, bridge, cgroups, state
directories, etcd data on /dev/shm) is removed at the end, also on Ctrl-C.

    sudo .venv/bin/python bench/fleet_halt.py [--hosts 10] [--agents 10] [--processes 10]
                                              [--rounds 5] [--json samples.json]
                                              [--logs DIR] [--methods fleet,floor]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.stats import cpu_model, nearest_rank
from supervisor.cli.fleet import FleetContext, issue, lift_holds
from supervisor.fleet.model import FleetAction, Selector, new_action_id
from supervisor.sandbox.cgroups import Cgroup
from tests.fleet.support import PREFIX, Fleet, Host, fleet_of


def _workload(processes: int) -> list[str]:
    children = " ".join(["sleep 3600 &"] * (processes - 1))
    return ["sh", "-c", f"{children} exec sleep 3600"]


def _launch_all(fleet: Fleet, agents: int, processes: int) -> None:
    """A new run for each host's `agents` agents (the same ones every round: a host has
    `agents` agents, not more each round), then a wait until the daemons are idle again, so
    what each halt meets is the agents running, not the tail of their launch (registration
    puts, first telemetry samples, checkpoints) or of the previous halt's cleanup."""
    def per_host(host: Host) -> None:
        client = host.daemon.client
        for i in range(agents):
            client.run({"name": f"b-{i}", "class": "bench", "command": _workload(processes)})

    with ThreadPoolExecutor(len(fleet.hosts)) as pool:
        list(pool.map(per_host, fleet.hosts))
    _quiesce(fleet)


QUIET_CPU_MS = 20.0  # daemons and etcd together, per 250 ms: under 4% of two cores


def _quiesce(fleet: Fleet, limit: float = 5.0) -> None:
    deadline = time.monotonic() + limit
    before = _cpu(fleet)
    while time.monotonic() < deadline:
        time.sleep(0.25)
        after = _cpu(fleet)
        if (after[0] - before[0]) + (after[1] - before[1]) < QUIET_CPU_MS:
            return
        before = after


# Where a halt's time goes: per round, the slowest local time_to_halt of any host, per method.
# The same local kill path runs under all; what the fleet path adds is the store (write,
# watch, ack).
METHODS = ("fleet", "sequential", "parallel", "floor")
HALTS: dict[str, list[float]] = {m: [] for m in METHODS}
# The fleet halt's stages, per round: for the host that answered last, and every host's.
STAGES = ("call -> committed", "committed -> seen", "seen -> done", "done -> sent",
          "sent -> arrived")
CRITICAL: dict[str, list[float]] = {s: [] for s in STAGES}
ALL_HOSTS: dict[str, list[float]] = {s: [] for s in STAGES}


def _socket_kill(host: Host) -> float:
    """One host's control socket; the slowest local time_to_halt of its agents."""
    result = host.daemon.client.action("kill", {"all": True}, "bench: per-host")
    # Every agent that had a run reports its time_to_halt (idle ones have nothing to halt).
    halts = [r["time_to_halt_ms"] for r in result["results"] if r.get("run_id")]
    assert all(h is not None for h in halts), result
    return max((float(h) for h in halts if h is not None), default=0.0)


def _light(host: Host) -> None:
    """The daemons as light as the measurement allows on a shared machine: no start-up
    canary, info logs, telemetry at 1 Hz, and the fleet timers at their defaults (the tests'
    short lease and re-read make etcd chatter that the halt would compete with)."""
    extra = host.daemon.extra_config
    extra["daemon"] = {"log_level": "info", "self_test": False}
    extra["telemetry"] = {"rate_hz": 1.0, "process_every": 10}
    fleet = extra["fleet"]
    assert isinstance(fleet, dict)
    for key in ("lease_ttl", "reread_interval", "anchor_interval"):
        fleet.pop(key, None)


def _socket_reactivate(fleet: Fleet) -> None:
    with ThreadPoolExecutor(len(fleet.hosts)) as pool:
        list(pool.map(lambda h: h.daemon.client.action("reactivate", {"all": True},
                                                       "bench: lift"), fleet.hosts))


def _fleet_kill(ctx: FleetContext) -> float:
    action = FleetAction(id=new_action_id(), verb="kill", selector=Selector(all=True),
                         reason="bench: fleet", operator=ctx.creds.user, issued_at=time.time())
    started = time.perf_counter()
    result = issue(ctx, [action], deadline=30.0, holds=True)
    elapsed = (time.perf_counter() - started) * 1000
    if result["unconfirmed"]:
        raise RuntimeError(f"unconfirmed: {result['unconfirmed']}")
    HALTS["fleet"].append(max((r["slowest_time_to_halt_ms"] or 0.0) for r in result["hosts"]))
    _stages(result)
    return elapsed


def _stages(result: dict[str, Any]) -> None:
    committed = result["committed_at"]
    last = max(result["hosts"], key=lambda r: r["timings"]["arrived"])
    for row in result["hosts"]:
        t = row["timings"]
        spans = {"call -> committed": committed - result["started_at"],
                 "committed -> seen": t["seen"] - committed,
                 "seen -> done": t["done"] - t["seen"], "done -> sent": t["sent"] - t["done"],
                 "sent -> arrived": t["arrived"] - t["sent"]}
        for stage, seconds in spans.items():
            ALL_HOSTS[stage].append(seconds * 1000)
            if row is last:
                CRITICAL[stage].append(seconds * 1000)


def _floor(fleet: Fleet) -> float:
    """Every host's agents killed by this process through the kernel alone, and all empty.
    The daemons are stopped (SIGSTOP) meanwhile, so the kernel's work is all that runs (they
    would otherwise notice their runs ending and clean up while it is timed); they carry on
    once it is done."""
    parents = [Cgroup(h.daemon.cgroup_parent) for h in fleet.hosts]
    pids = [h.daemon.proc.pid for h in fleet.hosts if h.daemon.proc is not None]
    for parent in parents:
        parent.hold()
    try:
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        started = time.perf_counter()
        for parent in parents:
            parent.kill()
        for parent in parents:
            if not parent.wait_empty(10.0):
                raise RuntimeError(f"{parent} not empty 10 s after cgroup.kill")
        elapsed = (time.perf_counter() - started) * 1000
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
        for parent in parents:
            parent.release()
    HALTS["floor"].append(elapsed)
    return elapsed


def _settle(fleet: Fleet) -> None:
    """Until every daemon has seen its runs end (after the floor, they learn it by
    themselves), so the next launch does not race their bookkeeping."""
    deadline = time.monotonic() + 60
    for host in fleet.hosts:
        while host.daemon.client.agents(state="active")["agents"]:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{host.host_id}: agents still running after the floor")
            time.sleep(0.1)


def _fleet_lift(ctx: FleetContext) -> None:
    result = lift_holds(ctx, None, "bench: lift", deadline=30.0)
    if result["unconfirmed"]:
        raise RuntimeError(f"lift unconfirmed: {result['unconfirmed']}")


def _halt(method: str, fleet: Fleet, ctx: FleetContext) -> float:
    """One halt of every agent by `method`; its wall time in ms."""
    if method == "fleet":
        return _fleet_kill(ctx)
    if method == "floor":
        return _floor(fleet)
    started = time.perf_counter()
    if method == "sequential":
        halts = [_socket_kill(host) for host in fleet.hosts]
    else:
        with ThreadPoolExecutor(len(fleet.hosts)) as pool:
            halts = list(pool.map(_socket_kill, fleet.hosts))
    elapsed = (time.perf_counter() - started) * 1000
    HALTS[method].append(max(halts))
    return elapsed


def _undo(method: str, fleet: Fleet, ctx: FleetContext) -> None:
    if method == "fleet":
        _fleet_lift(ctx)
    elif method == "floor":
        _settle(fleet)
    else:
        _socket_reactivate(fleet)


# CPU time spent while each halt was timed (user + system, from /proc; 10 ms ticks): the ten
# daemons together, etcd, and this process (the caller: agentctl's part, or the HTTP calls).
CPU_OF = ("daemons", "etcd", "caller")
CPU: dict[str, dict[str, list[float]]] = {m: {n: [] for n in CPU_OF} for m in METHODS}
_TICK_MS = 1000 / os.sysconf("SC_CLK_TCK")


def _proc_cpu_ms(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * _TICK_MS  # utime, stime


def _cpu(fleet: Fleet) -> tuple[float, float, float]:
    daemons = sum(_proc_cpu_ms(h.daemon.proc.pid) for h in fleet.hosts
                  if h.daemon.proc is not None)
    etcd = _proc_cpu_ms(fleet.etcd_proc.pid) if fleet.etcd_proc is not None else 0.0
    return daemons, etcd, time.process_time() * 1000


def _median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2] if values else float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", type=int, default=10)
    parser.add_argument("--agents", type=int, default=10)
    parser.add_argument("--processes", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1,
                        help="Rounds run first and not recorded (tokens, connections, caches).")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--logs", type=Path, help="Copy each daemon's log here at the end.")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help="Which halts to run (exploring; the figures need all four).")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="as-fleet-bench-", dir="/tmp"))
    root.chmod(0o755)
    samples: dict[str, list[float]] = {m: [] for m in METHODS}
    cli_wall_ms: float | None = None
    load_before = load_after = (0.0, 0.0, 0.0)
    try:
        with fleet_of(root, args.hosts) as fleet:
            for host in fleet.hosts:
                _light(host)
            with ThreadPoolExecutor(args.hosts) as pool:
                list(pool.map(lambda h: h.start(), fleet.hosts))
            load_before = os.getloadavg()
            ctx = FleetContext(fleet.credentials("operator", fleet.operator_password,
                                                 fleet.operator_cert), PREFIX)
            methods = [m for m in METHODS if m in args.methods.split(",")]
            ctx.etcd.get_prefix(ctx.keys.holds)  # authenticate before anything is timed
            for round_no in range(-args.warmup, args.rounds):
                shift = round_no % len(methods)
                order = methods[shift:] + methods[:shift]
                for method in order:
                    _launch_all(fleet, args.agents, args.processes)
                    before = _cpu(fleet)
                    samples[method].append(_halt(method, fleet, ctx))
                    used = [after - b for after, b in zip(_cpu(fleet), before, strict=True)]
                    _undo(method, fleet, ctx)
                    if round_no >= 0:
                        for name, ms in zip(CPU_OF, used, strict=True):
                            CPU[method][name].append(ms)
                    label = f"round {round_no + 1}" if round_no >= 0 else "warm-up"
                    print(f"{label} {method}: {samples[method][-1]:.1f} ms", flush=True)
                    if round_no < 0:
                        samples[method].pop()
                        HALTS[method].clear()
                        for stages in (CRITICAL, ALL_HOSTS):
                            for values in stages.values():
                                values.clear()
            # The whole command once, Python start-up and all (nothing left to kill).
            started = time.perf_counter()
            run = fleet.agentctl("kill", "--all", "--reason", "bench: cli wall")
            cli_wall_ms = (time.perf_counter() - started) * 1000
            if run.returncode != 0:
                print(run.stdout, run.stderr)
            ctx.etcd.close()
            load_after = os.getloadavg()
            if args.logs is not None:
                args.logs.mkdir(parents=True, exist_ok=True)
                for host in fleet.hosts:
                    shutil.copy(host.daemon.log_path, args.logs / f"{host.host_id}.log")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"\n{args.hosts} hosts x {args.agents} agents x {args.processes} processes, "
          f"{args.rounds} rounds; {cpu_model()}; load average {load_before[0]:.1f} before, "
          f"{load_after[0]:.1f} after")
    report: dict[str, Any] = {"hosts": args.hosts, "agents": args.agents,
                              "processes": args.processes, "rounds": args.rounds,
                              "samples_ms": samples, "cli_wall_ms": cli_wall_ms,
                              "loadavg": [load_before, load_after]}
    for method, values in samples.items():
        if not values:
            continue
        median = _median(values)
        p95 = nearest_rank(values, 0.95)
        report[method] = {"median_ms": median, "p95_ms": p95}
        if method == "floor":
            print(f"{method:>10}: median {median:7.1f} ms  p95 {p95:7.1f} ms  "
                  f"(n={len(values)}; cgroup.kill of the 10 parents from one process, "
                  f"until all empty)")
            continue
        halts = HALTS[method]
        slowest = _median(halts)
        report[method]["median_slowest_time_to_halt_ms"] = slowest
        print(f"{method:>10}: median {median:7.1f} ms  p95 {p95:7.1f} ms  "
              f"(n={len(values)}; slowest local time_to_halt, median {slowest:.1f} ms)")
    report["cpu_ms"] = CPU
    print("CPU while halting, median ms: " + "; ".join(
        f"{method} " + " + ".join(f"{name} {_median(CPU[method][name]):.0f}" for name in CPU_OF)
        for method in METHODS))
    report["fleet_stages_ms"] = {"last_host": CRITICAL, "all_hosts": ALL_HOSTS}
    print("fleet stages, median ms (host that answered last | all hosts):")
    for stage in STAGES:
        print(f"  {stage:>18}: {_median(CRITICAL[stage]):7.1f} | "
              f"{_median(ALL_HOSTS[stage]):7.1f}")
    if cli_wall_ms is not None:
        print(f"agentctl fleet kill --all, whole process once: {cli_wall_ms:.0f} ms")
    if "fleet" not in report or "parallel" not in report:
        return 0
    fleet_p95 = report["fleet"]["p95_ms"]
    met = fleet_p95 <= 250 and fleet_p95 < report["parallel"]["p95_ms"]
    print(f"target (fleet p95 <= 250 ms and < parallel p95): {'met' if met else 'MISSED'}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
