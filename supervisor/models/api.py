"""The control API's own wire models (pydantic): list pages, drills, health, reload answers,
and the requests only the API takes. Named through `supervisor.models`, which loads this module
the first time one of them is used; the supervisor core never needs them, so an embedded CI
run does not build them (tests/support/ci_imports.py). No I/O."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, Field

from supervisor.models import (
    DRILL_SLO_MAX,
    AgentView,
    Approval,
    AuditEntry,
    Reason,
    TelemetrySummary,
    _Request,
)
from supervisor.models.telemetry import Sample
from supervisor.models.units import duration_schema, duration_within


class ReasonRequest(_Request):
    reason: Reason = ""


class DenyRequest(_Request):
    """A denial needs a reason: the agent is told it."""

    reason: Annotated[Reason, Field(min_length=1, pattern=r"\S")]


class BreakerReset(BaseModel):
    agent: str
    run: str
    was: str  # why the breaker was open


class ApprovalList(BaseModel):
    approvals: list[Approval]


class EgressView(BaseModel):
    run: str
    agent: str
    gateway: str
    usage: dict[str, float]
    agent_total: dict[str, float]
    breaker: str | None  # why it is open; null when closed
    token_expires_at: float
    pending_approvals: list[str]


class TelemetryView(BaseModel):
    run: str
    agent: str
    state: str
    live: bool  # sampled right now (False: the run ended; the summary is the stored one)
    samples: list[Sample]
    summary: TelemetrySummary | None


class ForgetResult(BaseModel):
    """An idle agent dropped from the registry (agentctl rm); its runs stay in the history."""

    agent: str
    previous_state: str
    reason: str


class AgentList(BaseModel):
    """One page of agents, by name; `next_cursor` continues after the last one (null: done)."""

    agents: list[AgentView]
    global_halt: bool
    total: int  # agents that match the filters, over every page
    next_cursor: str | None = None


class AuditList(BaseModel):
    entries: list[AuditEntry]


class DrillRequest(_Request):
    processes: Annotated[int, Field(ge=1, le=10_000)] | None = None
    slo: Annotated[float, BeforeValidator(duration_within(DRILL_SLO_MAX)),
                 duration_schema(DRILL_SLO_MAX)] | None = None


class GatewayRunUpdate(BaseModel):
    """A running gateway run a reload reached (daemon/egress.py `regrant`)."""

    run: str
    agent: str
    profile: str
    # The routes it has now; absent when it kept what it had, `kept` saying why.
    routes: list[str] | None = None
    kept: str | None = None


class ReloadResult(BaseModel):
    """POST /v1/reload: what a reload applied (daemon/reload.py)."""

    outcome: Literal["applied", "unchanged"]
    source: str
    # Sections applied ("roles", "webhooks", ...) and profiles that changed ("profile:NAME").
    changed: list[str]
    # Sections that changed in the file but keep their running value until a restart.
    restart_required: list[str]
    running: int
    # Running gateway runs given the changed routes and secrets (or told why not).
    gateway_runs: list[GatewayRunUpdate] = []
    # What a start would refuse but a reload does not need ({path, key, reason}: the Docker
    # engine's socket is unusable).
    warnings: list[dict[str, str]] = []


class DrillResult(BaseModel):
    id: str
    ts: float
    actor: str
    processes: int
    processes_seen: int
    slo_ms: float
    time_to_halt_ms: float | None
    passed: bool
    # Each check: "pass", "fail: ..." or "n/a: ...".
    checks: dict[str, str]
    survivors: list[int] = []
    error: str | None = None


class DrillList(BaseModel):
    drills: list[DrillResult]


class Health(BaseModel):
    status: str
    version: str
    global_halt: bool
    agents: int
    active_runs: int
    cgroup_mode: str
    # What is wrong with the audit log (a broken chain, failing writes, a released disk
    # reserve, dropped rows); empty when all is well.
    audit_alarms: dict[str, Any] = {}
