"""What the daemon hands the egress gateway for one run, and an operator's answer to a held
request. Plain data, importable without the HTTP stack; no I/O."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

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


@dataclass(frozen=True)
class Carried:
    """What a run's gate had counted and decided before a restart (supervisor/daemon/
    handover.py), for the gateway worker of the daemon that adopts the run: its usage so far
    (the run's budgets go on counting from it), an open breaker (it stays open: only a human
    closes it), whether its budget has fired already (it fires once per run), and a pause.
    No secret: those are read again from the adopting daemon's configuration."""

    usage: Usage = field(default_factory=Usage)
    breaker: str | None = None
    budget_fired: bool = False
    suspended: bool = False


# The grant as the daemon sends it to the gateway's process (supervisor/egress/ipc.py frames);
# here, not in the worker's module, so the daemon need not import the worker's process code.
def grant_to_wire(grant: RunGrant) -> dict[str, Any]:
    return {"run_id": grant.run_id, "agent": grant.agent, "token": grant.token,
            "expires_at": grant.expires_at, "policy": grant.policy.model_dump(mode="json"),
            "host_ip": grant.host_ip, "port": grant.port, "secrets": grant.secrets,
            "agent_usage": grant.agent_usage.as_dict()}


def grant_from_wire(data: dict[str, Any]) -> RunGrant:
    return RunGrant(run_id=str(data["run_id"]), agent=str(data["agent"]),
                    token=str(data["token"]), expires_at=float(data["expires_at"]),
                    policy=GatewayPolicy.model_validate(data["policy"]),
                    host_ip=str(data["host_ip"]), port=int(data["port"]),
                    secrets={str(k): str(v) for k, v in data["secrets"].items()},
                    agent_usage=Usage(**data["agent_usage"]))


def carried_to_wire(carried: Carried) -> dict[str, Any]:
    return {"usage": carried.usage.as_dict(), "breaker": carried.breaker,
            "budget_fired": carried.budget_fired, "suspended": carried.suspended}


def carried_from_wire(data: dict[str, Any]) -> Carried:
    """ValueError (or TypeError, KeyError) unless `data` is what `carried_to_wire` makes."""
    usage = data["usage"]
    counts = {key: usage[key] for key in ("requests", "bytes", "tokens", "denied", "errors")}
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
               for v in counts.values()):
        raise ValueError("a carried count is not a non-negative integer")
    spend = usage["spend"]
    if isinstance(spend, bool) or not isinstance(spend, int | float) or not 0 <= spend < 1e300:
        raise ValueError("the carried spend is not a non-negative number")
    breaker = data["breaker"]
    if breaker is not None and not isinstance(breaker, str):
        raise ValueError("the carried breaker is not a reason")
    if not isinstance(data["budget_fired"], bool) or not isinstance(data["suspended"], bool):
        raise ValueError("a carried flag is not a boolean")
    return Carried(usage=Usage(spend=float(spend), **counts),
                   breaker=None if breaker is None else breaker[:500],
                   budget_fired=data["budget_fired"], suspended=data["suspended"])
