"""What a caller holds open cannot hold a stopping or restarting daemon (issue 13, audit F3):
follow streams end at once with the daemon's notice (api/server.py FollowStreams), which the
client raises as StreamEnded and agentctl prints on one line with exit status 75; a stop in
its grace period goes on to the kill path and answers (Arbiter.cut_graces); the listener waits
a bounded time for requests in flight and closes idle keep-alive connections
(api/listener.py LISTENER_DRAIN). In-process servers over the FakeRuntime; no root."""

from __future__ import annotations

import asyncio
import signal
import socket
import threading
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from supervisor.api import listener as listener_module
from supervisor.api.client import Client
from supervisor.api.server import FOLLOW_STREAMS, FollowStreams
from supervisor.cli import follow as follow_module
from supervisor.cli.main import cli
from supervisor.errors import StreamEnded, SupervisorError
from supervisor.models import ActionRequest, RunRequest, Scope
from supervisor.runtime.fake import FakeRuntime
from supervisor.states import EndCause
from tests.unit.conftest import ALICE, WAIT, MakeEnv, ServeFactory, ServerThread, raw_request

BODY: dict[str, Any] = {"name": "a1", "command": ["sleep", "infinity"]}


def client_of(server: ServerThread) -> Client:
    return Client(server.socket_path, timeout=WAIT)


def log_path(server: ServerThread, run_id: str) -> Path:
    arbiter = server.arbiter
    assert arbiter is not None
    path = Path(server.call(lambda: arbiter.live[run_id].record.log_path))
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


class Follower:
    """`Client.logs(run, follow=True)` on a thread: what it printed and how it ended."""

    def __init__(self, server: ServerThread, run_id: str) -> None:
        self.out = b""
        self.error: BaseException | None = None
        self.finished = False
        self._thread = threading.Thread(target=self._follow, args=(server, run_id), daemon=True)
        self._thread.start()
        streams = server.app[FOLLOW_STREAMS]
        wait_until(lambda: streams.open == 1, "the stream to open")

    def _follow(self, server: ServerThread, run_id: str) -> None:
        try:
            for chunk in Client(server.socket_path, timeout=WAIT).logs(run_id, follow=True):
                self.out += chunk
            self.finished = True
        except BaseException as exc:  # the test reads it
            self.error = exc

    def join(self) -> None:
        self._thread.join(WAIT)
        assert not self._thread.is_alive(), "the stream did not end"


def wait_until(predicate: Any, what: str) -> None:
    done = threading.Event()
    for _ in range(int(WAIT / 0.01)):
        if predicate():
            return
        done.wait(0.01)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.parametrize("why", ["restarting", "stopping"])
def test_a_follow_stream_ends_with_the_daemons_notice_while_the_run_goes_on(
        serve: ServeFactory, why: str) -> None:
    server = serve(listener=True)
    view = client_of(server).run(BODY)
    log_path(server, view["id"]).write_bytes(b"tick-1\ntick-2 no newline yet")
    follower = Follower(server, view["id"])
    wait_until(lambda: follower.out.endswith(b"yet"), "the output so far")

    ended = server.call(lambda: server.app[FOLLOW_STREAMS].end(why))
    follower.join()

    assert ended == 1
    # Nothing of the notice is output; it says the output stopped mid-line.
    assert follower.out == b"tick-1\ntick-2 no newline yet"
    assert isinstance(follower.error, StreamEnded), follower.error
    assert follower.error.exit_status == 75
    assert follower.error.detail["why"] == why and follower.error.detail["run"] == view["id"]
    assert follower.error.detail["midline"] is True
    assert f"the daemon is {why}" in follower.error.message
    assert view["id"] in follower.error.message and f"[{why}" not in follower.error.message
    if why == "restarting":  # where to go on from: the bytes shown so far
        assert f"from offset {len(follower.out)} " in follower.error.message
    assert server.call(lambda: view["id"] in server.arbiter.live)  # type: ignore[union-attr]
    # A stream that starts while the daemon stops ends the same way, after the output.
    with pytest.raises(StreamEnded):
        b"".join(client_of(server).logs(view["id"], follow=True))
    # A plain read is no stream: it is answered whole, with no notice.
    assert b"".join(client_of(server).logs(view["id"])) == b"tick-1\ntick-2 no newline yet"
    client_of(server).action("kill", {"agent": "a1"}, reason="done")


def test_output_that_looks_like_the_notice_is_output(server: ServerThread) -> None:
    """The end mark is a token in the stream's own header: an agent cannot end its
    operator's stream by printing the notice, with or without a guessed mark."""
    view = client_of(server).run(BODY)
    fake = (b"agent-supervisor: the daemon is restarting; run x keeps running [restarting "
            + b"0" * 32 + b"]\n")
    log_path(server, view["id"]).write_bytes(fake)
    follower = Follower(server, view["id"])
    wait_until(lambda: follower.out == fake, "the agent's output")
    client_of(server).action("kill", {"agent": "a1"}, reason="done")
    follower.join()
    assert follower.finished and follower.error is None
    assert follower.out == fake


def test_notice_names_the_run_and_carries_the_mark() -> None:
    notice = FollowStreams.notice("restarting", "r-1", "m" * 32, 1234)
    assert notice.startswith(b"agent-supervisor: the daemon is restarting; run r-1 keeps ")
    assert b"from offset 1234 ('agentctl logs -f r-1')" in notice
    assert notice.endswith(b" [restarting " + b"m" * 32 + b"]\n")
    stopping = FollowStreams.notice("stopping", "r-1", "m" * 32, 1234)
    assert stopping.endswith(b" [stopping " + b"m" * 32 + b"]\n")
    with pytest.raises(AssertionError):
        FollowStreams().end("paused")


def invoke(server: ServerThread, *args: str) -> tuple[threading.Thread, list[Any]]:
    """agentctl ARGS on a thread (it blocks while it follows); its Result in the list."""
    result: list[Any] = []
    thread = threading.Thread(target=lambda: result.append(CliRunner().invoke(
        cli, ["--socket", str(server.socket_path), *args], catch_exceptions=False)))
    thread.start()
    return thread, result


@pytest.mark.parametrize("args", [["logs", "-f", "a1"], ["logs", "--follow", "a1", "--json"]])
def test_agentctl_logs_f_says_a_stop_on_one_line_and_exits_75(serve: ServeFactory,
                                                              args: list[str]) -> None:
    server = serve(listener=True)
    view = client_of(server).run(BODY)
    log_path(server, view["id"]).write_bytes(b"hello\n")
    thread, result = invoke(server, *args)
    streams = server.app[FOLLOW_STREAMS]
    wait_until(lambda: streams.open == 1, "agentctl's stream")
    server.call(lambda: streams.end("stopping"))
    thread.join(WAIT)
    [outcome] = result
    assert outcome.exit_code == 75, (outcome.stdout, outcome.stderr)
    if "--json" in args:
        body = outcome.stdout[outcome.stdout.index("{"):]
        assert '"code": "stream_ended"' in body and view["id"] in body
        assert outcome.stderr == ""
    else:
        assert outcome.stdout == "hello\n"
        lines = outcome.stderr.splitlines()
        assert len(lines) == 1, lines
        assert lines[0].startswith("agentctl: the daemon is stopping and kills every agent, "
                                   f"run {view['id']} among them")
        assert "Traceback" not in outcome.stderr
    client_of(server).action("kill", {"agent": "a1"}, reason="done")


def test_agentctl_logs_f_follows_again_after_a_restart_from_where_it_stopped(
        serve: ServeFactory) -> None:
    """A restart's notice: one line, then the same run's output from the byte where the
    stream stopped once a daemon answers (here the same one, its streams open again):
    nothing lost, nothing twice; the run's end ends it as usual."""
    server = serve(listener=True)
    view = client_of(server).run(BODY)
    path = log_path(server, view["id"])
    path.write_bytes(b"one\ntwo, half")
    thread, result = invoke(server, "logs", "-f", "a1")
    streams = server.app[FOLLOW_STREAMS]
    wait_until(lambda: streams.open == 1, "agentctl's stream")
    server.call(lambda: streams.end("restarting"))
    wait_until(lambda: streams.open == 0, "the stream to end")
    with path.open("ab") as log:  # the agent writes on while no stream is open
        log.write(b" and the rest\nthree\n")
    streams.ending = None  # the next daemon's streams
    wait_until(lambda: streams.open == 1, "agentctl to follow again")
    client_of(server).action("kill", {"agent": "a1"}, reason="done")
    thread.join(WAIT)
    [outcome] = result
    assert outcome.exit_code == 0, (outcome.stdout, outcome.stderr)
    assert outcome.stdout == "one\ntwo, half and the rest\nthree\n"
    assert outcome.stderr.splitlines() == [
        f"agentctl: the daemon is restarting; run {view['id']} keeps running: following it "
        f"again once the daemon is back (up to {follow_module.RESTART_WAIT:g}s)"]


def test_agentctl_run_gives_up_when_no_daemon_is_back_in_time(
        serve: ServeFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """A daemon that keeps ending the stream (or none at all) past RESTART_WAIT: exit 75,
    one line for the restart and one for giving up."""
    monkeypatch.setattr(follow_module, "RESTART_WAIT", 0.5)
    server = serve(listener=True)
    streams = server.app[FOLLOW_STREAMS]

    def restart_once_it_follows() -> None:
        wait_until(lambda: streams.open == 1, "agentctl's stream")
        server.call(lambda: streams.end("restarting"))

    restarting = threading.Thread(target=restart_once_it_follows)
    restarting.start()
    # On this thread: a foreground run sets its SIGINT handler, which only the main thread may.
    outcome = CliRunner().invoke(cli, ["--socket", str(server.socket_path), "run", "--name",
                                       "a1", "--", "sleep", "infinity"],
                                 catch_exceptions=False)
    restarting.join(WAIT)
    assert outcome.exit_code == 75, (outcome.stdout, outcome.stderr)
    lines = outcome.stderr.splitlines()
    assert len(lines) == 2, lines
    assert lines[0].startswith("agentctl: the daemon is restarting; run ")
    assert lines[1].startswith("agentctl: the daemon is restarting; run ")
    assert lines[1].endswith("(no daemon answered within 0.5s)")
    client_of(server).action("kill", {"agent": "a1"}, reason="done")


def test_the_listener_stops_without_waiting_for_a_request_or_an_idle_connection(
        serve: ServeFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """A stream nobody ended (a handler that would run until its run ends) is cancelled after
    LISTENER_DRAIN, and a keep-alive connection between requests is closed at once; the
    daemon's stop goes on. (aiohttp's own wait is 60 s, twice: past TimeoutStopSec.)"""
    monkeypatch.setattr(listener_module, "LISTENER_DRAIN", 0.2)
    server = serve(listener=True)
    view = client_of(server).run(BODY)
    follower = Follower(server, view["id"])
    idle = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    idle.settimeout(WAIT)
    idle.connect(str(server.socket_path))
    idle.sendall(b"GET /v1/health HTTP/1.1\r\nHost: localhost\r\n\r\n")
    answer = b""
    while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
        answer += idle.recv(65536)
    assert answer.startswith(b"HTTP/1.1 200")

    listener = server.listener
    assert listener is not None
    server.run(listener.stop)  # within WAIT: the guard of server.run
    follower.join()
    assert isinstance(follower.error, OSError | SupervisorError), follower.error
    assert idle.recv(65536) == b""  # closed by the daemon
    idle.close()
    assert server.call(lambda: view["id"] in server.arbiter.live)  # type: ignore[union-attr]


def test_a_stop_in_its_grace_goes_to_the_kill_path_when_the_daemon_stops(
        make_env: MakeEnv) -> None:
    """Arbiter.cut_graces: the stop answers its caller with the kill path's result, audited
    as a stop whose grace the daemon cut short; a stop asked after it waits no grace."""
    env = make_env(runtime=FakeRuntime(exit_on_signal=False))

    async def body() -> None:
        arbiter = env.arbiter()
        view = await arbiter.launch(RunRequest.model_validate(BODY), ALICE)
        stopping = asyncio.ensure_future(arbiter.act(
            "stop", ActionRequest(scope=Scope(agent="a1"), reason="done", grace=3600.0), ALICE))
        handle = env.runtime.handles[view.id]
        while not handle.signals:
            await asyncio.sleep(0.01)
        assert handle.signals == [signal.SIGTERM] and not stopping.done()
        await arbiter.cut_graces("the daemon is restarting")
        assert not arbiter.in_grace  # the stop's kill path owns the run by now
        # The stop's kill path owns the run by now, before any sweep of the daemon's own.
        assert view.id not in arbiter.live or arbiter.live[view.id].ending is EndCause.KILLED
        result = await asyncio.wait_for(stopping, WAIT)
        [item] = result.results
        assert (item.previous_state, item.new_state) == ("active", "idle")
        record = env.store.run(view.id)
        assert record is not None and record.state == "killed"
        entry = next(e for e in reversed(env.audit.list(limit=100)) if e.verb == "stop")
        assert entry.reason == "done (grace cut short: the daemon is restarting)"
        assert entry.detail["confirmed_empty"] is True
        await asyncio.wait_for(arbiter.settled(view.id), WAIT)

        again = await arbiter.launch(RunRequest.model_validate(BODY), ALICE)
        result = await asyncio.wait_for(arbiter.act(
            "stop", ActionRequest(scope=Scope(agent="a1"), grace=3600.0), ALICE), WAIT)
        assert result.results[0].new_state == "idle"
        entry = next(e for e in reversed(env.audit.list(limit=100)) if e.verb == "stop")
        assert entry.reason == "grace cut short: the daemon is restarting"
        await asyncio.wait_for(arbiter.settled(again.id), WAIT)

    asyncio.run(body())


def test_the_docs_give_the_wait_the_code_has() -> None:
    root = Path(__file__).resolve().parents[2]
    wait = f"{follow_module.RESTART_WAIT:g}"
    assert f"within {wait} s" in (root / "README.md").read_text()
    runbook = (root / "docs" / "runbook.md").read_text()
    assert f"(up to {wait}s)" in runbook and f"within {wait} s" in runbook


def test_output_from_an_offset_says_where_it_starts(server: ServerThread) -> None:
    view = client_of(server).run(BODY)
    log_path(server, view["id"]).write_bytes(b"0123456789")
    where: dict[str, int] = {}
    assert b"".join(client_of(server).logs(view["id"], offset=4, where=where)) == b"456789"
    assert where == {"offset": 10}
    where.clear()
    assert b"".join(client_of(server).logs(view["id"], tail=0, where=where)) == b""
    assert where == {"offset": 10}
    status, body = raw_request(server.socket_path, "GET",
                               f"/v1/runs/{view['id']}/logs?offset=-1")
    assert (status, body["error"]["code"], body["error"]["detail"]["field"]) == (
        422, "invalid_request", "offset")
    client_of(server).action("kill", {"agent": "a1"}, reason="done")
