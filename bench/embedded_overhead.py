"""What an embedded CI run costs over bare runc: `agentctl run --embedded -- true` (two Python
start-ups, the supervisor core assembled, netns, bundle, runc create/start, kill path, teardown,
exit) against `runc run` of the same bundle (the daemon's rendering of the default profile: same
namespaces, seccomp, id maps, cgroup limits, network namespace), in one run, order alternating.

    python bench/embedded_overhead.py [--iterations 20] [--json PATH] [--baseline-python PY]

--baseline-python: also time, interleaved in the same run, the embedded run and the runner's
start with another venv's interpreter (another version of the supervisor installed there),
so a change's effect is measured against its baseline under the same load.

Needs root and runc. Uses its own state root, runc root, cgroup parent and netns; removes all
of them. Timings are wall clock of the whole command as a CI job sees it."""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import resource
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from stats import nearest_rank

from supervisor.profiles import load_profile, load_seccomp
from supervisor.sandbox import netns
from supervisor.sandbox.bundle import BundleSpec, IdMap, write_bundle
from supervisor.sandbox.cgroups import Cgroup

_current = ""  # the mechanism being timed, for CPU_MS
UID_BASE = 3_000_000_000  # far from the daemon's and the embedded slots' ranges
AGENT_UID = 1000


CPU_MS: dict[str, list[float]] = {}  # per mechanism: user+system CPU of the command's processes


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (usage.ru_utime + usage.ru_stime) * 1000


def time_command(argv: list[str], env: dict[str, str] | None = None,
                 expect: int = 0) -> float:
    """Wall clock of the command; its CPU (every process of it that was waited for: under a
    loaded host, CPU time is the steadier figure) goes to CPU_MS under the caller's name.
    `expect`: the exit status that means it did what is timed."""
    cpu_before = _children_cpu()
    started = time.perf_counter()
    result = subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, check=False, cwd="/")
    elapsed = (time.perf_counter() - started) * 1000
    CPU_MS.setdefault(_current, []).append(_children_cpu() - cpu_before)
    if result.returncode != expect:
        raise RuntimeError(f"{' '.join(argv[:6])} ... exited {result.returncode}: "
                           f"{result.stderr.decode(errors='replace')[-1500:]}")
    return elapsed


def _agentctl(python: str) -> list[str]:
    """How to run agentctl of the venv `python` belongs to."""
    script = Path(python).parent / "agentctl"
    return [str(script)] if os.access(script, os.X_OK) else [python, "-m", "supervisor.cli"]


def _runner_argv(python: str) -> list[str]:
    """The runner's interpreter options as that venv's agentctl execs it (after the
    interpreter): `-I -m supervisor.ci`, or its form without site (cli/embedded.py)."""
    asked = subprocess.run(
        [python, "-c", "import json\nfrom supervisor.cli.embedded import runner_argv\n"
                       "print(json.dumps(runner_argv()[1:]))"],
        capture_output=True, text=True, check=False, cwd="/")
    if asked.returncode != 0:  # a version from before runner_argv
        return ["-I", "-m", "supervisor.ci"]
    found: list[str] = json.loads(asked.stdout)
    return found


def main(argv: list[str] | None = None) -> int:
    global _current
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--baseline-python", type=Path, default=None,
                        help="a venv's python with the supervisor version to compare against")
    args = parser.parse_args(argv)
    if os.geteuid() != 0 or shutil.which("runc") is None:
        print("needs root and runc", file=sys.stderr)
        return 2
    tag = secrets.token_hex(3)
    workdir = Path(tempfile.mkdtemp(prefix=f"as-bench-ci-{tag}-", dir="/tmp"))
    workdir.chmod(0o711)
    runc_root = workdir / "runc-root"
    bundle = workdir / "bundle"
    ns_name = f"asbench{tag}"
    cgroup_parent = f"agent-supervisor-bench/{tag}"
    profile = load_profile("default", [])
    id_map = IdMap(UID_BASE, AGENT_UID, UID_BASE + AGENT_UID)
    env = {**os.environ, "AGENT_SUPERVISOR_CI_ROOT": str(workdir / "ci-state"),
           "AGENT_SUPERVISOR_SOCKET": str(workdir / "no-daemon.sock")}
    env.pop("AGENT_SUPERVISOR_EMBEDDED_RUN", None)  # agentctl sets it; the runner's start row not
    # The venv's agentctl, as a CI job runs it (the console script, or its launcher: supervisor/
    # cli/launcher.py), where there is one; `python -m supervisor.cli` (runpy, and the modules
    # it imports, ~3 ms more) otherwise.
    agentctl = [*_agentctl(sys.executable), "run", "--embedded"]
    baseline = str(args.baseline_python) if args.baseline_python is not None else None
    mechanisms: dict[str, list[float]] = {"runc run (bare)": [], "agentctl run --embedded": []}
    if baseline is not None:
        mechanisms["agentctl run --embedded [baseline]"] = []
    mechanisms["  + --report (signed)"] = []
    # Where the extra goes, measured the same way: an interpreter's start, agentctl's start up
    # to its exec (the first of the two processes: the fast path reading argv), the runner's
    # start (the second: its entry point as agentctl execs it, every module loaded, then a
    # refusal for want of a run spec, status 6 (invalid_request), before any work of a run).
    runner_start = _runner_argv(sys.executable)
    parts = {"python -c pass": ["-c", "pass"],
             "  agentctl to the exec": ["-c", "from supervisor.cli import fast; "
                                        "fast.plan(['run', '--embedded', '--', 'true'], {})"],
             "  runner start (no spec)": runner_start}
    if baseline is not None:
        parts["  runner start (no spec) [baseline]"] = _runner_argv(baseline)
    for name in parts:
        mechanisms[name] = []
    try:
        netns_path = netns.create(ns_name)
        count = 0

        def bare() -> float:
            nonlocal count
            count += 1
            container = f"asbench{tag}-{count}"
            return time_command(["runc", "--root", str(runc_root), "run", "--bundle",
                                 str(bundle), container])

        write_bundle(bundle, BundleSpec(
            run_id=f"bench{tag}", hostname="agent-bench", command=["true"], profile=profile,
            seccomp=load_seccomp(profile.seccomp.profile), uid_map=id_map, gid_map=id_map,
            cgroups_path=f"/{cgroup_parent}/run", netns_path=str(netns_path), workspace=None))
        runs = {
            "runc run (bare)": bare,
            "agentctl run --embedded": lambda: time_command([*agentctl, "--", "true"], env),
            "  + --report (signed)": lambda: time_command(
                [*agentctl, "--report", str(workdir / "r.json"), "--", "true"], env),
        }
        for name, argv in parts.items():
            python = baseline if baseline is not None and "[baseline]" in name \
                else sys.executable
            runs[name] = functools.partial(time_command, [python, *argv], env,
                                           6 if "runner start" in name else 0)
        if baseline is not None:
            runs["agentctl run --embedded [baseline]"] = functools.partial(
                time_command, [*_agentctl(baseline), "run", "--embedded", "--", "true"], env)
        for run in runs.values():  # warm-up: page cache, pyc files
            run()
        for iteration in range(args.iterations):
            order = list(runs)
            if iteration % 2:
                order.reverse()
            for name in order:
                _current = name
                mechanisms[name].append(runs[name]())
    finally:
        netns.remove(ns_name)
        Cgroup(cgroup_parent).remove()
        Cgroup("agent-supervisor-bench").remove()
        shutil.rmtree(workdir, ignore_errors=True)
    base = statistics.median(mechanisms["runc run (bare)"])
    rows = []
    for name, values in mechanisms.items():
        median = statistics.median(values)
        rows.append({"mechanism": name.strip(), "n": len(values), "median_ms": median,
                     "p95_ms": nearest_rank(values, 0.95), "min_ms": min(values),
                     "max_ms": max(values), "extra_median_ms": median - base,
                     "cpu_median_ms": statistics.median(CPU_MS[name])})
    print(f"{'mechanism':36} {'n':>3} {'median ms':>10} {'p95 ms':>8} {'min':>7} {'max':>7} "
          f"{'extra vs runc run':>18} {'CPU ms (median)':>16}")
    print(f"{'-' * 36} {'-' * 3} {'-' * 10} {'-' * 8} {'-' * 7} {'-' * 7} {'-' * 18} "
          f"{'-' * 16}")
    for name, row in zip(mechanisms, rows, strict=True):
        print(f"{name:36} {row['n']:>3} {row['median_ms']:>10.1f} {row['p95_ms']:>8.1f} "
              f"{row['min_ms']:>7.1f} {row['max_ms']:>7.1f} {row['extra_median_ms']:>+18.1f} "
              f"{row['cpu_median_ms']:>16.1f}")
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")
    extra = rows[1]["extra_median_ms"]
    print(f"\ntarget: agentctl run --embedded -- true at most 150 ms over bare runc run "
          f"(median): {extra:+.1f} ms, {'met' if extra <= 150 else 'NOT met'}")
    if args.json is not None:
        args.json.write_text(json.dumps({"rows": rows, "machine": {
            "python": platform.python_version(), "kernel": platform.release(),
            "cpus": os.cpu_count()}}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
