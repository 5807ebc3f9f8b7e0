"""Wire models of the control API (pydantic): the daemon's, no I/O. agentctl reads the same
shapes as TypedDicts without pydantic (supervisor/api/shapes.py; tests/unit/test_api_shapes.py
holds the two key by key).

The models the supervisor core takes and returns are defined here; those only the control API
and its clients use (list pages, drills, health, reload answers, ...) are in
supervisor/models/api.py, and the views the core makes only on request (an agent's, a held
request's, an audit verification's) in supervisor/models/views.py; each is loaded from there
the first time one is named (`__getattr__` below), so a process that assembles the core
without serving the API (an embedded CI run) does not define them. Every name is imported from
`supervisor.models` either way."""

# No `from __future__ import annotations`: pydantic then gets these models' annotations as
# objects, not strings it must evaluate one by one as each class is defined (~2 ms of the
# embedded runner's start over the models on its path).

import re
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from supervisor import buildmode
from supervisor.limits import REASON_MAX, reason_text
from supervisor.models.tripwire import TripwireRule
from supervisor.models.units import Duration, duration_schema, duration_within

if TYPE_CHECKING:
    from supervisor.models.api import (
        AgentList,
        ApprovalList,
        AuditList,
        BreakerReset,
        DenyRequest,
        DrillList,
        DrillRequest,
        DrillResult,
        EgressView,
        ForgetResult,
        GatewayRunUpdate,
        Health,
        ReasonRequest,
        ReloadResult,
        TelemetryView,
    )
    from supervisor.models.views import AgentView, Approval, AuditVerifyResult

__all__ = [
    "REASON_MAX",
    "SCOPED_VERBS",
    "ActionRequest",
    "ActionResult",
    "Actor",
    "AgentList",
    "AgentResult",
    "AgentView",
    "Approval",
    "ApprovalList",
    "AuditEntry",
    "AuditList",
    "AuditVerifyResult",
    "BreakerReset",
    "DenyRequest",
    "DrillList",
    "DrillRequest",
    "DrillResult",
    "Duration",
    "EgressView",
    "ForgetResult",
    "GatewayRunUpdate",
    "Health",
    "ReasonRequest",
    "ReloadResult",
    "RunRequest",
    "RunView",
    "Scope",
    "TelemetrySummary",
    "TelemetryView",
]

SCOPED_VERBS = ("kill", "pause", "resume", "stop", "reactivate")
_AGENT_NAME = re.compile(r"^[a-z0-9][a-z0-9_.\-]{0,62}$")
_CLASS_NAME = re.compile(r"^[a-z0-9][a-z0-9_.\-]{0,62}$")


def _reason_text(value: object) -> object:
    return reason_text(value) if isinstance(value, str) else value


# A reason with argv bytes that are not UTF-8 is stored with U+FFFD for each (limits.py).
Reason = Annotated[str, BeforeValidator(_reason_text), Field(max_length=REASON_MAX)]
# Bounds of a request's parts (the body as a whole is capped by the server too).
_PATH_MAX = 4096
_ARG_MAX = 131_072  # the kernel's MAX_ARG_STRLEN
_ARGS_MAX = 4096
_ENV_MAX = 256
_TRIPWIRES_MAX = 64
_NAME_MAX = 255
# A drill's SLO is a kill's time budget; a minute is already far beyond any sensible one.
DRILL_SLO_MAX = 60.0
GRACE_MAX = 3600.0


class _Request(BaseModel):
    # Strict: JSON true is not 1, "5" is not 5; every request is taken as it is typed.
    model_config = ConfigDict(extra="forbid", strict=True)


def _check_name(value: str | None, pattern: re.Pattern[str], what: str) -> str | None:
    if value is not None and not pattern.match(value):
        raise ValueError(
            f"{what} must be 1-63 characters of lowercase letters, digits, '.', '_', '-'"
        )
    return value


# A Docker image reference: name[:tag] or name@digest, as the engine resolves it locally.
IMAGE_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._/:@\-]{0,254}$"


class RunRequest(_Request):
    name: Annotated[str, Field(max_length=63)] | None = None
    # None keeps an existing agent's class (a new agent gets "default").
    agent_class: Annotated[str, Field(max_length=63)] | None = Field(default=None,
                                                                     alias="class")
    profile: Annotated[str, Field(max_length=_NAME_MAX)] | None = None
    workspace: Annotated[str, Field(max_length=_PATH_MAX)] | None = None
    timeout: Duration | None = None
    command: Annotated[list[Annotated[str, Field(max_length=_ARG_MAX)]],
                       Field(min_length=1, max_length=_ARGS_MAX)]
    # Tripwire rules for this agent; they replace the profile's rules of the same name.
    tripwires: Annotated[list[TripwireRule], Field(max_length=_TRIPWIRES_MAX)] = []
    env: Annotated[dict[str, Annotated[str, Field(max_length=_ARG_MAX)]],
                   Field(max_length=_ENV_MAX)] = {}
    # docker runtime only: the image that is the agent's root (overrides the profile's).
    image: Annotated[str, Field(pattern=IMAGE_PATTERN)] | None = None

    # Validated inside a CI run's spec, or on its own by the API (buildmode.py).
    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True,
                              defer_build=buildmode.DEFER_BUILD)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str | None) -> str | None:
        return _check_name(value, _AGENT_NAME, "name")

    @field_validator("agent_class")
    @classmethod
    def _class(cls, value: str | None) -> str | None:
        return _check_name(value, _CLASS_NAME, "class")

    @field_validator("workspace")
    @classmethod
    def _workspace(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith("/"):
            raise ValueError("workspace must be an absolute path")
        return value

    @field_validator("command")
    @classmethod
    def _command(cls, value: list[str]) -> list[str]:
        if any("\0" in arg for arg in value) or not value[0]:
            raise ValueError("command arguments must be non-empty strings without NUL")
        return value

    @field_validator("env")
    @classmethod
    def _env(cls, env: dict[str, str]) -> dict[str, str]:
        for key, value in env.items():
            if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", key) or "\0" in value:
                raise ValueError(f"{key!r} is not a valid environment variable")
        return env


class Scope(_Request):
    agent: Annotated[str, Field(max_length=_NAME_MAX)] | None = None
    agent_class: Annotated[str, Field(max_length=_NAME_MAX)] | None = Field(default=None,
                                                                            alias="class")
    all: bool = False

    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)

    @model_validator(mode="after")
    def _exactly_one(self) -> "Scope":
        chosen = [self.agent is not None, self.agent_class is not None, self.all]
        if sum(chosen) != 1:
            raise ValueError("give exactly one of agent, class or all=true")
        return self

    @property
    def kind(self) -> Literal["agent", "class", "global"]:
        if self.agent is not None:
            return "agent"
        if self.agent_class is not None:
            return "class"
        return "global"

    def describe(self) -> str:
        if self.agent is not None:
            return f"agent:{self.agent}"
        if self.agent_class is not None:
            return f"class:{self.agent_class}"
        return "global"


class ActionRequest(_Request):
    scope: Scope
    reason: Reason = ""
    grace: Annotated[float, BeforeValidator(duration_within(GRACE_MAX)),
                   duration_schema(GRACE_MAX)] | None = None


class Actor(BaseModel):
    kind: Literal["user", "system"] = "user"
    uid: int | None = None
    gid: int | None = None
    pid: int | None = None
    name: str = ""
    groups: list[str] = []

    def label(self) -> str:
        if self.kind == "system":
            return f"system:{self.name}" if self.name else "system"
        return f"{self.name or '?'}(uid={self.uid})"


class RunView(BaseModel):
    id: str
    agent: str
    state: str
    command: list[str]
    profile: str
    workspace: str | None
    pid: int | None
    started_at: float
    ended_at: float | None
    exit_code: int | None
    time_to_halt_ms: float | None
    end_reason: str | None
    timeout: float | None


# --- telemetry (supervisor/telemetry/): wire forms of a run's samples and its summary.
class TelemetrySummary(BaseModel):
    """One run's telemetry, summed up as it is sampled; kept in SQLite when the run ends."""

    run_id: str
    started_at: float
    ended_at: float | None = None  # None while the run is live
    samples: int = 0
    wall_seconds: float = 0.0
    cpu_seconds: float | None = None
    max_cpu_percent: float | None = None
    peak_memory_bytes: int | None = None
    peak_rss_bytes: int | None = None
    peak_processes: int = 0
    peak_threads: int | None = None
    peak_open_fds: int | None = None
    peak_connections: int | None = None
    io_read_bytes: int | None = None
    io_write_bytes: int | None = None
    network_bytes: int | None = None
    # stdout and stderr: every byte produced, and those recorded in the log (up to the cap).
    output_bytes: int | None = None
    output_recorded_bytes: int | None = None
    syscall_attempts: int = 0
    oom_kills: int | None = None
    commands: list[str] = []
    # Sampler ticks missed because a tick ran late, while this run was sampled.
    overruns: int = 0
    # Data the sampler skipped: a pid that vanished or was a zombie, a permission error, a
    # cgroup file that disappeared. Never fatal; counted so a gap is visible.
    skipped: int = 0


# --- end telemetry


class AgentResult(BaseModel):
    agent: str
    previous_state: str
    new_state: str
    run_id: str | None = None
    time_to_halt_ms: float | None = None
    skipped: str | None = None
    error: dict[str, Any] | None = None


class ActionResult(BaseModel):
    verb: str
    scope: str
    reason: str
    actor: str
    results: list[AgentResult]
    time_to_halt_ms: float | None = None
    global_halt: bool = False


class AuditEntry(BaseModel):
    seq: int
    ts: float
    actor: str
    verb: str
    scope: str
    target: str | None
    reason: str
    previous_state: str | None
    new_state: str | None
    time_to_halt_ms: float | None
    outcome: str
    detail: dict[str, Any]
    prev_hash: str
    hash: str


# The views the core makes only on request (supervisor/models/views.py): an agent's, a held
# request's, an audit verification's; loaded, like the API's own shapes, at their first use.
_VIEWS = ("AgentView", "Approval", "AuditVerifyResult")


def __getattr__(name: str) -> Any:
    # Only names not defined above come here: the views above and the control API's own shapes
    # (supervisor/models/api.py), each imported above for the type checker.
    if name in _VIEWS:
        from supervisor.models import views

        return getattr(views, name)
    if name in __all__:
        from supervisor.models import api

        return getattr(api, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
