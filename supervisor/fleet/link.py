"""A host's link to the fleet store, on threads of its own so etcd never blocks the control
loop or the kill path: the keeper (lease, registration, keepalive, lease loss and return),
the watcher (control/ from the last applied revision, re-read every reread_interval as a safety
net against lost watch events) and the writer (acks, anchors and reports, in a bounded queue,
retried until the store takes them). What it learns reaches the loop only through
`loop.call_soon_threadsafe`. Needs read access to the TLS files and the password file."""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from supervisor.errors import FleetPermissionDenied, FleetStoreError
from supervisor.fleet.etcd import Credentials, Etcd, KeyValue, Token
from supervisor.fleet.model import FleetAction, Keys

log = logging.getLogger(__name__)

_NOT_FOUND = 5  # gRPC status etcd gives a put under a lease it no longer has
WRITE_QUEUE_MAX = 1024  # acks and reports waiting for the store; anchors coalesce to one


@dataclass
class Snapshot:
    """What control/ held at `revision`: every action, and the holds still in force."""

    revision: int
    actions: list[tuple[int, FleetAction]] = field(default_factory=list)  # (create rev, action)
    holds: dict[str, FleetAction] = field(default_factory=dict)


@dataclass
class LinkEvents:
    """Callbacks run on the control loop (never on the link's threads)."""

    snapshot: Callable[[Snapshot], None]
    # (create revision, action, perf_counter() when the watch delivered it)
    action: Callable[[int, FleetAction, float], None]
    # (hold id or action, the store's revision of the change)
    hold_lifted: Callable[[str, int], None]
    hold_added: Callable[[FleetAction, int], None]
    lease_lost: Callable[[float], None]
    lease_back: Callable[[float], None]


def parse_control(keys: Keys, kvs: list[KeyValue], revision: int) -> Snapshot:
    snapshot = Snapshot(revision=revision)
    for kv in kvs:
        action = _parse(kv)
        if action is None:
            continue
        if kv.key.startswith(keys.holds):
            snapshot.holds[action.id] = action
        elif kv.key.startswith(keys.actions):
            snapshot.actions.append((kv.create_revision, action))
    snapshot.actions.sort(key=lambda item: item[0])
    return snapshot


def _parse(kv: KeyValue) -> FleetAction | None:
    try:
        return FleetAction.model_validate(kv.json())
    except (ValueError, ValidationError) as exc:
        log.error("fleet: ignoring malformed %s: %s", kv.key, exc)
        return None


class FleetLink:
    def __init__(self, creds: Credentials, keys: Keys, host_id: str, lease_ttl: float,
                 reread_interval: float, loop: asyncio.AbstractEventLoop,
                 events: LinkEvents) -> None:
        self.keys = keys
        self.host_id = host_id
        self.lease_ttl = max(2, round(lease_ttl))
        self.reread_interval = reread_interval
        self.loop = loop
        self.events = events
        # Separate clients: a keepalive never waits behind a slow put, and the keeper's short
        # timeout notices a cut link within the lease.
        token = Token()
        self.reader = Etcd(creds, timeout=5.0, token=token)
        self.writer_client = Etcd(creds, timeout=5.0, token=token)
        self.keeper_client = Etcd(creds, timeout=max(1.0, self.lease_ttl / 3), token=token)
        self._stop = threading.Event()
        self._cond = threading.Condition()
        # (key, value, called on the loop once the store took it or refused it, called on
        # the writer's thread before the put)
        self._writes: collections.deque[tuple[str, str, Callable[[], None] | None,
                                              Callable[[], object] | None]] = \
            collections.deque()
        self._latest: dict[str, str] = {}  # key -> value, coalesced (anchors)
        self._registration: str | None = None
        self._registration_dirty = threading.Event()
        self._threads: list[threading.Thread] = []
        self.revision = 0  # the newest revision the loop has been told about
        self.lease = 0
        self.connected = False
        self.dropped_writes = 0

    # ------------------------------------------------------------------ start and stop

    def read_control(self) -> Snapshot:
        """One read of control/ (blocking; call from a thread)."""
        kvs, revision = self.reader.get_prefix(self.keys.control)
        return parse_control(self.keys, kvs, revision)

    def start(self, revision: int) -> None:
        self.revision = revision
        for name, target in (("keeper", self._keeper), ("watcher", self._watcher),
                             ("writer", self._writer)):
            thread = threading.Thread(target=target, name=f"fleet-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self, timeout: float = 5.0) -> None:
        """Flush what is queued (bounded by `timeout`), revoke the lease, stop the threads."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while (self._writes or self._latest) and time.monotonic() < deadline \
                    and self.connected:
                self._cond.wait(0.05)
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        self._registration_dirty.set()
        if self.lease and self.connected:
            try:
                self.keeper_client.revoke(self.lease)
            except FleetStoreError as exc:
                log.warning("fleet: could not revoke the lease: %s", exc.message)
        for thread in self._threads:
            thread.join(max(0.1, deadline - time.monotonic()))
        for client in (self.reader, self.writer_client, self.keeper_client):
            client.close()

    # ------------------------------------------------------------------ what the loop hands us

    def publish_registration(self, value: str) -> None:
        self._registration = value
        self._registration_dirty.set()

    def write(self, key: str, value: str, done: Callable[[], None] | None = None,
              before: Callable[[], object] | None = None) -> None:
        """Queue a put that must reach the store (an ack, a report); `done` runs on the loop
        once the store has taken it (or refused it for good). `before` runs on the writer's
        thread first, once (an ack waits there for its kill's audit rows: the audit writer's
        commit wakes this thread, not the loop)."""
        with self._cond:
            if len(self._writes) >= WRITE_QUEUE_MAX:
                _key, _value, dropped, _before = self._writes.popleft()
                self.dropped_writes += 1
                if dropped is not None:
                    self._call(dropped)
            self._writes.append((key, value, done, before))
            self._cond.notify_all()

    def write_latest(self, key_slot: str, key: str, value: str) -> None:
        """A write-once key where only the newest matters (the audit head): one per slot
        waits, and a key already in the store is left as it is (anchors are never rewritten,
        so a second write would read as tampering)."""
        with self._cond:
            self._latest[key_slot] = f"{key}\0{value}"
            self._cond.notify_all()

    # ------------------------------------------------------------------ threads

    def _call(self, callback: Callable[..., None], *args: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:  # the loop closed: the daemon is exiting
            self._stop.set()

    def _keeper(self) -> None:
        client = self.keeper_client
        last_ok = time.monotonic()
        last_keepalive = 0.0
        had_lease = False
        lost_at: float | None = None
        while not self._stop.is_set():
            try:
                if not self.lease:
                    self.lease = client.grant(self.lease_ttl)
                    last_keepalive = time.monotonic()
                    self._registration_dirty.set()
                if self._registration_dirty.is_set() and self._registration is not None:
                    self._registration_dirty.clear()
                    client.put(self.keys.registration(self.host_id), self._registration,
                               self.lease)
                # A put under the lease does not renew it: the keepalive goes out on its own
                # schedule however often the registration changes, or a host whose agents
                # change state every second would lose its lease while talking to the store.
                if time.monotonic() - last_keepalive >= self.lease_ttl / 3:
                    if client.keepalive(self.lease) <= 0:
                        self.lease = 0  # expired while we were away: a new one, registered anew
                        continue
                    last_keepalive = time.monotonic()
                last_ok = time.monotonic()
                had_lease = True
                if not self.connected:
                    self.connected = True
                    with self._cond:
                        self._cond.notify_all()
                if lost_at is not None:
                    # Back: re-read control/ before the loop reopens launches.
                    snapshot = self.read_control()
                    self._call(self.events.snapshot, snapshot)
                    self._call(self.events.lease_back, time.monotonic() - lost_at)
                    lost_at = None
            except FleetStoreError as exc:
                self._registration_dirty.set()
                if exc.detail.get("grpc_code") == _NOT_FOUND:
                    # The lease expired in the store (a put under it is refused): a new one.
                    self.lease = 0
                if self.connected or not had_lease:
                    log.warning("fleet: store unreachable: %s", exc.message)
                self.connected = False
                # A lease is lost only once it was held: a host that never reached the store
                # has launched nothing (launches wait for the first read of the holds).
                if had_lease and lost_at is None and time.monotonic() - last_ok > self.lease_ttl:
                    lost_at = last_ok
                    self.lease = 0
                    self._call(self.events.lease_lost, time.monotonic() - last_ok)
                self._stop.wait(0.2)
                continue
            self._registration_dirty.wait(
                max(0.0, last_keepalive + self.lease_ttl / 3 - time.monotonic()))

    def _watcher(self) -> None:
        while not self._stop.is_set():
            try:
                # Read everything, then watch from there: what happened while the watch was
                # down (or lost) is in the read, and the loop applies what it has not yet.
                snapshot = self.read_control()
                self.revision = max(self.revision, snapshot.revision)
                self._call(self.events.snapshot, snapshot)
                for revision, events in self.reader.watch(self.keys.control, self.revision + 1,
                                                          timeout=self.reread_interval):
                    if self._stop.is_set():
                        return
                    seen = time.perf_counter()  # where a fleet kill's time_to_halt starts
                    for event in events:
                        self._event(event.kind, event.kv, seen, revision)
                    if revision > self.revision:
                        self.revision = revision
                # The stream went quiet for reread_interval (or ended): round again.
            except FleetStoreError as exc:
                if exc.detail.get("compact_revision"):
                    self.revision = int(exc.detail["compact_revision"]) - 1
                log.debug("fleet: watch: %s", exc.message)
                self._stop.wait(0.5)

    def _event(self, kind: str, kv: KeyValue, seen: float, revision: int) -> None:
        if kv.key.startswith(self.keys.holds):
            hold_id = kv.key[len(self.keys.holds):]
            changed = kv.mod_revision or revision
            if kind == "DELETE":
                self._call(self.events.hold_lifted, hold_id, changed)
            elif (action := _parse(kv)) is not None:
                self._call(self.events.hold_added, action, changed)
        elif (kv.key.startswith(self.keys.actions) and kind != "DELETE"
              and (action := _parse(kv)) is not None):
            self._call(self.events.action, kv.create_revision, action, seen)

    def _writer(self) -> None:
        client = self.writer_client
        while not self._stop.is_set():
            with self._cond:
                while not (self._writes or self._latest) and not self._stop.is_set():
                    self._cond.wait(1.0)
                if self._stop.is_set() and not self._writes:
                    return
                done: Callable[[], None] | None = None
                before: Callable[[], object] | None = None
                if self._writes:
                    head = self._writes[0]
                    key, value, done, before = head
                    slot = None
                else:
                    slot, packed = next(iter(self._latest.items()))
                    key, _, value = packed.partition("\0")
            if before is not None:
                try:
                    before()
                except Exception:  # the put goes on; what failed is in the log
                    log.exception("fleet: the wait before writing %s failed", key)
                with self._cond:  # once: a put retried after a store error does not wait again
                    if self._writes and self._writes[0] is head:
                        self._writes[0] = head = (key, value, done, None)
            try:
                if slot is None:
                    client.put(key, value)
                else:
                    client.create(key, value)
            except FleetPermissionDenied as exc:
                # Our own keys only; a refusal will not change by retrying, so it must not
                # hold every ack behind it.
                log.error("fleet: the store refused %s: %s", key, exc.message)
            except FleetStoreError as exc:
                log.debug("fleet: write %s: %s", key, exc.message)
                self._stop.wait(0.2)
                continue
            with self._cond:
                if slot is None:
                    if self._writes and self._writes[0][:3] == (key, value, done):
                        self._writes.popleft()
                elif self._latest.get(slot) == f"{key}\0{value}":
                    del self._latest[slot]
                self._cond.notify_all()
            if done is not None:
                self._call(done)
