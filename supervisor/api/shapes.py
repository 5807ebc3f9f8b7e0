"""The control API's JSON as the client sees it: TypedDicts of every request body agentctl sends
and every answer it reads, named after the server's pydantic models (supervisor/models) they
mirror. Standard library typing only, so agentctl's start never builds the pydantic models;
tests/unit/test_api_shapes.py holds each one to its model, field by field and type by type, so
the two cannot drift apart. No I/O, no privilege."""

from __future__ import annotations

from typing import Literal, NotRequired, TypeAlias, TypedDict

# A JSON value: what the daemon's free-form fields (an audit row's detail, an error's detail)
# hold. Nothing the client reads is typed Any.
JSON: TypeAlias = "bool | int | float | str | list[JSON] | dict[str, JSON] | None"

# Requests ---------------------------------------------------------------------------------

Scope = TypedDict("Scope", {"agent": NotRequired[str], "class": NotRequired[str],
                            "all": NotRequired[bool]})


class ActionRequest(TypedDict):
    scope: Scope
    reason: NotRequired[str]
    grace: NotRequired[str]  # a duration: "10s", "2m"


class ReasonRequest(TypedDict):
    reason: NotRequired[str]


class DrillRequest(TypedDict, total=False):
    processes: int
    slo: str  # a duration: "50ms"


class TripwireRule(TypedDict):
    name: str
    metric: str
    above: str  # a threshold as written: "512M", "90"
    action: NotRequired[str]  # alert, pause or kill: the daemon says which it takes


RunRequest = TypedDict("RunRequest", {
    "name": NotRequired[str], "class": NotRequired[str], "profile": NotRequired[str],
    "workspace": NotRequired[str], "timeout": NotRequired[str], "command": list[str],
    "tripwires": NotRequired[list[TripwireRule]], "env": NotRequired[dict[str, str]],
    "image": NotRequired[str]})

# Answers ----------------------------------------------------------------------------------


class Health(TypedDict):
    status: str
    version: str
    global_halt: bool
    agents: int
    active_runs: int
    cgroup_mode: str
    audit_alarms: dict[str, JSON]


class RunView(TypedDict):
    id: str
    agent: str
    state: str
    command: list[str]
    profile: str
    workspace: str | None
    pid: int | None
    started_at: float
    ended_at: float | None
    exit_code: int | None
    time_to_halt_ms: float | None
    end_reason: str | None
    timeout: float | None


class TelemetrySummary(TypedDict):
    run_id: str
    started_at: float
    ended_at: float | None
    samples: int
    wall_seconds: float
    cpu_seconds: float | None
    max_cpu_percent: float | None
    peak_memory_bytes: int | None
    peak_rss_bytes: int | None
    peak_processes: int
    peak_threads: int | None
    peak_open_fds: int | None
    peak_connections: int | None
    io_read_bytes: int | None
    io_write_bytes: int | None
    network_bytes: int | None
    output_bytes: int | None
    output_recorded_bytes: int | None
    syscall_attempts: int
    oom_kills: int | None
    commands: list[str]
    overruns: int
    skipped: int


class Sample(TypedDict):
    ts: float
    wall_seconds: float
    processes: int
    cpu_seconds: float | None
    cpu_percent: float | None
    memory_bytes: int | None
    oom_kills: int | None
    rss_bytes: int | None
    threads: int | None
    open_fds: int | None
    connections: int | None
    io_read_bytes: int | None
    io_write_bytes: int | None
    children: int | None
    commands: list[str]
    network_bytes: int | None
    network_packets: int | None
    syscall_attempts: int
    output_bytes: int | None
    output_recorded_bytes: int | None
    mcp_calls: int | None
    mcp_cost: float | None


class TelemetryView(TypedDict):
    run: str
    agent: str
    state: str
    live: bool
    samples: list[Sample]
    summary: TelemetrySummary | None


AgentView = TypedDict("AgentView", {
    "name": str, "class": str, "profile": str, "state": str, "created_at": float,
    "updated_at": float, "last_reason": str | None, "last_actor": str | None,
    "run": RunView | None, "time_to_halt_ms": float | None,
    "stats": dict[str, int | None] | None, "telemetry": TelemetrySummary | None})


class AgentList(TypedDict):
    agents: list[AgentView]
    global_halt: bool
    total: int
    next_cursor: str | None


class AgentResult(TypedDict):
    agent: str
    previous_state: str
    new_state: str
    run_id: str | None
    time_to_halt_ms: float | None
    skipped: str | None
    error: dict[str, JSON] | None


class ActionResult(TypedDict):
    verb: str
    scope: str
    reason: str
    actor: str
    results: list[AgentResult]
    time_to_halt_ms: float | None
    global_halt: bool


class ForgetResult(TypedDict):
    agent: str
    previous_state: str
    reason: str


class AuditEntry(TypedDict):
    seq: int
    ts: float
    actor: str
    verb: str
    scope: str
    target: str | None
    reason: str
    previous_state: str | None
    new_state: str | None
    time_to_halt_ms: float | None
    outcome: str
    detail: dict[str, JSON]
    prev_hash: str
    hash: str


class AuditList(TypedDict):
    entries: list[AuditEntry]


class AuditVerifyResult(TypedDict):
    ok: bool
    rows: int
    first_bad_seq: int | None
    problem: str | None
    head_hash: str | None
    head_seq: int
    anchor_seq: int | None
    unanchored_rows: int
    checkpoints: int
    key_id: str | None
    problems: list[str]
    notes: list[str]


class DrillResult(TypedDict):
    id: str
    ts: float
    actor: str
    processes: int
    processes_seen: int
    slo_ms: float
    time_to_halt_ms: float | None
    passed: bool
    checks: dict[str, str]
    survivors: list[int]
    error: str | None


class DrillList(TypedDict):
    drills: list[DrillResult]


class GatewayRunUpdate(TypedDict):
    run: str
    agent: str
    profile: str
    routes: list[str] | None
    kept: str | None


class ReloadResult(TypedDict):
    outcome: Literal["applied", "unchanged"]
    source: str
    changed: list[str]
    restart_required: list[str]
    running: int
    gateway_runs: list[GatewayRunUpdate]
    warnings: list[dict[str, str]]


class Approval(TypedDict):
    id: str
    agent: str
    run: str
    method: str
    host: str
    path: str
    rule: str
    requested_at: float
    expires_at: float
    approved: bool | None
    by: str | None
    reason: str | None


class ApprovalList(TypedDict):
    approvals: list[Approval]


class EgressView(TypedDict):
    run: str
    agent: str
    gateway: str
    usage: dict[str, float]
    agent_total: dict[str, float]
    breaker: str | None
    token_expires_at: float
    pending_approvals: list[str]


class BreakerReset(TypedDict):
    agent: str
    run: str
    was: str
