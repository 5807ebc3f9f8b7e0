"""A run's veth link to the host and the private /30 it is addressed from. Needs root
(CAP_NET_ADMIN in the host's network namespace and CAP_SYS_ADMIN for setns).

In network mode `gateway` the run's namespace (made by `supervisor.sandbox.netns`) gets one
veth pair: the host end carries the gateway's address, the peer is `eth0` inside the namespace
with the other address of the /30. There is deliberately no default route inside: the only
destination the sandbox can even address is the connected /30, so anything else fails at once
with ENETUNREACH, and `supervisor.egress.nft` narrows the /30 down to the gateway's one port.

Nothing here forks (see `supervisor.sandbox.netns` for why). Every netlink conversation runs in
a short-lived thread of its own: pyroute2's synchronous IPRoute drives an asyncio loop of its
own and cannot run in a thread whose loop is already running (the daemon's main thread), and
the steps inside the run's namespace need a thread that can setns there and back without
moving any other thread. The functions therefore block briefly and may be called from the
event loop's thread or from an executor alike."""

from __future__ import annotations

import ctypes
import errno
import hashlib
import ipaddress
import os
import socket
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from supervisor.config import parse_egress_pool
from supervisor.errors import EgressSetupFailed
from supervisor.sandbox.libc import libc

NETNS_DIR = Path("/run/netns")
SANDBOX_IFNAME = "eth0"
PREFIXLEN = 30
IFNAME_PREFIX = "asg"
CLONE_NEWNET = 0x40000000
_IFNAMSIZ = 15  # IFNAMSIZ is 16 including the terminating NUL
_libc = libc

T = TypeVar("T")


@dataclass(frozen=True)
class LinkAddresses:
    """One /30: the gateway's address on the host end and eth0's address in the sandbox."""

    host_ip: ipaddress.IPv4Address
    sandbox_ip: ipaddress.IPv4Address
    prefixlen: int = PREFIXLEN

    @property
    def network(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Network(f"{self.host_ip}/{self.prefixlen}", strict=False)

    @classmethod
    def of(cls, network: ipaddress.IPv4Network) -> LinkAddresses:
        return cls(host_ip=network[1], sandbox_ip=network[2], prefixlen=network.prefixlen)


# ----------------------------------------------------------------------------- threads


def _in_thread(name: str, fn: Callable[[], T]) -> T:
    """Run `fn` in a fresh thread and hand back its result or its exception."""
    results: list[T] = []
    errors: list[BaseException] = []

    def target() -> None:
        try:
            results.append(fn())
        except BaseException as exc:
            errors.append(exc)

    worker = threading.Thread(target=target, name=name)
    worker.start()
    worker.join()
    if errors:
        raise errors[0]
    return results[0]


def _setns(fd: int, what: str) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns into {what}: {os.strerror(err)}")


def _inside(netns_fd: int, netns_name: str, fn: Callable[[], T]) -> T:
    """Run `fn` in the namespace `netns_fd` from a thread of its own, which switches back (or,
    failing that, ends: nothing else ever runs in it)."""

    def body() -> T:
        original = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            _setns(netns_fd, f"/run/netns/{netns_name}")
            try:
                return fn()
            finally:
                _setns(original, "the host namespace")
        finally:
            os.close(original)

    return _in_thread(f"egress-{netns_name}", body)


# ----------------------------------------------------------------------------- addresses


def _host_networks() -> set[ipaddress.IPv4Network]:
    """Every IPv4 network assigned to an interface of this (the host's) namespace."""

    def read() -> set[ipaddress.IPv4Network]:
        found: set[ipaddress.IPv4Network] = set()
        with IPRoute() as ipr:
            for msg in ipr.get_addr(family=socket.AF_INET):
                prefixlen = msg["prefixlen"]
                # IFA_ADDRESS is the peer's on point-to-point links; both are taken.
                for attr in ("IFA_LOCAL", "IFA_ADDRESS"):
                    address = msg.get_attr(attr)
                    if address:
                        found.add(ipaddress.IPv4Network(f"{address}/{prefixlen}",
                                                        strict=False))
        return found

    return _in_thread("egress-addrs", read)


class AddressPool:
    """Hands out /30s from `share`, a part of a private CIDR (e.g. "10.213.0.0/16"), the whole
    of it by default. Thread-safe.

    A /30 is free when this pool does not hold it and no interface of the host has an address
    overlapping it, so links a crashed daemon left behind, or another daemon's with the same
    pool, are not handed out again. That check and the assignment are not atomic across
    processes, and a run's gateway listens on its address before its link has it: two
    processes drawing from one network at once could pick the same /30, and the second one's
    gateway would fail to listen. Processes that share a host therefore draw from disjoint
    shares of the pool: a daemon its lower half, each embedded CI run slot a /30 of the upper
    (config.py `pool_share`)."""

    def __init__(self, cidr: str,
                 in_use: Callable[[], set[ipaddress.IPv4Network]] = _host_networks,
                 share: ipaddress.IPv4Network | None = None) -> None:
        self.network = parse_egress_pool(cidr)
        self.share = self.network if share is None else share
        if not self.share.subnet_of(self.network) or self.share.prefixlen > PREFIXLEN:
            raise ValueError(f"{self.share} is not a network of /{PREFIXLEN}s in {self.network}")
        self._in_use = in_use
        self._held: set[ipaddress.IPv4Network] = set()
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"AddressPool({self.share} of {self.network}, held={len(self._held)})"

    def _subnets(self) -> Iterator[ipaddress.IPv4Network]:
        return self.share.subnets(new_prefix=PREFIXLEN)

    def size(self) -> int:
        return 1 << (PREFIXLEN - self.share.prefixlen)

    def allocate(self) -> LinkAddresses:
        with self._lock:
            taken = [n for n in self._in_use() if n.overlaps(self.share)]
            for candidate in self._subnets():
                if candidate in self._held or any(candidate.overlaps(n) for n in taken):
                    continue
                self._held.add(candidate)
                return LinkAddresses.of(candidate)
        what = ("" if self.share == self.network
                else f" ({self.share}, this supervisor's share of it)")
        raise EgressSetupFailed(
            f"egress address pool {self.network}{what} is exhausted: all {self.size()} /30s are "
            "held by this supervisor or overlap addresses of host interfaces",
            step="allocate", pool=str(self.network), share=str(self.share),
            held=len(self._held), host_networks=sorted(str(n) for n in taken))

    def reserve(self, addresses: LinkAddresses) -> bool:
        """Hold the /30 an adopted run's link already has (handed over at a restart);
        False when this pool holds it already (another run of this daemon has it)."""
        with self._lock:
            if addresses.network in self._held:
                return False
            self._held.add(addresses.network)
            return True

    def release(self, addresses: LinkAddresses) -> None:
        with self._lock:
            self._held.discard(addresses.network)


# ----------------------------------------------------------------------------- the link


def host_ifname(container_id: str) -> str:
    """The host end's name: deterministic per run so reconcile can find it, 15 characters."""
    digest = hashlib.blake2b(container_id.encode(), digest_size=6).hexdigest()
    return f"{IFNAME_PREFIX}{digest}"


def _check_ifname(ifname: str) -> None:
    if not ifname or len(ifname) > _IFNAMSIZ or "/" in ifname or any(c.isspace() for c in ifname):
        raise ValueError(f"invalid interface name {ifname!r}")


def IPRoute() -> Any:
    """pyroute2's IPRoute, imported on first use: runs without the gateway never load it."""
    from pyroute2 import IPRoute as _IPRoute
    return _IPRoute()


def _netlink_error() -> type[Exception]:
    from pyroute2 import NetlinkError
    error: type[Exception] = NetlinkError
    return error


def _errno_of(exc: BaseException) -> int | None:
    if "pyroute2" in sys.modules and isinstance(exc, _netlink_error()):
        code: int = getattr(exc, "code", 0)
        return code
    if isinstance(exc, OSError):
        return exc.errno
    return None


def _failed(step: str, ifname: str, exc: BaseException, **detail: Any) -> EgressSetupFailed:
    err = _errno_of(exc)
    reason = f"{errno.errorcode.get(err, err)} ({os.strerror(err)})" if err else repr(exc)
    return EgressSetupFailed(f"egress link {ifname}: {step} failed: {reason}",
                             step=step, errno=err, ifname=ifname, **detail)


def _disable_ipv6(ifname: str) -> None:
    """The link speaks IPv4 only: without an IPv6 link-local address on either end there is no
    second address family to police (nft drops it anyway) and no DAD/RS chatter. Writes the
    sysctl of the calling thread's namespace; a kernel without IPv6 has nothing to disable."""
    path = Path("/proc/sys/net/ipv6/conf") / ifname / "disable_ipv6"
    if not Path("/proc/sys/net/ipv6").exists():
        return
    path.write_text("1")


def _lookup(ipr: Any, ifname: str) -> int:
    indexes: list[int] = ipr.link_lookup(ifname=ifname)
    if not indexes:
        raise OSError(errno.ENODEV, f"no interface {ifname}")
    return indexes[0]


def attach(netns_name: str, ifname: str, addresses: LinkAddresses) -> None:
    """Give the namespace `netns_name` its link to the host; on failure undo what was made.

    The peer is created directly inside the namespace under the name eth0 (IFLA_NET_NS_FD in
    the peer's attributes), so it never exists in the host namespace, not even for a moment
    and not under a name that could collide with a host interface."""
    _check_ifname(ifname)
    detail: dict[str, Any] = {"netns": netns_name, "host_ip": str(addresses.host_ip),
                              "sandbox_ip": str(addresses.sandbox_ip)}
    try:
        netns_fd = os.open(NETNS_DIR / netns_name, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise _failed("open_netns", ifname, exc, **detail) from exc
    try:
        _attach(netns_fd, netns_name, ifname, addresses, detail)
    finally:
        os.close(netns_fd)


def _attach(netns_fd: int, netns_name: str, ifname: str, addresses: LinkAddresses,
            detail: dict[str, Any]) -> None:
    step = "create_veth"

    def create() -> None:
        with IPRoute() as ipr:
            ipr.link("add", ifname=ifname, kind="veth",
                     peer={"ifname": SANDBOX_IFNAME, "net_ns_fd": netns_fd})

    try:
        # EEXIST here means the name is taken (by us or by someone else): nothing was made,
        # so nothing is undone.
        _in_thread(f"egress-{ifname}", create)
    except Exception as exc:
        raise _failed(step, ifname, exc, **detail) from exc

    def host_end() -> None:
        nonlocal step
        with IPRoute() as ipr:
            index = _lookup(ipr, ifname)
            step = "host_disable_ipv6"
            _disable_ipv6(ifname)
            step = "host_address"
            ipr.addr("add", index=index, address=str(addresses.host_ip),
                     prefixlen=addresses.prefixlen)
            step = "host_up"
            ipr.link("set", index=index, state="up")

    def sandbox_end() -> None:
        nonlocal step
        with IPRoute() as ipr:
            step = "sandbox_lookup"
            index = _lookup(ipr, SANDBOX_IFNAME)
            step = "sandbox_disable_ipv6"
            _disable_ipv6(SANDBOX_IFNAME)
            step = "sandbox_address"
            # Only the connected /30 route comes with this; no default route is ever added.
            ipr.addr("add", index=index, address=str(addresses.sandbox_ip),
                     prefixlen=addresses.prefixlen)
            step = "sandbox_up"
            ipr.link("set", index=index, state="up")

    try:
        step = "host_lookup"
        _in_thread(f"egress-{ifname}", host_end)
        step = "enter_netns"
        _inside(netns_fd, netns_name, sandbox_end)
    except Exception as exc:
        failure = _failed(step, ifname, exc, **detail)
        try:
            detach(ifname)  # the peer goes with it
        except Exception as undo_exc:
            failure.detail["undo_error"] = repr(undo_exc)
        raise failure from exc


def set_up(ifname: str, up: bool) -> None:
    """Pause (down) or resume (up) the link from the host end: down takes the carrier away
    from eth0 inside, so the sandbox cannot send anything; the agent cannot bring it back,
    having no CAP_NET_ADMIN over either namespace."""
    _check_ifname(ifname)

    def change() -> None:
        with IPRoute() as ipr:
            ipr.link("set", index=_lookup(ipr, ifname), state="up" if up else "down")

    try:
        _in_thread(f"egress-{ifname}", change)
    except Exception as exc:
        raise _failed("link_up" if up else "link_down", ifname, exc) from exc


def detach(ifname: str) -> bool:
    """Delete the host end (the kernel deletes the peer with it); False when it did not
    exist."""
    _check_ifname(ifname)

    def delete() -> bool:
        with IPRoute() as ipr:
            indexes = ipr.link_lookup(ifname=ifname)
            if not indexes:
                return False
            try:
                ipr.link("del", index=indexes[0])
            except _netlink_error() as exc:
                if getattr(exc, "code", None) == errno.ENODEV:  # deleted by someone else in between
                    return False
                raise
            return True

    try:
        return _in_thread(f"egress-{ifname}", delete)
    except Exception as exc:
        raise _failed("delete", ifname, exc) from exc


def exists(ifname: str) -> bool:
    _check_ifname(ifname)

    def lookup() -> bool:
        with IPRoute() as ipr:
            return bool(ipr.link_lookup(ifname=ifname))

    return _in_thread(f"egress-{ifname}", lookup)


def counters(ifname: str) -> tuple[int, int]:
    """(bytes, packets) the run's link carried both ways, from the host end's statistics in
    sysfs (no netlink round trip: the telemetry sampler reads this at 10 Hz)."""
    _check_ifname(ifname)
    stats = f"/sys/class/net/{ifname}/statistics"
    values = []
    for name in ("rx_bytes", "tx_bytes", "rx_packets", "tx_packets"):
        with open(f"{stats}/{name}", "rb") as handle:
            values.append(int(handle.read()))
    return values[0] + values[1], values[2] + values[3]
