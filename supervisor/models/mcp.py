"""The MCP policy a profile states under `[network.gateway.mcp]`: the MCP servers an agent may
reach through the gateway (`http://mcp.gateway/<server>`), which of their tools it may call,
rules on a call's arguments (CEL expressions, compiled here so a profile with a bad rule is
refused when it is loaded), budgets of calls and cost, and tools held for an operator
(pydantic). No I/O.

CEL (common-expression-language, bindings to the cel-rust interpreter) is used for argument
rules: it is side-effect free, always terminates, and reads like the condition it states
(`args.query.matches(r"(?i)^\\s*select\\b")`); see docs/mcp.md for why not Cedar."""

from __future__ import annotations

import fnmatch
import re
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

from supervisor.models.credentials import (
    HeaderName,
    SecretFormat,
    SecretRef,
    check_secret_ref,
    header_value,
)
from supervisor.models.units import Size

_NAME = r"^[a-z0-9][a-z0-9_\-]{0,62}$"
_TOOL_GLOB = re.compile(r"^[A-Za-z0-9_.\-*?/]{1,128}$")
_HOST_PATH = r"^/[A-Za-z0-9_.\-/+@]{0,4095}$"
_ENV_NAME = r"^[A-Za-z_][A-Za-z0-9_]{0,127}$"
_SECRET_FILE = r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}$"
MAX_STDIO_SERVERS = 8  # per profile: each is a sandbox started with every run
# Requests the gateway passes on when the profile does not narrow them: what a tool-using
# client needs. Anything else (resources, prompts, sampling set-up, unknown or misspelt
# methods) is refused unless listed in `methods`.
DEFAULT_METHODS = ("initialize", "ping", "tools/list", "tools/call",
                   "notifications/initialized", "notifications/cancelled",
                   "notifications/progress", "notifications/roots/list_changed")
KNOWN_METHODS = frozenset((*DEFAULT_METHODS, "resources/list", "resources/read",
                           "resources/templates/list", "resources/subscribe",
                           "resources/unsubscribe", "prompts/list", "prompts/get",
                           "completion/complete", "logging/setLevel"))
MAX_RULE_CHARS = 2000


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ToolRule(_Strict):
    """What applies to one tool of a server (its name is the key in `tools`)."""

    # A CEL expression over `args` (the call's arguments, a map) and `tool` (its name); the
    # call goes on only when it is true. False, an error, or a non-boolean result: denied.
    require: Annotated[str, Field(max_length=MAX_RULE_CHARS)] | None = None
    # Hold the call until an operator approves it (agentctl approvals, webhooks); no answer
    # within the gateway's approval_timeout is a denial.
    approval: bool = False
    max_calls: Annotated[int, Field(ge=1)] | None = None  # per run
    cost: Annotated[float, Field(ge=0)] = 0.0  # per call; counts toward the run's spend too
    # Refuse with a tool result `isError: true` (the model reads it and can correct itself)
    # instead of a JSON-RPC error.
    as_tool_error: bool = False
    _program: Any = PrivateAttr(default=None)

    @field_validator("require")
    @classmethod
    def _compiles(cls, expression: str | None) -> str | None:
        if expression is not None:
            import cel  # here, not at the top: only profiles with rules pay for its import

            try:
                cel.compile(expression)
            except Exception as exc:  # the binding raises ValueError and others
                raise ValueError(f"not a CEL expression: {str(exc)[:300]}") from None
        return expression

    def program(self) -> Any:
        """The compiled rule (compiled once per process; the model is frozen)."""
        if self._program is None and self.require is not None:
            import cel

            self._program = cel.compile(self.require)
        return self._program


class StdioLimits(_Strict):
    """The cgroup and rlimits of a stdio server's sandbox (smaller than an agent's)."""

    memory: Size = 256 * 1024**2
    pids: Annotated[int, Field(ge=8, le=4096)] = 64
    cpus: Annotated[float, Field(gt=0, le=64)] = 0.5
    nofile: Annotated[int, Field(ge=16, le=65536)] = 256
    # Bytes the server may write to any file, its stderr log included (past it the kernel
    # ends it with SIGXFSZ, and its calls fail).
    file_size: Size = 8 * 1024**2
    tmp_size: Size = 16 * 1024**2


class McpServer(_Strict):
    """An MCP server the agent reaches as `http://mcp.gateway/<name>`. Either remote (`url`):
    the streamable HTTP transport, the gateway sends its messages to `url`, adding the secret
    as `<header>: <format with {secret}>` (the agent never holds it); or stdio (`command`):
    the supervisor starts it with the run in a sandbox of its own (its own cgroup, empty
    network namespace, uid and seccomp filter), gives it the secrets in `secret_env` and
    `secret_files` and nothing else, and the gateway speaks to it over its stdin and stdout
    (newline-delimited JSON-RPC)."""

    name: Annotated[str, Field(pattern=_NAME)]
    url: Annotated[str, Field(pattern=r"^https?://[^/\s?#]+(/[^\s#]*)?$")] | None = None
    command: Annotated[list[Annotated[str, Field(min_length=1, max_length=4096)]],
                       Field(min_length=1, max_length=256)] | None = None
    # stdio only: host paths bound read-only into the server's sandbox (besides /usr, /etc).
    binds: list[Annotated[str, Field(pattern=_HOST_PATH)]] = []
    env: dict[Annotated[str, Field(pattern=_ENV_NAME)],
              Annotated[str, Field(max_length=4096)]] = {}
    # stdio only: environment variables and files (under /run/secrets/) holding secrets.
    secret_env: dict[Annotated[str, Field(pattern=_ENV_NAME)], str] = {}
    secret_files: dict[Annotated[str, Field(pattern=_SECRET_FILE)], str] = {}
    limits: StdioLimits = StdioLimits()
    secret: SecretRef | None = None
    header: HeaderName = "Authorization"
    format: SecretFormat = "Bearer {secret}"
    # Tool names (globs) the agent may see and call; a tool in neither list is denied.
    allow: list[Annotated[str, Field(pattern=_TOOL_GLOB.pattern)]] = []
    # Wins over `allow`.
    deny: list[Annotated[str, Field(pattern=_TOOL_GLOB.pattern)]] = []
    tools: dict[str, ToolRule] = {}
    refuse_as_tool_error: bool = False  # the default of every refusal on this server
    max_calls: Annotated[int, Field(ge=1)] | None = None  # per run, over its tools

    @field_validator("secret_env", "secret_files")
    @classmethod
    def _secrets(cls, refs: dict[str, str]) -> dict[str, str]:
        for ref in refs.values():
            check_secret_ref(ref)
        return refs

    @field_validator("binds")
    @classmethod
    def _binds(cls, binds: list[str]) -> list[str]:
        for path in binds:
            if any(part in (".", "..") for part in path.split("/")):
                raise ValueError(f"{path!r}: a bind is an absolute path without . or ..")
        return binds

    @property
    def stdio(self) -> bool:
        return self.command is not None

    @model_validator(mode="after")
    def _credentials_over_tls(self) -> McpServer:
        from supervisor.models.egress import is_ip_literal  # egress imports this module

        for tool in self.tools:
            if not _TOOL_GLOB.match(tool) or any(c in tool for c in "*?"):
                raise ValueError(f"server {self.name}: {tool!r} is not a tool name")
        if (self.url is None) == (self.command is None):
            raise ValueError(f"server {self.name}: give either `url` (a remote server) or "
                             "`command` (a stdio server the supervisor starts), not both")
        if self.command is not None:
            if self.secret is not None:
                raise ValueError(f"server {self.name}: a stdio server gets its secrets from "
                                 "`secret_env` and `secret_files`, not `secret`")
            return self
        if self.binds or self.env or self.secret_env or self.secret_files:
            raise ValueError(f"server {self.name}: `binds`, `env`, `secret_env` and "
                             "`secret_files` are for stdio servers (`command`)")
        assert self.url is not None
        host = self.url.split("://", 1)[1].split("/", 1)[0].rsplit(":", 1)[0].strip("[]")
        if is_ip_literal(host) or not host:
            raise ValueError(f"server {self.name}: the url must name a host (pin it in "
                             "[egress] hosts if it is on a private network), not an address")
        if self.secret is not None and not self.url.startswith("https://"):
            raise ValueError(f"server {self.name}: a secret is sent only over https")
        return self

    def header_value(self, secret: str) -> str:
        return header_value(self.format, secret)

    def permits(self, tool: str) -> bool:
        """Allowed by name: in `allow`, not in `deny`."""
        if any(fnmatch.fnmatchcase(tool, glob) for glob in self.deny):
            return False
        return any(fnmatch.fnmatchcase(tool, glob) for glob in self.allow)


class McpPolicy(_Strict):
    servers: list[McpServer] = []
    methods: list[str] = list(DEFAULT_METHODS)
    max_calls: Annotated[int, Field(ge=1)] | None = None  # per run, over every server
    max_cost: Annotated[float, Field(gt=0)] | None = None  # per run, the tools' `cost`
    # Bytes of one message the agent sends (a batch counts whole); past it, refused 413.
    max_message_bytes: Annotated[int, Field(ge=1024, le=16 * 1024 * 1024)] = 1024 * 1024
    # Messages in one batch.
    max_batch: Annotated[int, Field(ge=1, le=1000)] = 32

    @field_validator("methods")
    @classmethod
    def _methods(cls, methods: list[str]) -> list[str]:
        for method in methods:
            if method not in KNOWN_METHODS:
                raise ValueError(f"{method!r} is not an MCP method the gateway can judge; one "
                                 f"of {', '.join(sorted(KNOWN_METHODS))}")
        return methods

    @field_validator("servers")
    @classmethod
    def _unique(cls, servers: list[McpServer]) -> list[McpServer]:
        names = [s.name for s in servers]
        if len(names) != len(set(names)):
            raise ValueError("MCP server names must be unique")
        if sum(s.stdio for s in servers) > MAX_STDIO_SERVERS:
            raise ValueError(f"at most {MAX_STDIO_SERVERS} stdio servers (each is a sandbox "
                             "started with every run)")
        return servers

    @property
    def stdio_servers(self) -> list[McpServer]:
        return [s for s in self.servers if s.stdio]

    def server(self, name: str) -> McpServer | None:
        for server in self.servers:
            if server.name == name:
                return server
        return None
