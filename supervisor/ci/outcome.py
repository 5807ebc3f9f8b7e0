"""How an embedded CI run ended and the exit status agentctl gives it. Pure; no I/O.

The statuses of how a run ended sit in a block no other agentctl status uses (errors.py: 1-13,
78, and docker's 125-127 for a run that did not start); an agent that itself exits 80-84 is
told apart by the report."""

from __future__ import annotations

from enum import StrEnum

from supervisor.errors import EmbeddedRunFailed
from supervisor.states import EndCause


class Ending(StrEnum):
    EXITED = "exited"  # the agent's command ended by itself
    KILLED = "killed"  # an operator, the CI job's SIGINT/SIGTERM, or an unknown kill
    TRIPWIRE = "tripwire"  # a tripwire rule killed it
    TIMEOUT = "timeout"  # the execution window (--timeout or the profile's wall_clock)
    NOT_STARTED = "not_started"  # the sandbox could not be set up; the agent never ran


EXIT_KILLED = 80
EXIT_TRIPWIRE = 81
EXIT_TIMEOUT = 82
EXIT_SCOPE_VIOLATION = 83
EXIT_SUPERVISOR_ERROR = EmbeddedRunFailed.exit_status  # 84

STATUS_OF_ENDING = {Ending.KILLED: EXIT_KILLED, Ending.TRIPWIRE: EXIT_TRIPWIRE,
                    Ending.TIMEOUT: EXIT_TIMEOUT}


ENDING_OF_CAUSE = {EndCause.EXITED: Ending.EXITED, EndCause.STOPPED: Ending.EXITED,
                   EndCause.LAUNCH_FAILED: Ending.NOT_STARTED, EndCause.TRIPWIRE: Ending.TRIPWIRE,
                   EndCause.TIMEOUT: Ending.TIMEOUT}


def ending_of(cause: str | None) -> Ending:
    """The ending of a run from the cause its record carries (None: it never ended, so it was
    killed by whatever tore the run down)."""
    known = {c.value: c for c in EndCause}
    return ENDING_OF_CAUSE.get(known[cause], Ending.KILLED) if cause in known \
        else Ending.KILLED


def exit_status(ending: Ending, agent_status: int | None, *, scope_violation: bool,
                supervisor_error: bool, launch_error_status: int | None = None) -> int:
    """Precedence: a supervisor error (the evidence is incomplete), then a launch the sandbox
    refused (errors.launch_exit_status: 125 the supervisor could not start it, 126/127 the
    command, else the refusal's own status), then a scope violation (the
    workspace holds changes nobody allowed), then how the run ended, then the agent's own."""
    if supervisor_error:
        return EXIT_SUPERVISOR_ERROR
    if ending is Ending.NOT_STARTED:
        return launch_error_status or EXIT_SUPERVISOR_ERROR
    if scope_violation:
        return EXIT_SCOPE_VIOLATION
    if ending in STATUS_OF_ENDING:
        return STATUS_OF_ENDING[ending]
    return 1 if agent_status is None else agent_status
