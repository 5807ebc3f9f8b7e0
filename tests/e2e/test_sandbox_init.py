"""Every sandbox runs Debian's tini as its PID 1 (supervisor/runtime/init.py), in both runtimes:
the agent is not PID 1, a handler-less shell or Python agent ends by SIGTERM on `stop --grace`
and on Ctrl-C at `agentctl run`, orphaned grandchildren are reaped, and a daemon without the
init refuses to start (fail closed). Needs root, runc and (for the docker cases) dockerd."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import BOTH_RUNTIMES
from tests.support.daemon import Daemon, new_daemon, wait_for

# Python from the host's /usr, bound read-only in both runtimes' host roots.
ORPHANER = """
import os, sys, time
child = os.fork()
if child == 0:
    if os.fork() == 0:
        time.sleep(0.2)
        os._exit(0)
    os._exit(0)
os.waitpid(child, 0)
print("orphaned", flush=True)
time.sleep(1000)
"""


def _states(pids: list[int]) -> dict[int, str]:
    found = {}
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except FileNotFoundError:
            continue
        found[pid] = stat.rpartition(")")[2].split()[0]
    return found


def _wait_run_ended(daemon: Daemon, run_id: str, timeout: float = 60) -> dict[str, object]:
    def ended() -> dict[str, object] | None:
        view: dict[str, object] = daemon.client.get_run(run_id)
        return view if view.get("state") not in ("running", "starting", "paused") else None

    result: dict[str, object] = wait_for(ended, timeout=timeout, what=f"run {run_id} ended")
    return result


HANDLERLESS = [
    ["/bin/sh", "-c", "echo started; sleep 1000"],
    ["/usr/bin/python3", "-c", "import time; print('started', flush=True); time.sleep(1000)"],
]


@BOTH_RUNTIMES
def test_the_agent_runs_under_tini_which_forwards_sigterm_and_reaps_orphans(
        daemon: Daemon) -> None:
    result = daemon.agentctl(
        "run", "--name", "pid", "--", "/bin/sh", "-c",
        "echo pid=$$; tr '\\0' ' ' < /proc/1/cmdline; echo; cat /proc/1/comm")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] != "pid=1" and lines[0].startswith("pid="), lines
    assert lines[1].split()[:5] == ["/dev/init", "-g", "--", "/bin/sh", "-c"], lines
    assert lines[2] == "init", lines

    # `stop --grace`: a handler-less shell or Python agent ends by the SIGTERM itself. The
    # grace is far longer than any test: had SIGTERM not ended the agent, the kill path would
    # come only after it, and the run would end 137 (killed), not 143.
    for command in HANDLERLESS:
        view = daemon.agentctl_json("run", "--detach", "--name", "calm", "--", *command)
        run_id = view["id"]
        wait_for(lambda: "started" in daemon.agentctl("logs", run_id).stdout,  # noqa: B023
                 timeout=60, what="the agent started")
        stopped = daemon.agentctl("stop", "calm", "--grace", "600s", "--reason", "graceful")
        assert stopped.returncode == 0, stopped.stderr
        run = _wait_run_ended(daemon, view["id"])
        assert run["exit_code"] == 128 + signal.SIGTERM, run
        assert daemon.clean() == {}

    # A Python agent that never waits for strangers orphans a grandchild: tini adopts and
    # reaps it, so only tini and the agent stay, neither a zombie.
    view = daemon.agentctl_json("run", "--detach", "--name", "orphaner", "--",
                                "/usr/bin/python3", "-c", ORPHANER)
    wait_for(lambda: "orphaned" in daemon.agentctl("logs", view["id"]).stdout, timeout=60,
             what="the grandchild orphaned")

    def settled() -> bool:
        states = _states(daemon.agent_pids())
        return len(states) == 2 and "Z" not in states.values()

    wait_for(settled, timeout=30, what="the orphan reaped")
    time.sleep(0.5)  # long after the grandchild's own exit: still no zombie
    assert settled(), _states(daemon.agent_pids())
    daemon.agentctl("kill", "orphaner", "--reason", "done", check=True)
    assert daemon.clean() == {}


@BOTH_RUNTIMES
def test_ctrl_c_at_agentctl_run_ends_a_handlerless_agent_gracefully(daemon: Daemon) -> None:
    env = {**os.environ, "AGENT_SUPERVISOR_SOCKET": str(daemon.socket)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "supervisor.cli", "run", "--name", "ctrlc", "--", "/bin/sh", "-c",
         "echo started; sleep 1000"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, cwd=str(daemon.root))
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "started"
        proc.send_signal(signal.SIGINT)
        _out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # agentctl asks for a 5 s graceful stop: SIGTERM through tini ends the shell and its sleep.
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert daemon.clean() == {}


def test_a_daemon_without_the_init_refuses_to_start(tmp_root: Path) -> None:
    daemon = new_daemon(tmp_root, sandbox={"init": str(tmp_root / "no-tini")})
    try:
        with pytest.raises(RuntimeError, match="daemon exited 10") as refused:
            daemon.start()
        assert "no-tini" in str(refused.value) and "missing" in str(refused.value)
        assert daemon.residue() == {}
    finally:
        daemon.stop()
        daemon.cleanup_host()
