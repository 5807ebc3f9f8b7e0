"""The views the supervisor core makes only when asked (pydantic): an agent's (the API's agent
list and show), a request the egress gateway holds, an audit verification's result. Named
through `supervisor.models` like every model, and loaded from here at the first use of one
(`supervisor.models.__getattr__`), so a process that runs the core without being asked for them
(an embedded CI run without --report) does not define them. No I/O."""

# No `from __future__ import annotations`: pydantic then gets these models' annotations as
# objects, not strings it must evaluate one by one as each class is defined.

from pydantic import BaseModel, ConfigDict, Field

from supervisor import buildmode
from supervisor.models import RunView, TelemetrySummary

__all__ = ["AgentView", "Approval", "AuditVerifyResult"]

# Built at their first use where the process builds at first use (buildmode.py): a run makes
# none of them unless it verifies its audit for a report.
_VIEW = ConfigDict(defer_build=buildmode.DEFER_BUILD)


class Approval(BaseModel):
    """A request the egress gateway holds until an operator approves or denies it."""

    model_config = _VIEW

    id: str
    agent: str
    run: str
    method: str
    host: str
    path: str
    rule: str
    requested_at: float
    expires_at: float
    approved: bool | None = None
    by: str | None = None
    reason: str | None = None


class AgentView(BaseModel):
    name: str
    agent_class: str = Field(serialization_alias="class", validation_alias="class")
    profile: str
    state: str
    created_at: float
    updated_at: float
    last_reason: str | None
    last_actor: str | None
    run: RunView | None
    time_to_halt_ms: float | None
    # Live numbers of the current run (cpu_usec, memory_bytes, processes); None without one.
    stats: dict[str, int | None] | None = None
    # The telemetry summary of that run (live or stored); None when there is none.
    telemetry: TelemetrySummary | None = None

    model_config = ConfigDict(populate_by_name=True, defer_build=buildmode.DEFER_BUILD)


class AuditVerifyResult(BaseModel):
    model_config = _VIEW

    ok: bool
    rows: int
    first_bad_seq: int | None = None
    problem: str | None = None
    head_hash: str | None = None
    head_seq: int = 0
    # The newest trusted checkpoint (signed, outside the database or in it) and what follows it.
    anchor_seq: int | None = None
    unanchored_rows: int = 0
    checkpoints: int = 0
    key_id: str | None = None
    # Every problem found (the first is `problem`), and what was not checked.
    problems: list[str] = []
    notes: list[str] = []
