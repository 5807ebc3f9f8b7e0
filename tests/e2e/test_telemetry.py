"""Telemetry of a real run through a real daemon: an agent that allocates memory, forks and
listens shows up in `agentctl telemetry --json` while it runs, and its summary is in
`agentctl inspect` after it ends, across a daemon restart too (SQLite). Needs root and runc."""

from __future__ import annotations

from typing import Any

from tests.support.daemon import Daemon, wait_for

MIB = 1024 * 1024

# 64 MiB touched, a listening socket (in the run's own network namespace) and three sleeping
# children that inherit it.
AGENT = r"""
import os, socket, time
held = bytearray(64 * 1024 * 1024)
for i in range(0, len(held), 4096):
    held[i] = 1
server = socket.socket(); server.bind(("127.0.0.1", 0)); server.listen()
for _ in range(3):
    if os.fork() == 0:
        time.sleep(600)
        os._exit(0)
print("ready", flush=True)
time.sleep(600)
"""


# The sandbox's init (tini) is the run's first process and the agent its child, so the processes
# whose parent is in the run are the agent and its three forks.
CHILDREN = 4


def _busy_sample(daemon: Daemon) -> dict[str, Any] | None:
    """A sample whose process walk (every few ticks; the cgroup numbers are every tick) came
    after the forks: its per-process numbers then describe all four processes."""
    data = daemon.agentctl_json("telemetry", "tele", "--limit", "5")
    for sample in reversed(data["samples"]):
        if (sample["memory_bytes"] or 0) >= 64 * MIB and sample["processes"] >= 5 \
                and sample["connections"] and sample["children"] == CHILDREN:
            return dict(sample)
    return None


def test_a_run_is_sampled_live_and_summarised_after(daemon: Daemon) -> None:
    daemon.agentctl("run", "--detach", "--name", "tele", "--", "/usr/bin/python3", "-c", AGENT,
                    check=True)
    sample = wait_for(lambda: _busy_sample(daemon), timeout=60, interval=0.2,
                      what="a sample with 64 MiB, 5 processes and a socket")
    assert sample["connections"] == 1  # one socket, shared by the agent and its three forks
    assert sample["children"] == CHILDREN
    assert sample["rss_bytes"] >= 64 * MIB
    assert sample["threads"] >= 4 and sample["open_fds"] >= 4
    assert sample["cpu_seconds"] > 0 and sample["wall_seconds"] > 0
    assert "python3" in sample["commands"]

    table = daemon.agentctl("telemetry", "tele", check=True).stdout.splitlines()
    assert table[0].endswith("running (live)")
    assert table[1].split() == ["TIME", "CPU%", "MEMORY", "PROCS", "FDS", "THREADS",
                                "SYSCALLS"]
    live = daemon.agentctl_json("inspect", "tele")["telemetry"]
    assert live["ended_at"] is None and live["samples"] >= 1

    daemon.agentctl("kill", "tele", "--reason", "telemetry test", check=True)
    summary = daemon.agentctl_json("inspect", "tele")["telemetry"]
    assert summary["ended_at"] is not None
    assert summary["samples"] >= live["samples"]
    assert summary["peak_memory_bytes"] >= 64 * MIB
    assert summary["peak_processes"] >= 4 and summary["peak_connections"] == 1
    assert summary["cpu_seconds"] > 0 and "python3" in summary["commands"]

    text = daemon.agentctl("inspect", "tele", check=True).stdout.splitlines()
    assert f"telemetry (final, {summary['samples']} samples):" in text
    ended = daemon.agentctl_json("telemetry", "tele")
    assert (ended["live"], ended["samples"], ended["summary"]) == (False, [], summary)

    daemon.stop()
    daemon.start()
    assert daemon.agentctl_json("inspect", "tele")["telemetry"] == summary
