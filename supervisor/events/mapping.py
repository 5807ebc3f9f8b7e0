"""Which audit rows become webhook events, and the event each becomes (an allow-list of
verbs, private detail left out). No I/O, no privilege."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, ConfigDict

from supervisor.models import AuditEntry

EVENT_TYPES = (
    "agent.launched",
    "agent.paused",
    "agent.resumed",
    "agent.killed",
    "agent.reactivated",
    "agent.exited",
    "tripwire.fired",
    "drill.completed",
    "approval.requested",
    "approval.granted",
    "approval.denied",
    "mcp.call",
    "breaker.reset",
    "audit.checkpoint",
    "audit.verified",
    "audit.alarm",
)

# Audit verb -> event type. An allow-list: every other verb (daemon_start, global_halt,
# webhook_given_up, ...) produces no event, so the worker's own audit rows cannot loop.
_VERB_EVENTS = {
    "launch": "agent.launched",
    "pause": "agent.paused",
    "resume": "agent.resumed",
    "kill": "agent.killed",
    # An unconfirmed kill is retried in the background; this is the kernel's confirmation.
    "kill_confirmed": "agent.killed",
    "reap": "agent.killed",
    "reactivate": "agent.reactivated",
    "exit": "agent.exited",
    "stop": "agent.exited",
    "shutdown": "agent.exited",
    "tripwire": "tripwire.fired",
    "drill": "drill.completed",
    "approval_requested": "approval.requested",
    "approval_granted": "approval.granted",
    "approval_denied": "approval.denied",
    "breaker_reset": "breaker.reset",
    "mcp_call": "mcp.call",  # every MCP decision (supervisor/mcp/gateway.py)
    # Audit anchors leave the host (supervisor/audit/anchor.py); alarms say when writes fail.
    "audit_checkpoint": "audit.checkpoint",
    "audit_verify": "audit.verified",
    "audit_write_failed": "audit.alarm",
    "audit_overflow": "audit.alarm",
}
# The agent's command line may carry tokens; it stays in the audit log, not in a chat channel.
_PRIVATE_DETAIL = frozenset({"command", "env"})


class Event(BaseModel):
    """The JSON body of a `format = "json"` delivery."""

    model_config = ConfigDict(frozen=True)

    id: str
    type: str
    timestamp: str  # RFC 3339, UTC, of the audit row
    ts: float  # the same instant in unix seconds
    host: str
    actor: str
    reason: str
    scope: str
    agent: str | None
    run: str | None
    previous_state: str | None
    new_state: str | None
    time_to_halt_ms: float | None
    verb: str  # the audit verb behind the event (kill, reap, shutdown, ...)
    outcome: str
    audit_seq: int
    detail: dict[str, Any]


def event_type_of(entry: AuditEntry) -> str | None:
    """The event an audit entry stands for, or None (refusals, failures, housekeeping)."""
    if entry.outcome.startswith("refused:"):
        return None
    kind = _VERB_EVENTS.get(entry.verb)
    if kind is None:
        return None
    if entry.verb == "launch" and entry.outcome != "ok":
        return None  # failed or overtaken by a kill: the agent never ran
    if entry.verb == "reap" and not entry.scope.startswith("agent:"):
        return None  # a leftover container; the agent's own reap row carries the event
    return kind


def event_from_audit(entry: AuditEntry, host: str, event_id: str | None = None) -> Event | None:
    kind = event_type_of(entry)
    if kind is None:
        return None
    run = entry.detail.get("run")
    return Event(
        id=event_id or uuid.uuid4().hex, type=kind,
        timestamp=datetime.fromtimestamp(entry.ts, UTC).isoformat(timespec="milliseconds")
        .replace("+00:00", "Z"),
        ts=entry.ts, host=host, actor=entry.actor, reason=entry.reason, scope=entry.scope,
        agent=entry.target, run=run if isinstance(run, str) else None,
        previous_state=entry.previous_state, new_state=entry.new_state,
        time_to_halt_ms=entry.time_to_halt_ms, verb=entry.verb, outcome=entry.outcome,
        audit_seq=entry.seq,
        detail={k: v for k, v in entry.detail.items() if k not in _PRIVATE_DETAIL},
    )
