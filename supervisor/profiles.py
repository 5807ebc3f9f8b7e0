"""Sandbox profiles: TOML files validated by pydantic. A bad profile is rejected with the field and
the reason. Reads profile and seccomp files; no privilege."""

# No `from __future__ import annotations`: pydantic then gets these models' annotations as
# objects, not strings it must evaluate one by one as each class is defined (~2 ms of the
# embedded runner's start over the models on its path).

import json
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from supervisor import buildmode
from supervisor.errors import ProfileInvalid, ProfileNotFound, did_you_mean
from supervisor.models import IMAGE_PATTERN
from supervisor.models.network import NetworkPolicy
from supervisor.models.tripwire import TripwirePolicy
from supervisor.models.units import Duration, Size

_NAME = re.compile(r"^[a-z0-9][a-z0-9_.\-]{0,63}$")


class _Strict(BaseModel):
    # Where building waits for first use (buildmode.py), a profile's policies are built only
    # inside the Profile that validates them, not each on its own as well.
    model_config = ConfigDict(extra="forbid", frozen=True, defer_build=buildmode.DEFER_BUILD)


class FilesystemPolicy(_Strict):
    # "host": an empty read-only root with host directories bound read-only into it;
    # otherwise the path of a rootfs directory, mounted read-only.
    root: str = "host"
    host_binds: list[str] = ["/usr", "/etc"]
    tmp_size: Size = 64 * 1024**2
    masked_paths: list[str] = ["/etc/shadow", "/etc/gshadow", "/etc/sudoers"]

    @field_validator("host_binds", "masked_paths")
    @classmethod
    def _absolute(cls, paths: list[str]) -> list[str]:
        for path in paths:
            if not path.startswith("/") or ".." in path.split("/"):
                raise ValueError(f"{path!r} must be an absolute path without '..'")
        return paths

    @field_validator("root")
    @classmethod
    def _root(cls, root: str) -> str:
        if root != "host" and not root.startswith("/"):
            raise ValueError("must be 'host' or the absolute path of a rootfs directory")
        return root


class Limits(_Strict):
    memory: Size = 1024**3
    pids: Annotated[int, Field(ge=8, le=1_000_000)] = 4096
    cpus: Annotated[float, Field(gt=0, le=1024)] = 1.0
    nofile: Annotated[int, Field(ge=16, le=1_048_576)] = 4096
    # Execution window for runs that ask for none (agentctl run --timeout wins); None: no limit.
    wall_clock: Duration | None = None
    # RLIMIT_FSIZE: no file the agent writes (workspace, /tmp) may grow past this; a write
    # beyond it fails (EFBIG, SIGXFSZ). The run's output is a pipe and not bound by it.
    file_size: Size = 4 * 1024**3


class WorkspacePolicy(_Strict):
    # Paths inside the workspace bound read-only over the read-write workspace for the whole
    # run, their ancestors made immovable, and absent ones held by a read-only placeholder (a
    # directory when written with a trailing '/', else a file): sandbox/workspace_binds.py. A
    # CI run also reports any change to them as a scope violation and quarantines it.
    readonly: list[str] = []

    @field_validator("readonly")
    @classmethod
    def _relative(cls, paths: list[str]) -> list[str]:
        for path in paths:
            parts = path.removesuffix("/").split("/")
            if not path or path.startswith("/") or ".." in parts or "." in parts or "" in parts:
                raise ValueError(f"{path!r} must be a relative path inside the workspace, "
                                 f"without '.', '..' or empty components")
        return paths


class OutputPolicy(_Strict):
    # The most this profile's runs record of their output; None: the host's [output]
    # max_bytes, which is also the ceiling.
    max_bytes: Size | None = None
    # What the output_bytes tripwire does when a run reaches its cap (the audit row and the
    # tripwire.fired event come in every case; recording stops in every case).
    action: Literal["alert", "pause", "kill"] = "alert"


class SeccompPolicy(_Strict):
    profile: Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_\-]*$")] = "default"


class Profile(_Strict):
    # The policies' defaults are made without their validators (defaults are never validated);
    # tests/unit/test_config_defaults.py holds each equal to the validated one.
    name: str = ""
    description: str = ""
    # None: the daemon's [sandbox] runtime.
    runtime: Literal["runc", "docker"] | None = None
    # docker only: the image that is the agent's read-only root (`agentctl run --image`
    # overrides it). Without one, a "host" root is the host's directories bound read-only.
    image: Annotated[str, Field(pattern=IMAGE_PATTERN)] | None = None
    filesystem: FilesystemPolicy = FilesystemPolicy.model_construct()
    limits: Limits = Limits.model_construct()
    workspace: WorkspacePolicy = WorkspacePolicy.model_construct()
    seccomp: SeccompPolicy = SeccompPolicy.model_construct()
    output: OutputPolicy = OutputPolicy.model_construct()
    network: NetworkPolicy = NetworkPolicy.model_construct()
    tripwires: TripwirePolicy = TripwirePolicy.model_construct()
    env: dict[str, str] = {}

    @field_validator("env")
    @classmethod
    def _env(cls, env: dict[str, str]) -> dict[str, str]:
        for key in env:
            if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", key):
                raise ValueError(f"{key!r} is not a valid environment variable name")
        return env


def _packaged() -> Path:
    """The shipped profiles: inside the installed package, or at the top of a checkout (the
    package maps `sandbox_profiles/` in only when it is installed). A directory either way
    (the package is never imported from an archive), found without importlib.resources,
    whose readers bring zipfile into every run that loads a profile."""
    here = Path(__file__).resolve().parent
    installed = here / "sandbox_profiles"
    return installed if installed.is_dir() else here.parent / "sandbox_profiles"


def validate_profile(name: str, data: dict[str, Any], source: str) -> Profile:
    try:
        return Profile.model_validate({**data, "name": name})
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"])
        reason = "unknown field" if first["type"] == "extra_forbidden" else first["msg"]
        raise ProfileInvalid(
            f"profile {name!r} ({source}): {field}: {reason}",
            profile=name,
            source=source,
            field=field,
            reason=reason,
        ) from exc


def load_profile(name: str, search_dirs: list[Path]) -> Profile:
    """The profile called `name`: the first `<dir>/<name>.toml`, then the packaged one."""
    if not _NAME.match(name):
        raise ProfileInvalid(
            f"{name!r} is not a profile name", profile=name, field="profile",
            reason="use lowercase letters, digits, '.', '_' and '-'",
        )
    candidates = [d / f"{name}.toml" for d in search_dirs]
    candidates.append(_packaged() / f"{name}.toml")
    for candidate in candidates:
        try:
            text = candidate.read_bytes().decode("utf-8")
        except (FileNotFoundError, NotADirectoryError):
            continue
        except UnicodeDecodeError as exc:
            raise ProfileInvalid(
                f"profile {name!r} ({candidate}) is not UTF-8: {exc.reason} at byte {exc.start}",
                profile=name, source=str(candidate), field="", reason="not UTF-8",
            ) from exc
        except OSError as exc:
            raise ProfileInvalid(
                f"cannot read profile {candidate}: {exc.strerror}", profile=name,
                source=str(candidate), field="", reason=str(exc.strerror),
            ) from exc
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ProfileInvalid(
                f"profile {name!r} ({candidate}) is not valid TOML: {exc}", profile=name,
                source=str(candidate), field="", reason=str(exc),
            ) from exc
        return validate_profile(name, data, str(candidate))
    known = available_profiles(search_dirs)
    close = did_you_mean(name, known)
    raise ProfileNotFound(
        f"no profile named {name!r}" + (f"; did you mean {', '.join(close)}?" if close else ""),
        profile=name, searched=[str(c) for c in candidates], profiles=known,
        did_you_mean=close,
        hint=f"profiles on this host: {', '.join(known) or 'none'}; add NAME.toml to one of "
             f"{', '.join(str(d) for d in search_dirs) or 'the [daemon] profile_dirs'}",
    )


def available_profiles(search_dirs: list[Path]) -> list[str]:
    """Names of the profiles `load_profile` can find (the search dirs, then the packaged)."""
    names: set[str] = set()
    for directory in [*search_dirs, _packaged()]:
        try:
            names.update(p.name.removesuffix(".toml") for p in directory.iterdir()
                         if p.name.endswith(".toml") and _NAME.match(p.name[:-5]))
        except OSError:
            continue
    return sorted(names)


def load_seccomp(name: str) -> dict[str, Any]:
    """The OCI `linux.seccomp` object from sandbox_profiles/seccomp/<name>.json."""
    path = _packaged() / "seccomp" / f"{name}.json"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ProfileInvalid(
            f"seccomp profile {name!r} not found", field="seccomp.profile", reason="not found",
            profile=name,
        ) from exc
    except json.JSONDecodeError as exc:
        raise ProfileInvalid(
            f"seccomp profile {name!r} is not valid JSON: {exc}", field="seccomp.profile",
            reason=str(exc), profile=name,
        ) from exc
    if not isinstance(data, dict) or "defaultAction" not in data:
        raise ProfileInvalid(
            f"seccomp profile {name!r} has no defaultAction", field="seccomp.profile",
            reason="not an OCI seccomp object", profile=name,
        )
    return data
