"""The OpenAPI document of the control API, generated from the pydantic models. No I/O."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from supervisor import __version__
from supervisor.models import (
    ActionRequest,
    ActionResult,
    AgentView,
    Approval,
    ApprovalList,
    AuditList,
    AuditVerifyResult,
    DrillList,
    DrillRequest,
    DrillResult,
    EgressView,
    Health,
    ReasonRequest,
    RunRequest,
    RunView,
    TelemetryView,
)

_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": {"type": "object", "required": ["code", "message", "detail"],
                             "properties": {"code": {"type": "string"},
                                            "message": {"type": "string"},
                                            "detail": {"type": "object"}}}},
}


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def _op(summary: str, response: str | None, body: str | None = None, status: str = "200",
        params: list[dict[str, Any]] | None = None) -> dict[str, Any]:
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


def openapi_document() -> dict[str, Any]:
    models: list[type[BaseModel]] = [
        ActionRequest, ActionResult, AgentView, Approval, ApprovalList, AuditList,
        AuditVerifyResult, DrillList, DrillResult, EgressView, Health, RunRequest, RunView,
        TelemetryView]
    serialization: JsonSchemaMode = "serialization"
    validation: JsonSchemaMode = "validation"
    wanted = [(m, serialization) for m in models]
    wanted += [(m, validation) for m in (RunRequest, ActionRequest, DrillRequest,
                                         ReasonRequest)]
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
            "/v1/agents": {"get": _op("list agents", None)},
            "/v1/agents/{name}": {"get": _op("inspect an agent", "AgentView",
                                             params=[_path_param("name")])},
            "/v1/runs": {"post": _op("launch a run", "RunView", "RunRequest", "201")},
            "/v1/runs/{ref}": {"get": _op("a run, by id or agent name", "RunView",
                                          params=[_path_param("ref")])},
            "/v1/runs/{ref}/logs": {"get": _op("a run's output (follow=1 streams)", None,
                                               params=[_path_param("ref")])},
            "/v1/runs/{ref}/telemetry": {"get": _op(
                "a run's recent samples (limit=N, default 20) and its summary", "TelemetryView",
                params=[_path_param("ref")])},
            "/v1/actions/{verb}": {"post": _op("kill, pause, resume, stop or reactivate a scope",
                                               "ActionResult", "ActionRequest",
                                               params=[verb])},
            "/v1/audit": {"get": _op("audit rows", "AuditList")},
            "/v1/audit/verify": {"get": _op("verify the hash chain", "AuditVerifyResult")},
            "/v1/drills": {"post": _op("run a kill drill", "DrillResult", "DrillRequest"),
                           "get": _op("drill history", "DrillList")},
            "/v1/runs/{ref}/egress": {"get": _op(
                "a gateway run's egress usage, breaker and pending approvals", "EgressView",
                params=[_path_param("ref")])},
            "/v1/approvals": {"get": _op("requests held for approval", "ApprovalList")},
            "/v1/approvals/{id}/approve": {"post": _op(
                "release a held request", "Approval", "ReasonRequest",
                params=[_path_param("id")])},
            "/v1/approvals/{id}/deny": {"post": _op(
                "refuse a held request", "Approval", "ReasonRequest",
                params=[_path_param("id")])},
            "/v1/agents/{name}/breaker/reset": {"post": _op(
                "close a tripped egress circuit breaker", None, "ReasonRequest",
                params=[_path_param("name")])},
        },
        "components": {"schemas": schemas},
    }
