"""What the daemon hands the egress gateway for one run, and an operator's answer to a held
request. Plain data, importable without the HTTP stack; no I/O."""

from __future__ import annotations

from dataclasses import dataclass, field

from supervisor.egress.accounting import Usage
from supervisor.models.egress import GatewayPolicy


@dataclass(frozen=True)
class Decision:
    approved: bool
    approval_id: str
    by: str = ""
    reason: str = ""


@dataclass
class RunGrant:
    """What the daemon hands the gateway for one run. `secrets` maps route names to values and
    lives only in this process's memory."""

    run_id: str
    agent: str
    token: str
    expires_at: float
    policy: GatewayPolicy
    host_ip: str
    port: int
    secrets: dict[str, str]
    agent_usage: Usage = field(default_factory=Usage)  # earlier runs of the same agent
