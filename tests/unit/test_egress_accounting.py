"""What the gateway counts (Usage, budget ceilings, tokens from an upstream's JSON) and the circuit
breaker that judges it, over plain-float clocks. No I/O, no sleeping, no privilege."""

from __future__ import annotations

import json

import pytest

from supervisor.egress.accounting import (
    MAX_BREAKER_EVENTS,
    MAX_TARGET_CHARS,
    OTHER_TARGETS,
    BreakerState,
    Ceiling,
    RefusalTally,
    Usage,
    clip,
    tokens_in,
)
from supervisor.models.egress import Breaker, Budget

# ----------------------------------------------------------------------------- Usage


def test_usage_add_sums_every_counter_without_mutating() -> None:
    a = Usage(requests=1, bytes=10, spend=0.5, tokens=3, denied=1, errors=2)
    b = Usage(requests=2, bytes=5, spend=0.25, tokens=4, denied=0, errors=1)
    assert a.add(b) == Usage(requests=3, bytes=15, spend=0.75, tokens=7, denied=1, errors=3)
    assert a == Usage(requests=1, bytes=10, spend=0.5, tokens=3, denied=1, errors=2)


def test_usage_over_an_empty_budget_is_never_reached() -> None:
    assert Usage(requests=10**9, bytes=10**12, spend=1e9).over(Budget()) is None


@pytest.mark.parametrize(("usage", "budget", "expected"), [
    (Usage(requests=4), Budget(requests=5), None),
    (Usage(requests=5), Budget(requests=5), Ceiling("requests", 5.0, 5.0)),
    (Usage(bytes=1023), Budget(bytes=1024), None),
    (Usage(bytes=2048), Budget(bytes=1024), Ceiling("bytes", 2048.0, 1024.0)),
    (Usage(spend=0.99), Budget(spend=1.0), None),
    (Usage(spend=1.0), Budget(spend=1.0), Ceiling("spend", 1.0, 1.0)),
])
def test_usage_over_each_metric_at_its_limit(usage: Usage, budget: Budget,
                                             expected: Ceiling | None) -> None:
    assert usage.over(budget) == expected


def test_usage_over_reports_the_first_ceiling_in_order() -> None:
    usage = Usage(requests=9, bytes=9999, spend=99.0)
    assert usage.over(Budget(requests=5, bytes=100, spend=1.0)) == Ceiling("requests", 9, 5)
    assert usage.over(Budget(requests=50, bytes=100, spend=1.0)) == Ceiling("bytes", 9999, 100)
    assert usage.over(Budget(requests=50, bytes=100000, spend=1.0)) == Ceiling("spend", 99, 1)


def test_ceiling_str() -> None:
    assert str(Ceiling("spend", 1.2345678, 1.0)) == "spend 1.23457 >= 1"
    assert str(Ceiling("requests", 5.0, 5.0)) == "requests 5 >= 5"


def test_usage_as_dict_rounds_spend() -> None:
    usage = Usage(requests=1, spend=0.1 + 0.2)
    assert usage.as_dict() == {"requests": 1, "bytes": 0, "spend": 0.3, "tokens": 0,
                               "denied": 0, "errors": 0}
    json.dumps(usage.as_dict())


# ----------------------------------------------------------------------------- tokens_in


@pytest.mark.parametrize(("payload", "expected"), [
    ({"usage": {"total_tokens": 42}}, 42),
    ({"usage": {"total_tokens": 42, "prompt_tokens": 1, "completion_tokens": 2}}, 42),
    ({"usage": {"prompt_tokens": 10, "completion_tokens": 5}}, 15),  # OpenAI without total
    ({"usage": {"input_tokens": 7, "output_tokens": 3}}, 10),  # Anthropic
    ({"usage": {"input_tokens": 7}}, 7),
    ({"usage": {"total_tokens": True, "input_tokens": 2}}, 2),  # a bool is not a count
    ({"usage": {"input_tokens": "7", "output_tokens": 1.5}}, None),
    ({"usage": {}}, None),
    ({"usage": None}, None),
    ({"usage": [1, 2]}, None),
    ({"choices": []}, None),
    ([1, 2, 3], None),
    ("just a string", None),
])
def test_tokens_in_reads_usage_shapes(payload: object, expected: int | None) -> None:
    assert tokens_in(json.dumps(payload).encode()) == expected


@pytest.mark.parametrize("body", [b"", b"not json", b"\xff\xfe", b"{", b"null"])
def test_tokens_in_tolerates_garbage(body: bytes) -> None:
    assert tokens_in(body) is None


# ----------------------------------------------------------------------------- BreakerState


def tripped(state: BreakerState) -> str | None:
    """The breaker's reason, read through a call so that type narrowing does not carry over
    from one assert to the next (record() changes it)."""
    return state.tripped


def breaker(**overrides: object) -> BreakerState:
    fields: dict[str, object] = {"window": 10.0, "max_rate": None, "max_error_rate": 0.5,
                                 "min_requests": 4, "baseline_factor": 5.0,
                                 "baseline_windows": 3}
    fields.update(overrides)
    return BreakerState(Breaker.model_validate(fields), started=1000.0)


def test_a_quiet_healthy_run_never_trips() -> None:
    state = breaker()
    for i in range(100):
        assert state.record(1000.0 + i * 2.0, error=False) is None
    assert state.tripped is None


def test_errors_below_min_requests_are_not_judged() -> None:
    state = breaker(min_requests=4)
    for i in range(3):
        assert state.record(1000.0 + i, error=True) is None
    reason = state.record(1003.0, error=True)
    assert reason is not None and reason.startswith("error rate 4/4 over 50%")
    assert state.tripped == reason


def test_error_rate_at_the_limit_does_not_trip_above_it_does() -> None:
    state = breaker(min_requests=4, max_error_rate=0.5)
    assert state.record(1000.0, error=True) is None
    assert state.record(1000.1, error=False) is None
    assert state.record(1000.2, error=True) is None
    assert state.record(1000.3, error=False) is None  # 2/4 = 50%: not over
    reason = state.record(1000.4, error=True)  # 3/5
    assert reason is not None and "3/5" in reason


def test_old_errors_slide_out_of_the_window() -> None:
    state = breaker(min_requests=4, window=10.0)
    for i in range(3):
        state.record(1000.0 + i, error=True)
    # Eleven seconds later those errors are outside the window.
    for i in range(4):
        assert state.record(1013.0 + i, error=False) is None
    assert state.record(1017.0, error=True) is None  # 1/5
    assert state.tripped is None


def test_max_rate_trips_on_requests_within_the_window() -> None:
    state = breaker(window=1.0, max_rate=3.0, min_requests=100)
    for _ in range(3):
        assert state.record(1000.0, error=False) is None
    reason = state.record(1000.0, error=False)
    assert reason is not None and reason.startswith("request rate 4.0/s over 3/s")


def test_max_rate_is_judged_even_below_min_requests() -> None:
    state = breaker(window=10.0, max_rate=0.1, min_requests=100)
    assert state.record(1000.0, error=False) is None
    assert state.record(1000.0, error=False) is not None  # 2 in 10 s = 0.2/s


def test_once_tripped_it_stays_open_and_ignores_records_until_reset() -> None:
    state = breaker(min_requests=1, max_error_rate=0.5)
    reason = state.record(1000.0, error=True)
    assert reason is not None
    # Hours of good traffic later it is still open and reports no new trip.
    for i in range(20):
        assert state.record(5000.0 + i, error=False) is None
    assert state.tripped == reason
    state.reset(6000.0)
    assert tripped(state) is None
    assert not state.events
    assert state.record(6000.5, error=False) is None
    assert state.record(6001.0, error=True) is None  # 1/2, not over 50%
    assert state.record(6001.5, error=True) is not None  # 2/3


def test_reset_forgets_the_window_but_keeps_the_baseline() -> None:
    state = breaker(window=10.0, min_requests=2, baseline_windows=1)
    for i in range(20):
        state.record(1000.0 + i, error=False)
    baseline = state.baseline
    assert baseline is not None
    state.tripped = "test"
    state.reset(1025.0)
    assert state.baseline == baseline
    assert (state.window_start, state.window_count) == (1025.0, 0)


def test_disabled_breaker_never_trips() -> None:
    state = breaker(enabled=False, min_requests=1, max_rate=0.1)
    for _ in range(50):
        assert state.record(1000.0, error=True) is None
    assert state.tripped is None


def test_baseline_moves_as_an_exponential_average_of_whole_windows() -> None:
    state = breaker(window=10.0)
    for i in range(10):  # 10 requests in the first window: 1/s
        state.record(1000.0 + i, error=False)
    assert state.baseline is None
    state.record(1010.0, error=False)  # rolls the first window
    assert state.baseline == pytest.approx(1.0)
    assert state.windows_seen == 1
    # Nothing for two more windows, then a request: two empty windows pull the average down.
    state.record(1030.0, error=False)
    # window 2 had 1 request (0.1/s), window 3 had none.
    assert state.baseline == pytest.approx(0.7 * (0.7 * 1.0 + 0.3 * 0.1))
    assert state.windows_seen == 3


def test_a_jump_above_the_baseline_trips_only_after_enough_windows() -> None:
    state = breaker(window=10.0, min_requests=4, baseline_factor=5.0, baseline_windows=3)
    now = 1000.0
    # Three windows at 1 request/s (the floor min_requests/window = 0.4/s is below that).
    for _ in range(30):
        assert state.record(now, error=False) is None
        now += 1.0
    assert state.windows_seen == 2  # the third window rolls on the next request
    # A burst: 51 requests in the fourth window is 5.1/s > 5 x 1/s.
    reason = None
    for _ in range(51):
        reason = state.record(now, error=False)
        if reason:
            break
    assert reason is not None and "jumped above 5x the run's baseline 1.00/s" in reason
    assert state.windows_seen == 3


def test_no_baseline_judgement_before_baseline_windows() -> None:
    state = breaker(window=10.0, min_requests=4, baseline_factor=2.0, baseline_windows=3)
    for i in range(10):
        state.record(1000.0 + i, error=False)
    # Second window: far above 2x the first window's 1/s, but only one window has been seen.
    for _ in range(60):
        assert state.record(1015.0, error=False) is None
    assert state.tripped is None


def test_the_baseline_floor_keeps_a_near_idle_run_from_tripping_on_a_few_requests() -> None:
    state = breaker(window=10.0, min_requests=4, baseline_factor=5.0, baseline_windows=1)
    state.record(1000.0, error=False)
    state.record(1010.0, error=False)  # baseline 0.1/s after one window
    assert state.baseline == pytest.approx(0.1)
    # 19 requests (1.9/s) > 5 x 0.1/s, but below 5 x the floor (min_requests/window = 0.4/s).
    for _ in range(18):
        assert state.record(1011.0, error=False) is None
    assert tripped(state) is None
    # 2.1/s > 5 x 0.4/s = 2/s.
    for _ in range(2):
        state.record(1011.0, error=False)
    reason = tripped(state)
    assert reason is not None and "jumped" in reason


def test_breaker_window_is_bounded_whatever_the_rate() -> None:
    state = BreakerState(Breaker(max_rate=None, baseline_factor=1000.0), 0.0)
    for i in range(MAX_BREAKER_EVENTS * 3):
        state.record(1.0 + i * 1e-9, i % 3 == 0)
    assert len(state.events) == MAX_BREAKER_EVENTS
    assert state.errors == sum(1 for _, error in state.events if error)


def test_refusal_tally_is_bounded_and_counts_everything() -> None:
    tally = RefusalTally(cap=8)
    first = [tally.count("egress_denied", f"host{i}." + "x" * 5000) for i in range(1000)]
    assert first.count(True) == 8  # one report for each of the first 8 targets
    tally.count("bad_request", "y" * 10_000)
    counts = tally.as_dict()
    assert len(counts) == 10 and sum(counts.values()) == tally.total == 1001
    assert counts[f"egress_denied {OTHER_TARGETS}"] == 992
    assert all(len(key) < MAX_TARGET_CHARS + 20 for key in counts)
    assert clip("z" * 300).endswith("\u2026") and len(clip("z" * 300)) == MAX_TARGET_CHARS
