"""A daemon started the way CI harnesses and service managers start processes: stdin closed
and descriptors of the caller's own left open (here 4, 5, 11 and 12, inheritable). None of
them, nor any file the daemon opens for itself (its instance locks, the state database, the
audit chain), reaches a process of an agent (the sandbox's init and the agent, runc and
docker) or the watchdog process. The files behind descriptors are compared (device and
inode), never their numbers. Needs root, runc and (for the docker case) dockerd."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from tests.conftest import BOTH_RUNTIMES
from tests.support.daemon import new_daemon, runtime_config, wait_for

INHERITED = (4, 5, 11, 12)


def _files(pid: int) -> dict[tuple[int, int], str]:
    """The regular files behind `pid`'s descriptors: (device, inode) -> where."""
    found: dict[tuple[int, int], str] = {}
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except FileNotFoundError:
        return found
    for name in names:
        try:
            info = os.stat(f"/proc/{pid}/fd/{name}")
        except (FileNotFoundError, ProcessLookupError):
            continue  # closed between the listing and the stat
        if stat.S_ISREG(info.st_mode):
            found[(info.st_dev, info.st_ino)] = f"pid {pid} fd {name}"
    return found


def _descendants(pid: int) -> list[int]:
    children: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            children.extend(int(c) for c in (task / "children").read_text().split())
        except FileNotFoundError:
            continue
    return [p for child in children for p in (child, *_descendants(child))]


@BOTH_RUNTIMES
def test_no_descriptor_of_the_daemon_reaches_an_agent_or_the_watchdog(
        tmp_root: Path, runtime: str) -> None:
    marker = tmp_root / "inherited-by-the-daemon"
    marker.write_text("the caller's file\n")
    mark = marker.stat()
    daemon = new_daemon(tmp_root, **runtime_config(runtime))
    opens = " ".join(f'{fd}<"$0"' for fd in INHERITED)
    daemon.launcher = ["/bin/bash", "-c", f'exec <&- {opens}; exec "$@"', str(marker)]
    daemon.start(timeout=90)
    try:
        assert daemon.proc is not None
        held = _files(daemon.proc.pid)
        # The setup took: the daemon holds the caller's file, its locks and its database.
        assert (mark.st_dev, mark.st_ino) in held
        for own in (daemon.root / "state" / "daemon.lock", daemon.root / "run" / "daemon.lock",
                    daemon.state_db):
            info = own.stat()
            assert (info.st_dev, info.st_ino) in held, own
        view = daemon.agentctl_json("run", "--detach", "--name", "fds", "--", "sleep", "600")
        wait_for(lambda: daemon.client.get_run(view["id"])["state"] == "running", timeout=60,
                 what="the agent running")
        pids = wait_for(lambda: len(daemon.agent_pids()) >= 2 and daemon.agent_pids(),
                        timeout=60, what="the init and the agent")
        for pid in pids:
            leaked = {where for key, where in _files(pid).items() if key in held}
            assert not leaked, (pid, leaked)
        # The watchdog and whatever else the daemon runs (the egress worker, a runc still
        # cleaning up): none holds the caller's file or the daemon's locks.
        forbidden = {(mark.st_dev, mark.st_ino)} | {
            (s.st_dev, s.st_ino) for s in (
                (daemon.root / "state" / "daemon.lock").stat(),
                (daemon.root / "run" / "daemon.lock").stat())}
        others = [p for p in _descendants(daemon.proc.pid) if p not in pids]
        assert others  # the watchdog at least
        for pid in others:
            leaked = {where for key, where in _files(pid).items() if key in forbidden}
            assert not leaked, (pid, leaked)
        daemon.agentctl("kill", "fds", "--reason", "done", check=True)
        assert daemon.clean() == {}
    finally:
        daemon.stop()
        daemon.cleanup_host()
