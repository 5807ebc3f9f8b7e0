"""Daemon configuration: `/etc/agent-supervisor/daemon.toml`, every key defaulted, unknown keys
rejected by name. No privilege; reads one file."""

# No `from __future__ import annotations`: pydantic then gets these models' annotations as
# objects, not strings it must evaluate one by one as each class is defined (~2 ms of the
# embedded runner's start over the models on its path).

import ipaddress
import re
import tomllib
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

from supervisor import buildmode
from supervisor.errors import ConfigInvalid
from supervisor.models.units import Duration, Size, parse_size

DEFAULT_CONFIG_PATH = Path("/etc/agent-supervisor/daemon.toml")
# RFC 1918 only: 127/8, 169.254/16 and the other "private" special ranges would either not
# route over a veth or collide with things the host relies on.
_RFC1918 = tuple(ipaddress.IPv4Network(n) for n in ("10.0.0.0/8", "172.16.0.0/12",
                                                    "192.168.0.0/16"))
# A /16 holds 16384 /30s; larger pools make every allocation scan for nothing, smaller than a
# /29 hold fewer than two links.
_POOL_PREFIXLENS = range(16, 30)
# The cgroups of systemd's units: systemd owns them and whatever runs in them.
SYSTEMD_UNIT_SUFFIXES = (".slice", ".service", ".scope", ".socket", ".mount", ".swap")
# The highest host uid (uid_t's -1 is "no uid").
_UID_MAX = 2**32 - 2


def parse_egress_pool(cidr: str) -> ipaddress.IPv4Network:
    """[egress] pool as the gateway's address pool takes it: a private IPv4 network of a usable
    size. ValueError says why not (the configuration refuses it by key)."""
    try:
        network = ipaddress.ip_network(cidr, strict=True)
    except ValueError as exc:
        raise ValueError(f"egress address pool {cidr!r} is not a network: {exc} (a private "
                         f"IPv4 network, e.g. 10.200.0.0/16)") from None
    if not isinstance(network, ipaddress.IPv4Network):
        raise ValueError(f"egress address pool {cidr!r} must be IPv4, e.g. 10.200.0.0/16")
    if not any(network.subnet_of(private) for private in _RFC1918):
        raise ValueError(f"egress address pool {cidr!r} must lie inside a private (RFC 1918) "
                         "range: 10.0.0.0/8, 172.16.0.0/12 or 192.168.0.0/16")
    if network.prefixlen not in _POOL_PREFIXLENS:
        raise ValueError(f"egress address pool {cidr!r} must be a /{_POOL_PREFIXLENS.start} "
                         f"to /{_POOL_PREFIXLENS.stop - 1}, e.g. 10.200.0.0/16")
    return network


def _pool(cidr: str) -> str:
    parse_egress_pool(cidr)
    return cidr


def pool_share(pool: ipaddress.IPv4Network,
               ci_slot: int | None) -> ipaddress.IPv4Network | None:
    """The part of the egress pool whose /30s a configuration's gateway runs take: the lower
    half for a daemon's (`ci_slot` None); the upper half is CI mode's, one /30 per embedded run
    slot, slot s the s-th. So a daemon and the embedded runs on one host, each its own process
    with a pool of its own, never pick the same addresses, whatever moment each picks them in
    (the host-interface check of egress/link.py sees another's only once its link is up).
    None: slot `ci_slot` lies past the upper half."""
    lower, upper = pool.subnets(prefixlen_diff=1)
    if ci_slot is None:
        return lower
    if not 0 <= ci_slot < slots_in_pool(pool):
        return None
    return ipaddress.IPv4Network((int(upper.network_address) + 4 * ci_slot, 30))


def slots_in_pool(pool: ipaddress.IPv4Network) -> int:
    """How many embedded run slots the pool's upper half holds: one /30 each."""
    return pool.num_addresses // 8


def normal_parent(path: str) -> str:
    """A cgroup path as one spelling: "/P/", "//P" and "P" are all "/P"."""
    return "/" + "/".join(part for part in path.split("/") if part)


def _cgroup_parent(path: str) -> str:
    """No climbing out ('.', '..') and no systemd unit's cgroup: the daemon writes the runs'
    limits on its parent and a global halt kills everything in it (sandbox/runs_parent.py
    checks what the host holds there)."""
    parts = [part for part in path.split("/") if part]
    if not parts or any(part in (".", "..") for part in parts):
        raise ValueError(f"{path!r} is the root or has a '.' or '..' component: name the "
                         f"cgroup plainly, e.g. /agent-supervisor")
    for part in parts:
        if part.endswith(SYSTEMD_UNIT_SUFFIXES):
            raise ValueError(f"{path!r} is inside systemd's unit {part!r}: systemd owns that "
                             f"cgroup and what runs in it, and a global halt would kill all "
                             f"of it; name a cgroup of the supervisor's own, e.g. "
                             f"/agent-supervisor")
    # One spelling, so a restart compares it with the handed-over parent as the same cgroup.
    return normal_parent(path)


def _seccomp_listener(path: str | None) -> str | None:
    if path and not path.startswith("/"):
        raise ValueError(f"{path!r} is not an absolute path (\"\" turns the listener off)")
    return path


def _pinned_hosts(hosts: dict[str, str]) -> dict[str, str]:
    for name, address in hosts.items():
        try:
            ipaddress.ip_address(address)
        except ValueError:
            raise ValueError(f"hosts[{name!r}] = {address!r} is not an IP address (a name "
                             f"pinned to one, e.g. {name!r} = \"203.0.113.10\")") from None
    return hosts


def _endpoints(endpoints: list[str]) -> list[str]:
    for endpoint in endpoints:
        if (why := _why_not_host_port(endpoint)) is not None:
            raise ValueError(f"{endpoint!r} is not HOST:PORT ({why}): an etcd client URL's "
                             f"host and port only, e.g. etcd1.example:2379, 10.0.0.5:2379 or "
                             f"[2001:db8::5]:2379")
    return endpoints


def _why_not_host_port(endpoint: str) -> str | None:
    if "://" in endpoint:
        return "no scheme: the client speaks TLS to every endpoint"
    try:
        parts = urlsplit("//" + endpoint)
        port = parts.port
    except ValueError as exc:
        return str(exc)
    if parts.path or parts.query or parts.fragment or "?" in endpoint or "#" in endpoint:
        return "no path, query or fragment"
    if parts.username is not None or parts.password is not None:
        return "no user or password"
    host = parts.hostname
    if not host:
        return "no host"
    if port is None:
        return "no port"
    if not 1 <= port <= 65535:
        return "the port is 1 to 65535"
    if parts.netloc.startswith("["):
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            return f"[{host}] is not an IPv6 address"
    elif ":" in host or not re.fullmatch(r"[A-Za-z0-9._-]+", host):
        return "the host is a name or an address (an IPv6 address in brackets)"
    return None


def _engine_url(url: str) -> str:
    """The forms the Docker SDK takes (a bare path is not one: it reads it as a TCP host)."""
    if url.startswith("unix://"):
        if not url.removeprefix("unix://").startswith("/"):
            raise ValueError(f"{url!r}: a unix:// engine socket needs an absolute path, "
                             f"e.g. unix:///var/run/docker.sock")
        return url
    scheme, _, rest = url.partition("://")
    if scheme in ("tcp", "http", "https") and rest:
        _http_url(f"http://{rest}")
        if scheme == "tcp" and not urlsplit(f"http://{rest}").port:
            raise ValueError(f"{url!r}: a tcp:// engine needs a port, e.g. tcp://HOST:2376")
        return url
    if scheme == "ssh" and rest:
        return url
    raise ValueError(f"{url!r} is not an engine URL: unix:///PATH, tcp://HOST:PORT, "
                     f"https://HOST[:PORT] or ssh://[USER@]HOST")


def _http_url(url: str) -> str:
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises for a port that is not a number in range
    except ValueError as exc:
        raise ValueError(f"{url!r} is not a URL: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{url!r} is not an http:// or https:// URL with a host")
    return url


class _Section(BaseModel):
    # A run with no configuration file validates none of it (buildmode.py): the defaults are
    # made without a validator (Config.model_construct(), below).
    model_config = ConfigDict(extra="forbid", frozen=True, defer_build=buildmode.DEFER_BUILD)


class DaemonSection(_Section):
    state_dir: Path = Path("/var/lib/agent-supervisor")
    runtime_dir: Path = Path("/run/agent-supervisor")
    # Defaults to <runtime_dir>/control.sock.
    socket_path: Path | None = None
    socket_group: str = "agent-operators"
    log_level: Annotated[str, Field(pattern="^(debug|info|warning|error)$")] = "info"
    # Run a canary agent at startup and refuse to serve when enforcement does not hold.
    self_test: bool = True
    # Directories searched for <name>.toml before the profiles shipped with the package.
    profile_dirs: list[Path] = [Path("/etc/agent-supervisor/profiles")]
    default_profile: str = "default"
    shutdown_reason: str = "supervisor shutdown"
    # Output of runs that ended longer ago than this is deleted (checked hourly).
    log_retention: Duration = 7 * 24 * 3600.0
    # An orderly restart hands running agents to the next daemon (daemon/handover.py); the
    # watchdog kills them if none adopts them within this long. 0: a restart kills them.
    adopt_window: Annotated[Duration, Field(ge=0, le=3600)] = 60.0


class SandboxSection(_Section):
    # The runtime of runs whose profile names none: "runc", or "docker" on hosts that run
    # Docker (then [docker] applies; the engine must be up when the daemon starts).
    runtime: Literal["runc", "docker"] = "runc"
    runc_path: str = "runc"
    # The init bound at /dev/init as every sandbox's PID 1 (runtime/init.py); no run starts
    # without it. The static build runs in any root (host, rootfs directory or image).
    init: str = "/usr/bin/tini-static"
    # Every run's cgroup lives under this path in each hierarchy (v1 controllers and v2).
    cgroup_parent: Annotated[str, Field(pattern=r"^/[A-Za-z0-9_.\-/]+$"),
                             AfterValidator(_cgroup_parent)] = "/agent-supervisor"
    # Prefix of the per-run network namespaces under /run/netns and of runc container ids.
    name_prefix: Annotated[str, Field(pattern=r"^[a-z][a-z0-9\-]{0,15}$")] = "as"
    # Host uids/gids for agents: slot k maps the sandbox's 0..65535 to
    # uid_base + k*65536 .. ; never host root.
    uid_base: Annotated[int, Field(ge=65536)] = 1_000_000
    max_runs: Annotated[int, Field(ge=1, le=4096)] = 512
    # The uid the agent's command runs as inside the sandbox.
    agent_uid: Annotated[int, Field(ge=1, le=65535)] = 1000
    # Smallest host uid a workspace owner may have (the agent writes the workspace as its owner).
    workspace_min_owner_uid: Annotated[int, Field(ge=1)] = 1000

    @model_validator(mode="after")
    def _uids_fit(self) -> "SandboxSection":
        if (problem := self.uids_problem()) is not None:
            raise ValueError(problem)
        return self

    def uids_problem(self) -> str | None:
        """Why the runs' host uids do not fit below the highest uid; None: they do."""
        last = self.uid_base + self.max_runs * 65536 - 1
        if last > _UID_MAX:
            return (f"uid_base {self.uid_base} + max_runs {self.max_runs} x 65536 ends at uid "
                    f"{last}, past the highest uid {_UID_MAX}")
        return None


class ResourcesSection(_Section):
    """What all runs together may take from the host, and what stays the host's
    (supervisor/sandbox/budget.py, supervisor/sandbox/userns.py)."""

    # pids.max of the runs' parent cgroup; unset: the kernel's pid limit less host_pids_reserve.
    runs_pids_max: Annotated[int, Field(ge=1)] | None = None
    host_pids_reserve: Annotated[int, Field(ge=64)] = 4096
    # The parent's memory limit; unset: the host's RAM less host_memory_reserve.
    runs_memory_max: Size | None = None
    host_memory_reserve: Size = 1024**3
    # Per run, in its user namespace; host root's limits are raised (never lowered) to hold
    # sandbox.max_runs runs at these plus the host's own reserve.
    run_inotify_instances: Annotated[int, Field(ge=1)] = 32
    run_inotify_watches: Annotated[int, Field(ge=1)] = 16384
    host_inotify_instances_reserve: Annotated[int, Field(ge=1)] = 128
    host_inotify_watches_reserve: Annotated[int, Field(ge=1)] = 65536


class DockerSection(_Section):
    # Enables the docker runtime for profiles that ask for it while the default stays runc.
    enabled: bool = False
    # The engine's API socket (the Docker SDK speaks to it; the CLI is never run).
    socket: Annotated[str, AfterValidator(_engine_url)] = "unix:///var/run/docker.sock"
    # Seconds for one API call; a hung engine fails the launch instead of the daemon.
    api_timeout: Annotated[float, Field(gt=0, le=300)] = 30.0
    # The image of runs with a "host" root and no image of their own: an empty skeleton the
    # daemon imports itself (no registry), with the host's directories bound read-only on it.
    host_root_image: Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9._/\-]*:[A-Za-z0-9._\-]+$")
                               ] = "agent-supervisor/host-root:1"


class KillSection(_Section):
    # How long the kernel gets to report a killed cgroup empty before the kill escalates.
    confirm_timeout: Duration = 5.0
    default_grace: Duration = 10.0


AbsolutePath = Annotated[str, Field(pattern=r"^/")]
_PRINCIPAL = r"^(user|group):[A-Za-z0-9_.][A-Za-z0-9_.\-]*\$?$"
Principal = Annotated[str, Field(pattern=_PRINCIPAL)]


class RolesSection(_Section):
    """Who holds which role, by "user:NAME" or "group:NAME" (root is always owner)."""

    owner: list[Principal] = []
    admin: list[Principal] = []
    viewer: list[Principal] = []
    auditor: list[Principal] = []


class WorkspacesSection(_Section):
    """Which workspaces a caller may launch on. Everyone may use a directory they can read,
    write and search, walking its path as themselves (uid and groups from SO_PEERCRED);
    `owner` may use any. `roots` also grants a role every workspace under the directories
    it lists, e.g. {admin = ["/srv/agents"]} (absolute, compared after symlinks resolve)."""

    roots: dict[Literal["owner", "admin", "viewer", "auditor"], list[AbsolutePath]] = {}


class WebhookEndpoint(_Section):
    url: Annotated[str, Field(pattern=r"^https?://"), AfterValidator(_http_url)]
    # HMAC-SHA256 key: a file (root, 0600) or the name of an environment variable.
    secret_file: Path | None = None
    secret_env: str | None = None
    format: Literal["json", "slack"] = "json"
    # Event types to send; empty means all.
    events: list[str] = []


class WebhookDelivery(_Section):
    timeout: Duration = 5.0
    backoff_initial: Duration = 1.0
    backoff_max: Duration = 300.0
    # Give up on an event after this many attempts (0: never; it stays in the outbox).
    max_attempts: Annotated[int, Field(ge=0)] = 0


class MetricsSection(_Section):
    # "HOST:PORT" on loopback, or "unix:/path"; empty disables the endpoint. An address beyond
    # loopback needs web_config_file (TLS and/or basic auth; supervisor/metrics_web.py).
    listen: str = "127.0.0.1:9464"
    # A Prometheus exporter-toolkit web config (YAML: tls_server_config, basic_auth_users).
    web_config_file: Path | None = None


class DrillSection(_Section):
    # Run a drill on this schedule (e.g. "24h"); absent: only on demand.
    interval: Duration | None = None
    processes: Annotated[int, Field(ge=1, le=10_000)] = 100
    slo: Duration = 0.05


class BreakGlassSection(_Section):
    # Root writes this file (optionally with a reason) to halt every agent without the socket.
    # Defaults to <runtime_dir>/HALT.
    halt_file: Path | None = None


class TelemetrySection(_Section):
    rate_hz: Annotated[float, Field(gt=0, le=100)] = 10.0
    # The per-process walk (RSS, fds, threads, connections, I/O, commands) is the costly
    # part: it runs on every Nth sample; the cgroup numbers are read on every sample.
    process_every: Annotated[int, Field(ge=1, le=100)] = 5
    # Samples kept in memory per run (600 at 10 Hz: the last minute).
    window: Annotated[int, Field(ge=10, le=100_000)] = 600
    # Seccomp user-notification listener (runc's listenerPath). "" turns it off: the notified
    # syscalls are then denied EPERM by the filter itself, unreported. Default:
    # <runtime_dir>/seccomp.sock.
    seccomp_listener: Annotated[str | None, AfterValidator(_seccomp_listener)] = None


class EgressSection(_Section):
    """The egress gateway, for runs whose profile has network mode `gateway`."""

    # Each gateway run gets a /30 of this private pool: .1 on the host (the gateway), .2 inside.
    # A daemon's runs take the lower half, CI mode's embedded runs the upper (`pool_share`).
    pool: Annotated[str, AfterValidator(_pool)] = "10.213.0.0/16"
    port: Annotated[int, Field(ge=1, le=65535)] = 3128
    # Route secrets named "file:NAME" are read from here (root-owned, mode 0600 or stricter).
    secrets_dir: Path = Path("/etc/agent-supervisor/secrets")
    # Extra CA certificates (PEM) the gateway trusts for upstreams, besides the system's.
    ca_file: Path | None = None
    # Names the gateway resolves itself to fixed addresses. Without an entry, a name that
    # resolves to a loopback, private or link-local address is refused (no way back in).
    hosts: Annotated[dict[str, str], AfterValidator(_pinned_hosts)] = {}
    max_connections_per_run: Annotated[int, Field(ge=1, le=10_000)] = 64
    # A connection that has not sent a complete request head within this time is closed.
    header_timeout: Duration = 10.0
    max_header_size: Annotated[int, Field(ge=1024, le=1_048_576)] = 16384
    upstream_timeout: Duration = 60.0
    connect_timeout: Duration = 10.0
    # The gateway runs in a process of its own (supervisor/egress/worker.py), as this user
    # ("root" keeps root; it needs none: secrets arrive over its channel), in the cgroup
    # <sandbox.cgroup_parent>-gateway with these limits, below the daemon's CPU priority.
    worker_user: str = "nobody"
    worker_memory_max: Size = 512 * 1024**2
    worker_pids_max: Annotated[int, Field(ge=16, le=100_000)] = 256
    # cgroup v2 cpu.weight (the daemon has the default 100); v1 hosts get cpu.shares to match.
    worker_cpu_weight: Annotated[int, Field(ge=1, le=10_000)] = 50
    # CPUs the gateway may use at most (cpu.max / cfs quota); 0 for no quota.
    worker_cpu_max: Annotated[float, Field(ge=0, le=1024)] = 1.0
    worker_nice: Annotated[int, Field(ge=0, le=19)] = 10
    # Set by CI mode alone (ci/runner.py `embedded_config`; a configuration file may not): the
    # embedded run slot whose /30 of the pool's upper half this configuration's runs take.
    # Unset (a daemon's), they take the pool's lower half (`pool_share`).
    ci_slot: Annotated[int, Field(ge=0)] | None = None

    @model_validator(mode="after")
    def _slot_fits(self) -> "EgressSection":
        if (problem := self.slot_problem()) is not None:
            raise ValueError(problem)
        return self

    def slot_problem(self) -> str | None:
        """Why the pool holds no /30 for `ci_slot`; None: it does (or no slot is set)."""
        pool = parse_egress_pool(self.pool)
        if self.ci_slot is None or pool_share(pool, self.ci_slot) is not None:
            return None
        return (f"embedded run slot {self.ci_slot} lies past egress pool {self.pool}: its upper "
                f"half, CI mode's, holds {slots_in_pool(pool)} slot(s), one /30 each")

    def share(self) -> ipaddress.IPv4Network:
        """The network this configuration's gateway runs take their /30s from (`pool_share`);
        ValueError when the pool holds none for its slot."""
        share = pool_share(parse_egress_pool(self.pool), self.ci_slot)
        if share is None:
            raise ValueError(self.slot_problem())
        return share


class OutputSection(_Section):
    """Each run's output (stdout and stderr) reaches its log file through the supervisor."""

    # The most one run may record in its log file; a profile's [output] max_bytes may ask for
    # less, never more. Output past it is drained, counted and discarded.
    max_bytes: Size = 64 * 1024**2


def _size_or_zero(value: object) -> int:
    return 0 if value in (0, "0") else parse_size(value)


class DiskSection(_Section):
    """Launches are refused (disk_space_low, audited) while the filesystem of the state
    directory or of the run logs has less free space than either watermark; 0 turns one off."""

    min_free_bytes: Annotated[int, BeforeValidator(_size_or_zero)] = 512 * 1024**2
    min_free_percent: Annotated[float, Field(ge=0, le=100)] = 1.0


class ControlSection(_Section):
    """Admission control on the control socket (docs/design.md, "Control socket admission")."""

    # Connections at once from everyone, and from one peer uid (root is not counted per uid).
    max_connections: Annotated[int, Field(ge=1, le=65_536)] = 256
    max_connections_per_uid: Annotated[int, Field(ge=1, le=65_536)] = 32
    # Slots beyond max_connections that only owners (root included) may take.
    reserved_connections: Annotated[int, Field(ge=1, le=4096)] = 32
    # Requests one uid may have in flight; more are answered 429. Actions (kill, pause, ...)
    # are never refused by this limit.
    max_requests_per_uid: Annotated[int, Field(ge=1, le=4096)] = 16
    # Reads handled at once over all peers; actions bypass this queue.
    max_concurrent_reads: Annotated[int, Field(ge=1, le=4096)] = 64
    # A connection must complete a request head this long after connecting (or after its
    # previous response), and a request body within body_timeout once its head arrived.
    header_timeout: Annotated[Duration, Field(le=3600)] = 10.0
    body_timeout: Annotated[Duration, Field(le=3600)] = 10.0
    # A request body's bytes: far above any real request, and a bound on what one request
    # costs the loop to judge (nesting) and parse.
    max_body: Annotated[int, Field(ge=1024, le=64 * 1024**2)] = 256 * 1024
    # The longest request line or header line.
    max_line: Annotated[int, Field(ge=1024, le=65_536)] = 8190
    backlog: Annotated[int, Field(ge=16, le=65_536)] = 4096
    # The owners' socket beside the control socket (control.sock -> control-owner.sock), with
    # an acceptor of its own, so no caller of the control socket can queue in front of an
    # owner's kill: root only (mode 0600), or also this group (0660), whose members must map
    # to the owner role or are turned away at connect.
    owner_socket_group: str = ""


class AuditSection(_Section):
    """The audit log's anchors outside its database, and what happens when the disk fills."""

    # Ed25519 key that signs checkpoints of the chain: created at first start (owner root,
    # mode 0600) with its public half at <key>.pub. Must lie outside the state directory.
    key: Path = Path("/etc/agent-supervisor/audit-key")
    # Every checkpoint is appended here (JSON lines) before it is recorded in the log; outside
    # the state directory, so wiping or restoring that directory does not take it along.
    checkpoint_file: Path = Path("/var/log/agent-supervisor/audit-checkpoints.jsonl")
    # A checkpoint after this many rows, after this long with new rows, after every kill and
    # at shutdown.
    checkpoint_every: Annotated[int, Field(ge=1, le=1_000_000)] = 100
    checkpoint_interval: Duration = 60.0
    # The chain does not hold against its checkpoints at start: "alarm" starts and alarms
    # loudly (log, audit row, webhook, /v1/health, metrics); "refuse" does not start.
    on_tamper: Literal["alarm", "refuse"] = "alarm"
    # Rows waiting for the writer; past this, rows an agent drives in volume are dropped and
    # counted (kill-path and state-change rows are always taken).
    queue_max: Annotated[int, Field(ge=64, le=1_000_000)] = 4096
    # Space kept in reserve on the state filesystem, released when a write fails for room.
    reserve_bytes: Annotated[int, Field(ge=0, le=1 << 34)] = 32 << 20


PartitionPolicy = Literal["halt", "pause", "hold-launches"]


class FleetSection(_Section):
    """Fleet mode (supervisor/fleet/, docs/fleet.md): this host joins an etcd v3 fleet store,
    applies fleet actions and holds, and anchors its audit head there. Absent: a lone host."""

    host_id: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,62}$")]
    # "host:port" of etcd's client URLs
    endpoints: Annotated[list[str], Field(min_length=1), AfterValidator(_endpoints)]
    ca_file: Path
    cert_file: Path
    key_file: Path
    user: str  # the etcd user whose role lets it write only under hosts/<host_id>/
    password_file: Path  # root, 0600
    prefix: str = "/agent-supervisor/fleet/"
    labels: dict[str, str] = {}
    lease_ttl: Duration = 10.0
    # The safety net under the watch: every action and hold re-read this often.
    reread_interval: Duration = 30.0
    # The audit head is published after every state change and checkpoint, and at least this
    # often.
    anchor_interval: Duration = 60.0
    # Cut off from the store for longer than lease_ttl: what happens to running agents
    # (launches are always refused until the host is back and has re-read the holds).
    partition_policy: PartitionPolicy = "hold-launches"
    partition_policy_by_class: dict[str, PartitionPolicy] = {}
    # How long the first read of holds may take at start before launches wait for it.
    sync_timeout: Duration = 10.0
    # After a fleet action's ack is in the store, what waited for it (step 6 of the runs it
    # ended: a runc delete per run; the registration; the audit anchor) waits this long
    # more. A fleet halt is done only once every host has confirmed; until then that work
    # takes CPU from the hosts still killing that share a machine with this one, and from
    # the store. The agents are dead and their networks down before the ack.
    settle_delay: Annotated[Duration, Field(ge=0, le=60)] = 1.0


class Config(_Section):
    # Each section's defaults as an instance made without its validator (defaults are never
    # validated, and a section's own checks hold for them): nothing is built at import in a
    # process that defers building (buildmode.py). tests/unit/test_config_defaults.py holds
    # them, and Config.model_construct(), equal to what validating {} gives, field by field.
    daemon: DaemonSection = DaemonSection.model_construct()
    sandbox: SandboxSection = SandboxSection.model_construct()
    resources: ResourcesSection = ResourcesSection.model_construct()
    kill: KillSection = KillSection.model_construct()
    docker: DockerSection = DockerSection.model_construct()
    roles: RolesSection = RolesSection.model_construct()
    workspaces: WorkspacesSection = WorkspacesSection.model_construct()
    webhooks: list[WebhookEndpoint] = []
    webhook_delivery: WebhookDelivery = WebhookDelivery.model_construct()
    metrics: MetricsSection = MetricsSection.model_construct()
    drill: DrillSection = DrillSection.model_construct()
    breakglass: BreakGlassSection = BreakGlassSection.model_construct()
    telemetry: TelemetrySection = TelemetrySection.model_construct()
    egress: EgressSection = EgressSection.model_construct()
    output: OutputSection = OutputSection.model_construct()
    disk: DiskSection = DiskSection.model_construct()
    control: ControlSection = ControlSection.model_construct()
    audit: AuditSection = AuditSection.model_construct()
    fleet: FleetSection | None = None

    @model_validator(mode="after")
    def _anchors_outside_the_state_dir(self) -> "Config":
        if (problem := self.anchors_problem()) is not None:
            raise ValueError(problem)
        return self

    def anchors_problem(self) -> str | None:
        """Why an audit anchor lies inside the state directory; None: neither does."""
        state = self.daemon.state_dir.resolve()
        for name in ("key", "checkpoint_file"):
            path: Path = getattr(self.audit, name).resolve()
            if path == state or state in path.parents:
                return (f"audit.{name} ({path}) must lie outside daemon.state_dir ({state}): "
                        f"an anchor inside what it anchors proves nothing")
        return None

    @property
    def seccomp_listener(self) -> Path | None:
        """None when syscall telemetry is turned off."""
        if self.telemetry.seccomp_listener == "":
            return None
        if self.telemetry.seccomp_listener is None:
            return self.daemon.runtime_dir / "seccomp.sock"
        return Path(self.telemetry.seccomp_listener)

    @property
    def docker_enabled(self) -> bool:
        return self.docker.enabled or self.sandbox.runtime == "docker"

    @property
    def logs_dir(self) -> Path:
        """Where each run's output is recorded (root, 0700)."""
        return self.daemon.state_dir / "logs"

    @property
    def halt_file(self) -> Path:
        return self.breakglass.halt_file or self.daemon.runtime_dir / "HALT"

    @property
    def socket_path(self) -> Path:
        return self.daemon.socket_path or self.daemon.runtime_dir / "control.sock"


def config_path(path: Path | None) -> Path | None:
    """The file a start reads: `path`, else the default path when it exists, else None
    (every default)."""
    if path is not None:
        return path
    return DEFAULT_CONFIG_PATH if DEFAULT_CONFIG_PATH.exists() else None


def load_config(path: Path | None) -> Config:
    """The configuration from `path` (or the default path when it exists, else defaults).
    ConfigInvalid names the file and every bad key (detail["errors"], one entry each)."""
    path = config_path(path)
    if path is None:
        # Nothing stated, nothing to validate: every default, without building the models
        # (equal to Config(): tests/unit/test_config_defaults.py).
        return Config.model_construct()
    try:
        data = tomllib.loads(path.read_bytes().decode("utf-8"))
    except OSError as exc:
        raise ConfigInvalid(f"cannot read {path}: {exc.strerror}", path=str(path),
                            errors=[config_error(path, "", exc.strerror or str(exc))]) from exc
    except UnicodeDecodeError as exc:
        raise ConfigInvalid(f"{path} is not UTF-8: {exc.reason} at byte {exc.start}",
                            path=str(path), key="", reason="not UTF-8",
                            errors=[config_error(path, "", "not UTF-8")]) from exc
    except tomllib.TOMLDecodeError as exc:
        # A parse error stops the parser: there is no later key to judge.
        raise ConfigInvalid(f"{path} is not valid TOML: {exc}", path=str(path),
                            errors=[config_error(path, "", f"not valid TOML: {exc}")]) from exc
    egress = data.get("egress")
    if isinstance(egress, dict) and "ci_slot" in egress:
        # A daemon's runs would take a CI slot's addresses; CI mode sets it for its own.
        reason = "set by CI mode for its embedded runs alone, never in a configuration file"
        raise ConfigInvalid(f"{path}: egress.ci_slot: {reason}", path=str(path),
                            key="egress.ci_slot", reason=reason,
                            errors=[config_error(path, "egress.ci_slot", reason)])
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        errors = []
        for error in exc.errors():
            key = ".".join(str(p) for p in error["loc"])
            reason = "unknown key" if error["type"] == "extra_forbidden" else error["msg"]
            errors.append(config_error(path, key, reason))
        first = errors[0]
        if exc.errors()[0]["type"] == "extra_forbidden":
            message = f"{path}: unknown key {first['key']!r}"
        else:
            message = f"{path}: {first['key']}: {first['reason']}"
        if len(errors) > 1:
            message += f" (and {len(errors) - 1} more)"
        raise ConfigInvalid(message, path=str(path), key=first["key"], reason=first["reason"],
                            errors=errors) from exc


def config_error(path: Path | str, key: str, reason: str) -> dict[str, str]:
    """One entry of ConfigInvalid's detail["errors"]: where, which key, what is wrong."""
    return {"path": str(path), "key": key, "reason": reason}
