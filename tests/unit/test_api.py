"""The control API (supervisor/api/server.py) served for real on a Unix socket in tmp, with the
real client (supervisor/api/client.py): structured errors with stable codes that change
nothing, the OpenAPI document, a launch + kill round trip, and SO_PEERCRED authorization.
The test process is the socket's peer. No root needed."""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.web import BaseRequest

from supervisor.api.client import Client
from supervisor.api.server import (
    FOLLOW_STREAMS,
    RENDERED,
    AfterAnswer,
    RenderedPages,
    build_app,
)
from supervisor.config import RolesSection
from supervisor.errors import (
    AgentNotFound,
    DaemonUnavailable,
    Forbidden,
    IllegalTransition,
    InvalidRequest,
    RouteNotFound,
    SupervisorError,
)
from supervisor.openapi import openapi_document
from tests.unit.conftest import (
    WAIT,
    ServeFactory,
    ServerThread,
    raw_request,
    spend_request_key_warning,
)

RUN_BODY: dict[str, Any] = {"name": "a1", "class": "web", "command": ["sleep", "infinity"]}


def client_of(server: ServerThread) -> Client:
    return Client(server.socket_path, timeout=WAIT)


def launch(server: ServerThread, name: str = "a1") -> dict[str, Any]:
    view = client_of(server).run({**RUN_BODY, "name": name})
    assert isinstance(view, dict)
    return view


def error_of(status_and_body: tuple[int, Any]) -> tuple[int, str, dict[str, Any]]:
    status, body = status_and_body
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"code", "message", "detail"}, error
    assert isinstance(error["message"], str) and error["message"]
    return status, error["code"], error["detail"]


# ----------------------------------------------------------------------------- errors


def test_unknown_agent_is_404_agent_not_found(server: ServerThread) -> None:
    launch(server)
    before = server.snapshot()
    status, code, detail = error_of(raw_request(server.socket_path, "GET", "/v1/agents/ghost"))
    assert (status, code, detail["agent"]) == (404, "agent_not_found", "ghost")
    status, code, _ = error_of(raw_request(
        server.socket_path, "POST", "/v1/actions/kill",
        b'{"scope": {"agent": "ghost"}, "reason": "x"}'))
    assert (status, code) == (404, "agent_not_found")
    with pytest.raises(AgentNotFound) as info:
        client_of(server).agent("ghost")
    assert info.value.detail["agent"] == "ghost"
    assert server.snapshot() == before


@pytest.mark.parametrize(("method", "path"), [
    ("GET", "/v1/nothing"), ("GET", "/"), ("POST", "/v2/runs"), ("GET", "/v1/agents/a/b"),
])
def test_unknown_route_is_404_route_not_found(server: ServerThread, method: str,
                                              path: str) -> None:
    launch(server)
    before = server.snapshot()
    status, code, detail = error_of(raw_request(server.socket_path, method, path, b"{}"))
    assert (status, code, detail["path"]) == (404, "route_not_found", path)
    assert server.snapshot() == before


def test_wrong_method_is_405(server: ServerThread) -> None:
    before = server.snapshot()
    status, code, detail = error_of(raw_request(server.socket_path, "DELETE", "/v1/agents"))
    assert (status, code) == (405, "method_not_allowed")
    assert "GET" in detail["allowed"]
    assert server.snapshot() == before


def test_unknown_verb_is_404(server: ServerThread) -> None:
    launch(server)
    before = server.snapshot()
    status, code, detail = error_of(raw_request(
        server.socket_path, "POST", "/v1/actions/explode",
        b'{"scope": {"agent": "a1"}, "reason": "x"}'))
    assert (status, code, detail["verb"]) == (404, "route_not_found", "explode")
    assert set(detail["known"]) == {"kill", "pause", "resume", "stop", "reactivate"}
    assert server.snapshot() == before
    assert server.runtime.handles[next(iter(server.runtime.handles))].processes == 1


def test_reason_over_500_characters_is_422(server: ServerThread) -> None:
    launch(server)
    before = server.snapshot()
    with pytest.raises(InvalidRequest) as info:
        client_of(server).action("kill", {"agent": "a1"}, reason="x" * 501)
    error = info.value
    assert error.code == "invalid_request"
    assert error.detail["field"] == "reason"
    assert "reason" in error.message
    assert server.snapshot() == before
    handle = next(iter(server.runtime.handles.values()))
    assert handle.processes == 1 and handle.network, "the agent was touched"
    # 500 characters is the limit, not over it.
    result = client_of(server).action("kill", {"agent": "a1"}, reason="x" * 500)
    assert result["results"][0]["new_state"] == "killed"


def test_a_reason_with_unpaired_surrogates_is_stored_with_replacement_characters(
        server: ServerThread) -> None:
    """JSON's "\\udcff" parses to an unpaired surrogate, what an older agentctl sent for an
    argv byte that is not UTF-8: the model refused it (400 invalid_request) and the kill did
    not go through. Each is stored as U+FFFD; the rest of the reason as it was."""
    launch(server)
    body = b'{"scope": {"agent": "a1"}, "reason": "caf\\udce9 \\ud800 ok"}'
    status, answer = raw_request(server.socket_path, "POST", "/v1/actions/kill", body)
    assert status == 200, answer
    assert answer["results"][0]["new_state"] == "killed"
    [row] = [e for e in client_of(server).audit()["entries"] if e["verb"] == "kill"]
    assert row["reason"] == "caf\ufffd \ufffd ok"


def test_reason_limit_status_is_422(server: ServerThread) -> None:
    body = b'{"scope": {"agent": "a1"}, "reason": "' + b"y" * 501 + b'"}'
    launch(server)
    before = server.snapshot()
    status, code, detail = error_of(raw_request(server.socket_path, "POST", "/v1/actions/kill",
                                                body))
    assert (status, code, detail["field"]) == (422, "invalid_request", "reason")
    assert server.snapshot() == before


@pytest.mark.parametrize("body", [
    b"{", b'{"scope": ', b"not json", b"\xff\xfe\x00", b"", b'{"scope": {"agent": "a1"}}}',
])
def test_broken_json_is_400_invalid_json(server: ServerThread, body: bytes) -> None:
    launch(server)
    before = server.snapshot()
    for path in ("/v1/actions/kill", "/v1/runs"):
        status, code, _ = error_of(raw_request(server.socket_path, "POST", path, body))
        assert (status, code) == (400, "invalid_json"), path
    assert server.snapshot() == before


@pytest.mark.parametrize(("path", "body", "field"), [
    ("/v1/actions/kill", {"scope": {"agent": "a1"}, "reason": 5}, "reason"),
    ("/v1/actions/kill", {"scope": {"agent": 5}}, "scope.agent"),
    ("/v1/actions/kill", {"scope": "a1"}, "scope"),
    ("/v1/actions/kill", {"scope": {"agent": "a1"}, "grace": "soon"}, "grace"),
    ("/v1/actions/kill", {"scope": {"agent": "a1"}, "bogus": 1}, "bogus"),
    ("/v1/actions/pause", {"scope": {"agent": "a1", "all": True}}, "scope"),
    ("/v1/runs", {"name": "a2", "command": "sleep 1"}, "command"),
    ("/v1/runs", {"name": "a2", "command": []}, "command"),
    ("/v1/runs", {"name": "A B", "command": ["true"]}, "name"),
    ("/v1/runs", {"name": "a2", "command": ["true"], "timeout": "10"}, "timeout"),
    ("/v1/runs", {"name": "a2", "command": ["true"], "workspace": "rel"}, "workspace"),
    ("/v1/runs", {"name": "a2", "command": ["true"], "env": {"1X": "y"}}, "env"),
])
def test_wrong_field_is_422_naming_the_field(server: ServerThread, path: str,
                                             body: dict[str, Any], field: str) -> None:
    launch(server)
    before = server.snapshot()
    with pytest.raises(InvalidRequest) as info:
        client_of(server).request("POST", path, body)
    assert info.value.code == "invalid_request"
    assert info.value.detail["field"] == field
    assert field in info.value.message
    assert server.snapshot() == before


def test_request_body_that_is_not_an_object(server: ServerThread) -> None:
    before = server.snapshot()
    status, code, detail = error_of(raw_request(server.socket_path, "POST", "/v1/runs", b"[1]"))
    assert (status, code, detail["field"]) == (422, "invalid_request", "body")
    assert server.snapshot() == before


def test_illegal_transition_is_409_and_audited(server: ServerThread) -> None:
    launch(server)
    before = server.snapshot()
    with pytest.raises(IllegalTransition) as info:
        client_of(server).action("resume", {"agent": "a1"}, reason="why not")
    assert info.value.code == "illegal_transition"
    assert info.value.detail["state"] == "active"
    status, code, _ = error_of(raw_request(server.socket_path, "POST", "/v1/actions/resume",
                                           b'{"scope": {"agent": "a1"}}'))
    assert (status, code) == (409, "illegal_transition")
    after = server.snapshot()
    assert (after.agents, after.runs) == (before.agents, before.runs)
    # A refusal changes nothing but is itself recorded: one row per refused request.
    assert after.audit_rows == before.audit_rows + 2
    entries = client_of(server).audit(limit=2)["entries"]
    assert [(e["verb"], e["target"], e["outcome"]) for e in entries] == [
        ("resume", "a1", "refused:illegal_transition")] * 2


def test_error_codes_round_trip_to_typed_errors(server: ServerThread) -> None:
    with pytest.raises(RouteNotFound):
        client_of(server).request("GET", "/v1/nothing")


def test_no_daemon_is_daemon_unavailable(server: ServerThread) -> None:
    with pytest.raises(DaemonUnavailable) as info:
        Client(server.socket_path.with_name("absent.sock"), timeout=WAIT).health()
    assert info.value.exit_status == 7


def test_a_request_emits_no_warning(server: ServerThread) -> None:
    """The daemon runs under the same -W error discipline as its tests: serving a request must
    not warn (aiohttp >= 3.14 warns once per process about request["actor"], a str key)."""
    seen = getattr(BaseRequest, "_seen_str_keys", None)
    if isinstance(seen, set):
        seen.discard("actor")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            status, _body = raw_request(server.socket_path, "GET", "/v1/agents")
    finally:
        spend_request_key_warning()
    assert status == 200
    assert [f"{w.category.__name__}: {w.message}" for w in caught] == []


# ----------------------------------------------------------------------------- OpenAPI


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [r for value in node.values() for r in _refs(value)]
    if isinstance(node, list):
        return [r for value in node for r in _refs(value)]
    return []


def test_openapi_document(server: ServerThread) -> None:
    document = client_of(server).request("GET", "/v1/openapi.json")
    assert document == openapi_document()
    assert document["openapi"].startswith("3.1")
    assert document["info"]["title"] and document["info"]["version"]
    paths = document["paths"]
    assert {"/v1/health", "/v1/agents", "/v1/agents/{name}", "/v1/runs", "/v1/runs/{ref}",
            "/v1/runs/{ref}/logs", "/v1/actions/{verb}", "/v1/audit",
            "/v1/audit/verify"} <= set(paths)
    for path, operations in paths.items():
        for method, operation in operations.items():
            assert method in {"get", "post"}, path
            assert operation["responses"], f"{method} {path}"
            assert "default" in operation["responses"], f"{method} {path} has no error schema"
    schemas = document["components"]["schemas"]
    for ref in _refs(document):
        assert ref.startswith("#/components/schemas/")
        assert ref.rsplit("/", 1)[1] in schemas, f"dangling {ref}"
    assert {"RunRequest", "ActionRequest", "ActionResult", "AgentView", "Error"} <= set(schemas)
    reason = schemas["ActionRequest"]["properties"]["reason"]
    assert reason["maxLength"] == 500


def test_every_route_is_documented() -> None:
    app = build_app(object(), RolesSection())  # type: ignore[arg-type]  # routes only
    served = {(route.method.lower(), route.resource.canonical)
              for route in app.router.routes()
              if route.resource is not None and route.method != "HEAD"}
    # The document does not describe itself.
    served.remove(("get", "/v1/openapi.json"))
    documented = {(method, path) for path, ops in openapi_document()["paths"].items()
                  for method in ops}
    assert served == documented


# ----------------------------------------------------------------------------- round trip


def test_launch_and_kill_round_trip(server: ServerThread) -> None:
    client = client_of(server)
    view = client.run(RUN_BODY)
    assert (view["agent"], view["state"]) == ("a1", "running")
    assert client.agent("a1")["class"] == "web"
    listed = client.agents()
    assert [a["name"] for a in listed["agents"]] == ["a1"] and not listed["global_halt"]
    result = client.action("kill", {"agent": "a1"}, reason="runaway")
    assert result["verb"] == "kill" and result["scope"] == "agent:a1"
    [item] = result["results"]
    assert (item["agent"], item["previous_state"], item["new_state"]) == (
        "a1", "active", "killed")
    assert isinstance(result["time_to_halt_ms"], float) and result["time_to_halt_ms"] >= 0
    assert item["time_to_halt_ms"] == result["time_to_halt_ms"]
    agent = client.agent("a1")
    assert agent["state"] == "killed"
    assert agent["time_to_halt_ms"] == result["time_to_halt_ms"]
    run = client.get_run(view["id"])
    assert run["state"] == "killed" and run["time_to_halt_ms"] == result["time_to_halt_ms"]
    assert server.runtime.handles[view["id"]].network is False
    server.settle()  # the runtime cleanup's row follows the kill's
    entries = client.audit()["entries"]
    assert [e["verb"] for e in entries[-2:]] == ["kill", "cleanup"]
    kill = entries[-2]
    assert kill["time_to_halt_ms"] == result["time_to_halt_ms"]
    assert kill["actor"].endswith(f"(uid={os.getuid()})")
    verify = client.audit_verify()
    assert verify["ok"] and verify["rows"] == len(entries)
    health = client.health()
    assert health["status"] == "ok" and health["agents"] == 1 and health["active_runs"] == 0


def test_run_logs_of_an_ended_run(server: ServerThread) -> None:
    view = launch(server)
    client_of(server).action("kill", {"agent": "a1"}, reason="done")
    assert b"".join(client_of(server).logs(view["id"], follow=True)) == b""


def test_a_follow_of_a_run_ended_but_not_cleaned_up_waits_for_its_last_output(
        server: ServerThread) -> None:
    """A run leaves the live table when it ends; its cleanup (step 6) drains the rest of its
    output into the log afterwards. A follow stream that starts in between (`agentctl run` of
    a short command, its stream opened after the command's exit) ends once that is done,
    with the whole output, not at once with what the log held so far."""
    view = launch(server)
    handle = server.runtime.handles[view["id"]]
    gate = asyncio.Event()  # set on the server's loop only

    async def cleanup() -> None:  # the drain reads the pipe's last bytes at cleanup
        await gate.wait()
        with open(handle.params.log_path, "ab") as log:
            log.write(b"last words\n")
        handle.cleaned = True

    handle.cleanup = cleanup  # type: ignore[method-assign]
    server.call(lambda: handle.finish(0))
    wait_until(lambda: client_of(server).get_run(view["id"])["state"] == "exited")
    assert server.call(lambda: view["id"] not in server.arbiter.live)  # type: ignore[union-attr]
    got: list[bytes] = []
    follower = threading.Thread(
        target=lambda: got.append(b"".join(client_of(server).logs(view["id"], follow=True))))
    follower.start()
    streams = server.app[FOLLOW_STREAMS]
    wait_until(lambda: server.call(lambda: streams.open) == 1)
    assert not got  # still open: the cleanup has not drained the output yet
    server.call(gate.set)
    follower.join(WAIT)
    assert got == [b"last words\n"]


def wait_until(predicate: Callable[[], bool]) -> None:
    deadline = time.monotonic() + WAIT
    while not predicate():
        assert time.monotonic() < deadline, "not within the wait"
        time.sleep(0.01)


# ----------------------------------------------------------------------------- authorization


def _foreign_gid() -> int:
    return max({os.getgid(), *os.getgroups()}) + 1


def test_the_peer_is_identified_by_so_peercred(server: ServerThread) -> None:
    launch(server)
    entry = client_of(server).audit()["entries"][-1]
    assert entry["detail"]["actor"]["uid"] == os.getuid()
    assert entry["detail"]["actor"]["pid"] == os.getpid()


@pytest.mark.skipif(os.geteuid() == 0, reason="root is always authorized, so a root test "
                    "process cannot be refused; run the unit tier as a non-root user")
def test_a_peer_without_a_role_is_forbidden(serve: ServeFactory) -> None:
    server = serve(roles=RolesSection(owner=[f"group:{_foreign_gid()}-nobody-has-it"]))
    before = server.snapshot()
    for method, path, body in [("GET", "/v1/agents", None),
                               ("POST", "/v1/actions/kill", b'{"scope": {"all": true}}'),
                               ("POST", "/v1/runs", b'{"command": ["true"]}')]:
        status, code, detail = error_of(raw_request(server.socket_path, method, path, body))
        assert (status, code, detail["uid"]) == (403, "forbidden", os.getuid())
    with pytest.raises(Forbidden) as info:
        client_of(server).agents()
    assert f"uid {os.getuid()}" in info.value.message
    after = server.snapshot()
    assert (after.agents, after.runs) == (before.agents, before.runs)
    assert not server.call(lambda: server.arbiter.global_halt)  # type: ignore[union-attr]
    assert server.runtime.handles == {}
    refusals = server.call(lambda: server.audit.list())
    assert len(refusals) == after.audit_rows - before.audit_rows == 4
    assert all(e.outcome == "refused:forbidden" and e.scope == "api" for e in refusals)
    assert (refusals[1].verb, refusals[1].target) == ("kill", "/v1/actions/kill")
    assert refusals[1].detail["needed_role"] == "owner"
    assert all(e.detail["actor"]["uid"] == os.getuid() for e in refusals)


def test_client_errors_are_supervisor_errors(server: ServerThread) -> None:
    with pytest.raises(SupervisorError) as info:
        client_of(server).agent("ghost")
    assert info.value.exit_status == 3


def test_logs_of_a_run_whose_output_was_pruned_say_so(server: ServerThread) -> None:
    view = launch(server)
    arbiter = server.arbiter
    assert arbiter is not None
    log_path = Path(server.call(lambda: arbiter.live[view["id"]].record.log_path))
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_path.write_text("hello\n")
    client_of(server).action("kill", {"agent": "a1"}, reason="done")
    assert b"".join(client_of(server).logs(view["id"])) == b"hello\n"
    log_path.unlink()  # what log_retention does
    with pytest.raises(SupervisorError) as info:
        b"".join(client_of(server).logs(view["id"]))
    assert info.value.code == "logs_expired"
    assert info.value.exit_status == 3


def test_agent_pages_are_served_as_rendered_until_what_they_show_changes(
        server: ServerThread) -> None:
    client = client_of(server)
    client.run(RUN_BODY)
    first = client.agents_page()
    rendered = server.app[RENDERED]
    [(query, (stamp, body))] = rendered.pages.items()
    assert json.loads(body) == first
    assert client.agents_page() == first and rendered.pages[query] == (stamp, body)
    # A kill changes what the page shows: the next read renders it anew, never stale.
    client.action("kill", {"agent": "a1"}, reason="cache test")
    after = client.agents_page()
    assert [a["state"] for a in after["agents"]] == ["killed"]
    assert rendered.pages[query][0] != stamp
    # Filters and cursors are pages of their own, and the kept pages stay bounded.
    for index in range(RenderedPages.MAX_PAGES + 5):
        client.agents_page(agent_class=f"c{index}")
    assert len(rendered.pages) <= RenderedPages.MAX_PAGES
    assert client.agents_page(state="killed")["agents"][0]["name"] == "a1"


def test_time_to_halt_starts_when_the_connection_is_accepted(serve: ServeFactory) -> None:
    """A kill that waits for a busy loop has that wait in its time_to_halt_ms: the acceptor
    thread stamps the connection, not the handler that runs once the loop is free."""
    server = serve(listener=True)
    client = client_of(server)
    client.run(RUN_BODY)
    assert server.loop is not None and server.listener is not None
    admission = server.listener.admission
    deadline = time.monotonic() + 30
    while admission.connected and time.monotonic() < deadline:
        time.sleep(0.01)  # the launch's connection is gone
    free = threading.Event()
    server.loop.call_soon_threadsafe(free.wait, 30)  # the loop is stuck until `free` is set
    answer: list[Any] = []
    killer = threading.Thread(target=lambda: answer.append(
        client.action("kill", {"agent": "a1"}, reason="busy loop")))
    killer.start()
    try:
        while admission.connected < 1 and time.monotonic() < deadline + 30:
            time.sleep(0.01)  # the acceptor admits the kill's connection; the loop is stuck
        assert admission.connected == 1 and admission.on_owner_socket == 1
        time.sleep(0.3)
    finally:
        free.set()
        killer.join(30)
    [result] = answer
    assert result["results"][0]["new_state"] == "killed"
    assert result["time_to_halt_ms"] >= 300


def test_work_left_for_after_an_answer_runs_once_in_order_even_when_no_answer_runs_it(
        caplog: pytest.LogCaptureFixture) -> None:
    """What a verb leaves for after its answer (`AfterAnswer`): run in the order handed over,
    once, a call that raises logged without stopping the next; and run at the loop's next
    turn when the handler never got to it (an error, a row not yet durable)."""
    done: list[int] = []

    def fails() -> None:
        raise RuntimeError("records")

    async def body() -> None:
        after = AfterAnswer()
        assert not after.pending
        after(lambda: done.append(1))
        after(fails)
        after(lambda: done.append(3))
        assert after.pending and done == []
        await asyncio.sleep(0)  # nobody ran it: the loop's next turn does
        assert done == [1, 3] and not after.pending
        after.run()
        assert done == [1, 3]
        after(lambda: done.append(4))
        after.run()  # the handler's own run, before the loop's turn
        await asyncio.sleep(0)
        assert done == [1, 3, 4]

    asyncio.run(body())
    assert "work left for after an answer failed" in caplog.text
