"""Tripwire rules and their evaluation (pure): thresholds, arming, actions, auto-containment,
per-agent overrides, and profile validation. No root."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from supervisor.errors import ProfileInvalid
from supervisor.profiles import validate_profile
from supervisor.telemetry import Sample
from supervisor.tripwires import RunTripwires, TripwirePolicy, TripwireRule
from tests.support.model_diff import differences


def sample(ts: float = 0.0, **values: float) -> Sample:
    return Sample(ts=ts, wall_seconds=ts, processes=int(values.pop("processes", 1)),
                  **values)  # type: ignore[arg-type]


def policy(*rules: dict[str, object], threshold: int = 3) -> TripwirePolicy:
    return TripwirePolicy.model_validate({"auto_containment_threshold": threshold,
                                          "rules": list(rules)})


def test_thresholds_accept_numbers_sizes_and_durations() -> None:
    p = policy({"name": "mem", "metric": "memory_bytes", "above": "512M", "action": "kill"},
               {"name": "wall", "metric": "wall_seconds", "above": "1m30s"},
               {"name": "fork", "metric": "processes", "above": 100})
    assert [r.above for r in p.rules] == [512 * 1024**2, 90.0, 100.0]
    as_cli_sends = TripwireRule.model_validate({"name": "e", "metric": "syscall_attempts",
                                                "above": "0"})
    assert as_cli_sends.above == 0.0


@pytest.mark.parametrize("bad", [
    {"name": "x", "metric": "bogus", "above": 1},
    {"name": "x", "metric": "processes", "above": "lots"},
    {"name": "x", "metric": "processes", "above": "nan"},
    {"name": "x", "metric": "processes", "above": 1, "action": "explode"},
    {"name": "X Y", "metric": "processes", "above": 1},
    {"name": "x", "metric": "processes", "above": 1, "extra": True},
])
def test_bad_rules_are_rejected(bad: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        TripwireRule.model_validate(bad)


def test_a_profile_with_a_bad_rule_names_the_field() -> None:
    with pytest.raises(ProfileInvalid) as info:
        validate_profile("p", {"tripwires": {"rules": [
            {"name": "a", "metric": "memory_bytes", "above": "1Q"}]}}, "test")
    assert info.value.detail["field"] == "tripwires.rules.0.above"
    with pytest.raises(ProfileInvalid) as info:
        validate_profile("p", {"tripwires": {"auto_containment_threshold": 1}}, "test")
    assert info.value.detail["field"] == "tripwires.auto_containment_threshold"


def test_kill_fires_once_on_crossing_and_rearms_after_dropping() -> None:
    state = RunTripwires(policy({"name": "fork", "metric": "processes", "above": 10,
                                 "action": "kill"}))
    assert state.evaluate(sample(processes=5)) == []
    [firing] = state.evaluate(sample(1, processes=11))
    assert (firing.rule, firing.action, firing.value, firing.threshold) == ("fork", "kill",
                                                                          11, 10)
    assert "tripwire fork: processes 11 > 10" in firing.reason
    assert state.evaluate(sample(2, processes=12)) == []  # still violated: no second firing
    assert state.evaluate(sample(3, processes=3)) == []
    assert [f.rule for f in state.evaluate(sample(4, processes=20))] == ["fork"]


def test_unmeasured_values_never_fire() -> None:
    state = RunTripwires(policy({"name": "fds", "metric": "open_fds", "above": 1,
                                 "action": "kill"}))
    assert state.evaluate(sample(open_fds=None)) == []  # type: ignore[arg-type]


def test_alerts_escalate_to_auto_containment_after_n_consecutive_violations() -> None:
    state = RunTripwires(policy({"name": "mem", "metric": "memory_bytes", "above": "100M"},
                                threshold=3))
    over = 200 * 1024**2
    first = state.evaluate(sample(0, memory_bytes=over))
    assert [(f.action, f.auto_containment) for f in first] == [("alert", False)]
    assert state.evaluate(sample(1, memory_bytes=over)) == []
    [contain] = state.evaluate(sample(2, memory_bytes=over))
    assert (contain.action, contain.auto_containment) == ("pause", True)
    assert contain.reason.startswith("auto-containment after 3 consecutive violations")
    assert "tripwire mem: memory_bytes 200.0M > 100.0M" in contain.reason
    assert state.evaluate(sample(3, memory_bytes=over)) == []  # contained once
    state.resumed()
    assert state.evaluate(sample(4, memory_bytes=over)) == []
    assert state.evaluate(sample(5, memory_bytes=over)) == []
    assert [f.action for f in state.evaluate(sample(6, memory_bytes=over))] == ["pause"]


def test_a_gap_resets_the_consecutive_count() -> None:
    state = RunTripwires(policy({"name": "cpu", "metric": "cpu_percent", "above": 90},
                                threshold=2))
    state.evaluate(sample(0, cpu_percent=99))
    state.evaluate(sample(1, cpu_percent=10))
    assert [f.action for f in state.evaluate(sample(2, cpu_percent=99))] == ["alert"]
    assert [f.action for f in state.evaluate(sample(3, cpu_percent=99))] == ["pause"]


def test_syscall_attempts_are_evaluated_between_samples() -> None:
    state = RunTripwires(policy({"name": "escape", "metric": "syscall_attempts", "above": 0,
                                 "action": "kill"},
                                {"name": "fork", "metric": "processes", "above": 10,
                                 "action": "kill"}))
    [firing] = state.evaluate_metric("syscall_attempts", 1, ts=5.0)
    assert (firing.rule, firing.action, firing.sample_ts) == ("escape", "kill", 5.0)
    assert state.evaluate_metric("syscall_attempts", 2, ts=6.0) == []
    assert state.evaluate_metric("processes", 1, ts=6.0) == []


def test_agent_overrides_replace_rules_of_the_same_name() -> None:
    base = policy({"name": "mem", "metric": "memory_bytes", "above": "1G", "action": "kill"},
                  {"name": "fork", "metric": "processes", "above": 100, "action": "kill"})
    mine = base.with_overrides([TripwireRule.model_validate(
        {"name": "mem", "metric": "memory_bytes", "above": "2G", "action": "alert"})])
    rules = {r.name: r for r in mine.rules}
    assert rules["mem"].above == 2 * 1024**3 and rules["mem"].action == "alert"
    assert rules["fork"].above == 100
    assert mine.auto_containment_threshold == base.auto_containment_threshold


def test_a_window_carried_across_a_restart_goes_on_where_it_was() -> None:
    """Issue 13: what the next daemon gets (daemon/handover.py) makes an adopted run's
    auto-containment fire after the violations it still lacked, and a rule that fired stays
    fired until its value drops back: no second alert for the same crossing."""
    rules = ({"name": "mem", "metric": "memory_bytes", "above": "100M"},
             {"name": "gone", "metric": "processes", "above": 1000})
    over = 200 * 1024**2
    before = RunTripwires(policy(*rules, threshold=4))
    assert [f.action for f in before.evaluate(sample(0, memory_bytes=over))] == ["alert"]
    assert before.evaluate(sample(1, memory_bytes=over)) == []
    carried = before.carry()
    assert carried == {"disarmed": ["mem"], "consecutive": 2, "contained": False}
    # The next daemon's policy lost a rule: its name is ignored.
    after = RunTripwires(policy(rules[0], threshold=4))
    after.restore({**carried, "disarmed": ["mem", "renamed"]})
    assert after.evaluate(sample(2, memory_bytes=over)) == []  # no second alert; 3 of 4
    [contain] = after.evaluate(sample(3, memory_bytes=over))
    assert (contain.action, contain.auto_containment) == ("pause", True)
    assert contain.reason.startswith("auto-containment after 4 consecutive violations")
    fresh = RunTripwires(policy(rules[0], threshold=4))  # what the restart did before
    assert [f.action for f in fresh.evaluate(sample(2, memory_bytes=over))] == ["alert"]


@pytest.mark.parametrize("bad", [{}, {"disarmed": "mem", "consecutive": 1, "contained": False},
                                 {"disarmed": [], "consecutive": -1, "contained": False},
                                 {"disarmed": [], "consecutive": True, "contained": False},
                                 {"disarmed": [], "consecutive": 1, "contained": "no"}])
def test_a_carried_state_not_of_its_form_changes_nothing(bad: dict[str, object]) -> None:
    state = RunTripwires(policy({"name": "mem", "metric": "memory_bytes", "above": "100M"}))
    with pytest.raises(ValueError):
        state.restore(bad)
    assert (state.armed, state.consecutive, state.contained) == ({}, 0, False)


def test_tripwires_without_overrides_are_the_profiles_own() -> None:
    """A run with no tripwires of its own keeps its profile's policy as it is; with some,
    they replace the profile's rules of the same name: the policy made of validated parts
    without validating it again is what validating gives."""
    rule = TripwireRule(name="mem", metric="memory_bytes", above=1.0)
    policy = TripwirePolicy(auto_containment_threshold=5, rules=[rule])
    assert policy.with_overrides([]) is policy
    other = TripwireRule(name="mem", metric="memory_bytes", above=2.0, action="kill")
    extra = TripwireRule(name="cpu", metric="cpu_seconds", above=3.0)
    merged = policy.with_overrides([other, extra])
    assert differences(merged, TripwirePolicy(auto_containment_threshold=5,
                                              rules=[other, extra])) == []
