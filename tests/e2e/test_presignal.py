"""The SIGKILL sent at the owners' acceptor on a real daemon (issue 12): an owner's kill of one
agent, a class and every agent sent to the owners' socket is SIGKILLed on the acceptor's
thread before the loop sees it, and its audit rows say so; the loop's kill path still
confirms, audits and finalises every run as killed. A kill request whose caller hangs up as
soon as it is written is SIGKILLed and audited all the same, whichever of the request's
handler or the connection's end reaches the loop first. Needs root."""

from __future__ import annotations

import json
import os
import pwd
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

from supervisor.api.client import owner_socket_of
from supervisor.api.presignal import PEEK_WAIT
from tests.e2e.test_admission import users
from tests.e2e.test_api_input import exchange
from tests.support.daemon import Daemon, running_daemon, wait_for


def kill_request(scope: dict[str, Any], reason: str) -> bytes:
    body = json.dumps({"scope": scope, "reason": reason}).encode()
    return (b"POST /v1/actions/kill HTTP/1.1\r\nHost: localhost\r\nContent-Type: "
            b"application/json\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
            % (len(body), body))


def launch(daemon: Daemon, name: str, agent_class: str) -> str:
    view = daemon.agentctl_json("run", "--detach", "--json", "--name", name, "--class",
                                agent_class, "--", "sleep", "600")
    return str(view["id"])


UNTAKEN = "SIGKILL sent at the owners' acceptor for '{}'; "


def kill_rows(daemon: Daemon, reason: str) -> dict[str, dict[str, Any]]:
    """The kill rows of the request with `reason`: its kill path's, or those of the kill
    that took what its kill path did not (daemon/presignalled.py finish)."""
    return {row["target"]: row for row in daemon.audit_rows("kill")
            if row["reason"] == reason or row["reason"].startswith(UNTAKEN.format(reason))}


def killed_and_audited(daemon: Daemon, runs: dict[str, str], reason: str, what: str
                       ) -> dict[str, dict[str, Any]]:
    """Waits until every one of `runs` (name -> run id) has a kill row of the request with
    `reason` and is finalised as killed; the rows."""
    wait_for(lambda: len(kill_rows(daemon, reason)) == len(runs) or None, timeout=30,
             what=f"the kill rows of {what}")
    for run_id in runs.values():
        wait_for(lambda i=run_id: daemon.client.get_run(i)["state"] == "killed" or None,
                 timeout=30, what=f"run {run_id} finalised as killed")
    return kill_rows(daemon, reason)


def timed_kill(daemon: Daemon, scope: dict[str, Any], reason: str) -> float:
    """An owner's kill through the client agentctl uses (api/client.py: the owners' socket,
    the whole request in one send right after the connect); how long the call took, connect
    to answer, which bounds how late after the accept its bytes can have come."""
    started = time.monotonic()
    daemon.client.action("kill", scope, reason=reason)
    return time.monotonic() - started


def not_at_the_acceptor(row: dict[str, Any], took: float | None) -> str:
    """Why a kill row without the acceptor's SIGKILL fails the test, said plainly: the
    acceptor waits PEEK_WAIT after the accept for a request's bytes (one last look at the
    deadline), so only a client stalled that long between its connect and its one send is
    no defect of the daemon."""
    said = (f"not SIGKILLed at the owners' acceptor (detail.sigkill: "
            f"{row['detail'].get('sigkill')}); the acceptor waits {PEEK_WAIT * 1000:.0f} ms "
            f"after the accept for the request's bytes")
    if took is None:
        return f"{said}: {row}"
    if took > PEEK_WAIT:
        return (f"{said}, and the client's call took {took * 1000:.0f} ms from its connect "
                f"to its answer: it may have been stalled past the deadline by the host's "
                f"load before its one send: {row}")
    return (f"{said}, and the client's whole call, connect to answer, took "
            f"{took * 1000:.0f} ms: its bytes were there in time, a defect: {row}")


def assert_killed_at_the_acceptor(daemon: Daemon, runs: dict[str, str], reason: str,
                                  took: float | None = None) -> None:
    rows = kill_rows(daemon, reason)
    assert set(rows) == set(runs), rows
    for agent, run_id in runs.items():
        row = rows[agent]
        assert row["outcome"] == "ok" and row["new_state"] == "killed", row
        assert row["detail"]["run"] == run_id and row["detail"]["confirmed_empty"] is True
        sigkill = row["detail"].get("sigkill")
        assert sigkill is not None and sigkill["at"] == "owners_acceptor", \
            not_at_the_acceptor(row, took)
        assert sigkill["mechanism"].startswith("cgroup.kill"), row
        run = daemon.client.get_run(run_id)
        assert (run["state"], run["end_reason"]) == ("killed", f"kill: {row['reason']}"), run
        assert daemon.client.agent(agent)["state"] == "killed"


def test_an_owners_kill_is_sigkilled_at_the_acceptor_for_an_agent_a_class_and_all(
        daemon: Daemon) -> None:
    runs = {name: launch(daemon, name, cls) for name, cls in
            [("solo", "one"), ("c1", "pair"), ("c2", "pair"), ("rest1", "x"), ("rest2", "y")]}

    # Through the client agentctl uses (api/client.py): the owners' socket, the request
    # written right after the connect.
    took = timed_kill(daemon, {"agent": "solo"}, "agent pre-signal")
    assert_killed_at_the_acceptor(daemon, {"solo": runs["solo"]}, "agent pre-signal", took)

    took = timed_kill(daemon, {"class": "pair"}, "class pre-signal")
    assert_killed_at_the_acceptor(daemon, {n: runs[n] for n in ("c1", "c2")},
                                  "class pre-signal", took)

    took = timed_kill(daemon, {"all": True}, "global pre-signal")
    # The agents killed already are skipped; the others' runs were signalled through the
    # parent's one write, as the global path's own.
    assert_killed_at_the_acceptor(daemon, {n: runs[n] for n in ("rest1", "rest2")},
                                  "global pre-signal", took)
    rows = kill_rows(daemon, "global pre-signal")
    for name in ("rest1", "rest2"):
        assert rows[name]["detail"]["sigkill"]["mechanism"] == "cgroup.kill (parent)"
    assert daemon.client.audit_verify()["ok"] is True


def test_a_kill_whose_caller_hangs_up_at_once_is_still_audited_and_finalised(
        daemon: Daemon) -> None:
    owner_socket = owner_socket_of(daemon.socket)
    runs: dict[str, str] = {}
    for round_ in range(3):
        batch = {f"h{round_}-{i}": launch(daemon, f"h{round_}-{i}", f"hang{round_}")
                 for i in range(2)}
        runs.update(batch)
        reason = f"caller gone {round_}"
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(str(owner_socket))
            sock.sendall(kill_request({"class": f"hang{round_}"}, reason))
        # The request's handler or the connection's end: either way every run is killed
        # through the kill path and audited with the acceptor's SIGKILL.
        rows = killed_and_audited(daemon, batch, reason, "a request whose caller hung up")
        for name, run_id in batch.items():
            assert rows[name]["detail"]["run"] == run_id
            assert rows[name]["detail"]["sigkill"]["at"] == "owners_acceptor"
            assert rows[name]["outcome"] == "ok"
    assert not daemon.audit_rows("acceptor_sigkill")
    assert daemon.client.audit_verify()["ok"] is True


def test_what_the_acceptor_does_not_judge_goes_the_normal_way(daemon: Daemon) -> None:
    run_id = launch(daemon, "kept", "k")
    owner_socket = owner_socket_of(daemon.socket)
    # A kill with no reason: refused by the handler, and nothing signalled before it.
    status, _headers, body = exchange(owner_socket, kill_request({"agent": "kept"}, ""))
    assert status == 422 and body["error"]["code"] == "reason_required", body
    assert daemon.client.get_run(run_id)["state"] == "running"
    # A pause is no kill: served by the loop alone.
    pause = json.dumps({"scope": {"agent": "kept"}, "reason": "p"}).encode()
    status, _headers, body = exchange(owner_socket, (
        b"POST /v1/actions/pause HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n"
        b"Connection: close\r\n\r\n%s" % (len(pause), pause)))
    assert status == 200, body
    assert daemon.client.agent("kept")["state"] == "paused"
    # A kill of a paused agent is signalled at the acceptor (cgroup.kill kills frozen tasks).
    took = timed_kill(daemon, {"agent": "kept"}, "frozen")
    assert_killed_at_the_acceptor(daemon, {"kept": run_id}, "frozen", took)


def test_a_kill_the_loop_never_handles_after_its_sigkill_is_still_audited_and_finalised(
        daemon: Daemon) -> None:
    runs = {name: launch(daemon, name, "piped") for name in ("p1", "p2")}
    spared = launch(daemon, "spared", "other")
    # A complete kill followed by bytes that are no HTTP: the acceptor judges the first
    # request alone and SIGKILLs, while the loop's HTTP parser refuses the connection's
    # bytes as a whole (400) and its kill path never runs.
    reason = "the loop refused it"
    status, _headers, body = exchange(
        owner_socket_of(daemon.socket),
        kill_request({"class": "piped"}, reason) + b"\x00\x01 not http\r\n\r\n")
    assert status == 400, body
    rows = killed_and_audited(daemon, runs, reason,
                              "the runs signalled for a request the loop refused")
    for row in rows.values():
        assert row["reason"].startswith(UNTAKEN.format(reason)), row
        assert row["actor"].startswith("root(")
    assert_killed_at_the_acceptor(daemon, runs, reason)
    assert daemon.client.get_run(spared)["state"] == "running"
    assert daemon.client.audit_verify()["ok"] is True


def test_a_kill_the_loops_http_layer_reads_otherwise_is_not_sigkilled_at_the_acceptor(
        daemon: Daemon) -> None:
    """A body in a Content-Encoding (the loop inflates it, and plain JSON does not inflate)
    and a control character in a header's value (the loop's parser answers 400): the
    acceptor leaves both to the loop, so the caller's error answer is the whole truth and
    the agent runs on, as on the control socket."""
    runs = {name: launch(daemon, name, "differ") for name in ("encoded", "ctl", "del")}
    owner_socket = owner_socket_of(daemon.socket)
    for name, extra in [("encoded", b"Content-Encoding: gzip\r\n"),
                        ("ctl", b"X-Note: a\x01b\r\n"), ("del", b"X-Note: a\x7fb\r\n")]:
        body = json.dumps({"scope": {"agent": name}, "reason": f"read otherwise {name}"})
        raw = (b"POST /v1/actions/kill HTTP/1.1\r\nHost: x\r\n" + extra
               + b"Content-Length: %d\r\nConnection: close\r\n\r\n%s"
               % (len(body), body.encode()))
        status, _headers, answer = exchange(owner_socket, raw)
        assert status == 400 and answer["error"]["code"] == "bad_http_request", answer
    for name, run_id in runs.items():
        assert daemon.client.get_run(run_id)["state"] == "running", name
    # A kill that goes through: it finds each agent as it was (had any been signalled
    # above, its run would be killed and audited for that request instead, and skipped here).
    daemon.agentctl_json("kill", "--class", "differ", "--reason", "now for real", "--json")
    assert_killed_at_the_acceptor(daemon, runs, "now for real")
    rows = kill_rows(daemon, "now for real")
    assert {row["reason"] for row in rows.values()} == {"now for real"}, rows
    assert {row["previous_state"] for row in rows.values()} == {"active"}, rows
    assert not [row for row in daemon.audit_rows("kill")
                if row["reason"].startswith("SIGKILL sent at the owners' acceptor for "
                                            "'read otherwise")]


def test_a_kill_behind_silent_and_stalled_owners_is_still_sigkilled_at_the_acceptor(
        daemon: Daemon) -> None:
    """Owners' connections that write nothing, or stall in a kill's head, are waited on
    beside the next ones (api/listener.py Acceptor): a kill connected behind them is
    SIGKILLed at the acceptor and confirmed, and the waiting ones are then served (or timed
    out) as any connection."""
    runs = {name: launch(daemon, name, "behind") for name in ("b1", "b2")}
    owner_socket = owner_socket_of(daemon.socket)
    head = kill_request({"class": "behind"}, "behind the stalled")[:60]
    waiting = [socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(24)]
    try:
        for i, sock in enumerate(waiting):
            sock.connect(str(owner_socket))
            if i % 2:
                sock.sendall(head)  # a kill's head, stalled: never completed
        daemon.agentctl_json("kill", "--class", "behind", "--reason", "behind the stalled",
                             "--json")
        assert_killed_at_the_acceptor(daemon, runs, "behind the stalled")
        # The stalled heads were handed to the loop unjudged: nothing was signalled for them.
        assert not [row for row in daemon.audit_rows("kill") if row["reason"].startswith(
            UNTAKEN.format("behind the stalled"))]
    finally:
        for sock in waiting:
            sock.close()
    assert daemon.client.health()["status"] == "ok"


# A caller's raw kill on a socket, as another user: sends it (at once, or on a connection it
# opened earlier, once told to on stdin) and prints the answer's status line, or b'' when the
# daemon closed the connection unread.
RAW_KILL = textwrap.dedent("""
    import socket, sys
    path, request, wait = sys.argv[1], sys.argv[2].encode(), sys.argv[3] == "wait"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    if wait:
        print("connected", flush=True)
        sys.stdin.readline()
    try:
        s.sendall(request)
        print(repr(s.recv(65536).split(b"\\r\\n")[0]), flush=True)
    except (BrokenPipeError, ConnectionResetError):
        print("b''", flush=True)
""")


def raw_kill_as(user: pwd.struct_passwd, path: Path, scope: dict[str, Any], reason: str, *,
                wait: bool = False) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", RAW_KILL, str(path), kill_request(scope, reason).decode(),
         "wait" if wait else "now"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, user=user.pw_uid, group=user.pw_gid,
        extra_groups=os.getgrouplist(user.pw_name, user.pw_gid))


def answer_of(proc: subprocess.Popen[str]) -> str:
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    return out.strip().splitlines()[-1]


def test_an_owner_demoted_by_a_reload_gets_nothing_sigkilled_at_the_acceptor(
        tmp_root: Path) -> None:
    """The owners' socket open to a group, its user an owner by name: its kill is SIGKILLed
    at the acceptor. A reload makes it an admin: a new connection of its is turned away
    unread, and a kill it writes on a connection it opened while still an owner is refused
    by the loop (403, audited), nothing signalled for either; both agents run on."""
    with users("owner") as made, running_daemon(
            tmp_root, roles={"owner": [f"user:{made['users']['owner'].pw_name}"]},
            control={"owner_socket_group": made["group"]}) as daemon:
        user = made["users"]["owner"]
        owner_socket = owner_socket_of(daemon.socket)
        runs = {name: launch(daemon, name, name) for name in ("first", "second", "third")}
        assert answer_of(raw_kill_as(user, owner_socket, {"agent": "first"},
                                     "as an owner")) == "b'HTTP/1.1 200 OK'"
        assert_killed_at_the_acceptor(daemon, {"first": runs["first"]}, "as an owner")
        early = raw_kill_as(user, owner_socket, {"agent": "third"}, "opened as an owner",
                            wait=True)
        assert early.stdout is not None and early.stdout.readline().strip() == "connected"
        daemon.extra_config["roles"] = {"admin": [f"user:{user.pw_name}"]}
        daemon.write_config()
        daemon.agentctl_json("reload", "--reason", "demote")
        assert answer_of(raw_kill_as(user, owner_socket, {"agent": "second"},
                                     "as an admin")) == "b''"
        assert early.stdin is not None
        early.stdin.write("go\n")
        early.stdin.flush()
        assert answer_of(early) == "b'HTTP/1.1 403 Forbidden'"
        refused = [row for row in daemon.audit_rows("kill")
                   if row["outcome"] == "refused:forbidden"]
        assert len(refused) == 1 and refused[0]["actor"].startswith(user.pw_name), refused
        for name in ("second", "third"):
            assert daemon.client.get_run(runs[name])["state"] == "running", name
        assert not [row for row in daemon.audit_rows("kill") if row["target"] != "first"
                    and row["outcome"] == "ok"]
        assert not daemon.audit_rows("acceptor_sigkill")


def test_a_global_kill_the_loop_refused_after_its_sigkill_leaves_the_global_halt_in_force(
        daemon: Daemon) -> None:
    """`all=true` followed by bytes that are no HTTP: every run is SIGKILLed at the acceptor
    and the loop's parser answers 400, so the handler that sets the global halt never runs;
    the runs are killed and audited, and the halt is in force all the same (fail closed)."""
    runs = {name: launch(daemon, name, "fleet") for name in ("f1", "f2")}
    reason = "everything, then garbage"
    status, _headers, body = exchange(owner_socket_of(daemon.socket),
                                      kill_request({"all": True}, reason) + b"\x00 no http\r\n")
    assert status == 400, body
    killed_and_audited(daemon, runs, reason, "a global kill the loop refused")
    assert daemon.client.health()["global_halt"] is True
    halts = daemon.audit_rows("global_halt")
    assert len(halts) == 1 and halts[0]["reason"].startswith(UNTAKEN.format(reason)), halts
    refused = daemon.agentctl("run", "--detach", "--name", "after", "--", "sleep", "600")
    assert refused.returncode != 0 and "global_halt" in refused.stdout + refused.stderr, refused
    assert daemon.client.audit_verify()["ok"] is True
