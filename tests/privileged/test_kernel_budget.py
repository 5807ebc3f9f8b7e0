"""Kernel resources an agent is charged to cannot be taken from the host: inotify instances come
out of the run's own user-namespace limit, not host root's pool, and all runs' pids together stay
under the parent cgroup's budget. Real agents attack from inside real runc sandboxes (and the
Docker engine for the pids budget). Needs root."""

from __future__ import annotations

import ctypes
import json
import os
import signal
from pathlib import Path
from typing import Any

from supervisor.config import ResourcesSection
from supervisor.sandbox.cgroups import CGROUP_ROOT, CgroupMode, detect_mode, unified_root
from tests.conftest import BOTH_RUNTIMES
from tests.support.daemon import Daemon, running_daemon, runtime_config, wait_for

PYTHON = "/usr/bin/python3"

# Take every inotify instance the kernel will give, report how many and why it stopped, read
# the namespace's limits, try to raise one, then hold them all.
INOTIFY_HOG = r"""
import ctypes, json, os, time
libc = ctypes.CDLL(None, use_errno=True)
held, error = [], 0
for _ in range(100000):
    fd = libc.inotify_init1(0)
    if fd < 0:
        error = ctypes.get_errno()
        break
    held.append(fd)
limits = {name: open("/proc/sys/user/" + name).read().strip()
          for name in ("max_inotify_instances", "max_user_namespaces", "max_net_namespaces")}
try:
    open("/proc/sys/user/max_inotify_instances", "w").write("100000")
    raised = "yes"
except OSError as exc:
    raised = exc.errno
print(json.dumps({"held": len(held), "errno": error, "limits": limits, "raised": raised}),
      flush=True)
time.sleep(600)
"""

# On SIGUSR1 (once every agent runs), fork up to N children that sleep; report how many it got
# and the errno that stopped it.
FORKER = r"""
import json, os, signal, sys, time
signal.signal(signal.SIGUSR1, lambda *_: None)
signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGUSR1})  # a runtime may hand it blocked
print("ready", flush=True)
signal.pause()
children, error = 0, 0
for _ in range(int(sys.argv[1])):
    try:
        pid = os.fork()
    except OSError as exc:
        error = exc.errno
        break
    if pid == 0:
        time.sleep(600)
        os._exit(0)
    children += 1
print(json.dumps({"children": children, "errno": error}), flush=True)
time.sleep(600)
"""

EMFILE, EAGAIN = 24, 11


def _last_json(path: Path) -> dict[str, Any] | None:
    if not path.exists():
        return None
    lines = [line for line in path.read_text().splitlines() if line.startswith("{")]
    return json.loads(lines[-1]) if lines else None


def _run_log(daemon: Daemon, run_id: str) -> Path:
    return daemon.root / "state" / "logs" / f"{run_id}.log"


def _host_root_inotify() -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.inotify_init1(0)
    if fd < 0:
        return -ctypes.get_errno()
    os.close(fd)
    return fd


def test_agents_exhausting_inotify_leave_host_root_its_own(daemon: Daemon) -> None:
    per_run = ResourcesSection().run_inotify_instances
    runs = []
    for index in range(3):
        view = daemon.agentctl_json("run", "--detach", "--name", f"inotify{index}", "--",
                                    PYTHON, "-c", INOTIFY_HOG)
        runs.append(view["id"])
    reports = []
    for run_id in runs:
        wait_for(lambda run_id=run_id: _last_json(_run_log(daemon, run_id)), timeout=60,
                 what="the agent to take every inotify instance it can")
        reports.append(_last_json(_run_log(daemon, run_id)))
    for report in reports:
        assert report is not None
        # Stopped by its own namespace's limit, which it cannot raise.
        assert report["held"] == per_run and report["errno"] == EMFILE, report
        assert report["limits"]["max_inotify_instances"] == str(per_run)
        assert report["limits"]["max_user_namespaces"] == "0"
        assert report["limits"]["max_net_namespaces"] == "0"
        assert report["raised"] != "yes"
    # While they hold everything they could get, host root still gets its own.
    assert _host_root_inotify() >= 0
    for index in range(3):
        daemon.agentctl("kill", f"inotify{index}", "--reason", "test over", check=True)


def _parent_pids(daemon: Daemon) -> tuple[Path, Path]:
    """(pids.max, pids.current) of the daemon's runs' parent cgroup."""
    parent = daemon.cgroup_parent.strip("/")
    if detect_mode() is CgroupMode.HYBRID:
        base = CGROUP_ROOT / "pids" / parent
    else:
        base = unified_root() / parent
    return base / "pids.max", base / "pids.current"


@BOTH_RUNTIMES
def test_many_fork_bombs_stay_inside_the_runs_budget(tmp_root: Path, runtime: str) -> None:
    budget, agents, forks = 120, 3, 80  # 240 wanted, 120 allowed in total
    with running_daemon(tmp_root, resources={"runs_pids_max": budget},
                        **runtime_config(runtime)) as daemon:
        max_file, current_file = _parent_pids(daemon)
        runs = [daemon.agentctl_json("run", "--detach", "--name", f"forker{index}", "--",
                                     PYTHON, "-c", FORKER, str(forks))["id"]
                for index in range(agents)]
        for run_id in runs:
            wait_for(lambda run_id=run_id: _run_log(daemon, run_id).exists()
                     and "ready" in _run_log(daemon, run_id).read_text(),
                     timeout=60, what="every agent to be ready")
        # Written at start and again at each launch (a parent left empty may be removed).
        assert max_file.read_text().strip() == str(budget)
        for pid in daemon.agent_pids():  # all at once, like a coordinated fork storm
            os.kill(pid, signal.SIGUSR1)
        reports = []
        for run_id in runs:
            wait_for(lambda run_id=run_id: _last_json(_run_log(daemon, run_id)), timeout=120,
                     what="the agent to fork all it can")
            reports.append(_last_json(_run_log(daemon, run_id)))
        assert int(current_file.read_text()) <= budget
        total = sum(r["children"] + 1 for r in reports if r is not None)
        assert total <= budget, reports
        # The budget, not each run's own limit (4096), is what stopped them.
        assert any(r is not None and r["errno"] == EAGAIN for r in reports), reports
        for index in range(agents):
            daemon.agentctl("kill", f"forker{index}", "--reason", "test over", check=True)


# On SIGUSR1, take memory 8 MiB at a time (every page touched, so it is charged), reporting
# each step, up to N MiB; then hold it.
MEMORY_HOG = r"""
import json, signal, sys, time
signal.signal(signal.SIGUSR1, lambda *_: None)
signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGUSR1})
print("ready", flush=True)
signal.pause()
held = []
for step in range(int(sys.argv[1]) // 8):
    block = bytearray(8 << 20)
    block[::4096] = b"x" * len(range(0, 8 << 20, 4096))
    held.append(block)
    print(json.dumps({"mib": 8 * (step + 1)}), flush=True)
print(json.dumps({"done": True}), flush=True)
time.sleep(600)
"""


def _parent_memory(daemon: Daemon) -> tuple[Path, Path]:
    """(limit, peak usage) files of the daemon's runs' parent memory cgroup."""
    parent = daemon.cgroup_parent.strip("/")
    if detect_mode() is CgroupMode.HYBRID:
        base = CGROUP_ROOT / "memory" / parent
        return base / "memory.limit_in_bytes", base / "memory.max_usage_in_bytes"
    base = unified_root() / parent
    return base / "memory.max", base / "memory.peak"


def test_memory_hogs_together_stay_inside_the_runs_budget(tmp_root: Path) -> None:
    # Each run may take 1 GiB on its own (its profile); three that each want 160 MiB
    # (480 MiB) share a 256 MiB budget, and the host keeps the rest.
    budget, agents, want_mib = 256 << 20, 3, 160
    with running_daemon(tmp_root, resources={"runs_memory_max": budget}) as daemon:
        limit_file, peak_file = _parent_memory(daemon)
        runs = [daemon.agentctl_json("run", "--detach", "--name", f"hog{index}", "--",
                                     PYTHON, "-c", MEMORY_HOG, str(want_mib))["id"]
                for index in range(agents)]
        for run_id in runs:
            wait_for(lambda run_id=run_id: _run_log(daemon, run_id).exists()
                     and "ready" in _run_log(daemon, run_id).read_text(),
                     timeout=60, what="every agent to be ready")
        assert int(limit_file.read_text()) == budget
        for pid in daemon.agent_pids():  # all at once
            os.kill(pid, signal.SIGUSR1)

        def settled() -> bool:
            # Each agent either holds all it wanted or is gone (the kernel's OOM killer,
            # inside the budget: the run ends, nothing outside it is touched).
            for index, run_id in enumerate(runs):
                done = '"done"' in _run_log(daemon, run_id).read_text()
                if not done and daemon.client.agent(f"hog{index}")["run"]["ended_at"] is None:
                    return False
            return True

        wait_for(settled, timeout=120, what="every hog to finish or be OOM-killed")
        assert int(peak_file.read_text()) <= budget
        finished = [run_id for run_id in runs if '"done"' in _run_log(daemon, run_id).read_text()]
        # 480 MiB wanted, 256 allowed: at least one was stopped by the budget, not by its own
        # 1 GiB limit.
        assert len(finished) < agents, finished
        runs_seen = [daemon.client.agent(f"hog{index}")["run"] for index in range(agents)]
        # The kernel's OOM kill ends the run like any SIGKILL.
        assert any(r["ended_at"] is not None and r["exit_code"] == 137 for r in runs_seen), (
            runs_seen)
        for index in range(agents):
            daemon.agentctl("kill", f"hog{index}", "--reason", "test over")
