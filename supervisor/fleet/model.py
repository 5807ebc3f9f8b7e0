"""What the fleet store holds: the key layout, fleet actions, holds, acknowledgements, host
registrations and audit anchors, and which agents and hosts a selector reaches. No I/O, no
privilege; agentctl and the daemon both read it.

Key layout under the configured prefix (default /agent-supervisor/fleet/):
  control/actions/<id>    one durable fleet action (operators write; hosts read)
  control/holds/<id>      a kill that stays until an owner lifts it (operators write)
  members/<host>          the host's registration, under its lease (that host writes); its own
                          prefix, so waiting for hosts reads registrations and nothing else
  hosts/<host>/acks/<id>  the host's acknowledgement of action <id> (that host writes)
  hosts/<host>/anchors/<seq>  the host's signed audit heads (that host writes)
  hosts/<host>/partition  what the host did while cut off, written once it is back
etcd's roles make the split: a host's user may write only under hosts/<itself>/."""

from __future__ import annotations

import json
import re
import secrets
import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from supervisor.limits import REASON_MAX, reason_text

VERBS = ("kill", "pause", "resume", "reactivate", "lift", "drill", "verify")
HOLDING_VERBS = ("kill", "pause")
DRILL_CLASS = "fleet-drill"
DRILL_PREFIX = "fleet-drill-"
HOST_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,62}$")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Selector(_Model):
    """Which hosts and agents an action reaches. Empty means every agent on every host."""

    all: bool = False
    agent_class: str | None = None
    host: str | None = None
    agent: str | None = None
    labels: dict[str, str] = {}

    def reaches_host(self, host: str, labels: dict[str, str]) -> bool:
        if self.host is not None and self.host != host:
            return False
        return all(labels.get(k) == v for k, v in self.labels.items())

    def reaches_agent(self, name: str, agent_class: str) -> bool:
        if self.agent is not None and self.agent != name:
            return False
        return self.agent_class is None or self.agent_class == agent_class

    @property
    def whole_host(self) -> bool:
        """Every agent of a reached host: the local verb's global scope."""
        return self.agent is None and self.agent_class is None

    def describe(self) -> str:
        parts = []
        if self.host:
            parts.append(f"host:{self.host}")
        for k, v in sorted(self.labels.items()):
            parts.append(f"label:{k}={v}")
        if self.agent_class:
            parts.append(f"class:{self.agent_class}")
        if self.agent:
            parts.append(f"agent:{self.agent}")
        return " ".join(parts) or "all"


class FleetAction(_Model):
    id: str
    verb: Literal["kill", "pause", "resume", "reactivate", "lift", "drill", "verify"]
    selector: Selector
    # Argv bytes that are not UTF-8 (or JSON's "\udcff" in an action another client wrote)
    # as U+FFFD, as for a local kill (limits.reason_text): never an action refused for them.
    reason: Annotated[str, BeforeValidator(lambda v: reason_text(v) if isinstance(v, str)
                                           else v), Field(min_length=1, max_length=REASON_MAX)]
    operator: str  # the etcd user that wrote it (only operator roles may write actions/)
    issued_at: float
    # lift: the holds it lifts
    lifts: list[str] = []


class AgentOutcome(_Model):
    agent: str
    agent_class: str = "default"
    previous_state: str = ""
    new_state: str = ""
    time_to_halt_ms: float | None = None
    skipped: str | None = None
    error: str | None = None


class Ack(_Model):
    action: str
    host: str
    outcome: Literal["ok", "failed", "not_applicable"]
    applied_at: float
    agents: list[AgentOutcome] = []  # the agents the verb acted on (or failed on)
    # agents in scope it did not apply to (already killed, idle...): a count, not a list, so
    # a host's ack does not grow with every agent it ever had
    agents_skipped: int = 0
    survivors: list[str] = []  # agents in scope still running after the verb
    slowest_time_to_halt_ms: float | None = None
    error: str | None = None
    # drills: the canary's end-to-end time, and whether it met the SLO
    drill: dict[str, Any] | None = None
    # verify: the host's audit chain held against the anchors it published to the store
    audit: dict[str, Any] | None = None
    # When (time.time() on the host) the watch delivered the action ("seen"), the loop began
    # it ("applying"), the local verb returned ("done": for a kill, every run's cgroup
    # confirmed empty and its network down) and the ack went to the writer ("sent"): where
    # a fleet halt's time goes between the store and the kernel (bench/fleet_halt.py).
    timings: dict[str, float] = {}


class AgentSummary(_Model):
    name: str
    agent_class: str
    state: str


REGISTRATION_AGENTS_MAX = 10_000  # agents listed in one host's registration


class Registration(_Model):
    host: str
    labels: dict[str, str] = {}
    version: str
    started_at: float
    updated_at: float
    agents: list[AgentSummary] = []
    # `agents` holds at most REGISTRATION_AGENTS_MAX of the host's agents: how many it has,
    # and whether the list was cut (a list cut without a word read as every agent there was).
    agents_total: int = 0
    agents_truncated: bool = False
    fleet_held: bool = False


class Keys:
    def __init__(self, prefix: str) -> None:
        self.prefix = prefix if prefix.endswith("/") else prefix + "/"

    @property
    def control(self) -> str:
        """What operators write and hosts only read: one prefix, so one watch covers it."""
        return self.prefix + "control/"

    @property
    def actions(self) -> str:
        return self.control + "actions/"

    @property
    def holds(self) -> str:
        return self.control + "holds/"

    @property
    def hosts(self) -> str:
        return self.prefix + "hosts/"

    def host(self, host: str) -> str:
        return f"{self.prefix}hosts/{host}/"

    def action(self, action_id: str) -> str:
        return self.actions + action_id

    def hold(self, action_id: str) -> str:
        return self.holds + action_id

    @property
    def members(self) -> str:
        return self.prefix + "members/"

    def registration(self, host: str) -> str:
        return self.members + host

    def ack(self, host: str, action_id: str) -> str:
        return self.host(host) + "acks/" + action_id

    def acks(self, host: str) -> str:
        return self.host(host) + "acks/"

    def anchors(self, host: str) -> str:
        return self.host(host) + "anchors/"

    def anchor(self, host: str, seq: int) -> str:
        return f"{self.anchors(host)}{seq:020d}"

    def partition(self, host: str) -> str:
        return self.host(host) + "partition"

    def host_of(self, key: str) -> str | None:
        if not key.startswith(self.hosts):
            return None
        return key[len(self.hosts):].split("/", 1)[0]


def drill_canary_name(action_id: str) -> str:
    return DRILL_PREFIX + action_id.rsplit("-", 1)[-1] + action_id[6:14]


def new_action_id() -> str:
    """Sortable by issue time, unique without coordination."""
    return f"{time.time_ns():020d}-{secrets.token_hex(3)}"


def dumps(model: BaseModel) -> str:
    return json.dumps(model.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
