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

    def resumed(self) -> None:
        """An operator resumed the agent: containment may trip again."""
        self.consecutive = 0
        self.contained = False
