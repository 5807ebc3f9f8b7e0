"""The lifecycle state table. Every transition of an agent or a run goes through `transition`;
an illegal one raises. Every way a run can end is an `EndCause`, and the table says what each
cause makes of the run and of its agent, so nothing downstream parses a reason string.
Standard library only, no I/O."""

from __future__ import annotations

import enum


class AgentState(enum.StrEnum):
    IDLE = "idle"  # registered, no run
    ACTIVE = "active"  # a run is executing
    PAUSED = "paused"  # the run's cgroup is frozen
    KILLED = "killed"  # durable hold: no run until an owner reactivates


class RunState(enum.StrEnum):
    STARTING = "starting"
    RUNNING = "running"
    PAUSED = "paused"
    KILLING = "killing"  # SIGKILL sent, the kernel has not yet reported the cgroup empty
    EXITED = "exited"  # the agent's command ended by itself (or a graceful stop)
    FAILED = "failed"  # the sandbox could not be set up or the runtime failed
    KILLED = "killed"  # ended by the kill path


class Verb(enum.StrEnum):
    LAUNCH = "launch"
    START = "start"
    FAIL = "fail"
    PAUSE = "pause"
    RESUME = "resume"
    EXIT = "exit"
    STOP = "stop"
    SHUTDOWN = "shutdown"
    KILL = "kill"
    KILL_UNCONFIRMED = "kill_unconfirmed"
    REACTIVATE = "reactivate"
    RELEASE = "release"


class EndCause(enum.StrEnum):
    """Why a run ended; recorded with the run and in the audit row of its end."""

    EXITED = "exited"  # the agent's command ended by itself
    STOPPED = "stopped"  # a graceful stop: SIGTERM, and the command ended within the grace
    LAUNCH_FAILED = "launch_failed"  # the sandbox could not be set up
    KILLED = "killed"  # an operator's (or a CI job's) kill, or a stop whose grace ran out
    TIMEOUT = "timeout"  # the run's execution window expired
    TRIPWIRE = "tripwire"  # a tripwire rule fired with action kill
    BREAK_GLASS = "break_glass"  # SIGUSR1, the HALT file or `agent-supervisord --halt`
    SHUTDOWN = "shutdown"  # the supervisor stopped and took its runs with it
    REAPED = "reaped"  # a previous supervisor instance left it; reconcile killed it


RUN_ENDED = frozenset({RunState.EXITED, RunState.FAILED, RunState.KILLED})

AGENT_TRANSITIONS: dict[str, dict[AgentState, AgentState]] = {
    Verb.LAUNCH: {AgentState.IDLE: AgentState.ACTIVE},
    Verb.PAUSE: {AgentState.ACTIVE: AgentState.PAUSED},
    Verb.RESUME: {AgentState.PAUSED: AgentState.ACTIVE},
    Verb.EXIT: {AgentState.ACTIVE: AgentState.IDLE, AgentState.PAUSED: AgentState.IDLE},
    Verb.STOP: {AgentState.ACTIVE: AgentState.IDLE, AgentState.PAUSED: AgentState.IDLE},
    # The daemon's own shutdown ends every run but keeps a pause: it is a hold, like a kill.
    Verb.SHUTDOWN: {AgentState.ACTIVE: AgentState.IDLE, AgentState.PAUSED: AgentState.PAUSED},
    Verb.KILL: {
        AgentState.IDLE: AgentState.KILLED,
        AgentState.ACTIVE: AgentState.KILLED,
        AgentState.PAUSED: AgentState.KILLED,
        # A killed agent whose run is still alive (its kill is unconfirmed, or its processes
        # outlived a failed step) may be killed again: the hold stays, the kill path runs.
        AgentState.KILLED: AgentState.KILLED,
    },
    Verb.REACTIVATE: {AgentState.KILLED: AgentState.IDLE},
    # A pause held across a restart (its run is gone) is lifted by resume or reactivate.
    Verb.RELEASE: {AgentState.PAUSED: AgentState.IDLE},
}

RUN_TRANSITIONS: dict[str, dict[RunState, RunState]] = {
    Verb.START: {RunState.STARTING: RunState.RUNNING},
    Verb.FAIL: {RunState.STARTING: RunState.FAILED, RunState.RUNNING: RunState.FAILED},
    Verb.PAUSE: {RunState.RUNNING: RunState.PAUSED},
    Verb.RESUME: {RunState.PAUSED: RunState.RUNNING},
    Verb.EXIT: {RunState.RUNNING: RunState.EXITED, RunState.PAUSED: RunState.EXITED},
    Verb.KILL: {
        RunState.STARTING: RunState.KILLED,
        RunState.RUNNING: RunState.KILLED,
        RunState.PAUSED: RunState.KILLED,
        RunState.KILLING: RunState.KILLED,
    },
    # A kill the kernel has not confirmed is not done: the run stays tracked until it is.
    Verb.KILL_UNCONFIRMED: {
        RunState.STARTING: RunState.KILLING,
        RunState.RUNNING: RunState.KILLING,
        RunState.PAUSED: RunState.KILLING,
    },
}

# Which run transition ends a run for each cause.
END_VERB: dict[EndCause, Verb] = {
    EndCause.EXITED: Verb.EXIT,
    EndCause.STOPPED: Verb.EXIT,
    EndCause.LAUNCH_FAILED: Verb.FAIL,
    EndCause.KILLED: Verb.KILL,
    EndCause.TIMEOUT: Verb.KILL,
    EndCause.TRIPWIRE: Verb.KILL,
    EndCause.BREAK_GLASS: Verb.KILL,
    EndCause.SHUTDOWN: Verb.KILL,
    EndCause.REAPED: Verb.KILL,
}

# What the agent becomes when its run ends for each cause (None: the agent verb that ended the
# run, a kill or a stop, has set it already). A kill that raced an exit keeps its hold.
AGENT_AT_END: dict[EndCause, Verb | None] = {
    EndCause.EXITED: Verb.EXIT,
    EndCause.STOPPED: None,
    EndCause.LAUNCH_FAILED: Verb.EXIT,
    EndCause.KILLED: None,
    EndCause.TIMEOUT: None,
    EndCause.TRIPWIRE: None,
    EndCause.BREAK_GLASS: None,
    EndCause.SHUTDOWN: None,
    EndCause.REAPED: Verb.SHUTDOWN,  # a pause outlives its run across a restart
}

class IllegalTransitionError(Exception):
    def __init__(self, kind: str, verb: str, state: str, allowed_from: list[str]) -> None:
        super().__init__(f"cannot {verb} {kind} in state {state!r}")
        self.kind = kind
        self.verb = verb
        self.state = state
        self.allowed_from = allowed_from


def agent_transition(state: AgentState, verb: str) -> AgentState:
    table = AGENT_TRANSITIONS[verb]
    if state not in table:
        raise IllegalTransitionError("agent", verb, state.value, [s.value for s in table])
    return table[state]


def run_transition(state: RunState, verb: str) -> RunState:
    table = RUN_TRANSITIONS[verb]
    if state not in table:
        raise IllegalTransitionError("run", verb, state.value, [s.value for s in table])
    return table[state]


def run_end(state: RunState, cause: EndCause) -> RunState:
    """The state a run ends in for `cause`; raises if it cannot end that way from `state`."""
    return run_transition(state, END_VERB[cause])


def agent_at_end(state: AgentState, cause: EndCause) -> AgentState:
    """The agent's state once its run has ended for `cause`."""
    verb = AGENT_AT_END[cause]
    if verb is None or state not in AGENT_TRANSITIONS[verb]:
        return state  # set by the verb that ended the run, or a kill's hold that stays
    return AGENT_TRANSITIONS[verb][state]


def agent_can(state: AgentState, verb: str) -> bool:
    return state in AGENT_TRANSITIONS[verb]
