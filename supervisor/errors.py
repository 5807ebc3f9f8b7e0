"""The one error tree. Each error has a stable snake_case code, an HTTP status and a CLI exit
status; every layer translates lower-level failures into one of these. No I/O, no privilege."""

from __future__ import annotations

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (agentctl's fast path)
if TYPE_CHECKING:  # annotations only: agentctl imports this module on its fast path
    from collections.abc import Iterable
    from typing import Any, ClassVar


class SupervisorError(Exception):
    code: ClassVar[str] = "internal_error"
    http_status: ClassVar[int] = 500
    exit_status: ClassVar[int] = 1
    # What the caller can do about it, sent as detail["hint"] unless the raiser gives one.
    # Every code has one (tests/unit/test_errors.py).
    default_hint: ClassVar[str | None] = (
        "an unexpected failure: the daemon's journal (journalctl -u agent-supervisor) has the "
        "details; report it with the command you ran")

    def __init__(self, message: str, **detail: Any) -> None:
        super().__init__(message)
        self.message = message
        if self.default_hint and "hint" not in detail:
            detail["hint"] = self.default_hint
        self.detail: dict[str, Any] = detail

    @property
    def hint(self) -> str | None:
        hint = self.detail.get("hint")
        return hint if isinstance(hint, str) else None

    def to_body(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message, "detail": self.detail}}


class InvalidRequest(SupervisorError):
    code = "invalid_request"
    http_status = 422
    exit_status = 6
    default_hint = ("fix the field named in detail.field and retry; 'agentctl COMMAND --help' "
                    "lists the options")


class InvalidJson(InvalidRequest):
    code = "invalid_json"
    http_status = 400
    default_hint = "send a JSON object as the body with Content-Type: application/json"


class CommandNotFound(InvalidRequest):
    """The agent's command does not exist in the sandbox's root (checked before launch).
    Exit status 127, as a shell and `docker run` give it."""

    code = "command_not_found"
    exit_status = 127
    default_hint = ("the command is resolved inside the sandbox's root, not on your host path, "
                    "from the sandbox's working directory (the workspace, /workspace, with "
                    "--workspace DIR; /tmp without): give an absolute path that the profile's "
                    "root provides, or pass --workspace with the directory that holds it")


class CommandNotExecutable(InvalidRequest):
    """The agent's command exists in the sandbox but cannot be executed (not a regular file
    with an execute bit). Exit status 126, as a shell and `docker run` give it."""

    code = "command_not_executable"
    exit_status = 126
    default_hint = "make the file executable (chmod +x), or run it through its interpreter"


class BodyTooLarge(InvalidRequest):
    code = "body_too_large"
    http_status = 413
    default_hint = "send a smaller body; the limit is [control] max_body in the daemon's config"


class BadHttpRequest(InvalidRequest):
    """The HTTP layer could not parse the request (a bad request line, header or framing)."""

    code = "bad_http_request"
    http_status = 400
    default_hint = ("speak HTTP/1.1 to the socket (curl --unix-socket works); check the request "
                    "line and headers")


class RequestTimeout(InvalidRequest):
    """The request's body did not arrive within [control] body_timeout."""

    code = "request_timeout"
    http_status = 408
    default_hint = ("send the whole body promptly; the limit is [control] body_timeout in the "
                    "daemon's config")


class UriTooLong(InvalidRequest):
    code = "uri_too_long"
    http_status = 414
    default_hint = "shorten the path and query; put long values in a JSON body"


class HeadersTooLarge(InvalidRequest):
    code = "headers_too_large"
    http_status = 431
    default_hint = "send fewer or smaller headers"


class MethodNotAllowed(InvalidRequest):
    code = "method_not_allowed"
    http_status = 405
    default_hint = "the API's paths and methods are listed in GET /v1/openapi.json"


class ReasonRequired(InvalidRequest):
    """A kill, or any verb over a class or every agent, must say why: the audit row is what an
    incident review reads."""

    code = "reason_required"
    default_hint = "say why with --reason TEXT (recorded in the audit log)"


class ProfileInvalid(InvalidRequest):
    code = "profile_invalid"
    default_hint = ("fix the profile file named in detail.source (docs/profiles.md describes the "
                    "keys)")


class ProfileNotFound(InvalidRequest):
    code = "profile_not_found"
    http_status = 404
    default_hint = ("use one of the profiles in detail.profiles, or add NAME.toml to a [sandbox] "
                    "profile_dirs directory")


class ConfigInvalid(SupervisorError):
    code = "config_invalid"
    exit_status = 78  # EX_CONFIG: systemd shows it as a configuration error
    default_hint = ("fix the key named in the message in /etc/agent-supervisor/daemon.toml, then "
                    "restart the daemon")


class DaemonRunning(SupervisorError):
    """Another agent-supervisord holds this state or runtime directory (daemon/instance.py):
    this one stops before it touches a socket, a cgroup, a watchdog or the state."""

    code = "daemon_already_running"
    http_status = 409
    # EX_UNAVAILABLE. Not 75: the unit counts that a handover's success and restarts on it
    # (SuccessExitStatus=, RestartForceExitStatus=); not 78 either, which is the config's.
    # The unit does not restart on it (RestartPreventExitStatus=): another daemon holds the
    # state, and starting again cannot change that.
    exit_status = 69
    default_hint = ("one daemon per state directory: stop the one running (systemctl stop "
                    "agent-supervisor, or SIGTERM to the pid named) or give this one another "
                    "[daemon] state_dir and runtime_dir; --check-config and --halt work "
                    "while it runs")


class ReloadRefused(ConfigInvalid):
    """A reload found errors in the configuration: nothing was applied (daemon/reload.py)."""

    code = "config_reload_refused"
    http_status = 422
    default_hint = ("fix every error in detail.errors (agent-supervisord --check-config lists "
                    "them too) and reload again; the running configuration is unchanged")


class WorkspaceInvalid(InvalidRequest):
    code = "workspace_invalid"
    default_hint = "give an existing directory as --workspace"


class AgentNotFound(SupervisorError):
    code = "agent_not_found"
    http_status = 404
    exit_status = 3
    default_hint = "'agentctl ls' lists the agents; check detail.did_you_mean"


class ScopeEmpty(SupervisorError):
    """A class or global scope that matches no agent: a typo must not read as success."""

    code = "scope_empty"
    http_status = 404
    exit_status = 3
    default_hint = "'agentctl ls' lists the agents and their classes; check detail.did_you_mean"


class RunNotFound(SupervisorError):
    code = "run_not_found"
    http_status = 404
    exit_status = 3
    default_hint = "'agentctl inspect AGENT' shows an agent's current or last run id"


class LogsExpired(SupervisorError):
    code = "logs_expired"
    http_status = 410
    exit_status = 3
    default_hint = ("the run's log file was rotated away; logs are kept per [logs] in the "
                    "daemon's config")


class RouteNotFound(SupervisorError):
    code = "route_not_found"
    http_status = 404
    exit_status = 3
    default_hint = ("the API's paths are listed in GET /v1/openapi.json ('agentctl --help' for "
                    "the CLI)")


class Conflict(SupervisorError):
    code = "conflict"
    http_status = 409
    exit_status = 4
    default_hint = "'agentctl inspect AGENT' shows its state; retry once it has changed"


class IllegalTransition(Conflict):
    code = "illegal_transition"
    default_hint = ("'agentctl inspect AGENT' shows its state; a killed agent needs 'agentctl "
                    "reactivate' first")


class AgentKilled(Conflict):
    code = "agent_killed"
    default_hint = ("the agent is held killed: an owner lifts the hold with 'agentctl reactivate "
                    "AGENT --reason ...'")


class AgentBusy(Conflict):
    code = "agent_busy"
    default_hint = ("the agent has a live run: stop it ('agentctl stop AGENT') or wait for it to "
                    "end")


class GlobalHalt(Conflict):
    code = "global_halt"
    default_hint = ("a global halt is in force: an owner lifts it with 'agentctl reactivate --all"
                    " --reason ...'")


class FleetHold(Conflict):
    """A fleet hold (supervisor/fleet/) covers the agent, or the host cannot yet tell whether
    one does (not synced with the fleet store, or cut off from it)."""

    code = "fleet_hold"
    default_hint = "an owner lifts fleet holds with 'agentctl fleet lift'"


class Forbidden(SupervisorError):
    code = "forbidden"
    http_status = 403
    exit_status = 5
    default_hint = ("roles live in [roles] of /etc/agent-supervisor/daemon.toml ('user:NAME' or "
                    "'group:NAME' under owner, admin, viewer, auditor); ask an owner to grant you"
                    " the role in detail.needed_role")


class WorkspaceForbidden(Forbidden):
    """The caller may not use that workspace: they cannot read, write and search it as
    themselves, and no workspace root the config grants their role holds it."""

    code = "workspace_forbidden"
    default_hint = ("use a directory you can read and write, or ask an owner to grant your role a"
                    " workspace root ([workspaces] roots in daemon.toml)")


class EmbeddedNeedsRoot(Forbidden):
    """`agentctl run --embedded` builds the sandbox itself, which takes root."""

    code = "embedded_needs_root"
    default_hint = ("run 'agentctl run --embedded' as root (sudo), or drop --embedded to use the "
                    "daemon")


class SigningKeyInvalid(InvalidRequest):
    code = "signing_key_invalid"
    default_hint = ("give an Ed25519 private key in PEM ('agentctl report keygen PREFIX' makes "
                    "one)")


class ReportInvalid(InvalidRequest):
    code = "report_invalid"
    default_hint = "give the JSON report written by 'agentctl run --embedded --report'"


class EmbeddedRunFailed(SupervisorError):
    """An embedded CI run could not be supervised to the end: teardown left something behind,
    the report could not be written, or the supervisor itself failed (ci/outcome.py)."""

    code = "embedded_run_failed"
    exit_status = 84
    default_hint = ("the message names what failed; the run's audit file and report say what was "
                    "left")


class WatchdogLost(EmbeddedRunFailed):
    """An embedded CI run's watchdog died and no new one could be started: the run was killed,
    since nothing would have killed the agent had agentctl died next (fail closed)."""

    code = "watchdog_lost"
    default_hint = ("the run was killed because its kill switch could not be replaced; detail."
                    "reason says why (often a host out of processes or memory): run the job again")


class EnforcementError(SupervisorError):
    """The sandbox could not be set up as the profile demands; the agent does not run.

    HTTP 424 Failed Dependency, for this code and every code below it: the request was sound
    but what it depends on (the sandbox, the OCI runtime, the kernel's cgroups, the egress
    gateway, the container engine) failed, so `agentctl run` exits 125 as `docker run` does.
    A 4xx, never a 500: a 500 (`internal_error`) means the daemon itself failed (an unexpected
    exception), and `kill_unconfirmed` the kernel did not confirm a kill."""

    code = "enforcement_failed"
    http_status = 424
    exit_status = 10
    default_hint = ("the sandbox could not be built, so the agent did not run: 'journalctl -u "
                    "agent-supervisor' has the cause; 'agentctl status' shows the self-test")


class RuntimeFailure(EnforcementError):
    code = "runtime_failed"
    default_hint = ("the OCI runtime failed: 'journalctl -u agent-supervisor' has its stderr; "
                    "check that [sandbox] runc_path works")


class EgressSetupFailed(EnforcementError):
    """The run's veth, addresses, nftables rules or gateway listener could not be set up."""

    code = "egress_setup_failed"
    default_hint = ("the agent's network could not be set up: 'journalctl -u agent-supervisor' "
                    "has the cause; a profile without egress routes runs without network")


class GatewayUnavailable(EgressSetupFailed):
    """The egress gateway's process is not running (starting, restarting or failed): gateway
    runs are refused until it is back; runs without network are unaffected."""

    code = "gateway_unavailable"
    default_hint = ("the egress gateway is restarting: retry in a few seconds; 'agentctl status' "
                    "shows it")


class ApprovalNotFound(SupervisorError):
    code = "approval_not_found"
    http_status = 404
    exit_status = 3
    default_hint = "'agentctl approvals' lists the requests waiting"


class ApprovalDecided(Conflict):
    code = "approval_decided"
    default_hint = ("the request was already decided or expired; 'agentctl audit' shows the "
                    "decision")


class BreakerNotTripped(Conflict):
    code = "breaker_not_tripped"
    default_hint = "nothing to reset: 'agentctl egress AGENT' shows the breaker"


class EngineUnavailable(EnforcementError):
    """The container engine (dockerd) cannot be reached or refused a request; the agent does
    not run. Kills go through the cgroup and do not need the engine."""

    code = "engine_unavailable"
    default_hint = ("start dockerd (systemctl start docker) or check [docker] socket in "
                    "daemon.toml")


class ImageNotFound(InvalidRequest):
    code = "image_not_found"
    http_status = 404
    default_hint = "pull the image on this host first (docker pull IMAGE)"


class RuntimeUnsupported(InvalidRequest):
    """The request needs a runtime feature this daemon or this runtime does not have (an
    image on runc, the docker runtime when it is not enabled)."""

    code = "runtime_unsupported"
    default_hint = ("enable the runtime in /etc/agent-supervisor/daemon.toml ([docker] enabled = "
                    "true, or [sandbox] runtime = \"docker\") and restart the daemon, or use a "
                    "profile that runs on runc")


class DiskSpaceLow(SupervisorError):
    """The filesystem of the state directory or of the run logs is under the free-space
    watermark ([disk]); no run starts until there is room again."""

    code = "disk_space_low"
    http_status = 507
    exit_status = 13
    default_hint = ("free space on the state and log filesystems (below the [disk] watermark); "
                    "runs start again once there is room")


class KillUnconfirmed(SupervisorError):
    """The kernel did not report the cgroup empty within the kill timeout."""

    code = "kill_unconfirmed"
    http_status = 500
    exit_status = 11
    default_hint = ("the kernel still reports processes in the cgroup: check 'agentctl inspect "
                    "AGENT' and the journal; retry the kill")


class TooManyRequests(SupervisorError):
    """The caller's uid has too many requests in flight on the control socket."""

    code = "too_many_requests"
    http_status = 429
    exit_status = 7
    default_hint = "wait for your other requests to finish, then retry"


class DaemonUnavailable(SupervisorError):
    code = "daemon_unavailable"
    http_status = 503
    exit_status = 7
    default_hint = ("check 'systemctl status agent-supervisor' and the socket path (--socket or "
                    "AGENT_SUPERVISOR_SOCKET)")


class ShuttingDown(SupervisorError):
    code = "shutting_down"
    http_status = 503
    exit_status = 7
    default_hint = ("the daemon is stopping; retry once it is back ('systemctl status agent-"
                    "supervisor')")


class StreamEnded(SupervisorError):
    """A follow stream (`agentctl run` in the foreground, `agentctl logs -f`) that the daemon
    ended before the run did, because it is restarting (the agent runs on: a handover) or
    stopping (it kills every agent). Never sent as an HTTP error: the client raises it when
    the stream's last chunk is the daemon's end notice (api/server.py, FollowStreams).
    Exit status 75 (EX_TEMPFAIL): follow the run again once the daemon is back."""

    code = "stream_ended"
    http_status = 503
    exit_status = 75
    default_hint = ("follow the run again once the daemon is back: 'agentctl logs -f RUN' "
                    "('systemctl status agent-supervisor' says when it is)")


class FleetStoreError(SupervisorError):
    """The fleet store (etcd) refused a request or answered nonsense."""

    code = "fleet_store_error"
    default_hint = ("check the etcd endpoints and the store's health (etcdctl endpoint health); "
                    "the message has etcd's answer")
    http_status = 502
    exit_status = 12


class FleetStoreUnavailable(FleetStoreError):
    code = "fleet_store_unavailable"
    default_hint = ("check that etcd is reachable at the --endpoints given, with the CA, cert "
                    "and key you pass; local kills still work on each host")
    http_status = 503


class FleetPermissionDenied(FleetStoreError):
    """etcd's roles refused the request: these credentials may not touch that key."""

    code = "fleet_permission_denied"
    default_hint = ("these credentials lack the etcd role for that key: ask the fleet's etcd "
                    "administrator (docs/fleet.md lists the roles)")
    http_status = 403
    exit_status = 5


class FleetUnconfirmed(SupervisorError):
    """A fleet action was written but some hosts did not confirm it before the deadline."""

    code = "fleet_unconfirmed"
    default_hint = ("the action stays in the store and every host applies it when it reconnects; "
                    "'agentctl fleet ls' shows which hosts acknowledged")
    http_status = 504
    exit_status = 13


# `agentctl run` (and an embedded run) exits with this when the supervisor could not start
# the run, as `docker run` exits 125 when the engine could not: the sandbox, runtime, engine or
# gateway failed. The command's own failures are 126 and 127 (above).
LAUNCH_FAILED_EXIT = 125


def launch_exit_status(exc: SupervisorError) -> int:
    """The exit status of a run that did not start because of `exc`."""
    return LAUNCH_FAILED_EXIT if isinstance(exc, EnforcementError) else exc.exit_status


def error_from_wire(code: object, message: str, detail: dict[str, object],
                    status: int | None = None) -> SupervisorError:
    """The typed error a daemon's error body names (the client rebuilds it from the wire); an
    unknown code keeps the code in its detail and stays a SupervisorError, or, answered with
    EnforcementError's status (424: a launch's dependency failed, from a daemon that knows a
    code this client does not), an EnforcementError, so `agentctl run` still exits 125."""
    cls = error_class_for(str(code))
    if cls is SupervisorError and status == EnforcementError.http_status:
        cls = EnforcementError
    exc = cls(message, **detail)
    if cls.code != code or cls is SupervisorError:
        exc.detail["code"] = code
    return exc


def error_class_for(code: str) -> type[SupervisorError]:
    """The error class with this code (the client rebuilds typed errors from the wire)."""
    for cls in error_classes():
        if cls.code == code:
            return cls
    return SupervisorError


def error_classes() -> list[type[SupervisorError]]:
    """Every class of the error tree, SupervisorError first (subclasses defined elsewhere,
    once imported, included)."""
    found: list[type[SupervisorError]] = []
    stack: list[type[SupervisorError]] = [SupervisorError]
    while stack:
        cls = stack.pop()
        found.append(cls)
        stack.extend(cls.__subclasses__())
    return found


class ConsoleRefused(Forbidden):
    """The web console refused a request before it reached the daemon: a wrong or spent
    token, no session, or a Host or Origin that is not the console's own (detail["check"])."""

    code = "console_refused"
    default_hint = "open the URL with the token that agentctl console printed, in one browser"


def class_not_found(agent_class: str, classes: Iterable[str]) -> ScopeEmpty:
    """The error for a --class no agent has, with the closest classes as suggestions (the
    daemon's scoped verbs and agentctl ls --class alike)."""
    known = sorted(set(classes))
    close = did_you_mean(agent_class, known)
    return ScopeEmpty(f"no agent has class {agent_class!r}"
                      + (f"; did you mean {', '.join(close)}?" if close else ""),
                      scope=f"class:{agent_class}", did_you_mean=close, classes=known[:50])


def did_you_mean(name: str, known: Iterable[str], limit: int = 3) -> list[str]:
    """The known names closest to a mistyped one (for "did you mean" in an error's detail)."""
    import difflib  # only on the error path

    return difflib.get_close_matches(name, sorted(set(known)), n=limit, cutoff=0.6)
