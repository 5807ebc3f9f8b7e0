"""The configured webhook endpoints with their secrets loaded and checked (fail closed: an
unsigned endpoint is a configuration error). Reads the secret files at startup (root, 0600)."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from supervisor.config import WebhookEndpoint
from supervisor.errors import ConfigInvalid
from supervisor.events.mapping import EVENT_TYPES


@dataclass(frozen=True)
class Endpoint:
    """A configured endpoint with its secret loaded."""

    index: int
    url: str
    secret: bytes
    format: Literal["json", "slack"]
    events: tuple[str, ...]

    @property
    def name(self) -> str:
        """For logs and listings: the URL without its path, which for Slack is the secret."""
        return f"webhooks[{self.index}] {redact(self.url)}"

    def wants(self, event_type: str) -> bool:
        if not self.events:
            return True
        return any(event_type == pattern or (pattern.endswith(".*") and
                                             event_type.startswith(pattern[:-1]))
                   for pattern in self.events)


def redact(url: str) -> str:
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    rest = "/…" if (parts.path not in ("", "/") or parts.query) else ""
    return f"{parts.scheme}://{host}{rest}"


def load_endpoints(endpoints: Iterable[WebhookEndpoint],
                   environ: Mapping[str, str] | None = None) -> list[Endpoint]:
    """Every configured endpoint with its secret; ConfigInvalid naming the endpoint when a secret
    is missing, empty or readable by others, when an event filter names no event, or when a URL
    is configured twice. Fails closed: an unsigned endpoint is a configuration error."""
    env = os.environ if environ is None else environ
    loaded: list[Endpoint] = []
    seen: set[str] = set()
    for index, endpoint in enumerate(endpoints):
        where = f"webhooks[{index}] ({redact(endpoint.url)})"
        if endpoint.url in seen:
            raise ConfigInvalid(f"{where}: the same URL is configured twice",
                                key=f"webhooks.{index}.url", reason="duplicate")
        seen.add(endpoint.url)
        for pattern in endpoint.events:
            if not _pattern_matches_any(pattern):
                raise ConfigInvalid(
                    f"{where}: events: {pattern!r} is no event type; known: "
                    f"{', '.join(EVENT_TYPES)} (or a prefix such as 'agent.*')",
                    key=f"webhooks.{index}.events", reason="unknown event type")
        loaded.append(Endpoint(index=index, url=endpoint.url,
                               secret=_secret(endpoint, index, where, env),
                               format=endpoint.format, events=tuple(endpoint.events)))
    return loaded


def _pattern_matches_any(pattern: str) -> bool:
    if pattern.endswith(".*"):
        return any(t.startswith(pattern[:-1]) for t in EVENT_TYPES)
    return pattern in EVENT_TYPES


def _secret(endpoint: WebhookEndpoint, index: int, where: str, env: Mapping[str, str]
            ) -> bytes:
    if endpoint.secret_file is not None and endpoint.secret_env is not None:
        raise ConfigInvalid(f"{where}: give secret_file or secret_env, not both",
                            key=f"webhooks.{index}", reason="two secrets")
    if endpoint.secret_file is not None:
        text = _read_secret_file(endpoint.secret_file, index, where)
        origin = str(endpoint.secret_file)
    elif endpoint.secret_env is not None:
        if endpoint.secret_env not in env:
            raise ConfigInvalid(
                f"{where}: secret_env {endpoint.secret_env!r} is not set in the daemon's "
                f"environment", key=f"webhooks.{index}.secret_env", reason="not set")
        text = env[endpoint.secret_env]
        origin = f"${endpoint.secret_env}"
    else:
        raise ConfigInvalid(
            f"{where}: no secret; every endpoint needs secret_file (root-owned, mode 0600) or "
            f"secret_env so receivers can verify what they get",
            key=f"webhooks.{index}", reason="no secret")
    secret = text.strip()
    if not secret:
        raise ConfigInvalid(f"{where}: the secret in {origin} is empty",
                            key=f"webhooks.{index}", reason="empty secret")
    return secret.encode()


def _read_secret_file(path: Path, index: int, where: str) -> str:
    key = f"webhooks.{index}.secret_file"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise ConfigInvalid(f"{where}: cannot read secret_file {path}: {exc.strerror}",
                            key=key, path=str(path), reason=exc.strerror or "unreadable"
                            ) from exc
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise ConfigInvalid(f"{where}: secret_file {path} is not a regular file",
                                key=key, path=str(path), reason="not a regular file")
        if info.st_mode & 0o077:
            raise ConfigInvalid(
                f"{where}: secret_file {path} is accessible by group or others (mode "
                f"{stat.S_IMODE(info.st_mode):04o}); chmod 600 it",
                key=key, path=str(path), reason="group or world accessible")
        if info.st_uid != os.geteuid():
            raise ConfigInvalid(
                f"{where}: secret_file {path} is owned by uid {info.st_uid}, not by the "
                f"daemon's uid {os.geteuid()}", key=key, path=str(path), reason="wrong owner")
        data = handle.read()
    try:
        return data.decode()
    except UnicodeDecodeError as exc:
        raise ConfigInvalid(f"{where}: secret_file {path} is not UTF-8", key=key,
                            path=str(path), reason="not UTF-8") from exc
