"""A run the supervisor could not start answers 4xx, never 500 (issue 13): every error that makes
`agentctl run` exit 125 (errors.launch_exit_status) carries HTTP 424 with a stable code and a
hint, over the real aiohttp app on a Unix socket; an unexpected exception in the launch path is
still a 500 `internal_error` (the daemon itself failed, not a launch); and the client rebuilds
the typed error, so the CLI exits 125, even for a code it does not know. No root: the runtime is
FakeRuntime, failing behind its `fail_launch` seam."""

from __future__ import annotations

import http.client
import json
import re
import socket
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from supervisor.api.client import _error_from
from supervisor.cli.main import cli
from supervisor.errors import (
    LAUNCH_FAILED_EXIT,
    EgressSetupFailed,
    EnforcementError,
    EngineUnavailable,
    GatewayUnavailable,
    KillUnconfirmed,
    RuntimeFailure,
    SupervisorError,
    error_class_for,
    error_classes,
    launch_exit_status,
)
from supervisor.openapi import openapi_document
from supervisor.runtime.fake import FakeRuntime
from tests.unit.conftest import WAIT, ServeFactory


def launch_failures() -> list[type[SupervisorError]]:
    return [cls for cls in error_classes()
            if launch_exit_status(cls("x")) == LAUNCH_FAILED_EXIT]


def test_every_error_that_exits_125_is_a_4xx_with_a_stable_code_and_a_hint() -> None:
    failures = launch_failures()
    # The tree as it stands: a new subclass joins the list, and this test, by itself.
    assert {cls.code for cls in failures} >= {
        "enforcement_failed", "runtime_failed", "egress_setup_failed", "gateway_unavailable",
        "engine_unavailable"}
    for cls in failures:
        assert 400 <= cls.http_status < 500, (cls.code, cls.http_status)
        assert cls.http_status == 424, cls.code
        assert re.fullmatch(r"[a-z]+(_[a-z]+)+", cls.code), cls.code
        assert error_class_for(cls.code) is cls, f"{cls.code} is not unique"
        assert cls.default_hint and cls("x").hint == cls.default_hint, cls.code
    # The daemon's own failures stay 5xx: they are not a launch that did not start.
    assert SupervisorError.http_status == 500 and SupervisorError not in failures
    assert KillUnconfirmed.http_status == 500 and KillUnconfirmed not in failures
    # The exit status outside `agentctl run` (the daemon's own start) is unchanged.
    assert EnforcementError.exit_status == 10


def test_the_openapi_document_lists_the_launch_failures_under_424_not_5xx() -> None:
    [launch] = [item["post"] for path, item in openapi_document()["paths"].items()
                if path == "/v1/runs"]
    responses = launch["responses"]
    assert set(responses["424"]["x-error-codes"]) == {cls.code for cls in launch_failures()}
    assert {"command_not_found", "command_not_executable"} <= set(
        responses["422"]["x-error-codes"])
    for status in ("500", "503"):
        assert not set(responses[status]["x-error-codes"]) & {
            cls.code for cls in launch_failures()}, status
    assert responses["500"]["x-error-codes"] == ["internal_error"]


def post_run(socket_path: Path, name: str) -> tuple[int, dict[str, Any]]:
    conn = http.client.HTTPConnection("localhost", timeout=WAIT)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(WAIT)
    sock.connect(str(socket_path))
    conn.sock = sock
    try:
        body = json.dumps({"name": name, "command": ["sleep", "infinity"]})
        conn.request("POST", "/v1/runs", body=body,
                      headers={"Content-Type": "application/json"})
        reply = conn.getresponse()
        return reply.status, json.loads(reply.read())
    finally:
        conn.close()


@pytest.mark.parametrize("error", [
    EnforcementError("the workspace binds moved"), RuntimeFailure("runc create failed: x"),
    EgressSetupFailed("no veth"), GatewayUnavailable("the gateway is restarting"),
    EngineUnavailable("dockerd does not answer")], ids=lambda e: type(e).code)
def test_a_launch_that_fails_in_the_sandbox_answers_424_and_agentctl_exits_125(
        serve: ServeFactory, error: SupervisorError) -> None:
    runtime = FakeRuntime(fail_launch=error)
    server = serve(runtime=runtime)
    status, body = post_run(server.socket_path, "a1")
    assert status == 424, body
    assert body["error"]["code"] == error.code
    assert body["error"]["detail"]["hint"] == type(error).default_hint
    result = CliRunner().invoke(cli, ["--socket", str(server.socket_path), "run", "--name",
                                      "a2", "--detach", "--", "sleep", "infinity"])
    assert result.exit_code == LAUNCH_FAILED_EXIT, (result.output, result.exception)
    assert error.code in result.stderr


def test_an_unexpected_exception_in_the_launch_is_still_a_500(serve: ServeFactory) -> None:
    server = serve(runtime=FakeRuntime(fail_launch=ZeroDivisionError("a bug")))
    status, body = post_run(server.socket_path, "a1")
    assert status == 500, body
    assert body["error"]["code"] == "internal_error"
    result = CliRunner().invoke(cli, ["--socket", str(server.socket_path), "run", "--name",
                                      "a2", "--detach", "--", "sleep", "infinity"])
    assert result.exit_code == SupervisorError.exit_status, (result.output, result.exception)


def test_the_client_maps_codes_and_an_unknown_424_to_a_launch_failure() -> None:
    def wire(code: str, status: int) -> SupervisorError:
        return _error_from({"error": {"code": code, "message": "m", "detail": {"k": 1}}},
                           status)

    for cls in launch_failures():
        rebuilt = wire(cls.code, cls.http_status)
        assert type(rebuilt) is cls and launch_exit_status(rebuilt) == LAUNCH_FAILED_EXIT
        # A daemon from before the 424 answered 503 or 500: the code decides, not the status.
        assert type(wire(cls.code, 503)) is cls and type(wire(cls.code, 500)) is cls
    # A code this client does not know yet, from a newer daemon: 424 still means "could not
    # start", and the code survives in the detail.
    newer = wire("sandbox_quota_exhausted", 424)
    assert isinstance(newer, EnforcementError) and newer.detail["code"] == (
        "sandbox_quota_exhausted")
    assert launch_exit_status(newer) == LAUNCH_FAILED_EXIT and newer.detail["k"] == 1
    # Any other unknown code stays the generic error with its code kept.
    other = wire("something_new", 500)
    assert type(other) is SupervisorError and other.detail["code"] == "something_new"
    assert launch_exit_status(other) == SupervisorError.exit_status
