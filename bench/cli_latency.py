"""Benchmark: agentctl's wall time per command, end to end, against docker's CLI and against a
Python floor, interleaved in one run.

Each round times, one after the other (each a fresh process, as an operator runs it):
  agentctl --version        against  docker --version
  agentctl ls               against  docker ps
  agentctl kill AGENT       against  docker kill CONTAINER
  python -c pass            (the interpreter's own start: no CLI can beat it)
  python -c <raw request>   (start + one GET /v1/agents on the control socket: the floor)
  agentctl ls via click     (the same ls through the click CLI, which the incident verbs
                             skip since issue 16's fast path: what that path saves)
  agentctl --version as pip's script  against  agentctl --version through agentctl's launcher
                            (both executed as files, as a shell runs them; the launcher is
                             pip's script started by `env -S --block-signal=INT`,
                             supervisor/cli/launcher.py: what closing the Ctrl-C window costs)
agentctl is the code of this checkout, started the way its console script starts it. Its
daemon is real (own state, cgroup parent and name prefix; tests/support/daemon.py) with one
`sleep` agent per round to kill (runc); docker kills one container per round, made from a
skeleton image imported here (no registry) with the host's /usr bound read-only and no
network. Launching the victims is not timed. Prints each command's wall time (median, p95) and
CPU time (user + system of the process and its children, median: on a loaded machine wall time
is mostly the wait for a core), and the ratio agentctl / docker per pair against the target
(wall <= 1.0: about docker's CLI). A missed target prints MISSED and still exits 0: this is a
benchmark, not a test.

Needs root, runc and a docker engine (scripts/start-dockerd.sh). Removes its agents, daemon,
containers and image when it ends, also on Ctrl-C.

    sudo .venv/bin/python bench/cli_latency.py [--rounds 15] [--json out.json]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # tests.support is not installed; run from anywhere

from stats import cpu_model, nearest_rank  # noqa: E402

from supervisor.cli.launcher import launcher_text  # noqa: E402
from tests.support.daemon import running_daemon  # noqa: E402

IMAGE = "agent-supervisor-bench/cli-latency:1"
TARGET = 1.0
# The console script pip writes for agentctl, verbatim: what an operator's shell runs.
ENTRY_POINT = ("import sys\nfrom supervisor.cli.fast import main\nif __name__ == '__main__':\n"
               "    sys.argv[0] = sys.argv[0].removesuffix('.exe')\n    sys.exit(main())\n")
RAW_REQUEST = ("import socket, sys\ns = socket.socket(socket.AF_UNIX)\ns.connect(sys.argv[1])\n"
               "s.sendall(b'GET /v1/agents HTTP/1.1\\r\\nHost: x\\r\\nConnection: close\\r\\n"
               "\\r\\n')\nwhile s.recv(65536):\n    pass\ns.close()\n")
# The click CLI's own entry, which every command but the incident verbs goes through.
CLICK_ENTRY_POINT = ENTRY_POINT.replace("supervisor.cli.fast", "supervisor.cli.main")
PAIRS = [("agentctl --version", "docker --version"), ("agentctl ls", "docker ps"),
         ("agentctl kill", "docker kill")]


def skeleton_tar() -> bytes:
    """A root of mount points and merged-/usr links; /usr itself comes as a read-only bind."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name in ("usr", "proc", "dev", "sys", "tmp", "etc"):
            info = tarfile.TarInfo(name)
            info.type, info.mode = tarfile.DIRTYPE, 0o1777 if name == "tmp" else 0o755
            tar.addfile(info)
        for name in ("bin", "sbin", "lib", "lib64"):
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, f"usr/{name}"
            tar.addfile(info)
    return buffer.getvalue()


def timed(argv: list[str], env: dict[str, str] | None = None) -> tuple[float, float]:
    """Wall time and CPU time (user + system, of the command and its children) in ms. On a
    loaded machine the wall time is mostly waiting for a core; the CPU time is the work."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, capture_output=True,
                          timeout=120, check=False)
    elapsed = (time.perf_counter() - start) * 1000
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} -> {done.returncode}: {done.stderr[-400:]!r}")
    cpu = (after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime) * 1000
    return elapsed, cpu


def docker(*args: str, stdin: bytes | None = None) -> str:
    done = subprocess.run(["docker", *args], input=stdin, capture_output=True, timeout=120,
                          check=True)
    return done.stdout.decode().strip()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--json", type=Path, default=None, help="Write the samples here.")
    args = parser.parse_args()
    if os.geteuid() != 0 or shutil.which("runc") is None or shutil.which("docker") is None:
        print("needs root, runc and docker (scripts/start-dockerd.sh)", file=sys.stderr)
        return 2
    docker("version", "--format", "{{.Server.Version}}")  # the engine answers, or stop here
    samples: dict[str, list[float]] = {}
    cpu_samples: dict[str, list[float]] = {}
    containers: list[str] = []
    with tempfile.TemporaryDirectory(prefix="cli-latency-") as scratch:
        root = Path(scratch)
        root.chmod(0o755)
        entry = root / "agentctl"
        entry.write_text(ENTRY_POINT)
        click_entry = root / "agentctl-click"
        click_entry.write_text(CLICK_ENTRY_POINT)
        # The console script as pip installs it (its shebang) and agentctl's launcher over it.
        pip_script = root / "agentctl-pip"
        pip_script.write_text(f"#!{sys.executable}\n{ENTRY_POINT}")
        launcher = root / "agentctl-launcher"
        launcher.write_text(launcher_text(pip_script.read_text()) or "")
        for script in (pip_script, launcher):
            script.chmod(0o755)
        # An installed agentctl runs from bytecode pip compiled; a checkout's must be compiled
        # too (PYTHONDONTWRITEBYTECODE would otherwise recompile every module on every run).
        subprocess.run([sys.executable, "-m", "compileall", "-q", str(REPO / "supervisor")],
                       check=True, timeout=300)
        docker("import", "-", IMAGE, stdin=skeleton_tar())
        try:
            with running_daemon(root, daemon={"log_level": "warning", "self_test": False}
                                ) as daemon:
                env = {**os.environ, "PYTHONPATH": str(REPO),
                       "AGENT_SUPERVISOR_SOCKET": str(daemon.socket)}
                agentctl = [sys.executable, str(entry)]
                for round_no in range(args.rounds):
                    victim = f"clibench-{round_no:03d}"
                    daemon.agentctl("run", "--detach", "--name", victim, "--", "sleep",
                                    "infinity", check=True)
                    container = docker("run", "-d", "--network", "none", "-v", "/usr:/usr:ro",
                                       IMAGE, "sleep", "infinity")
                    containers.append(container)
                    runs = {
                        "agentctl --version": ([*agentctl, "--version"], env),
                        "docker --version": (["docker", "--version"], None),
                        "agentctl ls": ([*agentctl, "ls"], env),
                        "docker ps": (["docker", "ps"], None),
                        "agentctl kill": ([*agentctl, "kill", victim, "--reason", "bench"], env),
                        "docker kill": (["docker", "kill", container], None),
                        "python -c pass": ([sys.executable, "-c", "pass"], None),
                        "agentctl ls via click": ([sys.executable, str(click_entry), "ls"], env),
                        "python raw request": ([sys.executable, "-c", RAW_REQUEST,
                                                str(daemon.socket)], None),
                        "--version, pip script": ([str(pip_script), "--version"], env),
                        "--version, launcher": ([str(launcher), "--version"], env),
                    }
                    # Alternate which side of each pair goes first, so warm caches and
                    # machine noise fall on both alike.
                    order = list(runs) if round_no % 2 == 0 else [
                        name for pair in PAIRS for name in reversed(pair)] + [
                        "python raw request", "agentctl ls via click", "python -c pass",
                        "--version, launcher", "--version, pip script"]
                    for name in order:
                        argv, run_env = runs[name]
                        wall, cpu = timed(argv, run_env)
                        samples.setdefault(name, []).append(wall)
                        cpu_samples.setdefault(name, []).append(cpu)
                    docker("rm", "-f", container)
                    containers.remove(container)
                daemon.agentctl("rm", *[f"clibench-{n:03d}" for n in range(args.rounds)],
                                "--reason", "benchmark done")
        finally:
            for container in containers:
                subprocess.run(["docker", "rm", "-f", container], capture_output=True,
                               timeout=60, check=False)
            subprocess.run(["docker", "rmi", IMAGE], capture_output=True, timeout=60,
                           check=False)
    report(samples, cpu_samples, args.rounds)
    if args.json:
        args.json.write_text(json.dumps({"wall_ms": samples, "cpu_ms": cpu_samples}, indent=2))
    return 0


def report(samples: dict[str, list[float]], cpu_samples: dict[str, list[float]],
           rounds: int) -> None:
    load = os.getloadavg()
    print(f"cli_latency: {rounds} rounds; {cpu_model()}, {os.cpu_count()} cpus, "
          f"load {load[0]:.1f}/{load[1]:.1f}; {platform.python_version()}; "
          f"{docker('--version')}")
    medians = {name: statistics.median(values) for name, values in samples.items()}
    cpu = {name: statistics.median(values) for name, values in cpu_samples.items()}
    print(f"  {'':22} {'wall median':>12} {'wall p95':>10} {'cpu median':>11}")
    for name, values in samples.items():
        print(f"  {name:22} {medians[name]:9.1f} ms {nearest_rank(values, 0.95):7.1f} ms "
              f"{cpu[name]:8.1f} ms")
    for ours, theirs in PAIRS:
        ratio = medians[ours] / medians[theirs]
        verdict = "met" if ratio <= TARGET else "MISSED"
        print(f"  {ours} / {theirs}: wall {ratio:.2f} (target <= {TARGET:.1f}) {verdict}; "
              f"cpu {cpu[ours] / cpu[theirs]:.2f}")
    floor = medians["python raw request"]
    print(f"  agentctl kill over the floor (python + raw request): "
          f"{medians['agentctl kill'] - floor:+.1f} ms")
    print(f"  agentctl ls via click over agentctl ls (the fast path's saving): "
          f"{medians['agentctl ls via click'] - medians['agentctl ls']:+.1f} ms")
    print(f"  agentctl's launcher over pip's script (--version): wall "
          f"{medians['--version, launcher'] - medians['--version, pip script']:+.1f} ms, "
          f"cpu {cpu['--version, launcher'] - cpu['--version, pip script']:+.1f} ms")


if __name__ == "__main__":
    sys.exit(main())
