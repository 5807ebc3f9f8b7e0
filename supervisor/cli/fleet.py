"""agentctl fleet: the operator's fleet-wide verbs. Talks to etcd directly with the operator's
credentials (flags or AGENT_SUPERVISOR_FLEET_* variables), writes one durable action, waits for
every reached host's acknowledgement, prints a row per host and exits non-zero naming every
host that did not confirm. Never talks to a daemon; runs unprivileged."""

from __future__ import annotations

import functools
import json
import sys
import time
from collections.abc import Callable, Generator
from pathlib import Path
from typing import Any, TypeVar

import click

from supervisor.errors import (
    FleetPermissionDenied,
    FleetStoreError,
    FleetUnconfirmed,
    InvalidRequest,
    ScopeEmpty,
    SupervisorError,
    class_not_found,
    did_you_mean,
)
from supervisor.fleet.etcd import Credentials, Etcd, KeyValue, WatchEvent
from supervisor.fleet.model import (
    Ack,
    FleetAction,
    Keys,
    Selector,
    drill_canary_name,
    dumps,
    new_action_id,
)
from supervisor.limits import REASON_MAX, reason_text

F = TypeVar("F", bound=Callable[..., Any])
ENV = "AGENT_SUPERVISOR_FLEET_"


class FleetContext:
    def __init__(self, creds: Credentials, prefix: str) -> None:
        self.creds = creds
        self.keys = Keys(prefix)
        self._etcd: Etcd | None = None

    @property
    def etcd(self) -> Etcd:
        if self._etcd is None:
            self._etcd = Etcd(self.creds)
        return self._etcd


def _handles_errors(func: F) -> F:
    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except SupervisorError as exc:
            if kwargs.get("as_json"):
                click.echo(json.dumps(exc.to_body(), indent=2, sort_keys=True))
            else:
                click.echo(f"agentctl: {exc.code}: {exc.message}", err=True)
                if exc.hint:
                    click.echo(f"hint: {exc.hint}", err=True)
            sys.exit(exc.exit_status)

    return wrapper  # type: ignore[return-value]


_json = click.option("--json", "as_json", is_flag=True, help="Print JSON.")


def _ctx() -> FleetContext:
    obj = click.get_current_context().find_object(FleetContext)
    assert obj is not None
    return obj


@click.group()
@click.option("--endpoints", envvar=ENV + "ENDPOINTS", required=True,
              help="etcd client endpoints, host:port[,host:port].")
@click.option("--ca", envvar=ENV + "CA", type=click.Path(path_type=Path), required=True,
              help="CA certificate that signed etcd's server certificate.")
@click.option("--cert", envvar=ENV + "CERT", type=click.Path(path_type=Path), required=True,
              help="Your client certificate (no CommonName; see docs/fleet.md).")
@click.option("--key", envvar=ENV + "KEY", type=click.Path(path_type=Path), required=True)
@click.option("--user", envvar=ENV + "USER", required=True, help="Your etcd user.")
@click.option("--password-file", envvar=ENV + "PASSWORD_FILE",
              type=click.Path(path_type=Path), required=True)
@click.option("--prefix", envvar=ENV + "PREFIX", default="/agent-supervisor/fleet/",
              show_default=True)
@click.pass_context
def fleet(ctx: click.Context, endpoints: str, ca: Path, cert: Path, key: Path, user: str,
          password_file: Path, prefix: str) -> None:
    """Fleet-wide halts through the etcd fleet store (docs/fleet.md)."""
    try:
        password = password_file.read_text().strip()
    except OSError as exc:
        raise click.UsageError(f"cannot read the password file {password_file}: "
                               f"{exc.strerror}") from None
    ctx.obj = FleetContext(Credentials(
        endpoints=tuple(e.strip() for e in endpoints.split(",") if e.strip()), ca_file=ca,
        cert_file=cert, key_file=key, user=user, password=password), prefix)


# ----------------------------------------------------------------------------- reading

def _hosts(ctx: FleetContext, full: bool = True) -> dict[str, dict[str, Any]]:
    """Every registered host (alive: its lease still holds the registration); with `full`,
    also every host that left acks, anchors or a partition report, and those."""
    return _hosts_at(ctx, full)[0]


def _hosts_at(ctx: FleetContext, full: bool = True, labels: bool = True, revision: int = 0
              ) -> tuple[dict[str, dict[str, Any]], int]:
    """`_hosts`, and the store's revision its read of the registrations saw (`revision`:
    as they were then). Without `labels` the registrations are read as keys only (which
    hosts are alive, not what they hold: a host's registration lists its every agent, and a
    halt of all needs none of it)."""
    hosts: dict[str, dict[str, Any]] = {}

    def entry(host: str) -> dict[str, Any]:
        return hosts.setdefault(host, {"host": host, "alive": False, "acks": {},
                                       "anchors": [], "partition": None})

    members, revision = ctx.etcd.get_prefix(ctx.keys.members, keys_only=not labels,
                                            revision=revision)
    for kv in members:
        if not labels:
            entry(kv.key[len(ctx.keys.members):]).update(alive=True, lease=kv.lease)
            continue
        try:
            value = kv.json()
        except ValueError:
            continue
        item = entry(kv.key[len(ctx.keys.members):])
        item.update(alive=True, registration=value, lease=kv.lease)
    if not full:
        return hosts, revision
    kvs, _ = ctx.etcd.get_prefix(ctx.keys.hosts)
    for kv in kvs:
        host = ctx.keys.host_of(kv.key)
        if host is None:
            continue
        item = entry(host)
        rest = kv.key[len(ctx.keys.host(host)):]
        try:
            value = kv.json()
        except ValueError:
            continue
        if rest.startswith("acks/"):
            item["acks"][rest[5:]] = value
        elif rest.startswith("anchors/"):
            item["anchors"].append((kv, value))
        elif rest == "partition":
            item["partition"] = value
    return hosts, revision


@fleet.command("ls")
@_json
@_handles_errors
def ls(as_json: bool) -> None:
    """Every host (alive, up time, lease time left, version) and every agent across the
    fleet."""
    ctx = _ctx()
    hosts = _hosts(ctx)
    holds, _ = ctx.etcd.get_prefix(ctx.keys.holds)
    now = time.time()
    rows = []
    for host in sorted(hosts.values(), key=lambda h: h["host"]):
        reg = host.get("registration") or {}
        agents = reg.get("agents", [])
        rows.append({"host": host["host"], "alive": host["alive"],
                     "version": reg.get("version"), "labels": reg.get("labels", {}),
                     "registered_for_s": round(now - reg["started_at"], 1) if reg else None,
                     "updated_s_ago": round(now - reg["updated_at"], 1) if reg else None,
                     **_lease_left(ctx, host.get("lease") if host["alive"] else None),
                     "agents": agents, "held": reg.get("fleet_held", False),
                     # A registration lists at most REGISTRATION_AGENTS_MAX agents and says
                     # when it was cut; one from an older version says nothing: whole.
                     "agents_total": reg.get("agents_total", len(agents)),
                     "agents_truncated": reg.get("agents_truncated", False),
                     "partition": host["partition"]})
    if as_json:
        click.echo(json.dumps({"hosts": rows, "holds": [json.loads(kv.value) for kv in holds]},
                              indent=2, sort_keys=True))
        return
    _table([[r["host"], "alive" if r["alive"] else "DOWN", str(r["version"] or "-"),
             _age(r["registered_for_s"]), _lease_cell(r), _agents_cell(r),
             "held" if r["held"] else ""] for r in rows],
           ["HOST", "STATE", "VERSION", "UP", "LEASE LEFT", "AGENTS", "HOLD"])
    cut = [r for r in rows if r["agents_truncated"]]
    for r in cut:
        click.echo(f"{r['host']}: its registration lists {len(r['agents'])} of its "
                   f"{r['agents_total']} agents (the rest are not shown)")
    agents = [[r["host"], a["name"], a["agent_class"], a["state"]]
              for r in rows for a in r["agents"]]
    if agents:
        click.echo()
        _table(agents, ["HOST", "AGENT", "CLASS", "STATE"])
    for kv in holds:
        hold = json.loads(kv.value)
        click.echo(f"hold {hold['id']}: {hold['verb']} {Selector(**hold['selector']).describe()}"
                   f" by {hold['operator']}: {hold['reason']}")


def _lease_left(ctx: FleetContext, lease: int | None) -> dict[str, Any]:
    """The remaining and granted TTL of a live host's lease (etcd LeaseTimeToLive): how long
    the store keeps the host a member if its keepalives stop now. None when the host is not
    alive or the store would not say (the error then beside it)."""
    left: dict[str, Any] = {"lease_ttl_left_s": None, "lease_ttl_granted_s": None}
    if not lease:
        return left
    try:
        remaining, granted = ctx.etcd.lease_ttl(lease)
    except FleetStoreError as exc:
        return {**left, "lease_error": exc.message}
    left.update(lease_ttl_left_s=max(remaining, 0), lease_ttl_granted_s=granted)
    return left


def _lease_cell(row: dict[str, Any]) -> str:
    if row["lease_ttl_left_s"] is None:
        return "?" if row.get("lease_error") else "-"
    return f"{row['lease_ttl_left_s']}s/{row['lease_ttl_granted_s']}s"


def _agents_cell(row: dict[str, Any]) -> str:
    shown = len(row["agents"])
    if row["agents_truncated"]:
        return f"{shown} of {row['agents_total']} (cut)"
    return str(shown)


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.0f}s"
    return f"{seconds / 60:.0f}m" if seconds < 7200 else f"{seconds / 3600:.0f}h"


def _table(rows: list[list[str]], headers: list[str]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(headers)]
    for row in [headers, *rows]:
        click.echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
                   .rstrip())


# ----------------------------------------------------------------------------- verbs

def _selector(all_hosts: bool, agent_class: str | None, host: str | None, agent: str | None,
              labels: tuple[str, ...]) -> Selector:
    parsed: dict[str, str] = {}
    for item in labels:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InvalidRequest(f"--label {item!r} is not k=v", field="label")
        parsed[key] = value
    if not (all_hosts or agent_class or host or agent or parsed):
        raise InvalidRequest("name a scope: --all, --class, --host, --agent or --label",
                             field="scope")
    if all_hosts and (agent_class or host or agent or parsed):
        raise InvalidRequest("--all reaches every agent; give it alone", field="scope")
    return Selector(all=all_hosts, agent_class=agent_class, host=host, agent=agent,
                    labels=parsed)


def _expected(hosts: dict[str, dict[str, Any]], selector: Selector) -> list[str]:
    """The live hosts the selector reaches (a host that is down applies it when back)."""
    return sorted(h for h, entry in hosts.items() if entry["alive"] and selector.reaches_host(
        h, (entry.get("registration") or {}).get("labels", {})))


ALLOW_EMPTY_HINT = ("'agentctl fleet ls' lists the live hosts and their agents; to hold a scope no "
                    "live host runs now (its host is down, or its agents are not launched "
                    "yet), repeat the command with --allow-empty")


def scope_error(selector: Selector, hosts: dict[str, dict[str, Any]]) -> ScopeEmpty | None:
    """Why `selector` reaches nothing on the live hosts (their registrations in `hosts`, as
    `_hosts_at` reads them with labels), or None if it reaches something. A selector that
    names hosts (--host, --label) must reach a live host; one that names agents (--class,
    --agent) an agent registered on a reached host. An operator's typo in an incident then
    fails visibly, with what there is, instead of writing a hold that reaches nothing and
    printing an empty table with exit 0."""
    if selector.all:
        return None
    live = {h: entry.get("registration") or {} for h, entry in hosts.items() if entry["alive"]}
    reached = {h: reg for h, reg in live.items()
               if selector.reaches_host(h, reg.get("labels", {}))}
    if not reached:
        known = sorted(live)
        if selector.host is not None and selector.host not in live:
            close = did_you_mean(selector.host, known)
            message = (f"no live host {selector.host!r}"
                       + (f"; did you mean {', '.join(close)}?" if close else ""))
        else:
            close = []
            message = f"no live host matches {selector.describe()}"
        return ScopeEmpty(message, scope=selector.describe(), did_you_mean=close,
                          hosts=known[:50], hint=ALLOW_EMPTY_HINT)
    agents = [a for reg in reached.values() for a in reg.get("agents", [])]
    if any(reg.get("agents_truncated") for reg in reached.values()):
        return None  # a cut list cannot show that an agent is not there: the action goes
    if any(selector.reaches_agent(a.get("name", ""), a.get("agent_class", ""))
           for a in agents):
        return None
    if selector.agent_class is not None and not any(
            a.get("agent_class") == selector.agent_class for a in agents):
        error = class_not_found(selector.agent_class, (a.get("agent_class", "") for a in agents))
        error.detail.update(scope=selector.describe(), hint=ALLOW_EMPTY_HINT)
        return error
    if selector.agent is not None:
        names = [a.get("name", "") for a in agents]
        close = did_you_mean(selector.agent, names)
        return ScopeEmpty(f"no live host reached by {selector.describe()} has agent "
                          f"{selector.agent!r}"
                          + (f"; did you mean {', '.join(close)}?" if close else ""),
                          scope=selector.describe(), did_you_mean=close, hint=ALLOW_EMPTY_HINT)
    return None


_OUT_OF_RANGE = 11  # etcd: "required revision has been compacted"
ACK_REREAD = 1.0  # seconds of a quiet watch before the acks are read directly


def issue(ctx: FleetContext, actions: list[FleetAction], deadline: float,
          holds: bool = False, lift: list[str] | None = None,
          acks: dict[tuple[str, str], Ack] | None = None) -> dict[str, Any]:
    """Write the actions (and their holds, and the lifted holds' deletion) in one transaction,
    then wait up to `deadline` seconds for every reached live host to acknowledge each (the
    acks land in `acks` when given). The store going away while it waits (etcd restarted)
    is waited out up to the deadline: the action is written and durable.

    The transaction is the first call: every host starts on the action one round trip after
    the command does. Which hosts to wait for (the registrations at the transaction's
    revision) and the watch for their acks (from the revision after it, so nothing written
    meanwhile is missed) are read while the hosts are applying it."""
    started = time.perf_counter()
    started_at = time.time()
    puts = {ctx.keys.action(a.id): dumps(a) for a in actions}
    if holds:
        puts.update({ctx.keys.hold(a.id): dumps(a) for a in actions})
    revision = ctx.etcd.txn(puts, [ctx.keys.hold(h) for h in (lift or [])])
    return _confirmations(ctx, actions, revision, deadline, started, started_at, time.time(),
                          acks)


def written_status(ctx: FleetContext, action_ids: list[str], deadline: float
                   ) -> dict[str, Any]:
    """The hosts' answers to actions already in the store (`agentctl fleet status`), waiting
    up to `deadline` seconds for the live hosts each reaches (as registered when it was
    written) to acknowledge: what `issue` waits for, without writing anything."""
    started, started_at = time.perf_counter(), time.time()
    actions: list[FleetAction] = []
    revision = 0
    for action_id in action_ids:
        kv = ctx.etcd.get(ctx.keys.action(action_id))
        if kv is None:
            raise InvalidRequest(f"no fleet action {action_id!r} in the store", field="action",
                                 hint="'agentctl fleet ls --json' lists the holds; an action's "
                                      "id is printed by the command that wrote it")
        actions.append(FleetAction.model_validate(kv.json()))
        revision = max(revision, kv.create_revision)
    return _confirmations(ctx, actions, revision, deadline, started, started_at, started_at,
                          None, read_first=True)


def _confirmations(ctx: FleetContext, actions: list[FleetAction], revision: int,
                   deadline: float, started: float, started_at: float, committed_at: float,
                   acks: dict[tuple[str, str], Ack] | None, read_first: bool = False
                   ) -> dict[str, Any]:
    """Wait up to `deadline` for every live host that `actions` (written at `revision`)
    reach to acknowledge each; with `read_first`, the acks already in the store are read
    before the watch (they may be older than etcd keeps history for)."""
    end = time.monotonic() + deadline
    acks = {} if acks is None else acks
    hosts_at = revision  # the registrations as they were when the actions were written
    arrived: dict[tuple[str, str], float] = {}

    def take(kv: KeyValue) -> None:
        key = _take_ack(ctx, kv, acks)
        if key is not None:
            arrived.setdefault(key, time.time())

    hosts: dict[str, dict[str, Any]] | None = None
    wanted: set[tuple[str, str]] = set()
    # The store's failures while waiting (etcd restarting, unreachable): an operator whose
    # hosts show "no answer" is told whether the store itself stood in the way.
    store_errors = 0
    last_store_error: str | None = None
    stream: Generator[tuple[int, list[WatchEvent]], None, None] | None = None
    start_revision = revision + 1
    try:
        while end - time.monotonic() > 0:
            try:
                if hosts is None:
                    hosts = _hosts_at(ctx, full=False, labels=any(a.selector.labels
                                                                  for a in actions),
                                      revision=hosts_at)[0]
                    wanted = {(h, a.id) for a in actions for h in _expected(hosts, a.selector)}
                    if read_first:
                        for host in {h for h, _ in wanted}:
                            for kv in ctx.etcd.get_prefix(ctx.keys.acks(host))[0]:
                                take(kv)
                if not wanted - set(acks):
                    break
                # A quiet second ends the watch for a direct read of the acks: a watch opened
                # while etcd restarts can be accepted and then never deliver (seen after a
                # restart mid-halt), and must not hold the wait until its deadline.
                stream = ctx.etcd.watch(ctx.keys.hosts, start_revision,
                                        timeout=min(deadline, ACK_REREAD), deadline=end)
                for rev, events in stream:
                    for event in events:
                        take(event.kv)
                    start_revision = max(start_revision, rev + 1)
                    if not wanted - set(acks):
                        break
                stream.close()
                # Whatever the watch missed: one read of the acks themselves.
                for host in {h for h, _ in wanted - set(acks)}:
                    kvs, _ = ctx.etcd.get_prefix(ctx.keys.acks(host))
                    for kv in kvs:
                        take(kv)
            except FleetPermissionDenied:
                raise
            except SupervisorError as exc:
                store_errors += 1
                last_store_error = f"{exc.code}: {exc.message}"
                # History older than etcd keeps (an action's status asked much later): the
                # registrations as they are now, and the watch from where history starts.
                if exc.detail.get("grpc_code") == _OUT_OF_RANGE:
                    hosts_at = 0
                if exc.detail.get("compact_revision"):
                    start_revision = int(exc.detail["compact_revision"])
                time.sleep(min(0.1, max(0.0, end - time.monotonic())))
    finally:
        if stream is not None:
            stream.close()
    if hosts is None:
        ids = [a.id for a in actions]
        raise FleetUnconfirmed(f"{', '.join(ids)} written, but the hosts' registrations could "
                               f"not be read within {deadline:g} s: no host is known to have "
                               f"confirmed", hosts=[], actions=ids)
    expected = sorted({h for h, _ in wanted})
    elapsed_ms = (time.perf_counter() - started) * 1000
    rows: list[dict[str, Any]] = []
    for host in expected:
        mine = [acks.get((host, a.id)) for a in actions if (host, a.id) in wanted]
        got = [a for a in mine if a is not None]
        if len(got) < len(mine):
            rows.append({"host": host, "status": "no answer"})
            continue
        failed = [a for a in got if a.outcome == "failed"]
        halts = [a.slowest_time_to_halt_ms for a in got if a.slowest_time_to_halt_ms is not None]
        last = max(got, key=lambda a: arrived.get((host, a.action), 0.0))
        rows.append({
            "host": host, "status": "failed" if failed else "confirmed",
            "agents_affected": sum(1 for a in got for o in a.agents if not o.skipped),
            "slowest_time_to_halt_ms": max(halts) if halts else None,
            "survivors": sorted({s for a in got for s in a.survivors}),
            "error": "; ".join(a.error for a in failed if a.error) or None,
            # each agent the host failed on, with the host's own words (the error above is
            # only the first one's)
            "agent_errors": {o.agent: o.error for a in got for o in a.agents if o.error},
            # the host's own times for its last ack, and when that ack reached us
            "timings": {**last.timings, "arrived": arrived.get((host, last.action))},
        })
    return {"actions": [a.id for a in actions], "revision": revision,
            "elapsed_ms": round(elapsed_ms, 1), "hosts": rows,
            "started_at": started_at, "committed_at": committed_at,
            "store_errors": store_errors, "last_store_error": last_store_error,
            "unconfirmed": [r["host"] for r in rows if r["status"] != "confirmed"]}


def _take_ack(ctx: FleetContext, kv: KeyValue, acks: dict[tuple[str, str], Ack]
              ) -> tuple[str, str] | None:
    host = ctx.keys.host_of(kv.key)
    if host is None or not kv.key.startswith(ctx.keys.acks(host)):
        return None
    try:
        ack = Ack.model_validate(kv.json())
    except ValueError:
        return None
    if ack.host != host:
        return None
    acks[(host, ack.action)] = ack
    return host, ack.action


def _report(result: dict[str, Any], as_json: bool, verb: str) -> None:
    if as_json:
        click.echo(json.dumps(result, indent=2, sort_keys=True))
    else:
        _table([[r["host"], r["status"], str(r.get("agents_affected", "-")),
                 _ms(r.get("slowest_time_to_halt_ms")), ",".join(r.get("survivors") or [])]
                for r in result["hosts"]],
               ["HOST", "STATUS", "AGENTS", "SLOWEST_TIME_TO_HALT_MS", "SURVIVORS"])
        click.echo(f"fleet {verb} {', '.join(result['actions'])}: {len(result['hosts'])} "
                   f"hosts in {result['elapsed_ms']:.0f} ms")
    if result["unconfirmed"]:
        # Why each host did not confirm, whole: what the host said, not only its name.
        why = {r["host"]: r.get("error") or r["status"] for r in result["hosts"]
               if r["host"] in result["unconfirmed"]}
        error = FleetUnconfirmed(
            f"not confirmed by: {', '.join(result['unconfirmed'])}",
            hosts=result["unconfirmed"], actions=result["actions"], why=why,
            store_errors=result.get("store_errors", 0),
            last_store_error=result.get("last_store_error"))
        if not as_json:
            for row in result["hosts"]:
                if row["host"] in why:
                    said = f": {row['error']}" if row.get("error") else ""
                    click.echo(f"{row['host']}: {row['status']}{said}", err=True)
                    for agent, message in sorted((row.get("agent_errors") or {}).items()):
                        click.echo(f"  {agent}: {message}", err=True)
            if result.get("store_errors"):
                click.echo(f"the fleet store failed {result['store_errors']} requests while "
                           f"waiting; the last: {result['last_store_error']}", err=True)
        if not as_json:
            click.echo(f"agentctl: {error.code}: {error.message}", err=True)
            click.echo(f"hint: {error.hint}", err=True)
        sys.exit(error.exit_status)


def _cell(text: str, width: int) -> str:
    """`text` for a table cell of at most about `width` characters; cut, it says so."""
    if len(text) <= width:
        return text
    return text[:width] + f" ... [cut: {len(text) - width} more characters; --json has all]"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _reason(reason: str) -> str:
    """As a local kill's (verbs.checked_reason): argv bytes that are not UTF-8 as U+FFFD."""
    reason = reason_text(reason)
    if not reason.strip() or len(reason) > REASON_MAX:
        raise InvalidRequest(f"--reason is required, at most {REASON_MAX} characters",
                             field="reason")
    return reason


def _verb(verb: str, help_text: str) -> None:
    @click.option("--all", "all_hosts", is_flag=True, help="Every agent on every host.")
    @click.option("--class", "agent_class", help="Every agent with this class, fleet-wide.")
    @click.option("--host", help="Every agent on this host.")
    @click.option("--agent", help="The agent with this name (on any host).")
    @click.option("--label", "labels", multiple=True, metavar="K=V",
                  help="Hosts with this label (repeatable; all must match).")
    @click.option("--reason", required=True, help="Why (recorded on every host).")
    @click.option("--deadline", type=float, default=10.0, show_default=True,
                  help="Seconds to wait for every host to confirm.")
    @click.option("--allow-empty", is_flag=True,
                  help="Write the action even if no live host has a host or agent in scope "
                       "(a hold for a host that is down, or a class not launched yet).")
    @_json
    @_handles_errors
    def command(all_hosts: bool, agent_class: str | None, host: str | None,
                agent: str | None, labels: tuple[str, ...], reason: str, deadline: float,
                allow_empty: bool, as_json: bool) -> None:
        ctx = _ctx()
        selector = _selector(all_hosts, agent_class, host, agent, labels)
        action = FleetAction(id=new_action_id(), verb=verb,  # type: ignore[arg-type]
                             selector=selector, reason=_reason(reason),
                             operator=ctx.creds.user, issued_at=time.time())
        if not selector.all and not allow_empty:
            # One read of the registrations before the write (--all has none: nothing to
            # mistype, and nothing may stand in front of a halt of everything).
            error = scope_error(selector, _hosts_at(ctx, full=False)[0])
            if error is not None:
                raise error
        _report(issue(ctx, [action], deadline, holds=verb == "kill"), as_json, verb)

    fleet.command(name=verb, help=help_text)(command)


_verb("kill", "Kill every agent in scope on every host, and hold them until lifted.")
_verb("pause", "Pause every agent in scope on every host.")
_verb("resume", "Resume every paused agent in scope on every host.")
_verb("reactivate", "Reactivate killed agents in scope (fleet holds stay until lifted).")


@fleet.command("status")
@click.argument("action_ids", nargs=-1, required=True, metavar="ACTION...")
@click.option("--deadline", type=float, default=10.0, show_default=True,
              help="Seconds to wait for every host to confirm.")
@_json
@_handles_errors
def status(action_ids: tuple[str, ...], deadline: float, as_json: bool) -> None:
    """The hosts' answers to fleet actions already written (a kill whose command ran out of
    time, exit 13): a row per live host each reaches, waiting up to the deadline for those
    that have not confirmed yet. Writes nothing."""
    _report(written_status(_ctx(), list(action_ids), deadline), as_json, "status")


@fleet.command("lift")
@click.option("--hold", "hold_ids", multiple=True, help="The hold (fleet kill id) to lift.")
@click.option("--all-holds", is_flag=True, help="Every hold in force.")
@click.option("--reason", required=True)
@click.option("--deadline", type=float, default=10.0, show_default=True)
@_json
@_handles_errors
def lift(hold_ids: tuple[str, ...], all_holds: bool, reason: str, deadline: float,
         as_json: bool) -> None:
    """Lift fleet holds: hosts reactivate what each hold killed and accept launches again."""
    _report(lift_holds(_ctx(), None if all_holds else list(hold_ids), reason, deadline),
            as_json, "lift")


def lift_holds(ctx: FleetContext, hold_ids: list[str] | None, reason: str,
               deadline: float) -> dict[str, Any]:
    """One lift action per hold (every hold in force when `hold_ids` is None), written with
    the holds' deletion in one transaction, and the hosts' answers (see `issue`)."""
    kvs, _ = ctx.etcd.get_prefix(ctx.keys.holds)
    holds = {kv.key[len(ctx.keys.holds):]: FleetAction.model_validate(kv.json()) for kv in kvs}
    chosen = list(holds) if hold_ids is None else hold_ids
    missing = [h for h in chosen if h not in holds]
    if missing or not chosen:
        raise InvalidRequest(f"no such hold: {', '.join(missing)}" if missing
                             else "name --hold ID or --all-holds", holds=sorted(holds))
    actions = [FleetAction(id=new_action_id(), verb="lift", selector=holds[h].selector,
                           reason=_reason(reason), operator=ctx.creds.user,
                           issued_at=time.time(), lifts=[h]) for h in chosen]
    return issue(ctx, actions, deadline, lift=chosen)


@fleet.command("drill")
@click.option("--host", help="Only this host.")
@click.option("--label", "labels", multiple=True, metavar="K=V")
@click.option("--slo", "slo_ms", type=float, default=250.0, show_default=True,
              help="Milliseconds from the fleet kill to every host confirmed.")
@click.option("--reason", default="fleet drill", show_default=True)
@click.option("--deadline", type=float, default=30.0, show_default=True)
@_json
@_handles_errors
def drill(host: str | None, labels: tuple[str, ...], slo_ms: float, reason: str,
          deadline: float, as_json: bool) -> None:
    """A canary on every reached host, killed through the fleet path; the SLO judged end to
    end (fleet kill written -> every host confirmed) and per host (time_to_halt)."""
    ctx = _ctx()
    selector = _selector(not (host or labels), None, host, None, labels)
    start = FleetAction(id=new_action_id(), verb="drill", selector=selector,
                        reason=_reason(reason), operator=ctx.creds.user, issued_at=time.time())
    ready = issue(ctx, [start], deadline)
    canary = drill_canary_name(start.id)
    kill = FleetAction(id=new_action_id(), verb="kill",
                       selector=selector.model_copy(update={"all": False, "agent": canary}),
                       reason=_reason(f"{reason}: canary"), operator=ctx.creds.user,
                       issued_at=time.time())
    halted = issue(ctx, [kill], deadline) if not ready["unconfirmed"] else None
    rows = []
    for row in (halted or ready)["hosts"]:
        slowest = row.get("slowest_time_to_halt_ms")
        row = {**row, "slo_met": row["status"] == "confirmed" and slowest is not None
               and slowest <= slo_ms}
        rows.append(row)
    end_to_end = halted["elapsed_ms"] if halted else None
    result = {"canary": canary, "slo_ms": slo_ms, "end_to_end_ms": end_to_end,
              "hosts": rows, "actions": [start.id] + ([kill.id] if halted else []),
              "elapsed_ms": end_to_end or ready["elapsed_ms"],
              "unconfirmed": sorted(set(ready["unconfirmed"]
                                        + (halted["unconfirmed"] if halted else [])))}
    result["slo_met"] = bool(end_to_end is not None and end_to_end <= slo_ms
                             and all(r["slo_met"] for r in rows) and not result["unconfirmed"])
    if not as_json:
        click.echo(f"fleet drill: end to end {_ms(end_to_end)} ms against an SLO of "
                   f"{slo_ms:.0f} ms: {'met' if result['slo_met'] else 'MISSED'}")
    _report(result, as_json, "drill")
    if not result["slo_met"]:
        sys.exit(14)


@fleet.group("audit")
def audit() -> None:
    """The hosts' audit chains against the anchors they published to the store."""


@audit.command("verify")
@click.option("--host", help="Only this host.")
@click.option("--keys", "keys_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Directory of pinned public keys, <host>.pub (base64 raw Ed25519).")
@click.option("--deadline", type=float, default=30.0, show_default=True)
@_json
@_handles_errors
def audit_verify(host: str | None, keys_dir: Path | None, deadline: float,
                 as_json: bool) -> None:
    """Check every host's anchors (signatures, one key, none rewritten), then have every live
    host hold its chain against the anchors read back from the store."""
    from supervisor.fleet.anchors import check_anchors

    ctx = _ctx()
    hosts = _hosts(ctx)
    names = [host] if host else sorted(hosts)
    checks = {}
    for name in names:
        pinned = None
        if keys_dir is not None and (keys_dir / f"{name}.pub").exists():
            pinned = (keys_dir / f"{name}.pub").read_text().strip()
        kvs = [kv for kv, _ in (hosts.get(name) or {}).get("anchors", [])]
        checks[name] = check_anchors(name, kvs, pinned).as_dict()
    action = FleetAction(id=new_action_id(), verb="verify",
                         selector=Selector(all=host is None, host=host),
                         reason="fleet audit verify", operator=ctx.creds.user,
                         issued_at=time.time())
    taken: dict[tuple[str, str], Ack] = {}
    result = issue(ctx, [action], deadline, acks=taken)
    acks = {host: ack for (host, _), ack in taken.items()}
    for name in names:  # a host not counted on (not alive when issued) may still have answered
        if name not in acks and (kv := ctx.etcd.get(ctx.keys.ack(name, action.id))):
            acks[name] = Ack.model_validate(kv.json())
    rows = []
    for name in names:
        problems = list(checks[name]["problems"])
        ack = acks.get(name)
        if ack is not None and ack.audit is not None:
            problems += [p for p in ack.audit.get("problems", []) if p not in problems]
        elif ack is not None and ack.error:
            problems.append(ack.error)
        why = None
        if ack is None:
            why = (f"no answer within {deadline:g} s" if (hosts.get(name) or {}).get("alive")
                   else "not alive (no registration under a lease): checked against its "
                        "anchors only")
        rows.append({"host": name, "anchors": checks[name]["anchors"],
                     "newest_seq": checks[name]["newest_seq"],
                     "host_checked": ack is not None, "unchecked_reason": why,
                     "ok": not problems, "problems": problems})
    bad = [r["host"] for r in rows if not r["ok"]]
    unchecked = [r["host"] for r in rows if not r["host_checked"]]
    if as_json:
        click.echo(json.dumps({"hosts": rows, "tampered": bad, "unchecked": unchecked,
                               "ok": not bad and not unchecked}, indent=2, sort_keys=True))
    else:
        _table([[r["host"], str(r["anchors"]), str(r["newest_seq"]),
                 "yes" if r["host_checked"] else f"NO: {r['unchecked_reason']}",
                 "ok" if r["ok"] else _cell("; ".join(r["problems"]), 200)] for r in rows],
               ["HOST", "ANCHORS", "NEWEST_SEQ", "HOST_CHECKED", "RESULT"])
    if bad or unchecked or result["unconfirmed"]:
        sys.exit(1)
