"""The OpenAPI document as a contract (issue 16): operationIds, tags, every query parameter
the server reads, every error response with codes that exist and carry that status. No root."""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import httpx

from supervisor.api import server as api_server
from supervisor.errors import error_class_for
from supervisor.openapi import TAGS, openapi_document
from tests.unit.conftest import ServerThread

METHODS = {"get", "post"}


def operations() -> list[tuple[str, str, dict]]:  # type: ignore[type-arg]
    return [(path, method, op) for path, item in openapi_document()["paths"].items()
            for method, op in item.items() if method in METHODS]


def test_every_operation_has_a_unique_id_and_a_known_tag() -> None:
    ops = operations()
    ids = [op["operationId"] for _path, _method, op in ops]
    assert len(ids) == len(set(ids)) == len(ops)
    assert all(re.fullmatch(r"[a-z][A-Za-z]+", i) for i in ids)
    for _path, _method, op in ops:
        assert len(op["tags"]) == 1 and op["tags"][0] in TAGS
    assert {t["name"] for t in openapi_document()["tags"]} == set(TAGS)


def test_every_error_response_names_real_codes_of_its_status() -> None:
    for path, method, op in ops_with_errors():
        for status, response in op["responses"].items():
            if status in ("default",) or status.startswith("2"):
                continue
            codes = response["x-error-codes"]
            assert codes, (path, method, status)
            for code in codes:
                cls = error_class_for(code)
                assert cls.code == code, f"{code} is not an error code"
                assert str(cls.http_status) == status, (path, method, code, status)
                assert code in response["description"]


def ops_with_errors() -> list[tuple[str, str, dict]]:  # type: ignore[type-arg]
    ops = operations()
    for path, method, op in ops:
        statuses = set(op["responses"])
        # What every request can meet: roles, load, a shutting-down daemon.
        assert {"403", "429", "503", "500", "default"} <= statuses, (path, method)
        if "requestBody" in op:
            assert {"400", "413", "422"} <= statuses, (path, method)
    return ops


def test_the_action_documents_its_incident_errors() -> None:
    [action] = [op for path, _m, op in operations() if path == "/v1/actions/{verb}"]
    assert "reason_required" in action["responses"]["422"]["x-error-codes"]
    assert {"scope_empty", "agent_not_found"} <= set(action["responses"]["404"]["x-error-codes"])
    assert "illegal_transition" in action["responses"]["409"]["x-error-codes"]


def test_every_query_parameter_the_server_reads_is_documented() -> None:
    source = Path(api_server.__file__).read_text()
    read = set(re.findall(r'request\.query\.get\("(\w+)"', source))
    read |= set(re.findall(r'_query_int\(request, "(\w+)"', source))
    assert {"limit", "cursor", "class", "state", "follow", "tail", "after"} <= read
    documented = {p["name"] for _path, _m, op in operations() for p in op.get("parameters", [])
                  if p["in"] == "query"}
    assert read <= documented, f"undocumented query parameters: {read - documented}"


def test_a_client_generated_from_the_document_works(server: ServerThread, tmp_path: Path
                                                    ) -> None:
    """openapi-python-client (a standard generator) builds a client from the document; the
    client launches, lists, is refused with a structured error, kills and forgets, over the
    real API server's Unix socket."""
    spec = tmp_path / "openapi.json"
    spec.write_text(json.dumps(openapi_document()))
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    subprocess.run([str(bin_dir / "openapi-python-client"), "generate", "--path", str(spec),
                    "--output-path", str(tmp_path / "asapi"), "--meta", "none"],
                   check=True, capture_output=True, timeout=300, env=env)
    sys.path.insert(0, str(tmp_path))
    try:
        gen = importlib.import_module("asapi")
        api = {name: importlib.import_module(f"asapi.api.{name}")
               for name in ("agents.list_agents", "agents.forget_agent", "runs.create_run",
                            "actions.act")}
        models = importlib.import_module("asapi.models")
        client = gen.Client(base_url="http://control.sock", raise_on_unexpected_status=True,
                            httpx_args={"transport": httpx.HTTPTransport(
                                uds=str(server.socket_path))})
        with client:
            assert api["agents.list_agents"].sync(client=client).agents == []
            view = api["runs.create_run"].sync(client=client, body=models.RunRequest(
                command=["sleep", "infinity"], name="gen1", class_="generated"))
            assert isinstance(view, models.RunView) and view.agent == "gen1"
            listed = api["agents.list_agents"].sync(client=client, class_="generated")
            assert [a.name for a in listed.agents] == ["gen1"]
            refused = api["actions.act"].sync_detailed(
                models.ActVerb.KILL, client=client,
                body=models.ActionRequest(scope=models.Scope(agent="gen1")))
            assert refused.status_code == 422
            assert isinstance(refused.parsed, models.Error)
            assert refused.parsed.error.code == "reason_required"
            result = api["actions.act"].sync(
                models.ActVerb.KILL, client=client,
                body=models.ActionRequest(scope=models.Scope(agent="gen1"), reason="generated"))
            assert isinstance(result, models.ActionResult)
            assert [(r.agent, r.new_state) for r in result.results] == [("gen1", "killed")]
            gone = api["agents.forget_agent"].sync(
                "gen1", client=client, body=models.ReasonRequest(reason="x"))
            assert isinstance(gone, models.Error) and gone.error.code == "agent_killed"
    finally:
        sys.path.remove(str(tmp_path))
        for name in [m for m in sys.modules if m == "asapi" or m.startswith("asapi.")]:
            del sys.modules[name]
