"""What the gateway counts per run and per agent (usage, refusals), and the circuit breaker
that judges it. Every structure here has a size fixed by its policy, whatever the agent sends.
Pure state over an injected clock; no I/O, no privilege."""

from __future__ import annotations

import json
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the policy's models load with the first gateway run (models/network.py)
    from supervisor.models.egress import Breaker, Budget


@dataclass(frozen=True)
class Ceiling:
    """A budget's metric that reached its limit."""
    metric: str  # requests, bytes or spend
    value: float
    limit: float

    def __str__(self) -> str:
        return f"{self.metric} {self.value:.6g} >= {self.limit:.6g}"


@dataclass
class Usage:
    """What a run has used of the gateway: requests, bytes and spend."""
    requests: int = 0
    bytes: int = 0
    spend: float = 0.0
    tokens: int = 0
    denied: int = 0
    errors: int = 0
    # "code target" -> count, from the run's RefusalTally; not part of the agent's totals.
    refusals: dict[str, int] = field(default_factory=dict, compare=False)

    def add(self, other: Usage) -> Usage:
        return Usage(self.requests + other.requests, self.bytes + other.bytes,
                     self.spend + other.spend, self.tokens + other.tokens,
                     self.denied + other.denied, self.errors + other.errors)

    def less(self, other: Usage) -> Usage:
        return Usage(self.requests - other.requests, self.bytes - other.bytes,
                     self.spend - other.spend, self.tokens - other.tokens,
                     self.denied - other.denied, self.errors - other.errors)

    def over(self, budget: Budget) -> Ceiling | None:
        """The first ceiling this usage has reached, or None."""
        for metric, value, limit in (("requests", self.requests, budget.requests),
                                     ("bytes", self.bytes, budget.bytes),
                                     ("spend", self.spend, budget.spend)):
            if limit is not None and value >= limit:
                return Ceiling(metric, float(value), float(limit))
        return None

    def as_dict(self) -> dict[str, Any]:
        return {"requests": self.requests, "bytes": self.bytes, "spend": round(self.spend, 9),
                "tokens": self.tokens, "denied": self.denied, "errors": self.errors}

    def copy(self) -> Usage:
        return Usage(self.requests, self.bytes, self.spend, self.tokens, self.denied,
                     self.errors, dict(self.refusals))


MAX_BREAKER_EVENTS = 20_000
MAX_TARGET_CHARS = 200  # of a host or path kept in a refusal's key, detail or audit row
OTHER_TARGETS = "(other targets)"


def clip(text: str, limit: int = MAX_TARGET_CHARS) -> str:
    """`text` cut to `limit` characters, marked when cut (an agent chooses its length)."""
    return text if len(text) <= limit else text[:limit - 1] + "\u2026"


class RefusalTally:
    """Refusals of one run per (code, target): at most `cap` distinct keys, each target clipped;
    past the cap, a code's further targets share one key. The codes are the gateway's own, so
    the tally's size is bounded whatever names or paths the agent invents."""

    def __init__(self, cap: int = 64) -> None:
        self.cap = cap
        self.counts: dict[tuple[str, str], int] = {}
        self.total = 0

    def count(self, code: str, target: str) -> bool:
        """Count one refusal; True the first time its key is seen (worth an audit row)."""
        self.total += 1
        key = (code, clip(target))
        if key not in self.counts and len(self.counts) >= self.cap:
            key = (code, OTHER_TARGETS)
        seen = self.counts.get(key, 0)
        self.counts[key] = seen + 1
        return seen == 0 and key[1] != OTHER_TARGETS

    def as_dict(self) -> dict[str, int]:
        return {f"{code} {target}".strip(): n for (code, target), n in self.counts.items()}


def tokens_in(body: bytes) -> int | None:
    """Tokens an upstream reports in its JSON `usage` (OpenAI and Anthropic shapes)."""
    try:
        usage = json.loads(body).get("usage")
    except (ValueError, AttributeError):
        return None
    if not isinstance(usage, dict):
        return None
    total = usage.get("total_tokens")
    if isinstance(total, int) and not isinstance(total, bool):
        return total
    parts = [usage.get(k) for k in ("prompt_tokens", "completion_tokens", "input_tokens",
                                    "output_tokens")]
    counted = [p for p in parts if isinstance(p, int) and not isinstance(p, bool)]
    return sum(counted) if counted else None


@dataclass
class BreakerState:
    """A sliding window of (time, error) for one run, and a moving baseline of the request
    rate over whole windows. Once tripped it stays open until a human resets it."""

    policy: Breaker
    started: float
    # Bounded: past this many requests in one window, every rate limit worth setting has
    # already tripped; the window then judges its newest requests.
    events: deque[tuple[float, bool]] = field(default_factory=deque)
    errors: int = 0  # errors among `events`, kept as they come and go (no scan per request)
    window_start: float = 0.0
    window_count: int = 0
    baseline: float | None = None
    windows_seen: int = 0
    tripped: str | None = None  # the reason, while open

    def __post_init__(self) -> None:
        self.window_start = self.started

    def _roll(self, now: float) -> None:
        width = self.policy.window
        while now - self.window_start >= width:
            rate = self.window_count / width
            # An exponential moving average: a single quiet or busy window moves it a little.
            self.baseline = rate if self.baseline is None else 0.7 * self.baseline + 0.3 * rate
            self.windows_seen += 1
            self.window_start += width
            self.window_count = 0
        while self.events and now - self.events[0][0] > width:
            self._drop_oldest()

    def _drop_oldest(self) -> None:
        _, error = self.events.popleft()
        self.errors -= error

    def record(self, now: float, error: bool) -> str | None:
        """Count one request; the reason when this request trips the breaker."""
        if not self.policy.enabled or self.tripped:
            return None
        self._roll(now)
        if len(self.events) >= MAX_BREAKER_EVENTS:
            self._drop_oldest()
        self.events.append((now, error))
        self.errors += error
        self.window_count += 1
        return self._judge()

    def _judge(self) -> str | None:
        p = self.policy
        n = len(self.events)
        rate = n / p.window
        reason = None
        if p.max_rate is not None and rate > p.max_rate:
            reason = f"request rate {rate:.1f}/s over {p.max_rate:g}/s (window {p.window:g}s)"
        elif n >= p.min_requests:
            errors = self.errors
            if errors / n > p.max_error_rate:
                reason = (f"error rate {errors}/{n} over {p.max_error_rate:.0%} "
                          f"(window {p.window:g}s)")
            elif self.baseline is not None and self.windows_seen >= p.baseline_windows:
                floor = max(self.baseline, p.min_requests / p.window)
                if rate > p.baseline_factor * floor:
                    reason = (f"request rate {rate:.2f}/s jumped above {p.baseline_factor:g}x "
                              f"the run's baseline {self.baseline:.2f}/s")
        if reason:
            self.tripped = reason
        return reason

    def reset(self, now: float) -> None:
        self.tripped = None
        self.events.clear()
        self.errors = 0
        self.window_start, self.window_count = now, 0
