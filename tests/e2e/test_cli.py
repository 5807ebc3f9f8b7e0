"""agentctl against a real daemon: exit statuses, streaming, timeouts, graceful stop, bad
input, and who may use the control socket. Needs root."""

from __future__ import annotations

import contextlib
import grp
import http.client
import json
import math
import os
import pwd
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from supervisor.cli import fast
from tests.support.daemon import Daemon, new_daemon, running_daemon, wait_for


def test_foreground_run_streams_output_and_returns_the_agents_status(daemon: Daemon) -> None:
    result = daemon.agentctl("run", "--name", "echo", "--", "/bin/sh", "-c",
                             "echo out; echo err >&2; exit 7")
    assert result.returncode == 7
    assert "out" in result.stdout and "err" in result.stdout
    view = daemon.agentctl_json("inspect", "echo")
    assert view["state"] == "idle"
    assert view["run"]["state"] == "exited" and view["run"]["exit_code"] == 7


def test_foreground_run_exits_137_when_killed(daemon: Daemon) -> None:
    env = {**os.environ, "AGENT_SUPERVISOR_SOCKET": str(daemon.socket)}
    runner = subprocess.Popen(
        [sys.executable, "-m", "supervisor.cli", "run", "--name", "victim", "--", "/bin/sh",
         "-c", "echo started; sleep 600"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        # Killed once its output has come through: an agent killed the moment it is active
        # may not have run its echo yet (it failed so under load).
        assert runner.stdout is not None
        seen = [runner.stdout.readline()]
        while seen[-1] and "started" not in seen[-1]:
            seen.append(runner.stdout.readline())
        assert "started" in seen[-1], seen
        killed = daemon.agentctl_json("kill", "victim", "--reason", "operator says so")
        _out, err = runner.communicate(timeout=30)
    finally:
        runner.kill()
    assert runner.returncode == 137
    assert "killed" in err and "time_to_halt_ms" in err
    assert killed["results"][0]["time_to_halt_ms"] > 0


def test_logs_follow_streams_until_the_run_ends(daemon: Daemon) -> None:
    daemon.agentctl("run", "--detach", "--name", "ticker", "--", "/bin/sh", "-c",
                    "for i in 1 2 3; do echo tick $i; sleep 0.2; done", check=True)
    result = daemon.agentctl("logs", "-f", "ticker", timeout=30)
    assert result.returncode == 0
    assert result.stdout.split("\n")[:3] == ["tick 1", "tick 2", "tick 3"]
    again = daemon.agentctl("logs", "ticker")
    assert again.stdout == result.stdout
    as_json = daemon.agentctl_json("logs", "ticker")
    assert as_json["output"] == result.stdout
    assert (as_json["agent"], as_json["state"], as_json["exit_code"]) == ("ticker", "exited", 0)


def test_logs_since_shows_only_what_arrived_since(daemon: Daemon) -> None:
    """The real drain indexes a real run's output by time; the log keeps its bytes exact."""
    daemon.agentctl("run", "--detach", "--name", "slow", "--", "/bin/sh", "-c",
                    "echo early; printf 'no newline'; sleep 4; echo; echo late; sleep 600",
                    check=True)
    wait_for(lambda: "no newline" in daemon.agentctl("logs", "slow").stdout, timeout=30,
             what="the first output")
    # The index is exact to a second (SPACING): `--since` may show up to a second more than
    # asked. The first output's record is at most as late as this moment, so a whole second
    # above it plus a margin (rounded up, as the ISO form drops fractions) excludes it; the
    # late output comes four seconds after the first.
    between = math.ceil(time.time() + 1.2)
    wait_for(lambda: "late" in daemon.agentctl("logs", "slow").stdout, timeout=30,
             what="the second output")
    whole = daemon.agentctl("logs", "slow", check=True).stdout
    assert whole == "early\nno newline\nlate\n"
    iso = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(between))
    later = daemon.agentctl("logs", "slow", "--since", iso, check=True).stdout
    assert later == "\nlate\n"
    assert daemon.agentctl("logs", "slow", "--since", "1h", check=True).stdout == whole
    daemon.agentctl("kill", "slow", "--reason", "test done", check=True)


def test_timeout_kills_the_run_with_a_reason(daemon: Daemon) -> None:
    started = time.monotonic()
    result = daemon.agentctl("run", "--name", "slow", "--timeout", "1s", "--", "sleep", "600")
    assert result.returncode == 137
    assert time.monotonic() - started < 30
    view = daemon.agentctl_json("inspect", "slow")
    assert view["state"] == "killed"
    assert "execution window of 1s expired" in view["run"]["end_reason"]
    audit = daemon.client.audit()["entries"]
    kill = next(e for e in audit if e["verb"] == "kill" and e["target"] == "slow")
    assert kill["actor"] == "system:supervisor"
    assert kill["time_to_halt_ms"] is not None


def test_stop_is_graceful_when_the_agent_cooperates(daemon: Daemon) -> None:
    daemon.agentctl("run", "--detach", "--name", "polite", "--", "/bin/sh", "-c",
                    "trap 'echo bye; exit 0' TERM; while :; do sleep 0.1; done", check=True)
    time.sleep(0.3)
    result = daemon.agentctl_json("stop", "polite", "--grace", "5s")
    assert result["results"][0]["new_state"] == "idle"
    view = daemon.agentctl_json("inspect", "polite")
    assert view["run"]["state"] == "exited" and view["run"]["exit_code"] == 0
    assert "bye" in daemon.agentctl("logs", "polite").stdout


def test_stop_escalates_to_the_kill_path_after_the_grace(daemon: Daemon) -> None:
    daemon.agentctl("run", "--detach", "--name", "stubborn", "--", "/bin/sh", "-c",
                    "trap '' TERM; while :; do sleep 0.1; done", check=True)
    time.sleep(0.3)
    started = time.monotonic()
    result = daemon.agentctl_json("stop", "stubborn", "--grace", "500ms")
    assert 0.5 <= time.monotonic() - started < 20
    assert result["results"][0]["new_state"] == "idle"  # stopped, not held killed
    view = daemon.agentctl_json("inspect", "stubborn")
    assert view["run"]["state"] == "killed" and view["run"]["exit_code"] == 137
    assert daemon.clean() == {}


def test_a_kill_whose_reason_holds_bytes_that_are_not_utf8_goes_through(daemon: Daemon
                                                                        ) -> None:
    """A shell's argv can carry bytes that are not UTF-8 (a pasted Latin-1 ticket title);
    Python reads them as lone surrogates. Sent as they were, the daemon refused the kill with
    a 400 (invalid_request on the reason) and the agent ran on. The venv's agentctl, its fast
    path and its click path alike, sends each such byte as U+FFFD; the kill goes through and
    the audit row keeps the rest of the reason."""
    agentctl = Path(sys.prefix) / "bin" / "agentctl"
    env = {**os.environ, "AGENT_SUPERVISOR_SOCKET": str(daemon.socket)}
    reason = b"ticket caf\xe9 \xff\xfe \xc3\xa9t\xc3\xa9"  # Latin-1 bytes beside UTF-8
    stored = "ticket caf\ufffd \ufffd\ufffd \u00e9t\u00e9"
    # The fast path takes `kill NAME --reason R`; `--` sends the same kill through click.
    for name, argv in (("fast", [b"kill", b"fast", b"--reason", reason, b"--json"]),
                       ("click", [b"kill", b"--json", b"--reason", reason, b"--", b"click"])):
        assert (fast.plan([os.fsdecode(a) for a in argv], {}) is not None) == (name == "fast")
        daemon.agentctl("run", "--detach", "--name", name, "--", "sleep", "600", check=True)
        done = subprocess.run([bytes(agentctl), *argv], env=env, capture_output=True,
                              timeout=60, stdin=subprocess.DEVNULL, check=False)
        assert done.returncode == 0, (name, done.stdout, done.stderr)
        [result] = json.loads(done.stdout)["results"]
        assert result["new_state"] == "killed", (name, result)
        view = daemon.agentctl_json("inspect", name)
        assert (view["state"], view["last_reason"]) == ("killed", stored), view
        [row] = [r for r in daemon.audit_rows("kill") if r["target"] == name]
        assert row["reason"] == stored, row
    assert daemon.clean() == {}


# --------------------------------------------------------------------------- bad input

def _snapshot(daemon: Daemon) -> tuple[Any, int]:
    agents = daemon.client.agents()["agents"]
    audit = daemon.client.audit(limit=10_000)["entries"]
    return agents, len(audit)


def _raw_request(sock_path: Path, method: str, path: str, body: bytes,
                 content_type: str = "application/json") -> tuple[int, Any]:
    conn = http.client.HTTPConnection("localhost")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(sock_path))
    conn.sock = sock
    try:
        conn.request(method, path, body=body, headers={"Content-Type": content_type})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def test_bad_input_gets_a_structured_error_and_changes_nothing(daemon: Daemon) -> None:
    daemon.agentctl("run", "--name", "bystander", "--class", "c1", "--", "true", check=True)
    (daemon.root / "profiles" / "broken.toml").write_text("[limits]\npids = -5\n")
    (daemon.root / "profiles" / "typo.toml").write_text("[limits]\nmemroy = '1G'\n")
    before = _snapshot(daemon)

    bad_profile = daemon.agentctl("run", "--name", "x1", "--profile", "broken", "--json",
                                  "--", "true")
    assert bad_profile.returncode == 6
    error = json.loads(bad_profile.stdout)["error"]
    assert error["code"] == "profile_invalid"
    assert error["detail"]["field"] == "limits.pids"

    typo = daemon.agentctl("run", "--name", "x1", "--profile", "typo", "--", "true")
    assert typo.returncode == 6 and "limits.memroy" in typo.stderr and "unknown" in typo.stderr

    unknown = daemon.agentctl("kill", "nosuchagent", "--reason", "test over", "--json")
    assert unknown.returncode == 3
    assert json.loads(unknown.stdout)["error"]["code"] == "agent_not_found"

    long_reason = "r" * 501
    client_side = daemon.agentctl("kill", "bystander", "--reason", long_reason)
    assert client_side.returncode == 6 and "reason" in client_side.stderr
    status, body = _raw_request(daemon.socket, "POST", "/v1/actions/kill", json.dumps(
        {"scope": {"agent": "bystander"}, "reason": long_reason}).encode())
    assert status == 422
    assert body["error"]["code"] == "invalid_request"
    assert body["error"]["detail"]["field"] == "reason"

    status, body = _raw_request(daemon.socket, "POST", "/v1/runs", b'{"command": ["true"')
    assert status == 400 and body["error"]["code"] == "invalid_json"
    status, body = _raw_request(daemon.socket, "POST", "/v1/runs", b'{"command": "true"}')
    assert status == 422 and body["error"]["detail"]["field"] == "command"
    status, body = _raw_request(daemon.socket, "POST", "/v1/actions/kill",
                                b'{"scope": {"agent": "bystander", "all": true}}')
    assert status == 422 and body["error"]["code"] == "invalid_request"
    status, body = _raw_request(daemon.socket, "POST", "/v1/actions/explode", b"{}")
    assert status == 404 and body["error"]["code"] == "route_not_found"

    assert _snapshot(daemon) == before


# --------------------------------------------------------------------------- socket access

@contextlib.contextmanager
def _test_users() -> Iterator[dict[str, Any]]:
    """A group of our own and two users: one in the group, one outside it."""
    tag = os.urandom(2).hex()
    group, member, outsider = f"ast-ops-{tag}", f"ast-op-{tag}", f"ast-out-{tag}"
    subprocess.run(["groupadd", group], check=True)
    try:
        subprocess.run(["useradd", "-M", "-N", "-s", "/usr/sbin/nologin", "-G", group, member],
                       check=True)
        subprocess.run(["useradd", "-M", "-N", "-s", "/usr/sbin/nologin", outsider], check=True)
        yield {"group": group, "gid": grp.getgrnam(group).gr_gid,
               "member": pwd.getpwnam(member), "outsider": pwd.getpwnam(outsider)}
    finally:
        subprocess.run(["userdel", member], check=False)
        subprocess.run(["userdel", outsider], check=False)
        subprocess.run(["groupdel", group], check=False)


def _as_user(daemon: Daemon, user: pwd.struct_passwd, *args: str
             ) -> subprocess.CompletedProcess[str]:
    env = {"AGENT_SUPERVISOR_SOCKET": str(daemon.socket), "PATH": "/usr/bin:/bin",
           "HOME": "/", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    return subprocess.run(
        [sys.executable, "-m", "supervisor.cli", *args], env=env, capture_output=True,
        text=True, timeout=60, user=user.pw_uid, group=user.pw_gid,
        extra_groups=os.getgrouplist(user.pw_name, user.pw_gid), cwd="/",
    )


def test_control_socket_is_0660_root_operators_and_only_operators_get_in(
        tmp_root: Path) -> None:
    if not os.access(sys.executable, os.X_OK, effective_ids=False):
        pytest.fail("the test interpreter must be executable by other users")
    with _test_users() as users, running_daemon(
            tmp_root, daemon={"socket_group": users["group"]},
            roles={"owner": [f"group:{users['group']}"]}) as daemon:
        st = daemon.socket.stat()
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o660
        assert (st.st_uid, st.st_gid) == (0, users["gid"])

        daemon.agentctl("run", "--detach", "--name", "target", "--", "sleep", "600", check=True)
        member = _as_user(daemon, users["member"], "ls", "--json")
        assert member.returncode == 0, member.stderr
        assert [a["name"] for a in json.loads(member.stdout)["agents"]] == ["target"]

        killed = _as_user(daemon, users["member"], "kill", "target", "--reason", "by member",
                          "--json")
        assert killed.returncode == 0, killed.stderr
        rows = daemon.client.audit()["entries"]
        kill_row = [r for r in rows if r["verb"] == "kill"][-1]
        assert kill_row["actor"] == f"{users['member'].pw_name}(uid={users['member'].pw_uid})"
        assert kill_row["detail"]["actor"]["uid"] == users["member"].pw_uid
        daemon.cleanup_audited("target")  # its row follows the kill's; the count below is exact

        outsider = _as_user(daemon, users["outsider"], "ls")
        assert outsider.returncode == 7
        assert "permission denied" in outsider.stderr

        # Past the file mode (a mis-set 0666), SO_PEERCRED still keeps an outsider out, and
        # the refusal is audited with its uid.
        daemon.socket.chmod(0o666)
        before = len(daemon.client.audit(limit=10_000)["entries"])
        refused = _as_user(daemon, users["outsider"], "kill", "--all", "--reason", "test over",
                           "--json")
        assert refused.returncode == 5, refused.stderr
        error = json.loads(refused.stdout)["error"]
        assert error["code"] == "forbidden"
        assert error["detail"]["uid"] == users["outsider"].pw_uid
        rows = daemon.client.audit(limit=10_000)["entries"]
        assert len(rows) == before + 1
        assert rows[-1]["outcome"] == "refused:forbidden"
        assert rows[-1]["detail"]["actor"]["uid"] == users["outsider"].pw_uid
        assert daemon.client.health()["global_halt"] is False


@pytest.mark.parametrize(("setting", "message"), [
    ({"sandbox": {"runc_path": "/nonexistent/runc"}}, "runc binary not found"),
    ({"daemon": {"default_profile": "norootfs"}}, "self-test failed"),
])
def test_the_daemon_refuses_to_start_when_enforcement_fails(
        tmp_root: Path, setting: dict[str, dict[str, Any]], message: str) -> None:
    """Fail closed: a broken runtime means no agents, loudly, not agents less contained."""
    daemon = new_daemon(tmp_root, **setting)
    (daemon.root / "profiles" / "norootfs.toml").write_text(
        '[filesystem]\nroot = "/nonexistent-rootfs"\n')
    with pytest.raises(RuntimeError, match=message):
        daemon.start(timeout=20)
    assert daemon.proc is not None and daemon.proc.returncode == 10
    assert not daemon.socket.exists()
    assert daemon.clean() == {}
    daemon.cleanup_host()
