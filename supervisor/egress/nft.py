"""A run's nftables table: the sandbox's veth may reach the gateway's one address and port on
the host and nothing else. Needs root (CAP_NET_ADMIN in the host's network namespace).

One `table inet <prefix>.<run>` per run, so each run's rules are installed and removed in one
atomic transaction without touching anything else in the ruleset. The python nftables binding
is not available, so this drives the `nft` binary (fork+exec through subprocess, which is fine
for the daemon: the child runs no Python code before exec).

Another table's drop verdict still drops what ours accepts (every base chain on a hook votes),
so a host firewall that drops input by default must let the gateway port through as well."""

from __future__ import annotations

import ipaddress
import json
import re
import subprocess
from typing import Any

from supervisor.errors import EgressSetupFailed
from supervisor.sandbox.childenv import child_env

FAMILY = "inet"
# Before the usual `filter` chains (priority 0) of other tables, so our drops are counted
# here even when a later chain would drop the packet too.
PRIORITY = "filter - 10"
NFT_TIMEOUT = 10.0
_NAME_MAX = 200  # NFT_NAME_MAXLEN is 256
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
_TABLE = re.compile(r"[A-Za-z][A-Za-z0-9_-]*\.[A-Za-z0-9_-]+")  # what table_name makes
_IFNAME = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")


def _clean(part: str) -> str:
    return _UNSAFE.sub("_", part)


def table_name(prefix: str, run_id: str) -> str:
    """`<prefix>.<run_id>` with anything outside [A-Za-z0-9_-] replaced by "_". nft accepts
    "-" and "." inside an unquoted name (quoted names it refuses), and a name with a "." can
    never be mistaken for a keyword. The "." separates the daemon's prefix from the run, so the
    leftovers of daemon "as" never include those of daemon "as-test". An empty run id gives
    the part all of the daemon's tables start with (`tables_with_prefix` takes that too), which
    `install` refuses as a table name."""
    if not prefix or not prefix[0].isascii() or not prefix[0].isalpha():
        raise ValueError(f"table prefix {prefix!r} must start with a letter")
    name = f"{_clean(prefix)}.{_clean(run_id)}"
    if len(name) > _NAME_MAX:
        raise ValueError(f"table name {name[:40]!r}... is longer than {_NAME_MAX} characters")
    return name


def _check_table(table: str) -> None:
    if not _TABLE.fullmatch(table) or len(table) > _NAME_MAX:
        raise ValueError(f"invalid nft table name {table!r}")


def ruleset(table: str, ifname: str, host_ip: ipaddress.IPv4Address, port: int) -> str:
    """The transaction `install` feeds to `nft -f -`. The leading add+delete makes it replace
    a leftover of the same name (a crashed daemon's) instead of appending to it, atomically."""
    _check_table(table)
    if not _IFNAME.fullmatch(ifname):
        raise ValueError(f"invalid interface name {ifname!r}")
    if not 1 <= port <= 65535:
        raise ValueError(f"invalid port {port}")
    address = ipaddress.IPv4Address(host_ip)
    return f"""\
add table {FAMILY} {table}
delete table {FAMILY} {table}
table {FAMILY} {table} {{
    chain input {{
        type filter hook input priority {PRIORITY}; policy accept;
        iifname "{ifname}" ip daddr {address} tcp dport {port} accept
        iifname "{ifname}" counter drop
    }}
    chain forward {{
        type filter hook forward priority {PRIORITY}; policy accept;
        iifname "{ifname}" counter drop
        oifname "{ifname}" counter drop
    }}
}}
"""


def _nft_binary() -> str:
    import shutil  # with the first nft call: a run without a gateway makes none

    found = shutil.which("nft") or shutil.which("nft", path="/usr/sbin:/sbin")
    if found is None:
        raise EgressSetupFailed("nft is not installed (apt-get install nftables)", step="nft")
    return found


def _nft(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    binary = _nft_binary()
    try:
        return subprocess.run([binary, *args], input=stdin, capture_output=True, text=True,
                              timeout=NFT_TIMEOUT, check=False, env=child_env())
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise EgressSetupFailed(f"nft {' '.join(args)}: {exc}", step="nft",
                                args=list(args)) from exc


def install(table: str, ifname: str, host_ip: ipaddress.IPv4Address, port: int) -> None:
    """Install the run's table in one transaction: all of it or none of it."""
    text = ruleset(table, ifname, host_ip, port)
    done = _nft("-f", "-", stdin=text)
    if done.returncode != 0:
        raise EgressSetupFailed(f"nft could not install table {FAMILY} {table}: "
                                f"{done.stderr.strip()}", step="nft_install", table=table,
                                ifname=ifname, stderr=done.stderr.strip())


def _tables() -> list[str]:
    """Names of the inet tables in the ruleset."""
    done = _nft("-j", "list", "tables", FAMILY)
    if done.returncode != 0:
        raise EgressSetupFailed(f"nft could not list tables: {done.stderr.strip()}",
                                step="nft_list", stderr=done.stderr.strip())
    try:
        document: dict[str, Any] = json.loads(done.stdout or '{"nftables": []}')
    except json.JSONDecodeError as exc:
        raise EgressSetupFailed(f"nft -j list tables printed no JSON: {exc}",
                                step="nft_list") from exc
    names: list[str] = []
    for item in document.get("nftables", []):
        entry = item.get("table") if isinstance(item, dict) else None
        if isinstance(entry, dict) and entry.get("family") == FAMILY:
            names.append(str(entry.get("name")))
    return names


def exists(table: str) -> bool:
    return table in _tables()


def tables_with_prefix(prefix: str) -> list[str]:
    """The tables `table_name(prefix, ...)` made, for reconcile after a crash; other tables
    in the ruleset are never listed, so never removed. `prefix` is the daemon's name prefix or
    `table_name(prefix, "")` (the only way to get a value ending in ".", which `_clean` never
    produces)."""
    start = prefix if prefix.endswith(".") else f"{_clean(prefix)}."
    return sorted(name for name in _tables() if name.startswith(start))


def remove(table: str) -> bool:
    """Delete the table and every rule in it; False when it did not exist."""
    _check_table(table)
    if not exists(table):
        return False
    done = _nft("delete", "table", FAMILY, table)
    if done.returncode == 0:
        return True
    if not exists(table):  # removed by someone else in between
        return False
    raise EgressSetupFailed(f"nft could not delete table {FAMILY} {table}: "
                            f"{done.stderr.strip()}", step="nft_remove", table=table,
                            stderr=done.stderr.strip())
