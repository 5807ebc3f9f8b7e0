"""Benchmark: how long `agentctl kill` takes to halt an agent, against the kernel's own floor.

For agents of 1, 200 and 1000 processes it measures, in one run and on identical runc containers
(same bundle renderer, same `bench` profile, same seccomp, user and network namespaces, same
cgroup parent):

- `agentctl kill`: the daemon's `time_to_halt_ms` (marking the agent killed -> kernel reports the
  cgroup empty -> netns removed), and separately the wall clock of the whole `agentctl kill`
  command, Python start-up of the CLI and the daemon's runtime cleanup included;
- raw `cgroup.kill`: write "1" to the container's v2 `cgroup.kill`, then wait for `populated 0`
  in `cgroup.events` (the same poll(2) wait the daemon uses), no daemon involved;
- `runc kill --all`: `runc kill --all ID KILL`, then the same wait.

Each iteration runs every mechanism once per size, in an order that rotates from one iteration
to the next so machine noise falls on all of them alike. It prints the median, p95 (nearest
rank), min and max per mechanism and size, the ratio of each median to the raw `cgroup.kill`
median at the same size, and a verdict on the target: the median `time_to_halt_ms` of
`agentctl kill` at 200 processes within 1.5x of raw `cgroup.kill`. A missed target prints MISSED
but still exits 0: this is a benchmark, not a test.

With --scope class (10 agents x 10 processes) or --scope global (100 agents x 20 processes) it
measures a scoped halt instead, in rounds that alternate which side goes first:

- the API: `POST /v1/actions/kill` with the class (or all=true) over the control socket; the
  wall time of that call (request written -> answer read, all runs confirmed empty) and the
  daemon's `time_to_halt_ms`;
- raw `cgroup.kill` of the same shape of cgroups without the daemon: the same number of runc
  containers with the same workload under the same init (tini), one `cgroup.kill` write per
  container (class) or one write to their parent (global), then the wait until every one is
  empty, through files held open before the kill as the daemon holds its runs' (the parent's
  `populated 0` first for global, as the daemon waits);
- raw `cgroup.kill` of the daemon's own runs: the same class launched through the API as the
  API rounds launch it, killed by this bench writing each run's `cgroup.kill` (global: the
  daemon's parent, which holds only its runs) and waiting for `populated 0` the same way, then
  forgotten through the API once the daemon has seen the runs end. The same cgroups the API
  kills, sandbox and all, without the request.

Target: the API's answer within 1.5x raw, printed against both baselines (the second ratio is
the issue's "raw cgroup.kill of the same cgroups" taken literally). Add --iterations 2 or 3: a
global round launches 300 containers and takes about a minute on a small machine.

Needs root, runc and cgroup v2 (pure or hybrid). It starts its own daemon (own state directory,
cgroup parent and name prefix, see tests/support/daemon.py) and removes every container,
network namespace, cgroup and temporary directory it made, also on Ctrl-C.

    sudo .venv/bin/python bench/time_to_halt.py [--iterations 20] [--sizes 1,200,1000]
                                               [--warmup 1] [--json samples.json]
    sudo .venv/bin/python bench/time_to_halt.py --scope global --iterations 2 --warmup 0
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import ctypes.util
import functools
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # tests.support is not installed; run from anywhere

from stats import cpu_model, nearest_rank  # noqa: E402

from supervisor.errors import SupervisorError  # noqa: E402
from supervisor.profiles import Profile, load_profile, load_seccomp  # noqa: E402
from supervisor.runtime.base import RunParams  # noqa: E402
from supervisor.runtime.init import SandboxInit  # noqa: E402
from supervisor.sandbox import netns  # noqa: E402
from supervisor.sandbox.bundle import (  # noqa: E402
    SANDBOX_UID_COUNT,
    BundleSpec,
    IdMap,
    remove_bundle,
    write_bundle,
)
from supervisor.sandbox.cgroups import (  # noqa: E402
    Cgroup,
    detect_mode,
    unified_root,
    v1_hierarchies,
)
from tests.support.daemon import Daemon, new_daemon, runtime_config, wait_for  # noqa: E402

AGENTCTL = "agentctl kill"
RAW = "raw cgroup.kill"
RUNC_KILL = "runc kill --all"
MECHANISMS = (AGENTCTL, RAW, RUNC_KILL)
DOCKER_KILL = "docker kill + wait"
DOCKER_STOP = "docker stop -t 0"
DOCKER_MECHANISMS = (AGENTCTL, RAW, DOCKER_KILL, DOCKER_STOP)
DOCKER_TARGET_SPEEDUP = 3.0  # issue 7: agentctl kill >= 3x faster than docker kill + wait
PROFILE = "bench"
TARGET_SIZE = 200
TARGET_RATIO = 1.5
READY_TIMEOUT = 120.0  # forking 1000 processes on a small, busy machine takes a few seconds
CONFIRM_TIMEOUT = 10.0
SETTLE = 0.1  # after the workload is up, so every kill starts from a quiet container
# The daemon maps run slot k to uid_base + k * 65536; the raw containers take a slot far above
# the ones a single benchmark daemon uses, with the daemon's default uid_base and agent uid.
RAW_UID_BASE = 1_000_000 + 400 * SANDBOX_UID_COUNT
AGENT_UID = 1000
PR_SET_CHILD_SUBREAPER = 36
# --scope: (agents, processes per agent), as in issue 12.
SCOPES = {"class": (10, 10), "global": (100, 20)}
API_SCOPE = "API kill (answer)"
RAW_SCOPE = "raw cgroup.kill"
DAEMON_RAW_SCOPE = "raw cgroup.kill of the daemon's runs"
SCOPE_MECHANISMS = (API_SCOPE, RAW_SCOPE, DAEMON_RAW_SCOPE)


def workload(processes: int) -> list[str]:
    """`processes` processes in all: N-1 background sleeps, then the shell execs into a sleep.

    The exec comes after the last fork, so an init whose comm is `sleep` means the tree is
    complete and nothing is forking any more."""
    return ["/bin/sh", "-c",
            f"for i in $(seq {processes - 1}); do sleep 1000 & done; exec sleep 1000"]


def _workload_pid(init_pid: int) -> tuple[int, int]:
    """The workload's first process and how many processes are not the workload's: the daemon
    runs tini as each run's init (comm `init`), with the workload its only child."""
    try:
        if Path(f"/proc/{init_pid}/comm").read_text().strip() != "init":
            return init_pid, 0
        children = Path(f"/proc/{init_pid}/task/{init_pid}/children").read_text().split()
    except FileNotFoundError:
        return init_pid, 0
    return (int(children[0]), 1) if children else (init_pid, 1)


def wait_ready(cgroup: Cgroup, init_pid: int, processes: int, what: str) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    count = 0
    comm = "?"
    while time.monotonic() < deadline:
        count = len(cgroup.pids())
        workload, extra = _workload_pid(init_pid)
        try:
            comm = Path(f"/proc/{workload}/comm").read_text().strip()
        except FileNotFoundError:
            comm = "(gone)"
        if comm == "sleep" and count >= processes + extra:
            if count != processes + extra:
                raise RuntimeError(f"{what}: {count} processes in {cgroup.path}, "
                                   f"expected exactly {processes + extra}")
            time.sleep(SETTLE)
            return
        time.sleep(0.01)
    raise RuntimeError(f"{what}: only {count} of {processes} processes in {cgroup.path} after "
                       f"{READY_TIMEOUT:g}s (init pid {init_pid} is {comm!r})")


class Interrupts:
    """Ctrl-C and SIGTERM raise KeyboardInterrupt, so the cleanup in main() runs; inside
    `deferred()` they wait for the block to end, because netns.create finishes its namespace in
    a helper thread that an exception in the main thread would not stop."""

    def __init__(self) -> None:
        self.depth = 0
        self.pending = False

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self._handle)
        if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:  # respect nohup and `&`
            signal.signal(signal.SIGINT, self._handle)

    def _handle(self, _signum: int, _frame: FrameType | None) -> None:
        if self.depth:
            self.pending = True
            return
        raise KeyboardInterrupt

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1
            if not self.depth and self.pending:
                self.pending = False
                raise KeyboardInterrupt


INTERRUPTS = Interrupts()


# ----------------------------------------------------------------------------- raw containers

@dataclass
class RawContainer:
    container_id: str
    bundle: Path
    netns: str
    cgroup: Cgroup
    pid: int | None = None
    removed: bool = False


@dataclass
class RawRuntime:
    """runc containers rendered exactly as the daemon renders its runs, but run without it,
    under our own `runc --root`."""

    workdir: Path
    cgroup_parent: str
    tag: str
    profile: Profile
    seccomp: dict[str, Any]
    runc: str = "runc"
    containers: list[RawContainer] = field(default_factory=list)
    _count: int = 0

    @property
    def runc_root(self) -> Path:
        return self.workdir / "runc-root"

    def _runc(self, *args: str, **kwargs: Any) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run([self.runc, "--root", str(self.runc_root), *args], **kwargs)

    def launch(self, command: list[str]) -> RawContainer:
        self._count += 1
        container_id = f"raw{self.tag}-{self._count}"
        container = RawContainer(
            container_id=container_id, bundle=self.workdir / "bundles" / container_id,
            netns=container_id, cgroup=Cgroup(f"{self.cgroup_parent}/{container_id}"),
        )
        self.containers.append(container)  # before any step, so a failed launch is undone too
        with INTERRUPTS.deferred():
            self._create(container, command)
        return container

    def _create(self, container: RawContainer, command: list[str]) -> None:
        container_id = container.container_id
        netns_path = netns.create(container.netns)
        id_map = IdMap(RAW_UID_BASE, AGENT_UID, RAW_UID_BASE + AGENT_UID)
        # The daemon's own init (tini) as PID 1, as every run has: the same processes to kill.
        init = SandboxInit()
        write_bundle(container.bundle, BundleSpec(
            run_id=container_id, hostname="agent-bench-raw", command=init.wrap(command),
            profile=self.profile, seccomp=self.seccomp, uid_map=id_map, gid_map=id_map,
            cgroups_path=f"/{container.cgroup.relative}", netns_path=str(netns_path),
            workspace=None, init_binary=init.check(),
        ))
        pid_file = container.bundle / "init.pid"
        with open(container.bundle / "output.log", "wb") as output:
            # --detach: the container keeps runc's stdio, so it gets a file and never a pipe.
            result = self._runc(
                "--log", str(container.bundle / "runc.log"), "run", "--detach", "--pid-file",
                str(pid_file), "--bundle", str(container.bundle), container_id,
                stdin=subprocess.DEVNULL, stdout=output, stderr=output,
            )
        if result.returncode != 0:
            log = (container.bundle / "runc.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"runc run {container_id} failed ({result.returncode}):\n{log}")
        container.pid = int(pid_file.read_text().strip())

    def runc_kill_all(self, container: RawContainer) -> None:
        self._runc("kill", "--all", container.container_id, "KILL", check=True,
                   stdin=subprocess.DEVNULL, capture_output=True)

    def remove(self, container: RawContainer) -> float:
        """Kill what is left, delete the container, reap its init, remove netns, cgroup and
        bundle. Returns how long the netns removal took (ms), the daemon's step 5."""
        if container.removed:
            return 0.0
        if container.cgroup.exists() and container.cgroup.populated():
            container.cgroup.kill()
            if not container.cgroup.wait_empty(CONFIRM_TIMEOUT):
                raise RuntimeError(f"{container.cgroup.path} still populated after kill")
        self._runc("delete", "--force", container.container_id, stdin=subprocess.DEVNULL,
                   capture_output=True)
        if container.pid is not None:
            # We are the subreaper of the container's init (runc run --detach exits); the
            # cgroup is empty, so the init has exited or is about to.
            with contextlib.suppress(ChildProcessError):
                os.waitpid(container.pid, 0)
        t0 = time.perf_counter()
        netns.remove(container.netns)
        netns_ms = (time.perf_counter() - t0) * 1000
        container.cgroup.remove()
        remove_bundle(container.bundle)
        container.removed = True
        return netns_ms

    def remove_all(self) -> list[str]:
        problems = []
        for container in self.containers:
            try:
                self.remove(container)
            except Exception as exc:
                problems.append(f"{container.container_id}: {exc}")
        return problems


# ----------------------------------------------------------------------------- mechanisms

@dataclass
class Sample:
    mechanism: str
    processes: int
    iteration: int
    warmup: bool
    time_to_halt_ms: float
    cli_wall_ms: float | None = None  # agentctl kill only
    netns_remove_ms: float | None = None  # raw mechanisms only: the daemon's step 5, untimed


def halt_with_agentctl(daemon: Daemon, processes: int, name: str) -> tuple[float, float]:
    """(daemon's time_to_halt_ms, wall clock of the agentctl kill command in ms)."""
    # Not daemon.agentctl_json: it appends --json last, which here would land after "--".
    launched = daemon.agentctl("run", "--detach", "--json", "--name", name, "--profile",
                               PROFILE, "--", *workload(processes), check=True)
    view = json.loads(launched.stdout)
    cgroup = Cgroup(f"{daemon.cgroup_parent.strip('/')}/{daemon.prefix}-{view['id']}")
    wait_ready(cgroup, int(view["pid"]), processes, f"agent {name}")
    t0 = time.perf_counter()
    result = daemon.agentctl("kill", name, "--json")
    wall_ms = (time.perf_counter() - t0) * 1000
    if result.returncode != 0:
        raise RuntimeError(f"agentctl kill {name} -> {result.returncode}: {result.stderr}")
    halt_ms = json.loads(result.stdout)["results"][0]["time_to_halt_ms"]
    if halt_ms is None:
        raise RuntimeError(f"agentctl kill {name}: no time_to_halt_ms in {result.stdout}")
    if cgroup.exists() and cgroup.populated():
        raise RuntimeError(f"agentctl kill {name} returned but {cgroup.path} is populated")
    return float(halt_ms), wall_ms


def halt_raw(raw: RawRuntime, processes: int, kill: Callable[[RawContainer], None]
             ) -> tuple[float, float]:
    """(ms from the kill to the kernel's `populated 0`, ms to remove the netns afterwards)."""
    container = raw.launch(workload(processes))
    assert container.pid is not None
    wait_ready(container.cgroup, container.pid, processes, container.container_id)
    t0 = time.perf_counter()
    kill(container)
    confirmed = container.cgroup.wait_empty(CONFIRM_TIMEOUT)
    halt_ms = (time.perf_counter() - t0) * 1000
    if not confirmed:
        raise RuntimeError(f"{container.container_id}: {container.cgroup.path} still populated "
                           f"{CONFIRM_TIMEOUT:g}s after the kill")
    return halt_ms, raw.remove(container)


def write_cgroup_kill(container: RawContainer) -> None:
    write_cgroup_kill_to(container.cgroup)


class DockerRaw:
    """Containers identical to the daemon's docker runs (made by the same DockerRuntime, same
    profile, image, seccomp, limits and cgroup parent), halted without the daemon."""

    def __init__(self, daemon: Daemon, profile: Profile) -> None:
        from supervisor.config import load_config
        from supervisor.daemon.core import docker_runtime_for

        self.config = load_config(daemon.config_path)
        self.runtime = docker_runtime_for(self.config)
        self.profile = profile
        self.prefix = f"{daemon.prefix}raw"
        self.loop = asyncio.new_event_loop()
        self.count = 0

    def halt(self, processes: int, mechanism: str) -> float:
        """ms from issuing `mechanism` to the halt being confirmed: the engine's answer for
        docker kill + wait and docker stop, the kernel's `populated 0` for raw cgroup.kill."""
        self.count += 1
        run_id = f"{self.count:06d}"
        container_id = f"{self.prefix}-{run_id}"
        params = RunParams(
            run_id=run_id, agent="bench", container_id=container_id, netns=container_id,
            cgroup=f"{self.config.sandbox.cgroup_parent.strip('/')}/{container_id}",
            bundle=Path("/nonexistent"),
            log_path=self.config.daemon.runtime_dir / f"{container_id}.log",
            profile=self.profile, command=workload(processes),
            uid_slot=self.config.sandbox.max_runs - 2, runtime="docker")
        engine = self.runtime.engine
        handle = self.loop.run_until_complete(self.runtime.launch(params))
        try:
            self.loop.run_until_complete(handle.start())
            assert handle.pid is not None
            wait_ready(handle.cgroup, handle.pid, processes, container_id)
            t0 = time.perf_counter()
            if mechanism == RAW:
                write_cgroup_kill_to(handle.cgroup)
                confirmed = handle.cgroup.wait_empty(CONFIRM_TIMEOUT)
            elif mechanism == DOCKER_KILL:
                engine.kill(container_id)
                confirmed = engine.wait(container_id, CONFIRM_TIMEOUT) is not None
            else:
                engine.stop(container_id, timeout=0)
                confirmed = True
            halt_ms = (time.perf_counter() - t0) * 1000
            if not confirmed or handle.cgroup.populated():
                raise RuntimeError(f"{container_id}: {mechanism} did not empty the container")
            return halt_ms
        finally:
            self.loop.run_until_complete(handle.cleanup())
            params.log_path.unlink(missing_ok=True)  # each run's log is a new file

    def close(self) -> None:
        self.loop.close()


def write_cgroup_kill_to(cgroup: Cgroup) -> None:
    with open(cgroup.path / "cgroup.kill", "w") as handle:
        handle.write("1")


# ----------------------------------------------------------------------------- scoped halts

@dataclass
class ScopeSample:
    mechanism: str
    round: int
    warmup: bool
    answer_ms: float  # the API: the call's wall time; raw: first write -> every cgroup empty
    time_to_halt_ms: float | None = None  # the API: the daemon's figure


def launch_scope(daemon: Daemon, scope: str, agent_class: str, prefix: str
                 ) -> list[tuple[Cgroup, int, str]]:
    """The scope's agents launched through the API as one class, each with its workload up:
    (the run's cgroup, its init's pid, the agent's name) for each."""
    agents, processes = SCOPES[scope]
    launched: list[tuple[Cgroup, int, str]] = []
    for i in range(agents):
        name = f"{prefix}-{i}"
        view = daemon.client.run({"name": name, "class": agent_class, "profile": PROFILE,
                                  "command": workload(processes)})
        cgroup = Cgroup(f"{daemon.cgroup_parent.strip('/')}/{daemon.prefix}-{view['id']}")
        launched.append((cgroup, int(view["pid"]), name))
    for cgroup, pid, name in launched:
        wait_ready(cgroup, pid, processes, f"agent {name}")
    return launched


def halt_scope_api(daemon: Daemon, scope: str, round_index: int) -> tuple[float, float]:
    """Launch the scope's agents through the API, then kill them all in one call."""
    agent_class = f"bench{round_index}"
    launched = launch_scope(daemon, scope, agent_class, f"s{round_index}")
    target = {"class": agent_class} if scope == "class" else {"all": True}
    t0 = time.perf_counter()
    result = daemon.client.action("kill", target, reason=f"bench {scope} round {round_index}")
    answer_ms = (time.perf_counter() - t0) * 1000
    populated = [c.relative for c, _pid, _name in launched if c.exists() and c.populated()]
    if populated:
        raise RuntimeError(f"the API answered but {len(populated)} cgroups are populated")
    if scope == "global":
        # Every round's global halt is of its own 100 agents: this round's go from the
        # registry (a halt also marks and audits every idle agent it finds).
        daemon.client.action("reactivate", {"all": True}, reason="bench: next round")
        for _cgroup, _pid, name in launched:
            daemon.client.forget(name, reason="bench: next round")
    return answer_ms, float(result["time_to_halt_ms"])


def halt_scope_daemon_raw(daemon: Daemon, scope: str, round_index: int) -> float:
    """The daemon's own runs, launched as the API rounds launch them, killed without the API:
    the bench writes each run's `cgroup.kill` (global: the daemon's parent, where only its
    runs live) and waits for `populated 0` through files held open before the kill, as
    `halt_scope_raw` does. The agents' runs then end as the daemon sees any run end (an exit
    by signal), and the agents are forgotten through the API."""
    launched = launch_scope(daemon, scope, f"benchruns{round_index}", f"d{round_index}")
    cgroups = [cgroup.hold() for cgroup, _pid, _name in launched]
    parent = Cgroup(daemon.cgroup_parent.strip("/")).hold()
    try:
        answer_ms, confirmed = write_and_wait(scope, parent, cgroups)
    finally:
        parent.release()
        for cgroup in cgroups:
            cgroup.release()  # before the daemon's cleanup removes the directories
    if not confirmed:
        raise RuntimeError(f"daemon's runs, {scope}: cgroups still populated "
                           f"{CONFIRM_TIMEOUT:g}s after the kill")
    for _cgroup, _pid, name in launched:
        # The run's end is the daemon's to see: until then the agent still has its run.
        wait_for(functools.partial(_forgot, daemon, name), timeout=60.0, interval=0.05,
                 what=f"the daemon to see {name}'s run end and forget {name}")
    return answer_ms


def write_and_wait(scope: str, parent: Cgroup, cgroups: list[Cgroup]) -> tuple[float, bool]:
    """The raw side's kill, timed: `cgroup.kill` of the parent (global) or of each cgroup,
    then `populated 0` of every one awaited through their held files. (ms, all confirmed)."""
    t0 = time.perf_counter()
    if scope == "global":
        parent.kill()
        parent.wait_empty(CONFIRM_TIMEOUT)
    else:
        for cgroup in cgroups:
            cgroup.kill()
    confirmed = all(c.wait_empty(CONFIRM_TIMEOUT) for c in cgroups)
    return (time.perf_counter() - t0) * 1000, confirmed


def _forgot(daemon: Daemon, name: str) -> bool:
    try:
        daemon.client.forget(name, reason="bench: next round")
    except SupervisorError as exc:
        if exc.code == "agent_busy":  # its run's cleanup is not done yet
            return False
        raise
    return True


def halt_scope_raw(raw: RawRuntime, scope: str) -> float:
    """The same shape without the daemon: one write per container, or one to the parent."""
    agents, processes = SCOPES[scope]
    containers = [raw.launch(workload(processes)) for _ in range(agents)]
    for container in containers:
        assert container.pid is not None
        wait_ready(container.cgroup, container.pid, processes, container.container_id)
    # As the daemon does: each cgroup's files held open before the kill (the parent's too),
    # `cgroup.kill` written and `populated 0` awaited through them, the parent first.
    parent = Cgroup(raw.cgroup_parent).hold()
    for container in containers:
        container.cgroup.hold()
    try:
        answer_ms, confirmed = write_and_wait(scope, parent, [c.cgroup for c in containers])
    finally:
        parent.release()
    if not confirmed:
        raise RuntimeError(f"raw {scope}: cgroups still populated {CONFIRM_TIMEOUT:g}s after")
    for container in containers:
        raw.remove(container)  # releases the held files
    return answer_ms


def run_scopes(args: argparse.Namespace, daemon: Daemon, raw: RawRuntime) -> list[ScopeSample]:
    samples: list[ScopeSample] = []
    for round_index in range(args.warmup + args.iterations):
        warmup = round_index < args.warmup
        shift = round_index % len(SCOPE_MECHANISMS)  # each side goes first in turn
        order = SCOPE_MECHANISMS[shift:] + SCOPE_MECHANISMS[:shift]
        label = "warm-up" if warmup else f"round {round_index - args.warmup + 1}/{args.iterations}"
        print(f"  {label}: {', '.join(order)}", file=sys.stderr, flush=True)
        for mechanism in order:
            if mechanism == API_SCOPE:
                answer, halt = halt_scope_api(daemon, args.scope, round_index)
                samples.append(ScopeSample(mechanism, round_index, warmup, answer, halt))
            elif mechanism == RAW_SCOPE:
                samples.append(ScopeSample(mechanism, round_index, warmup,
                                           halt_scope_raw(raw, args.scope)))
            else:
                samples.append(ScopeSample(mechanism, round_index, warmup,
                                           halt_scope_daemon_raw(daemon, args.scope,
                                                                 round_index)))
    return samples


def scope_verdict(api: list[float], baseline: list[float], against: str) -> str:
    ratio = statistics.median(api) / statistics.median(baseline)
    outcome = "MET" if ratio <= TARGET_RATIO else "MISSED"
    return (f"target: API answer <= {TARGET_RATIO}x {against}: "
            f"{statistics.median(api):.1f} ms vs {statistics.median(baseline):.1f} ms = "
            f"{ratio:.2f}x -> {outcome}")


def report_scopes(args: argparse.Namespace, samples: list[ScopeSample]) -> dict[str, Any]:
    measured = [s for s in samples if not s.warmup]
    api = [s.answer_ms for s in measured if s.mechanism == API_SCOPE]
    halts = [s.time_to_halt_ms for s in measured
             if s.mechanism == API_SCOPE and s.time_to_halt_ms is not None]
    raw = [s.answer_ms for s in measured if s.mechanism == RAW_SCOPE]
    daemon_raw = [s.answer_ms for s in measured if s.mechanism == DAEMON_RAW_SCOPE]
    agents, processes = SCOPES[args.scope]
    print()
    print(f"scope {args.scope}: {agents} agents x {processes} processes, {len(api)} rounds")
    where = " (parent)" if args.scope == "global" else " (each run)"
    for label, values in ((f"{API_SCOPE}", api), ("API time_to_halt_ms", halts),
                          (RAW_SCOPE + where, raw), ("daemon's runs raw" + where, daemon_raw)):
        if values:
            print(f"  {label:28} median {statistics.median(values):9.1f} ms  "
                  f"min {min(values):9.1f}  max {max(values):9.1f}  "
                  f"values {', '.join(f'{v:.1f}' for v in values)}")
    summary: dict[str, Any] = {"scope": args.scope, "agents": agents, "processes": processes,
                               "api_answer_ms": api, "api_time_to_halt_ms": halts,
                               "raw_ms": raw, "daemon_runs_raw_ms": daemon_raw}
    if api and raw:
        summary["verdict"] = scope_verdict(api, raw, "raw cgroup.kill")
        print(summary["verdict"])
    if api and daemon_raw:
        # The "raw cgroup.kill of the same cgroups", literally: the daemon's own runs.
        summary["verdict_daemon_runs"] = scope_verdict(
            api, daemon_raw, "raw cgroup.kill of the daemon's own runs")
        print(summary["verdict_daemon_runs"])
    return summary


# ----------------------------------------------------------------------------- report

def machine_info(runc: str) -> dict[str, str]:
    version = subprocess.run([runc, "--version"], capture_output=True, text=True, check=False)
    cpu = cpu_model()
    return {
        "nproc": str(len(os.sched_getaffinity(0))),
        "cpu": cpu,
        "kernel": platform.release(),
        "cgroup_mode": detect_mode().value,
        "runc": version.stdout.splitlines()[0] if version.stdout else "?",
        "python": platform.python_version(),
    }


def summarize(samples: list[Sample], sizes: list[int],
              mechanisms: tuple[str, ...] = MECHANISMS) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for size in sizes:
        measured = [s for s in samples if s.processes == size and not s.warmup]
        raw = [s.time_to_halt_ms for s in measured if s.mechanism == RAW]
        raw_median = statistics.median(raw) if raw else None
        for mechanism in mechanisms:
            values = [s.time_to_halt_ms for s in measured if s.mechanism == mechanism]
            if not values:
                continue
            median = statistics.median(values)
            walls = [s.cli_wall_ms for s in measured
                     if s.mechanism == mechanism and s.cli_wall_ms is not None]
            rows.append({
                "processes": size, "mechanism": mechanism, "n": len(values),
                "median_ms": median, "p95_ms": nearest_rank(values, 0.95),
                "min_ms": min(values), "max_ms": max(values),
                "ratio_vs_raw": median / raw_median if raw_median else None,
                "cli_wall_median_ms": statistics.median(walls) if walls else None,
                "cli_wall_p95_ms": nearest_rank(walls, 0.95) if walls else None,
            })
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}"

    headers = ["processes", "mechanism", "n", "median ms", "p95 ms", "min", "max", "x raw",
               "cli wall med", "cli wall p95"]
    table = [[str(r["processes"]), r["mechanism"], str(r["n"]), ms(r["median_ms"]),
              ms(r["p95_ms"]), ms(r["min_ms"]), ms(r["max_ms"]),
              "-" if r["ratio_vs_raw"] is None else f"{r['ratio_vs_raw']:.2f}x",
              ms(r["cli_wall_median_ms"]), ms(r["cli_wall_p95_ms"])] for r in rows]
    widths = [max(len(h), *(len(row[i]) for row in table)) for i, h in enumerate(headers)]
    left = {1}  # the mechanism column reads better left-aligned

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i in left else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths, strict=True)))

    print(line(headers))
    print("  ".join("-" * w for w in widths))
    previous = None
    for row, cells in zip(rows, table, strict=True):
        if previous is not None and row["processes"] != previous:
            print()
        previous = row["processes"]
        print(line(cells))


def _median_at_target(rows: list[dict[str, Any]], mechanism: str) -> float | None:
    for row in rows:
        if row["processes"] == TARGET_SIZE and row["mechanism"] == mechanism:
            return float(row["median_ms"])
    return None


def docker_verdict(rows: list[dict[str, Any]]) -> str:
    ours, engine = _median_at_target(rows, AGENTCTL), _median_at_target(rows, DOCKER_KILL)
    if ours is None or engine is None:
        return f"target: not evaluated ({TARGET_SIZE} processes not among --sizes)"
    speedup = engine / ours
    outcome = "MET" if speedup >= DOCKER_TARGET_SPEEDUP else "MISSED"
    return (f"target: median agentctl kill time_to_halt at {TARGET_SIZE} processes >= "
            f"{DOCKER_TARGET_SPEEDUP:g}x faster than docker kill + wait: {ours:.2f} ms vs "
            f"{engine:.2f} ms = {speedup:.1f}x -> {outcome}")


def verdict(rows: list[dict[str, Any]]) -> str:
    median = functools.partial(_median_at_target, rows)
    ours, raw = median(AGENTCTL), median(RAW)
    if ours is None or raw is None:
        return f"target: not evaluated ({TARGET_SIZE} processes not among --sizes)"
    ratio = ours / raw
    outcome = "MET" if ratio <= TARGET_RATIO else "MISSED"
    return (f"target: median agentctl kill time_to_halt at {TARGET_SIZE} processes <= "
            f"{TARGET_RATIO}x raw cgroup.kill: {ours:.2f} ms vs {raw:.2f} ms = {ratio:.2f}x "
            f"-> {outcome}")


# ----------------------------------------------------------------------------- main

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--iterations", type=int, default=20,
                        help="measured samples per mechanism and size (default 20)")
    parser.add_argument("--sizes", default="1,200,1000",
                        help="comma-separated process counts (default 1,200,1000)")
    parser.add_argument("--warmup", type=int, default=1,
                        help="discarded rounds before measuring (default 1)")
    parser.add_argument("--json", type=Path, help="also write machine info, summary and every "
                                                  "sample (warm-up included) to this file")
    parser.add_argument("--runc", default="runc", help="runc binary (default: runc on PATH)")
    parser.add_argument("--runtime", choices=("runc", "docker"), default="runc",
                        help="docker: the daemon on the docker runtime, against docker kill "
                             "(API) + wait and docker stop -t 0 on identical containers")
    parser.add_argument("--scope", choices=("agent", "class", "global"), default="agent",
                        help="class: 10 agents x 10 processes in one kill; global: 100 x 20 "
                             "(runc only); agent (default): one agent per kill, by size")
    args = parser.parse_args(argv)
    if args.scope != "agent" and args.runtime != "runc":
        parser.error("--scope class/global compares against raw runc containers: runc only")
    try:
        args.sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    except ValueError:
        parser.error(f"--sizes {args.sizes!r}: use comma-separated integers, e.g. 1,200,1000")
    if not args.sizes or min(args.sizes) < 1 or max(args.sizes) > 4000:
        parser.error("--sizes: each size must be between 1 and 4000 (the profile allows 4096)")
    if args.iterations < 1 or args.warmup < 0:
        parser.error("--iterations must be >= 1 and --warmup >= 0")
    return args


def write_profile(daemon: Daemon) -> None:
    """The default profile with room for 1000+ processes: 4096 pids, 2 GiB."""
    text = (REPO / "sandbox_profiles" / "default.toml").read_text()
    for key, value in (("description", '"the default sandbox with 2 GiB for the benchmark"'),
                       ("memory", '"2G"'), ("pids", "4096")):
        text, count = re.subn(rf"^{key} = .*$", f"{key} = {value}", text, flags=re.MULTILINE)
        if count != 1:
            raise RuntimeError(f"default.toml: expected one '{key} = ' line, found {count}")
    (daemon.root / "profiles" / f"{PROFILE}.toml").write_text(text)


def cgroup_trees(relative: str) -> list[Path]:
    """`relative` in the v2 tree and, on hybrid hosts, in every v1 hierarchy."""
    return [unified_root() / relative, *(h / relative for h in v1_hierarchies())]


def become_subreaper() -> None:
    """`runc run --detach` exits and orphans the container's init; as subreaper we inherit it
    and reap it instead of leaving a zombie to whatever the host's init is."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


def run_benchmark(args: argparse.Namespace, daemon: Daemon, raw: RawRuntime | DockerRaw
                  ) -> list[Sample]:
    samples: list[Sample] = []
    rounds = args.warmup + args.iterations
    mechanisms = DOCKER_MECHANISMS if isinstance(raw, DockerRaw) else MECHANISMS
    for round_index in range(rounds):
        warmup = round_index < args.warmup
        iteration = round_index - args.warmup
        shift = round_index % len(mechanisms)
        order = mechanisms[shift:] + mechanisms[:shift]
        label = "warm-up" if warmup else f"iteration {iteration + 1}/{args.iterations}"
        print(f"  {label}: {', '.join(order)}", file=sys.stderr, flush=True)
        for size in args.sizes:
            for mechanism in order:
                sample = Sample(mechanism, size, iteration, warmup, 0.0)
                if mechanism == AGENTCTL:
                    name = f"bench-{size}-{round_index}"
                    sample.time_to_halt_ms, sample.cli_wall_ms = halt_with_agentctl(
                        daemon, size, name)
                elif isinstance(raw, DockerRaw):
                    sample.time_to_halt_ms = raw.halt(size, mechanism)
                elif mechanism == RAW:
                    sample.time_to_halt_ms, sample.netns_remove_ms = halt_raw(
                        raw, size, write_cgroup_kill)
                else:
                    sample.time_to_halt_ms, sample.netns_remove_ms = halt_raw(
                        raw, size, raw.runc_kill_all)
                samples.append(sample)
    return samples


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("time_to_halt: needs root (sudo .venv/bin/python bench/time_to_halt.py)",
              file=sys.stderr)
        return 2
    if shutil.which(args.runc) is None:
        print(f"time_to_halt: runc binary {args.runc!r} not found", file=sys.stderr)
        return 2

    INTERRUPTS.install()
    become_subreaper()
    info = machine_info(args.runc)
    print("machine: " + ", ".join(f"{k}={v}" for k, v in info.items()))
    if args.scope != "agent":
        print(f"scope {args.scope} {SCOPES[args.scope]}, {args.iterations} rounds "
              f"(+{args.warmup} warm-up), the API and both raw baselines in turn first", flush=True)
    else:
        print(f"sizes {args.sizes}, {args.iterations} iterations (+{args.warmup} warm-up) per "
              f"mechanism and size", flush=True)

    tmp_root = Path(tempfile.mkdtemp(prefix="as-bench-", dir="/tmp"))
    tmp_root.chmod(0o755)  # the sandbox's mapped uids must traverse to the bundles' rootfs
    # Production-like logging: the test helper's debug level would be on the kill path.
    daemon = new_daemon(tmp_root, daemon={"log_level": "info"}, **runtime_config(args.runtime))
    top_parents = cgroup_trees(daemon.cgroup_parent.strip("/").split("/")[0])
    created_top = [tree for tree in top_parents if not tree.exists()]
    raw: RawRuntime | DockerRaw | None = None
    samples: list[Sample] = []
    scope_samples: list[ScopeSample] = []
    interrupted = False
    try:
        write_profile(daemon)
        profile = load_profile(PROFILE, [daemon.root / "profiles"])
        daemon.start()
        if args.runtime == "docker":
            raw = DockerRaw(daemon, profile)
        else:
            raw = RawRuntime(
                workdir=tmp_root / "raw", cgroup_parent=daemon.cgroup_parent.strip("/") + (
                    "-raw" if args.scope != "agent" else ""),
                tag=daemon.prefix, profile=profile,
                seccomp=load_seccomp(profile.seccomp.profile), runc=args.runc,
            )
            (raw.workdir / "bundles").mkdir(parents=True)
            raw.workdir.chmod(0o755)
            (raw.workdir / "bundles").chmod(0o755)
        if args.scope != "agent":
            assert isinstance(raw, RawRuntime)
            scope_samples = run_scopes(args, daemon, raw)
        else:
            samples = run_benchmark(args, daemon, raw)
    except KeyboardInterrupt:
        interrupted = True
        print("\ninterrupted; cleaning up", file=sys.stderr)
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # let the cleanup finish
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        problems = raw.remove_all() if isinstance(raw, RawRuntime) else []
        if isinstance(raw, RawRuntime) and args.scope != "agent":
            problems += Cgroup(raw.cgroup_parent).remove(strict=False)
        if isinstance(raw, DockerRaw):
            raw.close()
        code = daemon.stop()
        if args.scope != "agent":  # where each scoped answer's time went, as the daemon saw it
            for line in daemon.logs().splitlines():
                if (" agents, " in line and "audit rows" in line) or \
                        "sweep of " in line or "/v1/actions/kill: handled" in line or \
                        "audit writer" in line or "audit: observers" in line:
                    print(f"  daemon: {line.split(': ', 1)[-1]}")
        if code not in (0, None):
            problems.append(f"daemon exited {code}; log: {daemon.log_path}")
        if residue := daemon.residue():
            problems.append(f"left on the host: {residue}")
        daemon.cleanup_host()
        for tree in created_top:  # the shared test parent, only if this run created it
            with contextlib.suppress(OSError):
                tree.rmdir()
        if daemon.cgroup_dir().exists():
            problems.append(f"cgroup {daemon.cgroup_dir()} could not be removed")
        with contextlib.suppress(ChildProcessError):
            while os.waitpid(-1, os.WNOHANG)[0] > 0:  # any orphan we inherited as subreaper
                pass
        if problems:
            print("cleanup problems:\n  " + "\n  ".join(problems), file=sys.stderr)
            print(f"daemon log kept in {daemon.log_path}", file=sys.stderr)
        else:
            shutil.rmtree(tmp_root, ignore_errors=True)
    if interrupted:
        return 130
    if args.scope != "agent":
        summary = report_scopes(args, scope_samples)
        if args.json is not None:
            args.json.write_text(json.dumps({
                "machine": info, "summary": summary, "warmup": args.warmup,
                "samples": [s.__dict__ for s in scope_samples]}, indent=1) + "\n")
            print(f"samples written to {args.json}")
        return 0

    docker = args.runtime == "docker"
    rows = summarize(samples, args.sizes, DOCKER_MECHANISMS if docker else MECHANISMS)
    print()
    print_table(rows)
    print()
    print("time_to_halt: agentctl kill = the daemon's time_to_halt_ms (mark killed -> cgroup empty "
          "-> netns removed);")
    print("  raw mechanisms = kill issued -> populated 0 (netns removal not included); "
          "cli wall = whole agentctl kill command")
    netns_ms = [s.netns_remove_ms for s in samples
                if not s.warmup and s.netns_remove_ms is not None]
    if netns_ms:
        print(f"  (removing a netns, the daemon's step 5, took median "
              f"{statistics.median(netns_ms):.2f} ms in the raw runs)")
    print(verdict(rows))
    if docker:
        print(f"  {DOCKER_KILL}: the API's kill, then its wait until the engine reports the "
              f"container stopped; {DOCKER_STOP}: the API's stop with timeout 0")
        print(docker_verdict(rows))
    if args.json is not None:
        args.json.write_text(json.dumps({
            "machine": info, "sizes": args.sizes, "iterations": args.iterations,
            "warmup": args.warmup, "summary": rows, "verdict": verdict(rows),
            "runtime": args.runtime,
            "samples": [s.__dict__ for s in samples],
        }, indent=1) + "\n")
        print(f"samples written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
