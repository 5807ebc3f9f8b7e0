"""What `agentctl run --embedded` hands to the one-shot supervisor it execs: the run request
plus CI mode's options, as JSON in one environment variable (argv is world-readable and --env
values may be secrets). No I/O."""

# No `from __future__ import annotations`: pydantic then gets these models' annotations as
# objects, not strings it must evaluate one by one as each class is defined (~2 ms of the
# embedded runner's start over the models on its path).

from pydantic import BaseModel, ConfigDict, field_validator

from supervisor.ci import DEFAULT_ROOT, ENV_VAR, ROOT_ENV_VAR
from supervisor.models import RunRequest

__all__ = ["DEFAULT_ROOT", "ENV_VAR", "ROOT_ENV_VAR", "EmbeddedRun"]


class EmbeddedRun(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    run: RunRequest
    allow_changes: list[str] = []
    report: str | None = None
    summary: str | None = None
    audit: str | None = None
    signing_key: str | None = None
    self_test: bool = False
    # The daemon's configuration file for sandbox settings (runc path, uid_base, profiles).
    config: str | None = None

    @property
    def wants_evidence(self) -> bool:
        """A report, summary or audit file is to be written: the run's audit chain is verified
        and read back for it. Without any, the run skips that work after the agent exits."""
        return any(p is not None for p in (self.report, self.summary, self.audit))

    @field_validator("allow_changes")
    @classmethod
    def _globs(cls, globs: list[str]) -> list[str]:
        if not globs:
            return globs
        from supervisor.ci.manifest import check_glob  # a run with globs has a workspace

        for glob in globs:
            if (why := check_glob(glob)) is not None:
                raise ValueError(f"--allow-changes {glob!r} {why}")
        return globs

    @field_validator("report", "summary", "audit", "signing_key", "config")
    @classmethod
    def _absolute(cls, path: str | None) -> str | None:
        if path is not None and not path.startswith("/"):
            raise ValueError(f"{path!r} must be an absolute path")
        return path
