"""Every configuration error a start (or a reload) would hit, all of them, each with its
file and key: the daemon's file, the webhooks' secrets, the metrics address, every profile in
the profile directories and the route secrets they name. Reads files only; root to read
secrets as the daemon would.

A start stops at the first of these; an operator fixing them one restart at a time would
meet them one by one. `agent-supervisord --check-config` and every reload run this instead."""

from __future__ import annotations

import contextlib
import grp
import hashlib
import os
import pwd
import shutil
import ssl
import stat
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import ValidationError

from supervisor.config import (
    Config,
    FleetSection,
    WebhookEndpoint,
    _Section,
    config_error,
    config_path,
    load_config,
)
from supervisor.daemon.handover import handed_parent
from supervisor.egress.secrets import load_secret
from supervisor.errors import ConfigInvalid, SupervisorError
from supervisor.events import Endpoint, load_endpoints
from supervisor.metrics import check_endpoint
from supervisor.profiles import load_profile
from supervisor.runtime.init import SandboxInit
from supervisor.runtime.uid_drop import UidDrop
from supervisor.sandbox import budget, runs_parent, userns

# Where a bare [sandbox] runc_path is looked up (the unit's PATH and the root's usual one).
RUNC_SEARCH_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def _section_models() -> dict[str, type[_Section]]:
    models: dict[str, type[_Section]] = {"fleet": FleetSection}
    for name, info in Config.model_fields.items():
        if isinstance(info.annotation, type) and issubclass(info.annotation, _Section):
            models[name] = info.annotation
    return models


SECTION_MODELS = _section_models()


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
    # What stops a start but not a reload: the Docker engine's socket is unusable (dockerd is
    # down). Nothing a reload applies needs the engine ([docker] itself takes a restart), so a
    # reload applies and reports these; only docker launches need it (engine_unavailable).
    engine_errors: list[dict[str, str]] = field(default_factory=list)
    # What refuses launches with a profile, and a reload.
    profile_errors: list[dict[str, str]] = field(default_factory=list)

    @property
    def all_errors(self) -> list[dict[str, str]]:
        return self.errors + self.engine_errors + self.profile_errors

    @property
    def reload_errors(self) -> list[dict[str, str]]:
        """What refuses a reload: every error but the engine's."""
        return self.errors + self.profile_errors

    @property
    def reloadable(self) -> bool:
        return self.config is not None and not self.reload_errors

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
        # What a start would meet next is judged too, on every part of the file that is valid
        # on its own (defaults elsewhere): webhooks, metrics, the sandbox's programs, profiles.
        partial = _valid_parts(chosen)
        _check_start(partial, where, checked)
        checked.endpoints = []
        _check_profiles(partial, checked)
        return checked
    checked.config = config
    _check_start(config, where, checked)
    _check_profiles(config, checked)
    return checked


def group_errors(config: Config, where: str) -> list[dict[str, str]]:
    """The control sockets' groups that do not exist on this host: a start refuses them
    (the socket would be root's alone, every operator locked out without a word to them)."""
    wanted = [("daemon.socket_group", config.daemon.socket_group)]
    if config.control.owner_socket_group:
        wanted.append(("control.owner_socket_group", config.control.owner_socket_group))
    errors = []
    for key, group in wanted:
        try:
            grp.getgrnam(group)
        except KeyError:
            errors.append(config_error(where, key, f"group {group!r} does not exist on this "
                                       f"host (groupadd --system {group}, or name another)"))
    return errors


def host_errors(config: Config, where: str) -> list[dict[str, str]]:
    """What the host must hold for the file's names, which a start refuses before it touches
    anything (exit 78): the control sockets' groups, the runs' budget and host root's limits
    the [resources] reserves leave, the runs' parent cgroup being the supervisor's own (and
    clear of a handed-over one), the egress gateway's user and CA file, the fleet's files.
    Each is otherwise looked up only when used, after agents were adopted or while launches
    wait."""
    errors = group_errors(config, where)
    errors.extend(resource_errors(config, where))
    parent = config.sandbox.cgroup_parent
    if (why := runs_parent.why_foreign(parent, handed=handed_parent(config))) is not None:
        errors.append(config_error(where, "sandbox.cgroup_parent", f"{why}; name a cgroup "
                                   f"of the supervisor's own (one that does not exist yet, "
                                   f"e.g. /agent-supervisor)"))
    user = config.egress.worker_user
    if user and user != "root":
        try:
            pwd.getpwnam(user)
        except KeyError:
            errors.append(config_error(where, "egress.worker_user", f"user {user!r} does not "
                                       f"exist on this host (the gateway worker runs as it; "
                                       f"name another, e.g. nobody)"))
    if config.egress.ca_file is not None:
        errors.extend(_pem_errors(where, "egress.ca_file", config.egress.ca_file))
    if config.fleet is not None:
        errors.extend(_fleet_errors(config, where))
    return errors


def resource_errors(config: Config, where: str) -> list[dict[str, str]]:
    """The [resources] keys this host cannot hold as the start applies them (budget.py,
    userns.py): a reserve above what the host has, a value the kernel refuses."""
    res = config.resources
    found = budget.budget_errors(res.runs_pids_max, res.host_pids_reserve,
                                 res.runs_memory_max, res.host_memory_reserve)
    limits = userns.UsernsLimits.for_runs(res.run_inotify_instances,
                                          res.run_inotify_watches).present()
    reserve_keys = {"max_inotify_instances": "resources.host_inotify_instances_reserve",
                    "max_inotify_watches": "resources.host_inotify_watches_reserve"}
    for key, why in userns.host_limit_errors(limits, config.sandbox.max_runs, {
            "max_inotify_instances": res.host_inotify_instances_reserve,
            "max_inotify_watches": res.host_inotify_watches_reserve}).items():
        found[reserve_keys[key]] = (f"{why}: lower it, [resources] run_{key[4:]} or "
                                    f"[sandbox] max_runs")
    return [config_error(where, key, reason) for key, reason in found.items()]


def _pem_errors(where: str, key: str, path: Path) -> list[dict[str, str]]:
    try:
        ssl.create_default_context(cafile=str(path))
    except ssl.SSLError as exc:  # an OSError too: first
        reason = f"{path} holds no usable PEM certificate: {exc.reason or exc}"
    except OSError as exc:
        reason = f"{path}: {exc.strerror or exc}"
    else:
        return []
    return [config_error(where, key, reason)]


class _Encrypted(Exception):
    """The fleet's key asks for a passphrase."""


def _no_passphrase() -> str:
    """Asked for a passphrase: never prompt (a check on a terminal would wait for one)."""
    raise _Encrypted


def _fleet_errors(config: Config, where: str) -> list[dict[str, str]]:
    fleet = config.fleet
    assert fleet is not None
    errors = _pem_errors(where, "fleet.ca_file", fleet.ca_file)
    try:
        ssl.create_default_context().load_cert_chain(str(fleet.cert_file), str(fleet.key_file),
                                                     password=_no_passphrase)
    except _Encrypted:
        errors.append(config_error(where, "fleet.key_file", f"the key {fleet.key_file} is "
                                   f"encrypted; the etcd client cannot use it (decrypt it, "
                                   f"e.g. openssl pkey -in KEY -out PLAIN, root-only)"))
    except (OSError, ssl.SSLError) as exc:
        errors.append(config_error(where, "fleet.cert_file", f"the client certificate "
                                   f"{fleet.cert_file} with key {fleet.key_file} does not "
                                   f"load: {getattr(exc, 'strerror', None) or exc}"))
    try:
        fleet.password_file.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        errors.append(config_error(where, "fleet.password_file", f"{fleet.password_file}: "
                                   f"{getattr(exc, 'strerror', None) or exc}"))
    return errors


def _check_start(config: Config, where: str, checked: CheckedConfig) -> None:
    """What a start stops at beyond the file's schema: what the host must hold for the file's
    names (host_errors), webhook secrets, the metrics address, the sandbox's init and runc,
    and the Docker engine's socket and gosu when Docker is enabled (in engine_errors: a
    reload does not need the engine)."""
    checked.errors.extend(host_errors(config, where))
    _check_webhooks(config, where, checked)
    try:
        check_endpoint(config.metrics.listen, config.metrics.web_config_file)
    except SupervisorError as exc:
        checked.errors.append(config_error(where, "metrics.listen", exc.message))
    try:
        SandboxInit(Path(config.sandbox.init)).check()
    except SupervisorError as exc:
        checked.errors.append(config_error(where, "sandbox.init", exc.message))
    runc = config.sandbox.runc_path
    found = runc if "/" in runc else shutil.which(runc, path=RUNC_SEARCH_PATH)
    if found is None or not os.path.isfile(found) or not os.access(found, os.X_OK):
        checked.errors.append(config_error(
            where, "sandbox.runc_path", f"{runc} is not an executable file"
            + ("" if "/" in runc else f" on {RUNC_SEARCH_PATH}") + " (apt-get install runc)"))
    if config.docker_enabled:
        socket_path = docker_socket_path(config.docker.socket)
        if socket_path is not None:
            try:
                is_socket = stat.S_ISSOCK(os.stat(socket_path).st_mode)
                reason = "" if is_socket else f"{socket_path} is not a socket"
            except OSError as exc:
                reason = f"{socket_path}: {exc.strerror}"
            if reason:
                key = "docker.socket" if config.docker.enabled else "sandbox.runtime"
                checked.engine_errors.append(config_error(
                    where, key, f"the Docker runtime is enabled but its engine socket is "
                    f"unusable ({reason}): start dockerd or set [docker] socket"))
        try:
            UidDrop().check()
        except SupervisorError as exc:
            key = "docker.enabled" if config.docker.enabled else "sandbox.runtime"
            checked.engine_errors.append(config_error(where, key, exc.message))


def docker_socket_path(url: str) -> str | None:
    """The file of a unix:// engine URL (a TCP engine has none to check)."""
    return url.removeprefix("unix://") if url.startswith("unix://") else None


def _valid_parts(path: Path | None) -> Config:
    """Defaults, with every key of the (otherwise invalid) file that is valid on its own (and
    valid together with the other such keys of its section), and each webhook that is."""
    config = Config()
    if path is None:
        return config
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return config
    update: dict[str, object] = {}
    for name in Config.model_fields:
        value = data.get(name)
        if name == "webhooks":
            items = value if isinstance(value, list) else []
            good = []
            for item in items:
                with contextlib.suppress(ValidationError, TypeError):
                    good.append(WebhookEndpoint.model_validate(item))
            update[name] = good
            continue
        model = SECTION_MODELS.get(name)
        if model is None or not isinstance(value, dict):
            continue
        keys = {}
        for key, item in value.items():
            with contextlib.suppress(ValidationError, TypeError):
                model.model_validate({key: item})
                keys[key] = item
        with contextlib.suppress(ValidationError, TypeError):
            update[name] = model.model_validate(keys)
    return config.model_copy(update=update)


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
