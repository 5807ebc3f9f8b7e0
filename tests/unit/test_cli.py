"""agentctl (supervisor/cli/main.py) through click's CliRunner against the real API server on
a Unix socket in tmp: JSON output, exit statuses, errors on stderr or as JSON bodies, and
client-side validation that never reaches the daemon. No root."""

from __future__ import annotations

import json
from typing import Any

import pytest
from click.testing import CliRunner, Result

from supervisor.cli.main import cli
from supervisor.errors import AgentNotFound, InvalidRequest
from tests.unit.conftest import ServerThread


def agentctl(server: ServerThread, *args: str) -> Result:
    return CliRunner().invoke(cli, ["--socket", str(server.socket_path), *args],
                              catch_exceptions=True)


def ok_json(result: Result) -> Any:
    assert result.exit_code == 0, (result.output, result.stderr, result.exception)
    return json.loads(result.stdout)


def launch(server: ServerThread, name: str = "a1", *extra: str) -> dict[str, Any]:
    view = ok_json(agentctl(server, "run", "--name", name, "--class", "web", "--detach",
                            "--json", *extra, "--", "sleep", "infinity"))
    assert isinstance(view, dict)
    return view


def test_ls_json(server: ServerThread) -> None:
    assert ok_json(agentctl(server, "ls", "--json")) == {
        "agents": [], "global_halt": False, "total": 0, "next_cursor": None}
    view = launch(server)
    data = ok_json(agentctl(server, "ls", "--json"))
    [agent] = data["agents"]
    assert (agent["name"], agent["class"], agent["state"]) == ("a1", "web", "active")
    assert agent["run"]["id"] == view["id"]
    assert data["global_halt"] is False


def test_ls_table(server: ServerThread) -> None:
    launch(server)
    result = agentctl(server, "ls")
    assert result.exit_code == 0
    header, row = result.stdout.splitlines()
    assert header.split()[:3] == ["NAME", "CLASS", "STATE"]
    assert row.split()[:3] == ["a1", "web", "active"]


def test_kill_json(server: ServerThread) -> None:
    view = launch(server)
    result = ok_json(agentctl(server, "kill", "a1", "--reason", "x", "--json"))
    assert (result["verb"], result["scope"], result["reason"]) == ("kill", "agent:a1", "x")
    [item] = result["results"]
    assert (item["agent"], item["previous_state"], item["new_state"]) == (
        "a1", "active", "killed")
    assert isinstance(result["time_to_halt_ms"], float)
    assert item["time_to_halt_ms"] == result["time_to_halt_ms"]
    assert server.runtime.handles[view["id"]].network is False
    inspected = ok_json(agentctl(server, "inspect", "a1", "--json"))
    assert inspected["state"] == "killed" and inspected["last_reason"] == "x"


def test_kill_table(server: ServerThread) -> None:
    launch(server)
    result = agentctl(server, "kill", "a1", "--reason", "x")
    assert result.exit_code == 0, result.stderr
    assert "active -> killed" in result.stdout
    assert "TIME_TO_HALT_MS" in result.stdout


def test_unknown_agent_exits_3_with_the_code_on_stderr(server: ServerThread) -> None:
    before = server.snapshot()
    for args in (["kill", "ghost", "--reason", "x"], ["inspect", "ghost"], ["pause", "ghost"]):
        result = agentctl(server, *args)
        assert result.exit_code == AgentNotFound.exit_status == 3, args
        assert "agent_not_found" in result.stderr
        assert "ghost" in result.stderr
        assert result.stdout == ""
    assert server.snapshot() == before


def test_json_errors_print_the_error_body(server: ServerThread) -> None:
    result = agentctl(server, "inspect", "ghost", "--json")
    assert result.exit_code == 3
    body = json.loads(result.stdout)
    assert body["error"]["code"] == "agent_not_found"
    assert body["error"]["detail"]["agent"] == "ghost"
    assert body["error"]["message"]


def test_illegal_transition_exits_4(server: ServerThread) -> None:
    launch(server)
    result = agentctl(server, "resume", "a1", "--json")
    assert result.exit_code == 4
    assert json.loads(result.stdout)["error"]["code"] == "illegal_transition"


@pytest.mark.parametrize("args", [
    ["kill", "a1", "--all"],
    ["kill", "a1", "--class", "web"],
    ["kill", "--class", "web", "--all"],
    ["kill"],
])
def test_scope_must_be_exactly_one(server: ServerThread, args: list[str]) -> None:
    launch(server)
    before = server.snapshot()
    result = agentctl(server, *args)
    assert result.exit_code == InvalidRequest.exit_status == 6
    assert "invalid_request" in result.stderr
    as_json = agentctl(server, *args, "--json")
    assert as_json.exit_code == 6
    assert json.loads(as_json.stdout)["error"]["code"] == "invalid_request"
    assert server.snapshot() == before


def test_long_reason_is_rejected_client_side(server: ServerThread) -> None:
    launch(server)
    before = server.snapshot()
    result = agentctl(server, "kill", "a1", "--reason", "r" * 501, "--json")
    assert result.exit_code == 6
    error = json.loads(result.stdout)["error"]
    assert (error["code"], error["detail"]["field"]) == ("invalid_request", "reason")
    assert error["detail"]["length"] == 501
    assert server.snapshot() == before, "the daemon saw the request"
    assert next(iter(server.runtime.handles.values())).processes == 1


def test_audit_verify_exits_0(server: ServerThread) -> None:
    launch(server)
    agentctl(server, "kill", "a1", "--reason", "x")
    server.settle()
    result = agentctl(server, "audit", "verify")
    assert result.exit_code == 0, result.stderr
    assert "intact" in result.stdout and "3 rows" in result.stdout  # launch, kill, cleanup
    verify = ok_json(agentctl(server, "audit", "verify", "--json"))
    assert verify["ok"] is True and verify["rows"] == 3


def test_audit_verify_exits_1_when_the_chain_is_broken(server: ServerThread) -> None:
    launch(server)
    agentctl(server, "kill", "a1", "--reason", "x")

    def tamper() -> None:
        db = server.audit.db
        db.execute("DROP TRIGGER audit_no_update")
        db.execute("UPDATE audit SET reason = 'nothing' WHERE seq = 2")
        db.commit()

    server.call(tamper)
    result = agentctl(server, "audit", "verify")
    assert result.exit_code == 1
    assert "BROKEN at row 2" in result.stderr
    # Repair the row so the fixture's own verification holds afterwards.
    server.call(lambda: server.audit.db.execute(
        "UPDATE audit SET reason = 'x' WHERE seq = 2").connection.commit())
    assert agentctl(server, "audit", "verify").exit_code == 0


def test_audit_list_json(server: ServerThread) -> None:
    launch(server)
    data = ok_json(agentctl(server, "audit", "--json"))
    assert [e["verb"] for e in data["entries"]] == ["launch"]


def test_status_json(server: ServerThread) -> None:
    data = ok_json(agentctl(server, "status", "--json"))
    assert data["status"] == "ok" and data["global_halt"] is False


def test_no_daemon_exits_7(server: ServerThread) -> None:
    result = CliRunner().invoke(cli, ["--socket", str(server.socket_path) + ".absent", "ls"])
    assert result.exit_code == 7
    assert "daemon_unavailable" in result.stderr


def test_run_env_must_be_key_value(server: ServerThread) -> None:
    before = server.snapshot()
    result = agentctl(server, "run", "--name", "a1", "--env", "NOEQUALS", "-d", "--", "true")
    assert result.exit_code == 6
    assert "invalid_request" in result.stderr
    assert server.snapshot() == before

