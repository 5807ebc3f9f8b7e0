"""Who may scrape the metrics endpoint from beyond the host: TLS (optionally requiring a client
certificate) and HTTP basic auth with bcrypt hashes, configured by a web config file in the
format of the Prometheus exporter toolkit (`--web.config.file` of node_exporter and friends),
so one file serves every exporter on the host. Reads files the daemon (root) can read; no
privilege of its own.

    tls_server_config:
      cert_file: /etc/agent-supervisor/metrics.crt
      key_file: /etc/agent-supervisor/metrics.key
      client_auth_type: RequireAndVerifyClientCert   # optional, with client_ca_file
      client_ca_file: /etc/agent-supervisor/prometheus-ca.crt
      min_version: TLS12                               # optional: TLS12 (default) or TLS13
    basic_auth_users:
      prometheus: $2y$10$...                           # htpasswd -nBC 10 "" | tr -d ':'

A key this module does not know is an error, never ignored: an option an operator relies on
for security must not silently do nothing."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import ssl
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from supervisor.errors import ConfigInvalid

KEY = "metrics.web_config_file"
_TLS_KEYS = {"cert_file", "key_file", "client_auth_type", "client_ca_file", "min_version"}
_CLIENT_AUTH = ("NoClientCert", "RequireAndVerifyClientCert")
_MIN_VERSION = {"TLS12": ssl.TLSVersion.TLSv1_2, "TLS13": ssl.TLSVersion.TLSv1_3}
# Verified credentials kept (a digest of user and password: never the password), so a scrape
# every few seconds does not pay bcrypt each time; bounded.
_CACHE_SIZE = 64
# bcrypt is slow on purpose; at most this many checks at once, off the event loop.
_CHECKS_AT_ONCE = 2


@dataclass(frozen=True)
class WebConfig:
    path: Path
    cert_file: Path | None = None
    key_file: Path | None = None
    client_ca_file: Path | None = None
    require_client_cert: bool = False
    min_version: ssl.TLSVersion = ssl.TLSVersion.TLSv1_2
    users: dict[str, bytes] = field(default_factory=dict)

    @property
    def tls(self) -> bool:
        return self.cert_file is not None

    @property
    def protected(self) -> bool:
        """Something stands between a remote client and the metrics."""
        return self.tls or bool(self.users)

    def ssl_context(self) -> ssl.SSLContext:
        assert self.cert_file is not None and self.key_file is not None
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = self.min_version
        try:
            context.load_cert_chain(self.cert_file, self.key_file)
            if self.client_ca_file is not None:
                context.load_verify_locations(cafile=str(self.client_ca_file))
        except (OSError, ssl.SSLError) as exc:
            raise _invalid(self.path, f"cannot load the TLS files: {exc}") from None
        context.verify_mode = ssl.CERT_REQUIRED if self.require_client_cert else ssl.CERT_NONE
        return context


def _invalid(path: Path, why: str) -> ConfigInvalid:
    return ConfigInvalid(f"[metrics] web_config_file {path}: {why}", key=KEY, value=str(path),
                         reason=why)


def load_web_config(path: Path) -> WebConfig:
    """Parse and check the file (the TLS files are loaded too, so a wrong key fails here, at
    config check, not at the first scrape)."""
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise _invalid(path, f"cannot read it: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise _invalid(path, f"not YAML: {exc}") from None
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise _invalid(path, "expected a mapping with tls_server_config and basic_auth_users")
    unknown = set(data) - {"tls_server_config", "basic_auth_users"}
    if unknown:
        raise _invalid(path, f"unknown keys {sorted(unknown)} (this daemon reads "
                             f"tls_server_config and basic_auth_users)")
    settings: dict[str, Any] = {}
    tls = data.get("tls_server_config") or {}
    if not isinstance(tls, dict) or set(tls) - _TLS_KEYS:
        raise _invalid(path, f"tls_server_config takes {sorted(_TLS_KEYS)}")
    if tls:
        if not tls.get("cert_file") or not tls.get("key_file"):
            raise _invalid(path, "tls_server_config needs cert_file and key_file")
        base = path.parent
        settings["cert_file"] = base / str(tls["cert_file"])
        settings["key_file"] = base / str(tls["key_file"])
        auth = tls.get("client_auth_type", "NoClientCert")
        if auth not in _CLIENT_AUTH:
            raise _invalid(path, f"client_auth_type must be one of {list(_CLIENT_AUTH)}")
        settings["require_client_cert"] = auth == "RequireAndVerifyClientCert"
        if tls.get("client_ca_file"):
            settings["client_ca_file"] = base / str(tls["client_ca_file"])
        elif settings["require_client_cert"]:
            raise _invalid(path, "RequireAndVerifyClientCert needs client_ca_file")
        version = tls.get("min_version", "TLS12")
        if version not in _MIN_VERSION:
            raise _invalid(path, f"min_version must be one of {sorted(_MIN_VERSION)}")
        settings["min_version"] = _MIN_VERSION[version]
    users = data.get("basic_auth_users") or {}
    if not isinstance(users, dict):
        raise _invalid(path, "basic_auth_users maps user names to bcrypt hashes")
    hashes: dict[str, bytes] = {}
    for user, hashed in users.items():
        text = str(hashed)
        if not isinstance(user, str) or not user or ":" in user:
            raise _invalid(path, f"basic_auth_users: {user!r} is not a user name")
        if not text.startswith(("$2a$", "$2b$", "$2y$")):
            raise _invalid(path, f"basic_auth_users: {user}'s password must be a bcrypt "
                                 f"hash ($2y$...), never the password itself")
        hashes[user] = text.encode()
    config = WebConfig(path=path, users=hashes, **settings)
    if config.tls:
        config.ssl_context()
    return config


class BasicAuth:
    """aiohttp middleware: every request needs one of the configured users' passwords."""

    def __init__(self, users: dict[str, bytes]) -> None:
        self.users = users
        self._verified: OrderedDict[bytes, None] = OrderedDict()
        self._checks = asyncio.Semaphore(_CHECKS_AT_ONCE)

    async def _valid(self, header: str) -> bool:
        scheme, _, encoded = header.partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            user, sep, password = base64.b64decode(encoded.strip(), validate=True
                                                   ).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            return False
        hashed = self.users.get(user)
        if not sep or hashed is None:
            return False
        digest = hashlib.sha256(b"%s\0%s\0%s" % (user.encode(), password.encode(),
                                                   hashed)).digest()
        if any(hmac.compare_digest(digest, known) for known in self._verified):
            return True
        async with self._checks:
            import bcrypt

            ok: bool = await asyncio.to_thread(bcrypt.checkpw, password.encode(), hashed)
        if ok:
            self._verified[digest] = None
            while len(self._verified) > _CACHE_SIZE:
                self._verified.popitem(last=False)
        return ok

    @web.middleware
    async def middleware(self, request: web.Request,
                         handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                         ) -> web.StreamResponse:
        if not await self._valid(request.headers.get("Authorization", "")):
            return web.Response(status=401, text="Unauthorized\n",
                                headers={"WWW-Authenticate": 'Basic realm="agent-supervisor"'})
        return await handler(request)
