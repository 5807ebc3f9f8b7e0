"""The lifecycle state table. Every transition of an agent or a run goes through `transition`;
an illegal one raises. Standard library only, no I/O."""

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


RUN_ENDED = frozenset({RunState.EXITED, RunState.FAILED, RunState.KILLED})

AGENT_TRANSITIONS: dict[str, dict[AgentState, AgentState]] = {
    "launch": {AgentState.IDLE: AgentState.ACTIVE},
    "pause": {AgentState.ACTIVE: AgentState.PAUSED},
    "resume": {AgentState.PAUSED: AgentState.ACTIVE},
    "exit": {AgentState.ACTIVE: AgentState.IDLE, AgentState.PAUSED: AgentState.IDLE},
    "stop": {AgentState.ACTIVE: AgentState.IDLE, AgentState.PAUSED: AgentState.IDLE},
    # The daemon's own shutdown ends every run but keeps a pause: it is a hold, like a kill.
    "shutdown": {AgentState.ACTIVE: AgentState.IDLE, AgentState.PAUSED: AgentState.PAUSED},
    "kill": {
        AgentState.IDLE: AgentState.KILLED,
        AgentState.ACTIVE: AgentState.KILLED,
        AgentState.PAUSED: AgentState.KILLED,
    },
    "reactivate": {AgentState.KILLED: AgentState.IDLE},
    # A pause held across a restart (its run is gone) is lifted by resume or reactivate.
    "release": {AgentState.PAUSED: AgentState.IDLE},
}

RUN_TRANSITIONS: dict[str, dict[RunState, RunState]] = {
    "start": {RunState.STARTING: RunState.RUNNING},
    "fail": {RunState.STARTING: RunState.FAILED, RunState.RUNNING: RunState.FAILED},
    "pause": {RunState.RUNNING: RunState.PAUSED},
    "resume": {RunState.PAUSED: RunState.RUNNING},
    "exit": {RunState.RUNNING: RunState.EXITED, RunState.PAUSED: RunState.EXITED},
    "kill": {
        RunState.STARTING: RunState.KILLED,
        RunState.RUNNING: RunState.KILLED,
        RunState.PAUSED: RunState.KILLED,
        RunState.KILLING: RunState.KILLED,
    },
    # A kill the kernel has not confirmed is not done: the run stays tracked until it is.
    "kill_unconfirmed": {
        RunState.STARTING: RunState.KILLING,
        RunState.RUNNING: RunState.KILLING,
        RunState.PAUSED: RunState.KILLING,
    },
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


def agent_can(state: AgentState, verb: str) -> bool:
    return state in AGENT_TRANSITIONS[verb]
