"""A thin, typed, synchronous client for etcd v3's JSON gateway (/v3/...) over HTTPS with
client certificates and etcd users: range, put, delete, txn-create, leases and a streaming
watch. Standard library only (http.client, ssl), so agentctl starts fast and the daemon runs
it on threads of its own, never on the control loop. No privilege; reads the TLS files.

Why not a library: `etcd3` is unmaintained and breaks on current protobuf; `aetcd` brings
grpcio and protobuf (tens of MB, native code) into a root daemon and the CLI for six RPCs;
`etcd3gw` brings requests, futurist and pbr and has no typed surface. The gateway is etcd's
documented interface for clients without gRPC (etcd.io/docs/v3.4/dev-guide/api_grpc_gateway),
and auth over it works since etcd 3.3 ("Authorization: <token>")."""

from __future__ import annotations

import base64
import http.client
import json
import ssl
import threading
import time
from collections.abc import Generator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from supervisor.errors import FleetPermissionDenied, FleetStoreError, FleetStoreUnavailable

EtcdError = FleetStoreError
EtcdUnavailable = FleetStoreUnavailable
EtcdPermissionDenied = FleetPermissionDenied

_INVALID_ARGUMENT = 3  # etcd's "authentication failed, invalid user ID or password"
_PERMISSION_DENIED = 7
_UNAUTHENTICATED = 16
_AUTH_REFUSED = {_INVALID_ARGUMENT, _PERMISSION_DENIED, _UNAUTHENTICATED}


def b64(text: str | bytes) -> str:
    data = text.encode() if isinstance(text, str) else text
    return base64.b64encode(data).decode()


def unb64(text: str) -> str:
    return base64.b64decode(text).decode()


def prefix_end(prefix: str) -> str:
    """The range end that covers every key starting with `prefix`."""
    data = bytearray(prefix.encode())
    data[-1] += 1
    return bytes(data).decode()


@dataclass(frozen=True)
class KeyValue:
    key: str
    value: str
    mod_revision: int
    create_revision: int
    lease: int
    version: int = 1  # how many times the key was written since it was created

    @classmethod
    def from_wire(cls, kv: dict[str, Any]) -> KeyValue:
        return cls(key=unb64(kv["key"]), value=unb64(kv.get("value", "")),
                   mod_revision=int(kv.get("mod_revision", 0)),
                   create_revision=int(kv.get("create_revision", 0)),
                   lease=int(kv.get("lease", 0)), version=int(kv.get("version", 1)))

    def json(self) -> Any:
        return json.loads(self.value)


@dataclass(frozen=True)
class WatchEvent:
    kind: str  # "PUT" or "DELETE"
    kv: KeyValue


@dataclass(frozen=True)
class Credentials:
    """Where to reach etcd and who we are: CA to verify the server, a client certificate
    (etcd --client-cert-auth), and an etcd user whose roles decide what it may touch."""

    endpoints: tuple[str, ...]  # "host:port"
    ca_file: Path
    cert_file: Path
    key_file: Path
    user: str
    password: str

    def context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.ca_file))
        ctx.load_cert_chain(str(self.cert_file), str(self.key_file))
        return ctx


class Token:
    """An etcd auth token shared by the clients of one identity: etcd checks the password
    with bcrypt (costly on a busy server), so a host authenticates once, not per thread."""

    def __init__(self) -> None:
        self.value: str | None = None
        self.lock = threading.Lock()


AUTH_TIMEOUT = 10.0  # bcrypt on a loaded etcd: far slower than a keepalive


class Etcd:
    """One authenticated client. Thread-safe: each call opens its own connection from a small
    pool, so a watch on one thread never waits behind a put on another."""

    def __init__(self, creds: Credentials, timeout: float = 5.0, token: Token | None = None
                 ) -> None:
        self.creds = creds
        self.timeout = timeout
        self._ssl = creds.context()
        self._shared = token or Token()
        self._lock = threading.Lock()
        self._pool: list[http.client.HTTPSConnection] = []
        self._endpoint = 0
        self._watch_refreshed: str | None = None  # the token taken after a watch's refusal

    # ------------------------------------------------------------------ transport

    def _connect(self, timeout: float | None) -> http.client.HTTPSConnection:
        host, _, port = self.creds.endpoints[self._endpoint % len(self.creds.endpoints)]\
            .rpartition(":")
        return http.client.HTTPSConnection(host, int(port), context=self._ssl,
                                           timeout=timeout or self.timeout)

    def _take(self) -> http.client.HTTPSConnection:
        with self._lock:
            if self._pool:
                return self._pool.pop()
        return self._connect(None)

    def _give(self, conn: http.client.HTTPSConnection) -> None:
        with self._lock:
            if len(self._pool) < 4:
                self._pool.append(conn)
                return
        conn.close()

    def __enter__(self) -> Etcd:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, []
        for conn in pool:
            conn.close()

    def _raw(self, path: str, body: dict[str, Any], token: str | None) -> tuple[int, Any]:
        data = json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        if token:
            headers["Authorization"] = token
        for attempt in range(2):  # a pooled connection the server closed: once more, fresh
            conn = self._take()
            try:
                conn.request("POST", path, data, headers)
                response = conn.getresponse()
                payload = response.read()
            except (OSError, http.client.HTTPException) as exc:
                conn.close()
                # The other pooled connections went to the same server: after a restart of
                # etcd each would fail in turn (one retry delay apiece), so none is kept.
                self.close()
                if attempt == 0 and isinstance(exc, (http.client.RemoteDisconnected,
                                                     BrokenPipeError, ConnectionResetError,
                                                     ssl.SSLEOFError)):
                    continue
                self._endpoint += 1
                raise EtcdUnavailable(f"etcd at {self.creds.endpoints} unreachable: {exc}",
                                      path=path) from None
            self._give(conn)
            try:
                return response.status, json.loads(payload or b"{}")
            except ValueError:
                raise EtcdError(f"etcd answered {path} with non-JSON", path=path,
                                status=response.status) from None
        raise EtcdUnavailable("unreachable", path=path)  # pragma: no cover - loop returns

    @property
    def _token(self) -> str | None:
        return self._shared.value

    @_token.setter
    def _token(self, value: str | None) -> None:
        self._shared.value = value

    def _authenticate(self, stale: str | None = None) -> str:
        with self._shared.lock:
            if self._shared.value is not None and self._shared.value != stale:
                return self._shared.value  # another thread authenticated meanwhile
            conn = self._connect(max(self.timeout, AUTH_TIMEOUT))
            try:
                conn.request("POST", "/v3/auth/authenticate", json.dumps(
                    {"name": self.creds.user, "password": self.creds.password}).encode(),
                    {"Content-Type": "application/json"})
                response = conn.getresponse()
                status, body = response.status, json.loads(response.read() or b"{}")
            except (OSError, http.client.HTTPException, ValueError) as exc:
                self._endpoint += 1
                raise EtcdUnavailable(f"etcd at {self.creds.endpoints} unreachable: {exc}",
                                      path="/v3/auth/authenticate") from None
            finally:
                conn.close()
            if status != 200 or "token" not in body:
                if _code(body) not in _AUTH_REFUSED:
                    # etcd starting (its gateway not yet connected: 503, Unavailable) is not
                    # a refusal: a caller that takes a refusal as final (the ack writer)
                    # would drop what it was writing.
                    raise EtcdUnavailable(f"etcd could not authenticate {self.creds.user!r} "
                                          f"yet: {_message(body)}",
                                          path="/v3/auth/authenticate", status=status)
                raise EtcdPermissionDenied(f"etcd refused the credentials of user "
                                           f"{self.creds.user!r}: {_message(body)}",
                                           user=self.creds.user)
            self._shared.value = str(body["token"])
            return self._shared.value

    def call(self, path: str, body: dict[str, Any]) -> Any:
        token = self._token or self._authenticate()
        status, answer = self._raw(path, body, token)
        if status != 200 and _code(answer) == _UNAUTHENTICATED:
            status, answer = self._raw(path, body, self._authenticate(stale=token))
        if status != 200:
            if _code(answer) == _PERMISSION_DENIED:
                raise EtcdPermissionDenied(
                    f"etcd denied {self.creds.user!r} on {path}: {_message(answer)}",
                    user=self.creds.user, path=path)
            raise EtcdError(f"etcd {path}: {_message(answer)}", path=path, status=status,
                            grpc_code=_code(answer))
        return answer

    # ------------------------------------------------------------------ kv

    def get_prefix(self, prefix: str, keys_only: bool = False, revision: int = 0
                   ) -> tuple[list[KeyValue], int]:
        """Every key under `prefix` (with empty values if `keys_only`; as they were at
        `revision` if given), and the store's revision the read saw."""
        body: dict[str, Any] = {"key": b64(prefix), "range_end": b64(prefix_end(prefix))}
        if keys_only:
            body["keys_only"] = True
        if revision:
            body["revision"] = str(revision)
        answer = self.call("/v3/kv/range", body)
        kvs = [KeyValue.from_wire(kv) for kv in answer.get("kvs", [])]
        return kvs, int(answer["header"]["revision"])

    def get(self, key: str) -> KeyValue | None:
        answer = self.call("/v3/kv/range", {"key": b64(key)})
        kvs = answer.get("kvs", [])
        return KeyValue.from_wire(kvs[0]) if kvs else None

    def put(self, key: str, value: str, lease: int = 0) -> int:
        body: dict[str, Any] = {"key": b64(key), "value": b64(value)}
        if lease:
            body["lease"] = str(lease)
        answer = self.call("/v3/kv/put", body)
        return int(answer["header"]["revision"])

    def put_many(self, items: dict[str, str]) -> int:
        """Every key in one transaction: all or none."""
        answer = self.call("/v3/kv/txn", {"success": [
            {"request_put": {"key": b64(k), "value": b64(v)}} for k, v in items.items()]})
        return int(answer["header"]["revision"])

    def txn(self, puts: dict[str, str], deletes: list[str]) -> int:
        """Puts and deletes in one transaction: all or none."""
        ops: list[dict[str, Any]] = [{"request_put": {"key": b64(k), "value": b64(v)}}
                                     for k, v in puts.items()]
        ops += [{"request_delete_range": {"key": b64(k)}} for k in deletes]
        answer = self.call("/v3/kv/txn", {"success": ops})
        return int(answer["header"]["revision"])

    def create(self, key: str, value: str) -> bool:
        """Put `key` only if it does not exist; False if it did (nothing written)."""
        answer = self.call("/v3/kv/txn", {
            "compare": [{"key": b64(key), "target": "CREATE", "result": "EQUAL",
                         "create_revision": "0"}],
            "success": [{"request_put": {"key": b64(key), "value": b64(value)}}]})
        return bool(answer.get("succeeded", False))

    def delete(self, key: str) -> int:
        answer = self.call("/v3/kv/deleterange", {"key": b64(key)})
        return int(answer.get("deleted", 0))

    def delete_prefix(self, prefix: str) -> int:
        answer = self.call("/v3/kv/deleterange", {"key": b64(prefix),
                                                  "range_end": b64(prefix_end(prefix))})
        return int(answer.get("deleted", 0))

    # ------------------------------------------------------------------ leases

    def grant(self, ttl: int) -> int:
        answer = self.call("/v3/lease/grant", {"TTL": str(ttl)})
        return int(answer["ID"])

    def keepalive(self, lease: int) -> int:
        """One keepalive; the remaining TTL (0 or less: the lease is gone)."""
        answer = self.call("/v3/lease/keepalive", {"ID": str(lease)})
        result = answer.get("result", answer)
        return int(result.get("TTL", 0))

    def lease_ttl(self, lease: int) -> tuple[int, int]:
        """(remaining, granted) seconds of a lease (LeaseTimeToLive); remaining -1: gone."""
        answer = self.call("/v3/lease/timetolive", {"ID": str(lease)})
        return int(answer.get("TTL", -1)), int(answer.get("grantedTTL", 0))

    def revoke(self, lease: int) -> None:
        self.call("/v3/lease/revoke", {"ID": str(lease)})

    # ------------------------------------------------------------------ watch

    def watch(self, prefix: str, start_revision: int, timeout: float,
              deadline: float | None = None
              ) -> Generator[tuple[int, list[WatchEvent]], None, None]:
        """Events under `prefix` from `start_revision` on, as (revision, events), until the
        stream ends, nothing arrives for `timeout` seconds (etcd sends progress notifies
        only when asked, so the caller re-reads and re-watches on each return), or the
        `deadline` (time.monotonic()) passes, however busy the stream is."""
        token = self._token or self._authenticate()
        conn = self._connect(timeout if deadline is None
                             else max(0.01, min(timeout, deadline - time.monotonic())))
        body = {"create_request": {"key": b64(prefix), "range_end": b64(prefix_end(prefix)),
                                   "start_revision": str(start_revision),
                                   "progress_notify": True}}
        try:
            conn.request("POST", "/v3/watch", json.dumps(body).encode(),
                         {"Content-Type": "application/json", "Authorization": token})
            response = conn.getresponse()
            if response.status != 200:
                answer = json.loads(response.read() or b"{}")
                if _code(answer) == _UNAUTHENTICATED:
                    self._authenticate(stale=token)
                raise EtcdError(f"etcd watch: {_message(answer)}", grpc_code=_code(answer))
            while True:
                if deadline is not None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return
                    if conn.sock is not None:
                        # The idle timeout, cut short by the deadline: a stream that stays
                        # quiet must not hold the caller past it.
                        conn.sock.settimeout(min(timeout, left))
                line = response.readline()
                if not line:
                    return
                if not line.strip():
                    continue
                message = json.loads(line)
                if "error" in message:
                    error = message["error"]
                    if _code(error) == _UNAUTHENTICATED:
                        self._authenticate(stale=token)
                    raise EtcdError(f"etcd watch: {_message(error)}", grpc_code=_code(error))
                result = message.get("result", {})
                if result.get("canceled"):
                    reason = str(result.get("cancel_reason", ""))
                    if "permission denied" in reason:
                        # etcd cancels a watch whose token it no longer knows (it restarted:
                        # simple tokens die with it) as "permission denied", not as
                        # Unauthenticated: a fresh token first, and a refusal only if the
                        # fresh token is refused too.
                        if token == self._watch_refreshed:
                            raise EtcdPermissionDenied(
                                f"etcd denied {self.creds.user!r} a watch on {prefix!r}: "
                                f"{reason}", user=self.creds.user, path="/v3/watch")
                        self._watch_refreshed = self._authenticate(stale=token)
                    elif "invalid auth token" in reason:
                        # The same after etcd's restart, said as Unauthenticated in the cancel
                        # reason: without a fresh token every watch after it was cancelled
                        # alike, and agentctl waited on it until its deadline with every ack
                        # already in the store.
                        self._authenticate(stale=token)
                    raise EtcdError(f"etcd cancelled the watch: {reason}",
                                    compact_revision=result.get("compact_revision"))
                revision = int(result.get("header", {}).get("revision", 0))
                events = [WatchEvent(kind=e.get("type", "PUT"), kv=KeyValue.from_wire(e["kv"]))
                          for e in result.get("events", [])]
                yield revision, events
        except (OSError, http.client.HTTPException, ValueError) as exc:
            if isinstance(exc, TimeoutError):
                return
            raise EtcdUnavailable(f"etcd watch broke: {exc}") from None
        finally:
            conn.close()


def _code(body: Any) -> int:
    # Unary answers carry "code"; an error inside a watch stream carries "grpc_code" (with
    # "http_code"): read as 0 it left a stale token (etcd restarted) in use for ever.
    if isinstance(body, dict):
        return int(body.get("code", body.get("Code", body.get("grpc_code", 0))) or 0)
    return 0


def _message(body: Any) -> str:
    if isinstance(body, dict):
        return str(body.get("message") or body.get("error") or body.get("Error") or body)
    return str(body)
