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
