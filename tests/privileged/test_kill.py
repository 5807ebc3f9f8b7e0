"""The kill path against real processes: a hostile 200-process agent leaves nothing behind,
pause really freezes, scopes touch exactly the agents they name; on runc and on Docker.
Needs root (and dockerd for docker)."""

from __future__ import annotations

import os
import select
import time
from pathlib import Path

import psutil

from supervisor.sandbox.cgroups import Cgroup
from supervisor.sandbox.mounts import is_mountpoint
from tests.conftest import BOTH_RUNTIMES
from tests.support.daemon import Daemon, wait_for

pytestmark = BOTH_RUNTIMES

# Every process double-forks into its own session and ignores SIGTERM/SIGINT/SIGHUP: only a
# kill that does not depend on process trees, sessions or signal handlers gets them all.
HOSTILE = r"""
import os, signal, sys, time
for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
    signal.signal(s, signal.SIG_IGN)
def hide():
    if os.fork():
        return
    os.setsid()
    if os.fork():
        os._exit(0)
    while True:
        time.sleep(1000)
for _ in range(int(sys.argv[1])):
    hide()
print("spawned", flush=True)
while True:
    time.sleep(1000)
"""


def _run_cgroup(daemon: Daemon, agent: str) -> Cgroup:
    view = daemon.client.agent(agent)
    run = view["run"]
    relative = f"{daemon.cgroup_parent.strip('/')}/{daemon.prefix}-{run['id']}"
    return Cgroup(relative)


def test_kill_leaves_zero_processes_of_a_hostile_200_process_agent(daemon: Daemon) -> None:
    daemon.agentctl("run", "--detach", "--name", "hostile", "--", "/usr/bin/python3", "-c",
                    HOSTILE, "199", check=True)
    cgroup = _run_cgroup(daemon, "hostile")
    wait_for(lambda: len(cgroup.pids()) >= 200, timeout=60, what="200 processes")
    pids = cgroup.pids()
    assert len(pids) >= 200
    # Processes sit in many sessions, so no process-group or session kill would reach them all.
    sessions = {os.getsid(p) for p in pids[:50]}
    assert len(sessions) > 10
    # A pidfd names its process, not its number: after the kill a number may already belong
    # to another process on a busy host (pid_max is 32768 here; it failed so once).
    pidfds = {p: os.pidfd_open(p) for p in pids}
    try:
        result = daemon.agentctl_json("kill", "hostile", "--reason", "hostile test")
        [entry] = result["results"]
        assert entry["new_state"] == "killed"
        assert entry["time_to_halt_ms"] > 0

        # The kernel says the cgroup is gone or empty, and none of the processes is alive on
        # the host (a pidfd polls readable once its process has exited). The kernel leaves
        # the cgroup (cgroup_exit) before it reports the exit (exit_notify, behind the
        # tasklist lock that 200 dying processes contend for), so a process may still be in
        # between at the answer: past the point of running any code of its own, but not yet
        # readable. A process that is alive never becomes readable, and fails the test.
        assert not cgroup.exists() or not cgroup.populated()
        poller = select.poll()
        for fd in pidfds.values():
            poller.register(fd, select.POLLIN)
        exited: set[int] = set()
        deadline = time.monotonic() + 10
        while len(exited) < len(pidfds) and time.monotonic() < deadline:
            exited |= {fd for fd, _events in poller.poll(100)}
        alive = [p for p, fd in pidfds.items() if fd not in exited]
    finally:
        for fd in pidfds.values():
            os.close(fd)
    assert alive == []
    assert daemon.clean() == {}
    view = daemon.client.agent("hostile")
    assert view["state"] == "killed"
    assert view["run"]["exit_code"] == 137
    assert view["time_to_halt_ms"] == entry["time_to_halt_ms"]
    # A killed agent stays down until reactivated.
    again = daemon.agentctl("run", "--name", "hostile", "--", "true")
    assert again.returncode == 4 and "agent_killed" in again.stderr
    daemon.agentctl("reactivate", "hostile", "--reason", "test over", check=True)
    assert daemon.agentctl("run", "--name", "hostile", "--", "true").returncode == 0


def _cpu_usec(cgroup: Cgroup) -> int:
    for line in (cgroup.path / "cpu.stat").read_text().splitlines():
        key, value = line.split()
        if key == "usage_usec":
            return int(value)
    raise AssertionError("no usage_usec in cpu.stat")


def test_pause_freezes_and_resume_thaws(daemon: Daemon) -> None:
    daemon.agentctl("run", "--detach", "--name", "spinner", "--", "/bin/sh", "-c",
                    "while :; do :; done", check=True)
    cgroup = _run_cgroup(daemon, "spinner")
    wait_for(lambda: _cpu_usec(cgroup) > 50_000, what="the spinner to burn CPU")

    daemon.agentctl("pause", "spinner", "--reason", "look closer", check=True)
    assert cgroup.events()["frozen"] == "1"
    frozen_at = _cpu_usec(cgroup)
    time.sleep(0.5)
    assert _cpu_usec(cgroup) == frozen_at, "a frozen agent must not consume CPU"
    assert daemon.client.agent("spinner")["state"] == "paused"

    daemon.agentctl("resume", "spinner", check=True)
    wait_for(lambda: _cpu_usec(cgroup) > frozen_at + 50_000, what="CPU time to grow again")
    assert cgroup.events()["frozen"] == "0"

    # Killing a paused agent works too: SIGKILL reaches frozen tasks in cgroup v2.
    daemon.agentctl("pause", "spinner", check=True)
    daemon.agentctl("kill", "spinner", "--reason", "test over", check=True)
    assert not cgroup.exists() or not cgroup.populated()


def _states(daemon: Daemon) -> dict[str, str]:
    return {a["name"]: a["state"] for a in daemon.client.agents()["agents"]}


def test_class_and_global_scopes_touch_exactly_their_agents(daemon: Daemon) -> None:
    for name, cls in (("a1", "alpha"), ("a2", "alpha"), ("b1", "beta"), ("c1", "gamma")):
        daemon.agentctl("run", "--detach", "--name", name, "--class", cls, "--", "sleep", "600",
                        check=True)

    daemon.agentctl("pause", "--class", "alpha", "--reason", "test over", check=True)
    assert _states(daemon) == {"a1": "paused", "a2": "paused", "b1": "active", "c1": "active"}
    daemon.agentctl("resume", "--class", "alpha", "--reason", "test over", check=True)
    assert set(_states(daemon).values()) == {"active"}

    result = daemon.agentctl_json("kill", "--class", "alpha", "--reason", "alpha misbehaves")
    assert sorted(r["agent"] for r in result["results"]) == ["a1", "a2"]
    assert _states(daemon) == {"a1": "killed", "a2": "killed", "b1": "active", "c1": "active"}
    # Empty at the answer; their directories go with the cleanup that follows it.
    assert len([c for c in daemon.cgroups() if c.populated()]) == 2
    wait_for(lambda: len(daemon.run_cgroups()) == 2, what="the killed runs' cgroups removed")

    daemon.agentctl("pause", "--all", "--reason", "test over", check=True)
    assert _states(daemon) == {"a1": "killed", "a2": "killed", "b1": "paused", "c1": "paused"}

    result = daemon.agentctl_json("kill", "--all", "--reason", "global halt drill")
    assert result["global_halt"] is True
    assert set(_states(daemon).values()) == {"killed"}
    assert all(not cgroup.populated() for cgroup in daemon.cgroups())
    blocked = daemon.agentctl("run", "--name", "newcomer", "--", "true")
    assert blocked.returncode == 4 and "global_halt" in blocked.stderr

    daemon.agentctl("reactivate", "--all", "--reason", "all clear", check=True)
    assert set(_states(daemon).values()) == {"idle"}
    assert daemon.agentctl("run", "--name", "newcomer", "--", "true").returncode == 0


def _log(daemon: Daemon, agent: str) -> str:
    return daemon.agentctl("logs", agent, check=True).stdout


def test_a_sweeps_runs_catch_up_after_its_answer(daemon: Daemon) -> None:
    """A class halt hushes what of the daemon would wake on its runs' deaths (their inits'
    exit watchers, seccomp fds, output drains) until after its answer: each run still ends
    with its whole output in its log, the SIGKILL status, and its init reaped (no zombie
    left under the daemon) by its cleanup."""
    names = ("s1", "s2", "s3")
    for name in names:
        daemon.agentctl("run", "--detach", "--name", name, "--class", "swept", "--", "sh",
                        "-c", f"echo last words of {name}; exec sleep 600", check=True)
    for name in names:
        wait_for(lambda name=name: f"last words of {name}" in _log(daemon, name),
                 timeout=30, what=f"{name}'s output")
    result = daemon.agentctl_json("kill", "--class", "swept", "--reason", "sweep test")
    assert sorted(r["agent"] for r in result["results"]) == list(names)
    wait_for(lambda: not daemon.run_cgroups(), timeout=30, what="the runs' cleanups")
    assert daemon.proc is not None
    daemon_process = psutil.Process(daemon.proc.pid)

    def zombies() -> list[int]:
        return [child.pid for child in daemon_process.children()
                if child.status() == psutil.STATUS_ZOMBIE]

    wait_for(lambda: not zombies(), timeout=30, what="the killed runs' inits reaped")
    for name in names:
        view = daemon.client.agent(name)
        assert view["state"] == "killed" and view["run"]["exit_code"] == 137
        assert _log(daemon, name).strip() == f"last words of {name}"
    assert daemon.clean() == {}


def test_fallback_kill_without_cgroup_kill_empties_the_cgroup(daemon: Daemon) -> None:
    """The freeze + SIGKILL-each-pid + thaw path for kernels without cgroup.kill."""
    daemon.agentctl("run", "--detach", "--name", "oldkernel", "--", "/usr/bin/python3", "-c",
                    HOSTILE, "49", check=True)
    cgroup = _run_cgroup(daemon, "oldkernel")
    wait_for(lambda: len(cgroup.pids()) >= 50, timeout=30, what="50 processes")
    assert cgroup.kill(force_fallback=True) == "freeze+sigkill"
    assert cgroup.wait_empty(5.0)
    assert cgroup.events()["frozen"] == "0"
    # The daemon notices the run ended and cleans up after it.
    wait_for(lambda: daemon.client.agent("oldkernel")["state"] == "idle", what="run to end")
    wait_for(lambda: daemon.residue() == {}, what="cleanup")


def test_workspace_is_writable_as_its_owner_and_nothing_else_is(daemon: Daemon, runtime: str,
                                                                 tmp_root: Path) -> None:
    home = tmp_root / "home" / "alice"
    workspace = home / "repo"
    workspace.mkdir(parents=True)
    home.chmod(0o700)  # like a Debian home directory: the sandbox cannot traverse it itself
    os.chown(home, 4242, 4242)
    os.chown(workspace, 4242, 4242)
    result = daemon.agentctl("run", "--name", "writer", "--workspace", str(workspace), "--",
                             "/bin/sh", "-c", "echo hello > /workspace/out.txt && id -u && pwd")
    assert result.returncode == 0, result.stderr
    # runc: uid 1000 of the sandbox, mapped onto the owner; docker: the owner's uid itself.
    assert result.stdout.split() == ["1000" if runtime == "runc" else "4242", "/workspace"]
    written = workspace / "out.txt"
    assert written.read_text() == "hello\n"
    assert written.stat().st_uid == 4242, "files the agent writes belong to the workspace owner"
    assert daemon.clean() == {}
    assert not any(is_mountpoint(p) for p in (daemon.root / "run").rglob("*"))

    rootowned = tmp_root / "rootowned"
    rootowned.mkdir()
    refused = daemon.agentctl("run", "--name", "writer", "--workspace", str(rootowned), "--",
                              "true")
    assert refused.returncode == 6 and "workspace_invalid" in refused.stderr
