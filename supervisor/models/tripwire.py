"""Tripwire rules as profiles and requests state them (pydantic). No I/O."""

# No `from __future__ import annotations`: pydantic then gets these models' annotations as
# objects, not strings it must evaluate one by one as each class is defined (~2 ms of the
# embedded runner's start over the models on its path).

import math
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator

from supervisor import buildmode
from supervisor.models.units import parse_duration, parse_size

# Sample fields (supervisor.telemetry.Sample) a rule may watch.
METRICS = (
    "memory_bytes", "cpu_seconds", "cpu_percent", "processes", "wall_seconds", "open_fds",
    "threads", "rss_bytes", "connections", "network_bytes", "syscall_attempts", "oom_kills",
    "output_bytes", "mcp_calls", "mcp_cost",
)
_SECONDS = {"wall_seconds", "cpu_seconds"}
_BYTES = {"memory_bytes", "rss_bytes", "network_bytes", "output_bytes"}


Action = Literal["alert", "pause", "kill"]


def _threshold(value: Any) -> float:
    """A number, a size ("512M") or a duration ("30s")."""
    if isinstance(value, bool):
        raise ValueError("expected a number, a size such as '512M' or a duration such as '30s'")
    if isinstance(value, int | float):
        try:
            number = float(value)
        except OverflowError:
            raise ValueError("the threshold is too large") from None
        if not math.isfinite(number):
            raise ValueError("the threshold must be a finite number")
        return number
    if isinstance(value, str):
        if len(value) > 64:
            raise ValueError("a threshold is at most 64 characters")
        try:
            number = float(value)
        except ValueError:
            pass
        else:
            if math.isfinite(number):
                return number
        for parse in (parse_size, parse_duration):
            try:
                return float(parse(value))
            except ValueError:
                continue
    raise ValueError(f"{value!r} is not a number, a size such as '512M' or a duration like '30s'")


class TripwireRule(BaseModel):
    # Validated inside a profile or a run request (buildmode.py: built on its own only if used
    # on its own, where building waits for first use).
    model_config = ConfigDict(extra="forbid", frozen=True, defer_build=buildmode.DEFER_BUILD)

    name: Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_.\-]{0,62}$")]
    metric: str
    above: Annotated[float, BeforeValidator(_threshold)]
    action: Action = "alert"

    @field_validator("metric")
    @classmethod
    def _metric(cls, metric: str) -> str:
        if metric not in METRICS:
            raise ValueError(f"unknown metric {metric!r}; one of {', '.join(METRICS)}")
        return metric

    def describe(self, value: float) -> str:
        return (f"tripwire {self.name}: {self.metric} {_fmt(self.metric, value)} > "
                f"{_fmt(self.metric, self.above)}")


class TripwirePolicy(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, defer_build=buildmode.DEFER_BUILD)

    auto_containment_threshold: Annotated[int, Field(ge=2, le=1000)] = 3
    rules: list[TripwireRule] = []

    @field_validator("rules")
    @classmethod
    def _unique(cls, rules: list[TripwireRule]) -> list[TripwireRule]:
        names = [r.name for r in rules]
        if len(names) != len(set(names)):
            raise ValueError("rule names must be unique")
        return rules

    def with_overrides(self, overrides: list[TripwireRule]) -> "TripwirePolicy":
        """The agent's own rules replace the profile's rules of the same name."""
        if not overrides:
            return self  # the usual run: nothing to replace
        by_name = {r.name: r for r in self.rules}
        by_name.update({r.name: r for r in overrides})
        # Every part is validated already (the policy, each rule) and the names are unique
        # by construction: nothing to validate again, so nothing waits for this model to be
        # built as a run starts where building waits for first use (buildmode.py).
        return TripwirePolicy.model_construct(
            auto_containment_threshold=self.auto_containment_threshold,
            rules=list(by_name.values()))


def _fmt(metric: str, value: float) -> str:
    if metric in _BYTES:
        for unit, size in (("G", 1024**3), ("M", 1024**2), ("K", 1024)):
            if value >= size:
                return f"{value / size:.1f}{unit}"
        return f"{value:.0f}B"
    if metric in _SECONDS:
        return f"{value:.2f}s"
    if metric == "cpu_percent":
        return f"{value:.0f}%"
    return f"{value:g}"
