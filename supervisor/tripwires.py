"""Tripwire rules and their evaluation: pure, no I/O, no privilege.

A rule watches one telemetry metric (supervisor.telemetry.METRICS) and fires when a sample's
value goes above its threshold: `kill` and `pause` act at once, `alert` only reports. A rule
fires when it becomes violated and re-arms when the value drops back. Auto-containment: after
`auto_containment_threshold` consecutive samples in which any alert rule is violated, the agent
is paused. The daemon turns each Firing into an audit row, a `tripwire.fired` event and, for
pause and kill, the same verb an operator would use."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from supervisor.models.tripwire import TripwirePolicy, TripwireRule
from supervisor.telemetry import Sample

__all__ = ["Firing", "RunTripwires", "TripwirePolicy", "TripwireRule"]

@dataclass(frozen=True)
class Firing:
    """A tripwire rule that fired on a sample, and what it asks for."""
    rule: str
    metric: str
    value: float
    threshold: float
    action: Literal["alert", "pause", "kill"]
    reason: str
    sample_ts: float
    auto_containment: bool = False

    def detail(self) -> dict[str, Any]:
        return {"rule": self.rule, "metric": self.metric, "value": self.value,
                "threshold": self.threshold, "action": self.action,
                "sample_ts": self.sample_ts, "auto_containment": self.auto_containment}


@dataclass
class RunTripwires:
    """The evaluation state of one run."""

    policy: TripwirePolicy
    armed: dict[str, bool] = field(default_factory=dict)
    consecutive: int = 0
    contained: bool = False

    def evaluate(self, sample: Sample) -> list[Firing]:
        firings: list[Firing] = []
        alert_violated: list[tuple[TripwireRule, float]] = []
        for rule in self.policy.rules:
            value = getattr(sample, rule.metric)
            violated = value is not None and float(value) > rule.above
            if not violated:
                self.armed[rule.name] = True
                continue
            if rule.action == "alert":
                alert_violated.append((rule, float(value)))
            if self.armed.get(rule.name, True):
                self.armed[rule.name] = False
                firings.append(Firing(rule.name, rule.metric, float(value), rule.above,
                                      rule.action, rule.describe(float(value)), sample.ts))
        if alert_violated:
            self.consecutive += 1
        else:
            self.consecutive = 0
            self.contained = False
        threshold = self.policy.auto_containment_threshold
        if alert_violated and self.consecutive >= threshold and not self.contained:
            self.contained = True
            rule, value = alert_violated[0]
            firings.append(Firing(
                rule.name, rule.metric, value, rule.above, "pause",
                f"auto-containment after {self.consecutive} consecutive violations: "
                f"{rule.describe(value)}", sample.ts, auto_containment=True))
        return firings

    def evaluate_metric(self, metric: str, value: float, ts: float) -> list[Firing]:
        """Rules on one metric only, between samples (syscall attempts are evaluated the moment
        they are reported, not on the next tick). Auto-containment counts samples, not this."""
        firings = []
        for rule in self.policy.rules:
            if rule.metric != metric:
                continue
            if value > rule.above and self.armed.get(rule.name, True):
                self.armed[rule.name] = False
                firings.append(Firing(rule.name, metric, value, rule.above, rule.action,
                                      rule.describe(value), ts))
        return firings

    def carry(self) -> dict[str, Any]:
        """What a restart carries to the next daemon (daemon/handover.py), so a window
        under way goes on where it was: which rules are disarmed (fired, not yet back below
        their line), the consecutive violating samples, whether it contained already."""
        return {"disarmed": sorted(n for n, armed in self.armed.items() if not armed),
                "consecutive": self.consecutive, "contained": self.contained}

    def restore(self, carried: dict[str, Any]) -> None:
        """Take what `carry` gave; ValueError (and nothing changed) if it is not of that
        form. Rules no longer in the policy are ignored."""
        disarmed, consecutive = carried.get("disarmed"), carried.get("consecutive")
        contained = carried.get("contained")
        if not (isinstance(disarmed, list) and all(isinstance(n, str) for n in disarmed)
                and isinstance(consecutive, int) and not isinstance(consecutive, bool)
                and consecutive >= 0 and isinstance(contained, bool)):
            raise ValueError("carried tripwire state is not of the form carry() gives")
        names = {rule.name for rule in self.policy.rules}
        self.armed.update({name: False for name in disarmed if name in names})
        self.consecutive = consecutive
        self.contained = contained

    def resumed(self) -> None:
        """An operator resumed the agent: containment may trip again."""
        self.consecutive = 0
        self.contained = False
