"""The egress policy a profile states for network mode `gateway`: allow-listed tunnels,
credential routes, budgets, the circuit breaker and approval rules (pydantic). No I/O."""

from __future__ import annotations

import fnmatch
import ipaddress
import re
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from supervisor.models.credentials import HeaderName, SecretFormat, SecretRef, header_value
from supervisor.models.mcp import McpPolicy
from supervisor.models.units import Duration, Size

Action = Literal["alert", "pause", "kill"]

_LABEL = r"[a-z0-9]([a-z0-9\-]{0,61}[a-z0-9])?"
_HOST_PATTERN = re.compile(rf"^(\*\.)?{_LABEL}(\.{_LABEL})*$")
_METHOD = re.compile(r"^(\*|[A-Z]{3,10})$")
# Methods a route never forwards: TRACE and TRACK echo the request (the injected secret
# included) back to the agent; CONNECT is the gateway's own.
FORBIDDEN_METHODS = frozenset(("TRACE", "TRACK", "CONNECT"))
DEFAULT_ROUTE_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def is_ip_literal(host: str) -> bool:
    """An address written as such, in any notation a resolver would accept ("127.1",
    "2130706433", "0x7f.1", "[::1]"): the gateway refuses these, it only tunnels to names."""
    text = host.strip("[]")
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        pass
    parts = text.split(".")
    return all(re.fullmatch(r"(0x[0-9a-f]+|\d+)", p, re.IGNORECASE) for p in parts if p) and \
        any(parts)


class AllowEntry(_Strict):
    """`host:port`; host may start with `*.` for any subdomain (not the domain itself)."""

    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> AllowEntry:
        host, sep, port = text.strip().lower().rpartition(":")
        if not sep:
            host, port = text.strip().lower(), "443"
        if not _HOST_PATTERN.match(host) or is_ip_literal(host.removeprefix("*.")):
            raise ValueError(f"{text!r}: the host must be a DNS name (optionally '*.'-prefixed), "
                             f"not an address")
        if not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"{text!r}: the port must be 1-65535")
        return cls(host=host, port=int(port))

    def matches(self, host: str, port: int) -> bool:
        host = host.lower().rstrip(".")
        if port != self.port:
            return False
        if self.host.startswith("*."):
            return host.endswith(self.host[1:]) and host != self.host[2:]
        return host == self.host

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


class Route(_Strict):
    """A plain-HTTP request to `http://<host>/...` is sent over TLS to `upstream` with the
    secret added as `<header>: <format with {secret}>`."""

    name: Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_\-]{0,62}$")]
    host: str
    upstream: Annotated[str, Field(pattern=r"^https://[^/\s?#]+(/[^\s?#]*)?$")]
    secret: SecretRef
    header: HeaderName = "Authorization"
    format: SecretFormat = "Bearer {secret}"
    # Spend: a price per call, and/or per token read from the upstream's JSON `usage`.
    price_per_call: Annotated[float, Field(ge=0)] = 0.0
    price_per_token: Annotated[float, Field(ge=0)] = 0.0
    # The only methods forwarded; anything else is refused 405 before it leaves the gateway.
    methods: list[str] = list(DEFAULT_ROUTE_METHODS)

    @field_validator("methods")
    @classmethod
    def _methods(cls, methods: list[str]) -> list[str]:
        methods = [m.upper() for m in methods]
        for method in methods:
            if not _METHOD.match(method) or method == "*":
                raise ValueError(f"{method!r} is not an HTTP method name")
            if method in FORBIDDEN_METHODS:
                raise ValueError(f"{method} is never forwarded by a route")
        if not methods:
            raise ValueError("a route needs at least one method")
        return methods

    @field_validator("host")
    @classmethod
    def _host(cls, host: str) -> str:
        host = host.lower()
        if not _HOST_PATTERN.match(host) or host.startswith("*.") or is_ip_literal(host):
            raise ValueError(f"{host!r} must be a plain DNS name such as 'llm.gateway'")
        return host

    def header_value(self, secret: str) -> str:
        return header_value(self.format, secret)


class Budget(_Strict):
    requests: Annotated[int, Field(ge=1)] | None = None
    bytes: Size | None = None
    spend: Annotated[float, Field(gt=0)] | None = None


class Budgets(_Strict):
    run: Budget = Budget()
    agent: Budget = Budget()  # over all of the agent's runs
    # What the budget tripwire does when a ceiling is reached (requests are refused anyway).
    action: Action = "pause"


class Breaker(_Strict):
    """Trips on a request rate, an error rate, or a jump above `baseline_factor` x the run's
    own moving baseline, each over `window`."""

    enabled: bool = True
    window: Duration = 10.0
    max_rate: Annotated[float, Field(gt=0)] | None = 50.0  # requests per second
    max_error_rate: Annotated[float, Field(gt=0, le=1)] = 0.5
    min_requests: Annotated[int, Field(ge=1)] = 10  # below this, rates are not judged
    baseline_factor: Annotated[float, Field(gt=1)] = 5.0
    baseline_windows: Annotated[int, Field(ge=1, le=1000)] = 3  # windows before a baseline counts


class ApprovalRule(_Strict):
    """`METHOD TARGET`: TARGET is `*`, a path glob (`/v1/refunds*`) or `host/path-glob`."""

    method: str
    host: str = "*"
    path: str = "*"

    @classmethod
    def parse(cls, text: str) -> ApprovalRule:
        method, _, target = text.strip().partition(" ")
        method, target = method.upper(), target.strip() or "*"
        if not _METHOD.match(method):
            raise ValueError(f"{text!r}: start with an HTTP method or '*'")
        if target == "*":
            return cls(method=method)
        if target.startswith("/"):
            return cls(method=method, path=target)
        host, slash, path = target.partition("/")
        return cls(method=method, host=host.lower(), path=f"/{path}" if slash else "*")

    def matches(self, method: str, host: str, path: str) -> bool:
        """`path` is the gateway's judged form (decoded, lower-case, no empty segments, no
        trailing slash); the rule's glob is read the same way, so spelling cannot slip past."""
        if self.method not in ("*", method.upper()):
            return False
        if not fnmatch.fnmatchcase(host.lower().rstrip("."), self.host):
            return False
        if self.path == "*":
            return True
        glob = "/" + "/".join(s for s in self.path.lower().split("/") if s)
        if self.path.endswith("/"):
            glob += "/"
        return fnmatch.fnmatchcase(path, glob) or fnmatch.fnmatchcase(path + "/", glob)

    def __str__(self) -> str:
        if self.host == "*":
            return f"{self.method} {self.path}"
        return f"{self.method} {self.host}{'' if self.path == '*' else self.path}"


class GatewayPolicy(_Strict):
    allow: list[AllowEntry] = []
    routes: list[Route] = []
    # A session token works until the run's start + token_ttl (and never after its run).
    token_ttl: Duration = 3600.0
    budget: Budgets = Budgets()
    breaker: Breaker = Breaker()
    approvals: list[ApprovalRule] = []
    # An approval nobody answers within this time is a denial.
    approval_timeout: Duration = 300.0
    # Held requests a run may have at once, and in all; past either, matching requests are
    # refused (429 approvals_pending / approval_limit) without asking anyone.
    max_pending_approvals: Annotated[int, Field(ge=1, le=64)] = 4
    max_approval_requests: Annotated[int, Field(ge=1, le=10_000)] = 100
    # MCP servers reached through the gateway and their tool policy (docs/mcp.md).
    mcp: McpPolicy = McpPolicy()

    @field_validator("allow", mode="before")
    @classmethod
    def _allow(cls, value: object) -> object:
        if isinstance(value, list):
            return [AllowEntry.parse(v) if isinstance(v, str) else v for v in value]
        return value

    @field_validator("approvals", mode="before")
    @classmethod
    def _approvals(cls, value: object) -> object:
        if isinstance(value, list):
            return [ApprovalRule.parse(v) if isinstance(v, str) else v for v in value]
        return value

    @field_validator("routes")
    @classmethod
    def _unique(cls, routes: list[Route]) -> list[Route]:
        for attr in ("name", "host"):
            values = [getattr(r, attr) for r in routes]
            if len(values) != len(set(values)):
                raise ValueError(f"route {attr}s must be unique")
        return routes

    def route_for(self, host: str) -> Route | None:
        host = host.lower().rstrip(".")
        for route in self.routes:
            if route.host == host:
                return route
        return None

    def allowed(self, host: str, port: int) -> AllowEntry | None:
        for entry in self.allow:
            if entry.matches(host, port):
                return entry
        return None

    def approval_rule(self, method: str, host: str, path: str) -> ApprovalRule | None:
        for rule in self.approvals:
            if rule.matches(method, host, path):
                return rule
        return None
