"""What makes the watchdog fit to hold handed-over runs (issue 13, review of the handover):
it gives them only to a root peer, judged by the peer's uid and not its gid; the OOM killer
never picks it; and the daemon can tell when it is not in its own cgroup (then a restart
kills the agents rather than leave them to a watchdog that dies with the daemon's unit).
Real processes with real credentials, real cgroups. Needs root."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from supervisor.daemon import watchdog
from supervisor.daemon.watchdog import Watchdog
from supervisor.sandbox.cgroups import Cgroup, unified_root
from tests.conftest import require

NOBODY = 65534
# The next daemon, as anyone may write it: connect, take what is given, say ADOPTED to a
# record, print how many descriptors and messages it got. Standard library only (-I).
PEER = """
import json, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
s.settimeout(60)
s.connect(sys.argv[1])
fds = messages = 0
body = b""
while True:
    data, anc, _flags, _addr = s.recvmsg(1 << 20, socket.CMSG_SPACE(4 * 8))
    fds += sum(len(d) // 4 for level, kind, d in anc if kind == socket.SCM_RIGHTS)
    if not data:
        break
    messages += 1
    if data[:1] == b"\\0":  # a part of the record
        body += data[1:]
    elif json.loads(data).get("kind") == "end" and json.loads(body)["kind"] == "record":
        s.send(b"adopted\\n")
print(json.dumps({"fds": fds, "messages": messages}))
"""


@pytest.fixture
def parent() -> Iterator[Cgroup]:
    require(os.geteuid() == 0, "needs root (cgroups, credentials)")
    group = Cgroup(f"as-test-watchdog-{secrets.token_hex(4)}")
    (group.path / "run").mkdir(parents=True)
    yield group
    Cgroup(f"{group.relative}-watchdog").remove(strict=False)
    group.remove(strict=False)


def _give_to(uid: int, gid: int) -> tuple[bool, dict[str, int]]:
    """Run `_give` against a peer process running as uid:gid; what it returned and what the
    peer received."""
    require(os.geteuid() == 0, "needs root (credentials)")
    directory = Path(tempfile.mkdtemp(prefix="as-test-give-"))
    directory.chmod(0o711)  # the peer may be nobody: it must reach the socket
    path = directory / "handover.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
    peer: subprocess.Popen[str] | None = None
    try:
        listener.bind(str(path))
        path.chmod(0o777)
        listener.listen(1)
        listener.settimeout(60)
        peer = subprocess.Popen([sys.executable, "-I", "-c", PEER, str(path)], user=uid,
                                group=gid, extra_groups=[], stdout=subprocess.PIPE,
                                text=True, cwd="/")
        conn, _ = listener.accept()
        given = watchdog._give(conn, {"runs": [{"run_id": "r1"}]}, [read_fd])
        out, _ = peer.communicate(timeout=60)
        assert peer.returncode == 0
        return given, json.loads(out)
    finally:
        if peer is not None and peer.poll() is None:
            peer.kill()
            peer.wait()
        listener.close()
        os.close(read_fd)
        os.close(write_fd)
        with contextlib.suppress(OSError):
            path.unlink()
        directory.rmdir()


def test_a_peer_of_gid_0_but_not_uid_0_gets_nothing() -> None:
    """The attack: any local user in group root (gid 0) connecting to handover.sock (or
    whatever a new daemon's connection can be swapped for) took every run's pipe and seccomp
    fd when the watchdog read the gid as the uid."""
    given, got = _give_to(NOBODY, 0)
    assert not given
    assert got == {"fds": 0, "messages": 0}


def test_a_root_peer_of_another_gid_gets_everything() -> None:
    given, got = _give_to(0, NOBODY)
    assert given
    # The descriptors' chunk, then the record (one part here) and its end.
    assert got == {"fds": 1, "messages": 3}


def _oom_score_adj(pid: int) -> int:
    return int(Path(f"/proc/{pid}/oom_score_adj").read_text())


def _has_cap_sys_resource() -> bool:
    status = Path("/proc/self/status").read_text()
    [effective] = [line.split()[1] for line in status.splitlines() if line.startswith("CapEff:")]
    return bool(int(effective, 16) >> 24 & 1)  # CAP_SYS_RESOURCE


def test_the_oom_killer_never_picks_the_watchdog(parent: Cgroup, tmp_path: Path,
                                                 capfd: pytest.CaptureFixture[str]) -> None:
    """-1000 needs CAP_SYS_RESOURCE (a root service under systemd has it; a container may
    not, as on this project's own CI host): without it the watchdog says so in the journal
    instead, and runs on."""
    dog = Watchdog(parent.path, tmp_path / "watchdog.jsonl", timeout=5)
    try:
        deadline = time.monotonic() + 60  # it does it first thing at its start
        if _has_cap_sys_resource():
            while _oom_score_adj(dog.proc.pid) != -1000 and time.monotonic() < deadline:
                time.sleep(0.02)
            assert _oom_score_adj(dog.proc.pid) == -1000
            assert _oom_score_adj(os.getpid()) != -1000  # its own, not inherited from here
        else:
            said = ""
            while "OOM killer" not in said and time.monotonic() < deadline:
                time.sleep(0.02)
                said += capfd.readouterr().err
            assert "cannot exclude itself from the OOM killer: [Errno 13]" in said
    finally:
        assert dog.disarm()
    assert dog.proc.returncode == 0  # it ran on, and stood down when told


def test_a_watchdog_outside_its_cgroup_cannot_hold_runs(parent: Cgroup, tmp_path: Path) -> None:
    dog = Watchdog(parent.path, tmp_path / "watchdog.jsonl", timeout=5)
    try:
        assert dog.escape_error is None
        assert dog.cannot_hold() is None
        # Moved back where it started (what a failed escape leaves): into this test's cgroup.
        own = Path("/proc/self/cgroup").read_text().splitlines()
        [mine] = [line.split("::", 1)[1] for line in own if line.startswith("0::")]
        (unified_root() / mine.strip("/") / "cgroup.procs").write_text(str(dog.proc.pid))
        why = dog.cannot_hold()
        assert why is not None and f"pid {dog.proc.pid}" in why
        dog.escape_error = "cannot move pid 1 into x: Permission denied"
        assert "stayed in the daemon's cgroup" in (dog.cannot_hold() or "")
    finally:
        assert dog.disarm()
