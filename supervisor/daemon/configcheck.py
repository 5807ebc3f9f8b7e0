"""Every configuration error a start (or a reload) would hit, all of them, each with its
file and key: the daemon's file, the webhooks' secrets, the metrics address, every profile in
the profile directories and the route secrets they name. Reads files only; root to read
secrets as the daemon would.

A start stops at the first of these; an operator fixing them one restart at a time would
meet them one by one. `agent-supervisord --check-config` and every reload run this instead."""

from __future__ import annotations

import contextlib
import hashlib
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import ValidationError

from supervisor.config import (
    Config,
    DaemonSection,
    EgressSection,
    config_error,
    config_path,
    load_config,
)
from supervisor.egress.secrets import load_secret
from supervisor.errors import ConfigInvalid, SupervisorError
from supervisor.events import Endpoint, load_endpoints
from supervisor.metrics import check_endpoint
from supervisor.profiles import load_profile


@dataclass
class CheckedConfig:
    """What a start would run with, or every reason it would not start."""

    source: str
    config: Config | None = None
    endpoints: list[Endpoint] = field(default_factory=list)
    # name -> sha256 of the profile file the daemon would load, for reload diffs.
    profiles: dict[str, str] = field(default_factory=dict)
    # route secret reference ("file:NAME", "env:NAME") -> sha256 of its value: a reload names
    # the references whose secret changed, never a value.
    secrets: dict[str, str] = field(default_factory=dict)
    # What stops a start: the file, webhooks, metrics.
    errors: list[dict[str, str]] = field(default_factory=list)
    # What refuses launches with a profile, and a reload.
    profile_errors: list[dict[str, str]] = field(default_factory=list)

    @property
    def all_errors(self) -> list[dict[str, str]]:
        return self.errors + self.profile_errors

    @property
    def ok(self) -> bool:
        return self.config is not None and not self.all_errors

    def raise_for_errors(self) -> Config:
        if self.ok:
            assert self.config is not None
            return self.config
        errors = self.all_errors
        first = errors[0]
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise ConfigInvalid(f"{first['path']}: {first['key'] or '-'}: {first['reason']}{more}",
                            path=first["path"], key=first["key"], reason=first["reason"],
                            errors=errors)


def check_config(path: Path | None) -> CheckedConfig:
    chosen = config_path(path)
    where = str(chosen) if chosen is not None else "(defaults: no configuration file)"
    checked = CheckedConfig(source=where)
    try:
        config = load_config(path)
    except ConfigInvalid as exc:
        checked.errors = list(exc.detail.get("errors") or [config_error(where, "",
                                                                         exc.message)])
        # The profiles are judged too, from the directories the file names if those parse.
        _check_profiles(_profile_settings(chosen), checked)
        return checked
    checked.config = config
    _check_webhooks(config, where, checked)
    try:
        check_endpoint(config.metrics.listen, config.metrics.web_config_file)
    except SupervisorError as exc:
        checked.errors.append(config_error(where, "metrics.listen", exc.message))
    _check_profiles(config, checked)
    return checked


def _profile_settings(path: Path | None) -> Config:
    """Defaults, with [daemon] profile_dirs/default_profile and [egress] secrets_dir taken
    from the (otherwise invalid) file wherever they are valid on their own."""
    config = Config()
    if path is None:
        return config
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return config
    daemon, egress = data.get("daemon", {}), data.get("egress", {})
    with contextlib.suppress(ValidationError, AttributeError, TypeError):
        config = config.model_copy(update={"daemon": DaemonSection.model_validate(
            {k: daemon[k] for k in ("profile_dirs", "default_profile") if k in daemon})})
    with contextlib.suppress(ValidationError, AttributeError, TypeError):
        config = config.model_copy(update={"egress": EgressSection.model_validate(
            {k: egress[k] for k in ("secrets_dir",) if k in egress})})
    return config


def _check_webhooks(config: Config, where: str, checked: CheckedConfig) -> None:
    try:
        checked.endpoints = load_endpoints(config.webhooks)
        return
    except ConfigInvalid:
        pass
    # load_endpoints stops at the first bad endpoint: judge each one alone to name them all.
    seen: set[str] = set()
    for index, endpoint in enumerate(config.webhooks):
        if endpoint.url in seen:
            checked.errors.append(config_error(where, f"webhooks.{index}.url",
                                               "the same URL is configured twice"))
        seen.add(endpoint.url)
        try:
            load_endpoints([endpoint])
        except ConfigInvalid as exc:
            key = str(exc.detail.get("key", "webhooks.0")).replace("webhooks.0", f"webhooks."
                                                                   f"{index}", 1)
            message = exc.message.replace("webhooks[0]", f"webhooks[{index}]", 1)
            checked.errors.append(config_error(where, key, message))


def profile_names(config: Config) -> list[str]:
    """The profiles an operator installed (every <dir>/*.toml) and the default profile."""
    names = {config.daemon.default_profile}
    for directory in config.daemon.profile_dirs:
        try:
            names.update(p.stem for p in directory.glob("*.toml"))
        except OSError:
            continue
    return sorted(names)


def _check_profiles(config: Config, checked: CheckedConfig) -> None:
    dirs = config.daemon.profile_dirs
    for name in profile_names(config):
        try:
            profile = load_profile(name, dirs)
        except SupervisorError as exc:
            source = str(exc.detail.get("source") or next(
                (str(d / f"{name}.toml") for d in dirs if (d / f"{name}.toml").exists()),
                f"profile {name}"))
            checked.profile_errors.append(config_error(
                source, str(exc.detail.get("field", "")), exc.message))
            continue
        file = next((d / f"{name}.toml" for d in dirs if (d / f"{name}.toml").is_file()), None)
        checked.profiles[name] = (hashlib.sha256(file.read_bytes()).hexdigest()
                                  if file is not None else "packaged")
        for index, route in enumerate(profile.network.gateway.routes):
            try:
                value = load_secret(route.secret, config.egress.secrets_dir)
                checked.secrets[route.secret] = hashlib.sha256(value.encode()).hexdigest()
            except SupervisorError as exc:
                checked.profile_errors.append(config_error(
                    str(file or f"profile {name}"), f"network.gateway.routes.{index}.secret",
                    exc.message))
