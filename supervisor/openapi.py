"""The OpenAPI document of the control API, generated from the pydantic models. No I/O."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from supervisor import __version__
from supervisor.models import (
    ActionRequest,
    ActionResult,
    AgentList,
    AgentView,
    Approval,
    ApprovalList,
    AuditList,
    AuditVerifyResult,
    BreakerReset,
    DenyRequest,
    DrillList,
    DrillRequest,
    DrillResult,
    EgressView,
    ForgetResult,
    Health,
    ReasonRequest,
    ReloadResult,
    RunRequest,
    RunView,
    TelemetryView,
)

# The largest page of GET /v1/agents (and its default).
AGENT_PAGE_MAX = 1000

_ERROR = {
    "type": "object",
    "required": ["error"],
    "additionalProperties": False,
    "properties": {"error": {
        "type": "object", "required": ["code", "message", "detail"],
        "additionalProperties": False,
        "properties": {"code": {"type": "string", "pattern": "^[a-z][a-z0-9_]*$"},
                       "message": {"type": "string"},
                       "detail": {"type": "object", "properties": {
                           "hint": {"type": "string"}}}}}},
}


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def _op(summary: str, response: str | None, body: str | None = None, status: str = "200",
        params: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """An operation answering `response` (a model's JSON; None: the run's output as text) and
    a structured JSON error for every other status."""
    op: dict[str, Any] = {
        "summary": summary,
        "responses": {
            status: {"description": "ok",
                     "content": {"application/json": {"schema": _ref(response)}}
                     if response else {"text/plain": {"schema": {"type": "string"}}}},
            "default": {"description": "structured error",
                        "content": {"application/json": {"schema": _ref("Error")}}},
        },
    }
    if body:
        op["requestBody"] = {"required": True,
                             "content": {"application/json": {"schema": _ref(body)}}}
    if params:
        op["parameters"] = params
    return op


def _path_param(name: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}


def _query(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "schema": schema,
            "description": description}


def _limit(default: int, low: int, high: int) -> dict[str, Any]:
    return _query("limit", {"type": "integer", "minimum": low, "maximum": high,
                            "default": default}, "the most items to return")


def openapi_document() -> dict[str, Any]:
    # Responses in their serialized form, requests as they are validated (strict types,
    # durations as seconds or text).
    models: list[type[BaseModel]] = [
        ActionResult, AgentList, AgentView, Approval, ApprovalList, AuditList,
        AuditVerifyResult, BreakerReset, DrillList, DrillResult, EgressView, ForgetResult,
        Health, ReloadResult, RunView, TelemetryView]
    serialization: JsonSchemaMode = "serialization"
    validation: JsonSchemaMode = "validation"
    wanted = [(m, serialization) for m in models]
    wanted += [(m, validation) for m in (RunRequest, ActionRequest, DrillRequest,
                                         ReasonRequest, DenyRequest)]
    _keys, schema = models_json_schema(wanted, ref_template="#/components/schemas/{model}")
    schemas = dict(schema.get("$defs", {}))
    schemas["Error"] = _ERROR
    verb = {"name": "verb", "in": "path", "required": True,
            "schema": {"type": "string",
                       "enum": ["kill", "pause", "resume", "stop", "reactivate"]}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "agent-supervisor control API", "version": __version__},
        "paths": {
            "/v1/health": {"get": _op("daemon health", "Health")},
            "/v1/agents": {"get": _op(
                "one page of agents in name order, filtered by class and state", "AgentList",
                params=[_limit(AGENT_PAGE_MAX, 1, AGENT_PAGE_MAX),
                        _query("cursor", {"type": "string"},
                               "next_cursor of the previous page: the agents after this name"),
                        _query("class", {"type": "string"}, "only agents of this class"),
                        _query("state", {"type": "string"}, "only agents in this state")])},
            "/v1/agents/{name}": {"get": _op("inspect an agent", "AgentView",
                                             params=[_path_param("name")])},
            "/v1/runs": {"post": _op("launch a run", "RunView", "RunRequest", "201")},
            "/v1/runs/{ref}": {"get": _op("a run, by id or agent name", "RunView",
                                          params=[_path_param("ref")])},
            "/v1/runs/{ref}/logs": {"get": _op(
                "a run's output (follow=1 streams it until the run ends)", None,
                params=[_path_param("ref"),
                        _query("follow", {"type": "string", "enum": ["0", "1"]},
                               "1: keep streaming until the run ends"),
                        _query("tail", {"type": "integer", "minimum": 0, "maximum": 100_000},
                               "start with the last N lines of the output")])},
            "/v1/runs/{ref}/telemetry": {"get": _op(
                "a run's recent samples and its summary", "TelemetryView",
                params=[_path_param("ref"), _limit(20, 0, 10_000)])},
            "/v1/actions/{verb}": {"post": _op("kill, pause, resume, stop or reactivate a scope",
                                               "ActionResult", "ActionRequest",
                                               params=[verb])},
            "/v1/audit": {"get": _op("audit rows", "AuditList", params=[
                _limit(100, 1, 10_000),
                _query("after", {"type": "integer", "minimum": 0, "maximum": 2**53},
                       "only rows after this sequence number")])},
            "/v1/audit/verify": {"get": _op("verify the hash chain", "AuditVerifyResult")},
            "/v1/reload": {"post": _op("reload the configuration (owner)", "ReloadResult",
                                       "ReasonRequest")},
            "/v1/drills": {"post": _op("run a kill drill", "DrillResult", "DrillRequest"),
                           "get": _op("drill history", "DrillList",
                                      params=[_limit(50, 1, 1000)])},
            "/v1/runs/{ref}/egress": {"get": _op(
                "a gateway run's egress usage, breaker and pending approvals", "EgressView",
                params=[_path_param("ref")])},
            "/v1/approvals": {"get": _op("requests held for approval", "ApprovalList")},
            "/v1/approvals/{id}/approve": {"post": _op(
                "release a held request", "Approval", "ReasonRequest",
                params=[_path_param("id")])},
            "/v1/approvals/{id}/deny": {"post": _op(
                "refuse a held request (a reason is required: the agent is told it)", "Approval",
                "DenyRequest",
                params=[_path_param("id")])},
            "/v1/agents/{name}/breaker/reset": {"post": _op(
                "close a tripped egress circuit breaker", "BreakerReset", "ReasonRequest",
                params=[_path_param("name")])},
            "/v1/agents/{name}/forget": {"post": _op(
                "forget an idle agent (owner; audited): its registration goes, its runs and "
                "audit rows stay", "ForgetResult", "ReasonRequest",
                params=[_path_param("name")])},
        },
        "components": {"schemas": schemas},
    }
