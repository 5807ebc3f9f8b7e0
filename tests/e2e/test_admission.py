"""Admission control on a real daemon's control socket (issue 12): a flood of half-open
connections from one uid never stops an owner's kill, a uid's requests in flight are capped
with a JSON 429 that actions never get, a slowloris connection is closed by the header timeout
and a stalled body by the body timeout, and the daemon runs with its file limit raised. Real
users are created for the test (as in test_roles). Needs root."""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import socket
import stat
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from supervisor.api.client import owner_socket_of
from tests.e2e.test_api_input import exchange, json_error
from tests.support.daemon import Daemon, running_daemon, wait_for

# The attacker: opens connections as fast as it can and keeps every one it gets (sending
# nothing, or half a request head) for a while.
FLOOD = textwrap.dedent("""
    import resource, socket, sys, time
    path, count, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    held, refused = [], 0
    for i in range(count):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.setblocking(False)
        try:
            s.connect(path)
        except (BlockingIOError, ConnectionRefusedError, OSError):
            refused += 1
            s.close()
            continue
        if i % 2:
            try:
                s.send(b"GET /v1/health HTTP/1.1\\r\\nHost: x\\r\\n")
            except OSError:
                pass
        held.append(s)
    print("ready", len(held), refused, flush=True)
    time.sleep(seconds)
""")


def open_fds(daemon: Daemon) -> int:
    assert daemon.proc is not None
    return len(os.listdir(f"/proc/{daemon.proc.pid}/fd"))


@contextlib.contextmanager
def users(*roles: str) -> Iterator[dict[str, Any]]:
    """A user per role, all in the socket's group; the config maps them by name."""
    tag = os.urandom(2).hex()
    group = f"ast-adm-{tag}"
    names = {role: f"ast-{role[:5]}-{tag}" for role in roles}
    subprocess.run(["groupadd", group], check=True)
    try:
        for name in names.values():
            subprocess.run(["useradd", "-M", "-N", "-s", "/usr/sbin/nologin", "-G", group,
                            name], check=True)
        yield {"group": group, "users": {r: pwd.getpwnam(n) for r, n in names.items()}}
    finally:
        for name in names.values():
            subprocess.run(["userdel", name], check=False, capture_output=True)
        subprocess.run(["groupdel", group], check=False, capture_output=True)


def flood(daemon: Daemon, user: pwd.struct_passwd, count: int, seconds: float
          ) -> subprocess.Popen[str]:
    return flood_at(daemon.socket, user, count, seconds)


def flood_at(path: Path, user: pwd.struct_passwd, count: int, seconds: float
             ) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", FLOOD, str(path), str(count), str(seconds)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, user=user.pw_uid,
        group=user.pw_gid, extra_groups=os.getgrouplist(user.pw_name, user.pw_gid))
    assert proc.stdout is not None
    line = proc.stdout.readline().split()
    assert line and line[0] == "ready", (line, proc.stderr.read() if proc.stderr else "")
    return proc


def as_user(daemon: Daemon, user: pwd.struct_passwd, *args: str
            ) -> subprocess.CompletedProcess[str]:
    env = {"AGENT_SUPERVISOR_SOCKET": str(daemon.socket), "PATH": "/usr/bin:/bin", "HOME": "/",
           "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    return subprocess.run(
        [sys.executable, "-m", "supervisor.cli", *args], env=env, capture_output=True,
        text=True, timeout=120, user=user.pw_uid, group=user.pw_gid,
        extra_groups=os.getgrouplist(user.pw_name, user.pw_gid), cwd="/")


def test_a_connection_flood_never_stops_an_owners_kill(tmp_root: Path) -> None:
    with users("viewer", "admin", "owner") as made, running_daemon(
            tmp_root, daemon={"socket_group": made["group"]},
            roles={"viewer": [f"user:{made['users']['viewer'].pw_name}"],
                   "admin": [f"user:{made['users']['admin'].pw_name}"],
                   "owner": [f"user:{made['users']['owner'].pw_name}"]},
            # Small caps so one attacker uid can also fill every unreserved slot.
            control={"max_connections": 24, "max_connections_per_uid": 1000,
                     "reserved_connections": 8, "header_timeout": "60s"}) as daemon:
        daemon.agentctl("run", "--detach", "--name", "victim", "--", "sleep", "600",
                        check=True)
        daemon.agentctl("run", "--detach", "--name", "second", "--", "sleep", "600",
                        check=True)
        viewer = made["users"]["viewer"]
        before = open_fds(daemon)
        attacker = flood(daemon, viewer, 20_000, 20.0)
        try:
            # Every unreserved slot is the attacker's: an admin is turned away...
            refused = as_user(daemon, made["users"]["admin"], "ls", "--json")
            assert refused.returncode == 7, refused
            assert json.loads(refused.stdout)["error"]["code"] == "daemon_unavailable"
            # ...but owners keep their reserved slots: root, and an owner by role.
            killed = daemon.agentctl_json("kill", "victim", "--reason", "flood test")
            assert killed["results"][0]["new_state"] == "killed"
            by_owner = as_user(daemon, made["users"]["owner"], "kill", "second", "--reason",
                               "flood test", "--json")
            assert by_owner.returncode == 0, by_owner
            # What the daemon holds of 20,000 connects is its cap, not the attacker's count.
            assert open_fds(daemon) <= before + 24 + 8 + 16
        finally:
            attacker.kill()
            attacker.communicate(timeout=120)
        for name in ("victim", "second"):
            assert daemon.client.agent(name)["state"] == "killed"
        assert not daemon.agent_pids()
        assert "too many open files" not in daemon.logs().lower()


def test_one_uid_holds_at_most_its_connection_cap(tmp_root: Path) -> None:
    with users("viewer") as made, running_daemon(
            tmp_root, daemon={"socket_group": made["group"]},
            roles={"viewer": [f"user:{made['users']['viewer'].pw_name}"]},
            control={"max_connections_per_uid": 10, "header_timeout": "60s"}) as daemon:
        before = open_fds(daemon)
        attacker = flood(daemon, made["users"]["viewer"], 5_000, 60.0)
        try:
            # Meanwhile root is not held back by another uid's cap.
            assert daemon.client.health()["status"] == "ok"
            held = wait_for(lambda: ((n := open_fds(daemon)) <= before + 10 + 16 and n) or None,
                            timeout=60, what="the daemon to close what is over the cap")
            assert held <= before + 10 + 16
        finally:
            attacker.kill()
            attacker.communicate(timeout=120)


def slow_request(daemon: Daemon, target: str) -> socket.socket:
    """A request whose head is complete and whose body never comes: in flight until the body
    timeout."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(daemon.socket))
    sock.sendall(f"POST {target} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 f"Content-Length: 100\r\n\r\n{{".encode())
    return sock


def test_requests_in_flight_per_uid_are_capped_with_429_but_actions_pass(
        tmp_root: Path) -> None:
    with running_daemon(tmp_root, control={"max_requests_per_uid": 2,
                                           "body_timeout": "60s"}) as daemon:
        daemon.agentctl("run", "--detach", "--name", "victim", "--", "sleep", "600",
                        check=True)
        held = [slow_request(daemon, "/v1/runs"), slow_request(daemon, "/v1/drills")]
        try:
            def refused() -> dict[str, Any] | None:
                status, _headers, body = exchange(
                    daemon.socket, b"GET /v1/health HTTP/1.1\r\nHost: x\r\n"
                                   b"Connection: close\r\n\r\n")
                return body["error"] if status == 429 else None

            error = wait_for(refused, timeout=30, what="the third request to be refused")
            assert error["code"] == "too_many_requests" and error["detail"]["hint"]
            assert error["detail"]["limit"] == 2
            # An action is never refused by the limit: the kill goes through.
            result = daemon.agentctl_json("kill", "victim", "--reason", "429 test")
            assert result["results"][0]["new_state"] == "killed"
        finally:
            for sock in held:
                sock.close()
        wait_for(lambda: daemon.client.health()["status"] == "ok", timeout=30,
                 what="reads to be served again")


def test_slowloris_and_stalled_bodies_are_cut_off(tmp_root: Path) -> None:
    with running_daemon(tmp_root, control={"header_timeout": "1s",
                                           "body_timeout": "1s"}) as daemon:
        silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        dribble = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with silent, dribble:
            silent.connect(str(daemon.socket))
            dribble.connect(str(daemon.socket))
            dribble.sendall(b"GET /v1/health HTTP/1.1\r\n")
            closed = []
            deadline = time.monotonic() + 60
            while len(closed) < 2 and time.monotonic() < deadline:
                for sock in (silent, dribble):
                    if sock in closed:
                        continue
                    with contextlib.suppress(BlockingIOError):
                        if sock is dribble:
                            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                                sock.send(b"X-A: b\r\n")  # one header line at a time
                        sock.setblocking(False)
                        try:
                            data = sock.recv(65536)
                        except ConnectionResetError:
                            data = b""
                        if not data or data.startswith(b"HTTP/1.1 4"):
                            closed.append(sock)
                time.sleep(0.2)
            assert len(closed) == 2, "the daemon kept a connection that never sent a request"
        # A head without its body: a JSON 408 once the body timeout passes.
        json_error(exchange(daemon.socket, b"POST /v1/runs HTTP/1.1\r\nHost: x\r\n"
                                           b"Content-Length: 50\r\n\r\n{"),
                   408, "request_timeout")
        assert daemon.client.health()["status"] == "ok"


def test_the_daemon_raises_its_file_limit(daemon: Daemon) -> None:
    assert daemon.proc is not None
    limits = Path(f"/proc/{daemon.proc.pid}/limits").read_text().splitlines()
    line = next(x for x in limits if x.startswith("Max open files"))
    soft, hard = line.split()[3:5]
    assert soft == hard, line
    assert json.loads(json.dumps(daemon.client.health()))["status"] == "ok"


# Connect, send a request, print what comes back before the daemon closes the connection.
READ_ONE = textwrap.dedent("""
    import socket, sys
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(30)
    s.connect(sys.argv[1])
    try:
        s.sendall(b"GET /v1/health HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n")
        print(s.recv(65536))
    except (BrokenPipeError, ConnectionResetError):
        print(b"")
""")


def kill_request(agent: str) -> bytes:
    body = json.dumps({"scope": {"agent": agent}, "reason": "owners' socket test"}).encode()
    return (b"POST /v1/actions/kill HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))


def test_the_owners_socket_is_root_only_by_default(daemon: Daemon) -> None:
    owner_socket = owner_socket_of(daemon.socket)
    st = owner_socket.stat()
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o600, 0, 0)
    status, _headers, body = exchange(owner_socket, kill_request("nobody-here"))
    assert status == 404 and body["error"]["code"] == "agent_not_found", body


def test_a_flood_of_either_socket_never_stops_a_kill_on_the_owners_socket(
        tmp_root: Path) -> None:
    with users("viewer", "admin") as made, running_daemon(
            tmp_root, daemon={"socket_group": made["group"]},
            roles={"viewer": [f"user:{made['users']['viewer'].pw_name}"],
                   "admin": [f"user:{made['users']['admin'].pw_name}"]},
            # The owners' socket open to the group: its non-owners are turned away at connect.
            control={"owner_socket_group": made["group"], "backlog": 16,
                     "max_connections_per_uid": 1000, "header_timeout": "60s"}) as daemon:
        owner_socket = owner_socket_of(daemon.socket)
        assert stat.S_IMODE(owner_socket.stat().st_mode) == 0o660
        for name in ("first", "second", "third"):
            daemon.agentctl("run", "--detach", "--name", name, "--", "sleep", "600",
                            check=True)
        viewer, admin = made["users"]["viewer"], made["users"]["admin"]
        before = open_fds(daemon)
        # The viewer's connects to the owners' socket are accepted and closed unread...
        unread = subprocess.run(
            [sys.executable, "-c", READ_ONE, str(owner_socket)], capture_output=True,
            text=True, timeout=60, user=viewer.pw_uid, group=viewer.pw_gid,
            extra_groups=os.getgrouplist(viewer.pw_name, viewer.pw_gid))
        assert unread.returncode == 0 and unread.stdout == "b''\n", unread
        held = flood_at(owner_socket, viewer, 2_000, 30.0)
        try:
            wait_for(lambda: open_fds(daemon) <= before + 16 or None, timeout=60,
                     what="the owners' socket to hold none of a viewer's connections")
            # ...and an admin's verb, refused there before a byte was read, falls back to
            # the control socket, where the admin may pause.
            paused = as_user(daemon, admin, "pause", "first", "--reason", "t", "--json")
            assert paused.returncode == 0, paused
            attacker = flood(daemon, viewer, 20_000, 30.0)  # and the control socket too
            try:
                killed = daemon.agentctl_json("kill", "second", "--reason", "flood test")
                assert killed["results"][0]["new_state"] == "killed"
                status, _headers, body = exchange(owner_socket, kill_request("third"))
                assert status == 200, body
            finally:
                attacker.kill()
                attacker.communicate(timeout=120)
        finally:
            held.kill()
            held.communicate(timeout=120)
        assert daemon.client.agent("first")["state"] == "paused"
        for name in ("second", "third"):
            assert daemon.client.agent(name)["state"] == "killed"
        rows = [e for e in daemon.client.audit(limit=1000)["entries"] if e["verb"] == "kill"]
        assert {e["target"] for e in rows if e["outcome"] == "ok"} >= {"second", "third"}
        assert "too many open files" not in daemon.logs().lower()


def test_a_stalled_verb_of_a_peer_who_may_not_do_it_holds_nothing(tmp_root: Path) -> None:
    """Verbs are served first (api/listener.py VerbsFirst): while one is in flight the control
    socket's other connections wait. A viewer who sends a verb's head and stalls its body
    (for the whole body timeout) must not make an admin's verb or read wait for it: the
    role is checked before the body is read, and the refusal ends the hold."""
    with users("viewer", "admin") as made, running_daemon(
            tmp_root, daemon={"socket_group": made["group"]},
            roles={"viewer": [f"user:{made['users']['viewer'].pw_name}"],
                   "admin": [f"user:{made['users']['admin'].pw_name}"]},
            control={"body_timeout": "600s", "max_connections_per_uid": 1000}) as daemon:
        daemon.agentctl("run", "--detach", "--name", "first", "--", "sleep", "600",
                        check=True)
        viewer, admin = made["users"]["viewer"], made["users"]["admin"]
        # The viewer's stalled verbs: heads of a pause, a kill and a reactivate whose bodies
        # never come, from the viewer's uid (SO_PEERCRED is read at connect).
        stall = textwrap.dedent("""
            import socket, sys, time
            held = []
            for verb in sys.argv[2:]:
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.connect(sys.argv[1])
                s.sendall(b"POST /v1/actions/%s HTTP/1.1\\r\\nHost: x\\r\\n"
                          b"Content-Type: application/json\\r\\nContent-Length: 4096\\r\\n\\r\\n{"
                          % verb.encode())
                held.append(s)
            print("ready", flush=True)
            time.sleep(600)
        """)
        stalled = subprocess.Popen(
            [sys.executable, "-c", stall, str(daemon.socket), "pause", "kill", "reactivate"],
            stdout=subprocess.PIPE, text=True, user=viewer.pw_uid, group=viewer.pw_gid,
            extra_groups=os.getgrouplist(viewer.pw_name, viewer.pw_gid))
        try:
            assert stalled.stdout is not None and stalled.stdout.readline() == "ready\n"
            # The admin's read and verb are answered while the viewer's bodies are still
            # awaited (a 600 s body timeout: a hold would outlast as_user's 120 s timeout).
            listed = as_user(daemon, admin, "ls", "--json")
            assert listed.returncode == 0, listed
            paused = as_user(daemon, admin, "pause", "first", "--reason", "t", "--json")
            assert paused.returncode == 0, paused
            assert stalled.poll() is None
        finally:
            stalled.kill()
            stalled.communicate(timeout=60)
        assert daemon.client.agent("first")["state"] == "paused"


# An admin's verb whose body stalls: its head and all of its body but the last byte, sent as
# the admin (SO_PEERCRED is read at connect); the last byte when the test says so on stdin.
STALLED_VERB = textwrap.dedent("""
    import socket, sys
    body = b'{"scope": {"agent": "%s"}, "reason": "stalled body"}' % sys.argv[3].encode()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(120)
    s.connect(sys.argv[1])
    s.sendall(b"POST /v1/actions/%s HTTP/1.1\\r\\nHost: x\\r\\nContent-Type: application/json"
              b"\\r\\nConnection: close\\r\\nContent-Length: %d\\r\\n\\r\\n"
              % (sys.argv[2].encode(), len(body)) + body[:-1])
    print("ready", flush=True)
    sys.stdin.readline()
    s.sendall(body[-1:])
    print(s.recv(65536).split(b"\\r\\n", 1)[0].decode(), flush=True)
""")


def test_a_stalled_verb_body_or_an_idle_owner_holds_no_reads(tmp_root: Path) -> None:
    """Verbs are served first (api/listener.py VerbsFirst), and an owner's connection holds
    the control socket's reads from its accept (EarlyHold). An admin who may pause sends a
    pause and stalls its last byte, and root keeps an owners' socket connection idle: with
    the body and header timeouts longer than as_user's 120 s, a hold until either timeout
    would fail the admin's read; both requests are served once they complete."""
    with users("admin") as made, running_daemon(
            tmp_root, daemon={"socket_group": made["group"]},
            roles={"admin": [f"user:{made['users']['admin'].pw_name}"]},
            control={"body_timeout": "600s", "header_timeout": "600s"}) as daemon:
        for name in ("first", "second"):
            daemon.agentctl("run", "--detach", "--name", name, "--", "sleep", "600",
                            check=True)
        admin = made["users"]["admin"]
        stalled = subprocess.Popen(
            [sys.executable, "-c", STALLED_VERB, str(daemon.socket), "pause", "first"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, user=admin.pw_uid,
            group=admin.pw_gid, extra_groups=os.getgrouplist(admin.pw_name, admin.pw_gid))
        try:
            assert stalled.stdout is not None and stalled.stdout.readline() == "ready\n"
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as idle:
                idle.settimeout(60)
                idle.connect(str(owner_socket_of(daemon.socket)))
                # Reads on the control socket are answered while both are open and silent.
                listed = as_user(daemon, admin, "ls", "--json")
                assert listed.returncode == 0, listed
                assert {a["name"] for a in json.loads(listed.stdout)["agents"]} == {
                    "first", "second"}
                status, _headers, body = exchange(
                    daemon.socket, b"GET /v1/agents HTTP/1.1\r\nHost: x\r\n"
                                   b"Connection: close\r\n\r\n")
                assert status == 200, body
                # The owner's connection was kept open: its kill is served.
                idle.sendall(kill_request("second"))
                assert idle.recv(65536).startswith(b"HTTP/1.1 200"), "the owner's kill"
            stalled_out, _ = stalled.communicate("go\n", timeout=60)
            assert stalled_out.strip() == "HTTP/1.1 200 OK", stalled_out
        finally:
            stalled.kill()
            stalled.communicate(timeout=60)
        assert daemon.client.agent("first")["state"] == "paused"
        assert daemon.client.agent("second")["state"] == "killed"
