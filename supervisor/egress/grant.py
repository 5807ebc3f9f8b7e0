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
