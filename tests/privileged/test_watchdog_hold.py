"""What makes the watchdog fit to hold handed-over runs (issue 13, review of the handover):
it gives them only to a root peer, judged by the peer's uid and not its gid; the OOM killer
never picks it where the host allows it, and where it does not (a container without
CAP_SYS_RESOURCE, as this project's own CI host; a spawner without it is made on any host
with setpriv) the daemon says so at debug when the runs' memory budget leaves memory outside
the runs and as a warning when it does not (the budget is judged against a real memory limit
above it); and the daemon can tell when it is not in its own cgroup (then a restart kills
the agents rather than leave them to a watchdog that dies with the daemon's unit). Real
processes with real credentials, real cgroups. Needs root."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from supervisor.daemon import watchdog
from supervisor.daemon.watchdog import CAP_SYS_RESOURCE, Watchdog, has_capability
from supervisor.sandbox.budget import RunsBudget, leaves_host_memory
from supervisor.sandbox.cgroups import Cgroup, CgroupMode, detect_mode, unified_root
from tests.conftest import require

NOBODY = 65534
REPO = Path(__file__).resolve().parents[2]
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


# The daemon's side as Core builds it, in a process without CAP_SYS_RESOURCE: spawns the
# watchdog, says where it stands and what its oom_score_adj is, and stands it down.
SPAWNER = """
import json, logging, sys
from pathlib import Path
from supervisor.daemon.watchdog import Watchdog
logging.basicConfig(level=logging.DEBUG, format="%(levelname)s %(message)s", stream=sys.stderr)
dog = Watchdog(Path(sys.argv[1]), Path(sys.argv[2]), 5,
               runs_leave_host_memory=sys.argv[3] == "leave")
adj = int(Path(f"/proc/{dog.proc.pid}/oom_score_adj").read_text())
print(json.dumps({"oom": dog.oom, "adj": adj, "pid": dog.proc.pid}), flush=True)
assert dog.disarm()
assert dog.proc.returncode == 0
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


def test_the_oom_killer_never_picks_the_watchdog_where_the_host_allows(
        parent: Cgroup, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Whichever this host is: -1000 with the capability; without it, quiet (the default
    budget leaves the host a reserve) and said in `oom`."""
    caplog.set_level(logging.DEBUG, logger="supervisor.daemon.watchdog")
    dog = Watchdog(parent.path, tmp_path / "watchdog.jsonl", timeout=5)
    try:
        said = [r for r in caplog.records if "OOM killer" in r.getMessage()]
        if has_capability(CAP_SYS_RESOURCE):
            assert _oom_score_adj(dog.proc.pid) == -1000
            assert dog.oom == {"oom_protected": True} and said == []
        else:
            assert _oom_score_adj(dog.proc.pid) == _oom_score_adj(os.getpid())
            assert dog.oom["oom_protected"] is False
            assert dog.oom["weakens_containment"] is False
            assert [r.levelno for r in said] == [logging.DEBUG]
        assert _oom_score_adj(os.getpid()) != -1000  # its own, not inherited from here
    finally:
        assert dog.disarm()
    assert dog.proc.returncode == 0  # it ran on, and stood down when told


@pytest.mark.parametrize("budget", ["leave", "fill"])
def test_without_the_capability_it_is_quiet_unless_containment_is_weakened(
        parent: Cgroup, tmp_path: Path, budget: str) -> None:
    require(shutil.which("setpriv") is not None, "needs setpriv (util-linux)")
    result = subprocess.run(
        ["setpriv", "--inh-caps=-sys_resource", "--bounding-set=-sys_resource",
         sys.executable, "-c", SPAWNER, str(parent.path), str(tmp_path / "w.jsonl"), budget],
        capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout)
    assert seen["adj"] == _oom_score_adj(os.getpid())  # not -1000: the write was refused
    assert seen["oom"]["oom_protected"] is False
    assert "CAP_SYS_RESOURCE" in seen["oom"]["why"]
    # One line says it, from the spawner's log at the level it matters; the watchdog process
    # (stderr shared) prints nothing of its own about it.
    said = [line for line in result.stderr.splitlines() if "OOM killer" in line]
    message = f"the watchdog (pid {seen['pid']}) is within the OOM killer's reach"
    if budget == "leave":
        assert seen["oom"]["weakens_containment"] is False
        assert said == [f"DEBUG {message}: {seen['oom']['why']}"]
    else:
        assert seen["oom"]["weakens_containment"] is True
        assert said == [f"WARNING {message}: {seen['oom']['why']}"]
        assert "take the kill switch" in said[0]


def test_a_memory_limit_above_the_runs_is_what_the_budget_is_held_against() -> None:
    """A real memory limit on a cgroup above the runs' parent (as a container's would be):
    a budget over it fills the memory the supervisor lives in; one under it does not."""
    require(os.geteuid() == 0, "needs root (cgroups)")
    above = Cgroup(f"as-test-oom-limit-{secrets.token_hex(4)}")
    hybrid = detect_mode() is CgroupMode.HYBRID
    limit_file = "memory.limit_in_bytes" if hybrid else "memory.max"
    try:
        if hybrid:
            above.create(("memory",))
        else:
            Cgroup(f"{above.relative}/runs").delegate(["memory"])
        above.write(limit_file, str(256 << 20))
        runs = f"/{above.relative}/runs"
        assert not leaves_host_memory(runs, RunsBudget(100, 512 << 20))
        assert not leaves_host_memory(runs, RunsBudget(100, 256 << 20))
        assert leaves_host_memory(runs, RunsBudget(100, 128 << 20))
        above.write(limit_file, "-1" if hybrid else "max")  # no limit: the host's RAM decides
        assert leaves_host_memory(runs, RunsBudget(100, 512 << 20))
    finally:
        above.remove(strict=False)


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
