"""The lifecycle state table (supervisor/states.py): every legal transition, every illegal one
raises, killed is a durable hold, ended runs are terminal. Pure; no I/O."""

from __future__ import annotations

import itertools

import pytest

from supervisor.states import (
    AGENT_TRANSITIONS,
    RUN_ENDED,
    RUN_TRANSITIONS,
    AgentState,
    EndCause,
    IllegalTransitionError,
    RunState,
    agent_at_end,
    agent_can,
    agent_transition,
    run_end,
    run_transition,
)

A = AgentState
R = RunState

# The lifecycle of DESIGN.md, written out independently of the module under test.
EXPECTED_AGENT: dict[tuple[str, AgentState], AgentState] = {
    ("launch", A.IDLE): A.ACTIVE,
    ("pause", A.ACTIVE): A.PAUSED,
    ("resume", A.PAUSED): A.ACTIVE,
    ("exit", A.ACTIVE): A.IDLE,
    ("exit", A.PAUSED): A.IDLE,
    ("stop", A.ACTIVE): A.IDLE,
    ("stop", A.PAUSED): A.IDLE,
    ("kill", A.IDLE): A.KILLED,
    ("kill", A.ACTIVE): A.KILLED,
    ("kill", A.PAUSED): A.KILLED,
    # Issue 12: a killed agent whose run is still alive may be killed again; the hold stays.
    ("kill", A.KILLED): A.KILLED,
    ("reactivate", A.KILLED): A.IDLE,
    # The daemon's shutdown ends runs but a pause is a hold: it survives (issue 11, item 11).
    ("shutdown", A.ACTIVE): A.IDLE,
    ("shutdown", A.PAUSED): A.PAUSED,
    # A held pause (its run ended with a restart) is lifted by resume or reactivate.
    ("release", A.PAUSED): A.IDLE,
}

EXPECTED_RUN: dict[tuple[str, RunState], RunState] = {
    ("start", R.STARTING): R.RUNNING,
    ("fail", R.STARTING): R.FAILED,
    ("fail", R.RUNNING): R.FAILED,
    ("pause", R.RUNNING): R.PAUSED,
    ("resume", R.PAUSED): R.RUNNING,
    ("exit", R.RUNNING): R.EXITED,
    ("exit", R.PAUSED): R.EXITED,
    ("kill", R.STARTING): R.KILLED,
    ("kill", R.RUNNING): R.KILLED,
    ("kill", R.PAUSED): R.KILLED,
    ("kill", R.KILLING): R.KILLED,
    ("kill_unconfirmed", R.STARTING): R.KILLING,
    ("kill_unconfirmed", R.RUNNING): R.KILLING,
    ("kill_unconfirmed", R.PAUSED): R.KILLING,
}

AGENT_VERBS = sorted(AGENT_TRANSITIONS)
RUN_VERBS = sorted(RUN_TRANSITIONS)


def test_verbs_are_the_documented_ones() -> None:
    assert set(AGENT_TRANSITIONS) == {verb for verb, _ in EXPECTED_AGENT}
    assert set(RUN_TRANSITIONS) == {verb for verb, _ in EXPECTED_RUN}


def test_tables_are_exactly_the_lifecycle() -> None:
    agent_table = {(verb, src): dst for verb, row in AGENT_TRANSITIONS.items()
                   for src, dst in row.items()}
    run_table = {(verb, src): dst for verb, row in RUN_TRANSITIONS.items()
                 for src, dst in row.items()}
    assert agent_table == EXPECTED_AGENT
    assert run_table == EXPECTED_RUN


@pytest.mark.parametrize(("verb", "state"), sorted(EXPECTED_AGENT))
def test_legal_agent_transition(verb: str, state: AgentState) -> None:
    assert agent_transition(state, verb) is EXPECTED_AGENT[(verb, state)]
    assert agent_can(state, verb)


ILLEGAL_AGENT = sorted((verb, state) for verb, state in itertools.product(AGENT_VERBS, A)
                       if (verb, state) not in EXPECTED_AGENT)


@pytest.mark.parametrize(("verb", "state"), ILLEGAL_AGENT)
def test_illegal_agent_transition_raises(verb: str, state: AgentState) -> None:
    assert not agent_can(state, verb)
    with pytest.raises(IllegalTransitionError) as info:
        agent_transition(state, verb)
    error = info.value
    assert (error.kind, error.verb, error.state) == ("agent", verb, state.value)
    assert sorted(error.allowed_from) == sorted(
        src.value for (v, src) in EXPECTED_AGENT if v == verb)
    assert verb in str(error) and state.value in str(error)


@pytest.mark.parametrize(("verb", "state"), sorted(EXPECTED_RUN))
def test_legal_run_transition(verb: str, state: RunState) -> None:
    assert run_transition(state, verb) is EXPECTED_RUN[(verb, state)]


ILLEGAL_RUN = sorted((verb, state) for verb, state in itertools.product(RUN_VERBS, R)
                     if (verb, state) not in EXPECTED_RUN)


@pytest.mark.parametrize(("verb", "state"), ILLEGAL_RUN)
def test_illegal_run_transition_raises(verb: str, state: RunState) -> None:
    with pytest.raises(IllegalTransitionError) as info:
        run_transition(state, verb)
    assert (info.value.kind, info.value.verb, info.value.state) == ("run", verb, state.value)


@pytest.mark.parametrize("verb", [v for v in AGENT_VERBS if v not in ("reactivate", "kill")])
def test_killed_is_a_durable_hold(verb: str) -> None:
    """Nothing but reactivate leaves killed: no launch, resume, exit or stop."""
    with pytest.raises(IllegalTransitionError):
        agent_transition(A.KILLED, verb)


def test_a_second_kill_keeps_the_hold() -> None:
    assert agent_transition(A.KILLED, "kill") is A.KILLED


def test_only_reactivate_leaves_killed_and_only_to_idle() -> None:
    leaving = {verb: dst for (verb, src), dst in EXPECTED_AGENT.items()
               if src is A.KILLED and dst is not A.KILLED}
    assert leaving == {"reactivate": A.IDLE}
    assert agent_transition(A.KILLED, "reactivate") is A.IDLE


# Every way a run ends, written out independently: (run state it ends in, agent afterwards
# from active, from killed).
EXPECTED_END: dict[EndCause, tuple[RunState, AgentState, AgentState]] = {
    EndCause.EXITED: (R.EXITED, A.IDLE, A.KILLED),
    EndCause.STOPPED: (R.EXITED, A.ACTIVE, A.KILLED),
    EndCause.LAUNCH_FAILED: (R.FAILED, A.IDLE, A.KILLED),
    EndCause.KILLED: (R.KILLED, A.ACTIVE, A.KILLED),
    EndCause.TIMEOUT: (R.KILLED, A.ACTIVE, A.KILLED),
    EndCause.TRIPWIRE: (R.KILLED, A.ACTIVE, A.KILLED),
    EndCause.BREAK_GLASS: (R.KILLED, A.ACTIVE, A.KILLED),
    EndCause.SHUTDOWN: (R.KILLED, A.ACTIVE, A.KILLED),
    EndCause.REAPED: (R.KILLED, A.IDLE, A.KILLED),
}


@pytest.mark.parametrize("cause", list(EndCause))
def test_every_end_cause_goes_through_the_table(cause: EndCause) -> None:
    run_state, from_active, from_killed = EXPECTED_END[cause]
    assert run_end(R.RUNNING, cause) is run_state
    assert agent_at_end(A.ACTIVE, cause) is from_active
    assert agent_at_end(A.KILLED, cause) is from_killed, "no ending lifts a kill's hold"
    for ended in RUN_ENDED:  # a run ends once
        with pytest.raises(IllegalTransitionError):
            run_end(ended, cause)


def test_every_live_state_can_be_killed() -> None:
    for state in (A.IDLE, A.ACTIVE, A.PAUSED):
        assert agent_transition(state, "kill") is A.KILLED


def test_run_ended_states() -> None:
    assert frozenset({R.EXITED, R.FAILED, R.KILLED}) == RUN_ENDED


@pytest.mark.parametrize(("verb", "state"), list(itertools.product(RUN_VERBS, sorted(RUN_ENDED))))
def test_ended_run_states_are_terminal(verb: str, state: RunState) -> None:
    with pytest.raises(IllegalTransitionError):
        run_transition(state, verb)


def test_state_values_are_the_wire_strings() -> None:
    assert [s.value for s in A] == ["idle", "active", "paused", "killed"]
    assert [s.value for s in R] == ["starting", "running", "paused", "killing", "exited",
                                    "failed", "killed"]


def test_an_unconfirmed_kill_is_not_an_end() -> None:
    """A run whose kill the kernel has not confirmed stays live until it is."""
    assert R.KILLING not in RUN_ENDED
    assert run_transition(R.KILLING, "kill") is R.KILLED
    for verb in ("pause", "resume", "exit", "start"):
        with pytest.raises(IllegalTransitionError):
            run_transition(R.KILLING, verb)
