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


# Errors any request may meet, before its handler runs (the HTTP layer, roles, load).
_ANY = ("bad_http_request", "uri_too_long", "headers_too_large", "method_not_allowed",
        "forbidden", "too_many_requests", "shutting_down", "internal_error")
# Errors of a request with a JSON body.
_BODY = ("invalid_json", "invalid_request", "body_too_large", "request_timeout")


def _responses(codes: tuple[str, ...]) -> dict[str, Any]:
    """One response per HTTP status, naming every error code it carries (the codes are the
    stable contract; x-error-codes lists them for generators and linters)."""
    from supervisor.errors import error_class_for  # the one error tree; no I/O

    by_status: dict[int, list[str]] = {}
    for code in dict.fromkeys(codes):
        cls = error_class_for(code)
        if cls.code != code:
            raise ValueError(f"unknown error code {code!r} in the OpenAPI table")
        by_status.setdefault(cls.http_status, []).append(code)
    return {str(status): {
        "description": "error: " + ", ".join(sorted(found)),
        "x-error-codes": sorted(found),
        "content": {"application/json": {"schema": _ref("Error")}}}
        for status, found in sorted(by_status.items())}


def _op(operation_id: str, tag: str, summary: str, response: str | None,
        body: str | None = None, status: str = "200",
        params: list[dict[str, Any]] | None = None, errors: tuple[str, ...] = ()
        ) -> dict[str, Any]:
    """An operation answering `response` (a model's JSON; None: the run's output as text), its
    error responses by status with their codes, and `default` for any other structured error."""
    codes = _ANY + (_BODY if body else ()) + (("invalid_request",) if params else ()) + errors
    op: dict[str, Any] = {
        "operationId": operation_id,
        "tags": [tag],
        "summary": summary,
        "responses": {
            status: {"description": "ok",
                     "content": {"application/json": {"schema": _ref(response)}}
                     if response else {"text/plain": {"schema": {"type": "string"}}}},
            **_responses(codes),
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


TAGS = {
    "daemon": "the daemon's health",
    "agents": "registered agents",
    "runs": "launching runs and reading their output and telemetry",
    "actions": "kill, pause, resume, stop and reactivate over an agent, a class or every agent",
    "audit": "the hash-chained audit log",
    "drills": "kill drills",
    "egress": "the egress gateway: usage, approvals, circuit breakers",
}
_RUN_REF = ("run_not_found", "agent_not_found")
_LAUNCH_ERRORS = (
    "agent_not_found", "agent_killed", "agent_busy", "global_halt", "profile_not_found",
    "profile_invalid", "workspace_invalid", "workspace_forbidden", "command_not_found",
    "command_not_executable", "runtime_unsupported", "image_not_found", "disk_space_low",
    "enforcement_failed", "runtime_failed", "egress_setup_failed", "gateway_unavailable",
    "engine_unavailable", "route_not_found")
_DECIDE = ("approval_not_found", "approval_decided", "route_not_found")


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
        "tags": [{"name": name, "description": text} for name, text in TAGS.items()],
        "paths": {
            "/v1/health": {"get": _op("getHealth", "daemon", "daemon health", "Health")},
            "/v1/agents": {"get": _op(
                "listAgents", "agents",
                "one page of agents in name order, filtered by class and state", "AgentList",
                params=[_limit(AGENT_PAGE_MAX, 1, AGENT_PAGE_MAX),
                        _query("cursor", {"type": "string"},
                               "next_cursor of the previous page: the agents after this name"),
                        _query("class", {"type": "string"}, "only agents of this class"),
                        _query("state", {"type": "string"}, "only agents in this state")])},
            "/v1/agents/{name}": {"get": _op("getAgent", "agents", "inspect an agent",
                                             "AgentView", params=[_path_param("name")],
                                             errors=("agent_not_found",))},
            "/v1/runs": {"post": _op("createRun", "runs", "launch a run", "RunView",
                                     "RunRequest", "201", errors=_LAUNCH_ERRORS)},
            "/v1/runs/{ref}": {"get": _op("getRun", "runs", "a run, by id or agent name",
                                          "RunView", params=[_path_param("ref")],
                                          errors=_RUN_REF)},
            "/v1/runs/{ref}/logs": {"get": _op(
                "getRunLogs", "runs", "a run's output (follow=1 streams it until the run ends)",
                None,
                params=[_path_param("ref"),
                        _query("follow", {"type": "string", "enum": ["0", "1"]},
                               "1: keep streaming until the run ends"),
                        _query("tail", {"type": "integer", "minimum": 0, "maximum": 100_000},
                               "start with the last N lines of the output"),
                        _query("since", {"type": "number", "minimum": 0, "maximum": 1e11},
                               "start with what arrived at or after this Unix time (seconds; "
                               "with tail: the last N lines of that)"),
                        _query("offset", {"type": "integer", "minimum": 0, "maximum": 2**53},
                               "start at this byte of the output (instead of tail and since): "
                               "where an earlier answer stopped, its X-Log-Offset plus the "
                               "bytes read; a follow stream ended by a restart names it")],
                errors=(*_RUN_REF, "logs_expired"))},
            "/v1/runs/{ref}/telemetry": {"get": _op(
                "getRunTelemetry", "runs", "a run's recent samples and its summary",
                "TelemetryView", params=[_path_param("ref"), _limit(20, 0, 10_000)],
                errors=(*_RUN_REF, "route_not_found"))},
            "/v1/actions/{verb}": {"post": _op(
                "act", "actions", "kill, pause, resume, stop or reactivate a scope",
                "ActionResult", "ActionRequest", params=[verb],
                errors=("route_not_found", "reason_required", "agent_not_found", "scope_empty",
                        "illegal_transition", "agent_killed", "agent_busy", "kill_unconfirmed",
                        "enforcement_failed", "runtime_failed"))},
            "/v1/audit": {"get": _op("listAudit", "audit", "audit rows", "AuditList", params=[
                _limit(100, 1, 10_000),
                _query("after", {"type": "integer", "minimum": 0, "maximum": 2**53},
                       "only rows after this sequence number")])},
            "/v1/audit/verify": {"get": _op("verifyAudit", "audit", "verify the hash chain",
                                            "AuditVerifyResult")},
            "/v1/reload": {"post": _op("reloadConfig", "daemon",
                                       "reload the configuration (owner)", "ReloadResult",
                                       "ReasonRequest", errors=("config_reload_refused",))},
            "/v1/drills": {"post": _op("runDrill", "drills", "run a kill drill", "DrillResult",
                                       "DrillRequest", errors=_LAUNCH_ERRORS),
                           "get": _op("listDrills", "drills", "drill history", "DrillList",
                                      params=[_limit(50, 1, 1000)],
                                      errors=("route_not_found",))},
            "/v1/runs/{ref}/egress": {"get": _op(
                "getRunEgress", "egress",
                "a gateway run's egress usage, breaker and pending approvals", "EgressView",
                params=[_path_param("ref")], errors=(*_RUN_REF, "route_not_found"))},
            "/v1/approvals": {"get": _op("listApprovals", "egress", "requests held for approval",
                                         "ApprovalList", errors=("route_not_found",))},
            "/v1/approvals/{id}/approve": {"post": _op(
                "approveRequest", "egress", "release a held request", "Approval",
                "ReasonRequest", params=[_path_param("id")], errors=_DECIDE)},
            "/v1/approvals/{id}/deny": {"post": _op(
                "denyRequest", "egress",
                "refuse a held request (a reason is required: the agent is told it)", "Approval",
                "DenyRequest", params=[_path_param("id")], errors=_DECIDE)},
            "/v1/agents/{name}/breaker/reset": {"post": _op(
                "resetBreaker", "egress", "close a tripped egress circuit breaker",
                "BreakerReset", "ReasonRequest", params=[_path_param("name")],
                errors=("agent_not_found", "breaker_not_tripped", "route_not_found"))},
            "/v1/agents/{name}/forget": {"post": _op(
                "forgetAgent", "agents",
                "forget an idle agent (owner; audited): its registration goes, its runs and "
                "audit rows stay", "ForgetResult", "ReasonRequest",
                params=[_path_param("name")],
                errors=("agent_not_found", "agent_killed", "agent_busy"))},
        },
        "components": {"schemas": schemas},
    }
