"""The default seccomp profile: the OCI `linux.seccomp` object the daemon inserts into config.json
(bundle.render_seccomp only adds the listener or turns NOTIFY into ERRNO). Checks the
deny-by-default shape, the escape-class notify list and the allow list."""

from __future__ import annotations

import errno
import json
from collections import defaultdict
from importlib import resources
from pathlib import Path
from typing import Any

import pytest

REPO_PROFILE = Path(__file__).parents[2] / "sandbox_profiles" / "seccomp" / "default.json"

# Syscalls that reach past the sandbox (namespaces, mounts, other processes' memory, kernel
# modules and keyrings, host clock and console). Notified to the daemon, which answers EPERM (and
# EPERM by the filter itself when the daemon has no listener); never allowed.
ESCAPE_CLASS = frozenset({
    "acct", "add_key", "adjtimex", "bpf", "chroot", "clock_settime", "delete_module",
    "finit_module", "fsconfig", "fsmount", "fsopen", "fspick", "init_module", "io_uring_enter",
    "io_uring_register", "io_uring_setup", "ioperm", "iopl", "kexec_file_load", "kexec_load",
    "keyctl", "lookup_dcookie", "mount", "mount_setattr", "move_mount", "name_to_handle_at",
    "open_by_handle_at", "open_tree", "perf_event_open", "pivot_root", "process_vm_readv",
    "process_vm_writev", "ptrace", "quotactl", "reboot", "request_key", "setns", "settimeofday",
    "swapoff", "swapon", "syslog", "umount", "umount2", "unshare", "userfaultfd", "vhangup",
})

COMMON = (
    "read", "write", "openat", "execve", "exit_group", "clone", "wait4", "futex", "epoll_wait",
    "connect",
)

# Address families an agent may open: local sockets, IPv4/6 (its netns has only what the
# profile's network mode gives it), and rtnetlink, which glibc's getaddrinfo reads. Every other
# family (vsock, which reaches the host; packet; AF_ALG's kernel crypto; the rest of netlink) is
# notified: refused and counted. Keys are (family, protocol); None: any protocol.
ALLOWED_SOCKETS = {(1, None), (2, None), (10, None), (16, 0)}
AF_NETLINK = 16
# Values the kernel truncates to an int family: a rule that compares 64 bits must not let
# 0x1_0000_0028 (AF_VSOCK to the kernel) through as "not 40".
HIGH = 1 << 32

# CLONE_NEWNS | CLONE_NEWCGROUP | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWUSER | CLONE_NEWPID
# | CLONE_NEWNET: clone is allowed only when none of these bits is set (moby's filter).
NAMESPACE_FLAGS = (0x00020000, 0x02000000, 0x04000000, 0x08000000, 0x10000000, 0x20000000,
                   0x40000000)
CLONE_NAMESPACE_MASK = 0x7E020000

ALLOW = "SCMP_ACT_ALLOW"
ERRNO = "SCMP_ACT_ERRNO"
NOTIFY = "SCMP_ACT_NOTIFY"

OCI_SECCOMP_KEYS = {"defaultAction", "defaultErrnoRet", "architectures", "flags", "listenerPath",
                    "listenerMetadata", "syscalls"}
OCI_SYSCALL_KEYS = {"names", "action", "errnoRet", "args"}
OCI_ARG_KEYS = {"index", "value", "valueTwo", "op"}


def _profile_text() -> str:
    """The packaged profile (what the daemon loads), or the repository copy when the package is
    not installed."""
    try:
        packaged = resources.files("supervisor.sandbox_profiles") / "seccomp" / "default.json"
        return packaged.read_text(encoding="utf-8")
    except (ModuleNotFoundError, FileNotFoundError, NotADirectoryError):
        return REPO_PROFILE.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def profile() -> dict[str, Any]:
    data = json.loads(_profile_text())
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="module")
def rules(profile: dict[str, Any]) -> list[dict[str, Any]]:
    syscalls = profile["syscalls"]
    assert isinstance(syscalls, list) and syscalls
    return syscalls


def _entries_for(rules: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [rule for rule in rules if name in rule["names"]]


def _allowed(rules: list[dict[str, Any]], name: str) -> bool:
    return any(rule["action"] == ALLOW for rule in _entries_for(rules, name))


def test_is_a_pure_oci_seccomp_object(profile: dict[str, Any], rules: list[dict[str, Any]]) -> None:
    assert set(profile) <= OCI_SECCOMP_KEYS
    for rule in rules:
        assert set(rule) <= OCI_SYSCALL_KEYS, rule
        assert rule["names"], rule
        assert rule["action"] in {ALLOW, ERRNO, NOTIFY}, rule
        # On NOTIFY, errnoRet is what the entry becomes when the daemon has no listener.
        assert ("errnoRet" in rule) == (rule["action"] in {ERRNO, NOTIFY}), rule
        for arg in rule.get("args", []):
            assert set(arg) <= OCI_ARG_KEYS, rule
            assert {"index", "value", "op"} <= set(arg), rule


def test_only_the_native_abi_is_admitted(profile: dict[str, Any]) -> None:
    # i386 (int 0x80, with the socketcall and ipc multiplexers whose arguments live in memory)
    # and x32 are not admitted: the kernel kills a thread that enters through them, so no rule
    # has to be written twice and no multiplexer can carry what a native rule denies.
    assert profile["architectures"] == ["SCMP_ARCH_X86_64"]


def test_no_multiplexer_or_compat_only_entry_is_allowed(rules: list[dict[str, Any]]) -> None:
    allowed = {n for r in rules if r["action"] == ALLOW for n in r["names"]}
    assert not allowed & {"socketcall", "ipc"}


def test_default_action_is_eperm(profile: dict[str, Any]) -> None:
    assert profile["defaultAction"] == ERRNO
    assert profile["defaultErrnoRet"] == errno.EPERM


@pytest.mark.parametrize("name", sorted(ESCAPE_CLASS))
def test_escape_class_syscall_is_notified_and_denied(rules: list[dict[str, Any]], name: str
                                                     ) -> None:
    entries = _entries_for(rules, name)
    assert entries, f"{name} has no explicit entry"
    assert not _allowed(rules, name), f"{name} is in an allow entry"
    assert all(e["action"] == NOTIFY and e["errnoRet"] == errno.EPERM for e in entries), name


def test_notify_entry_is_exactly_the_escape_class(rules: list[dict[str, Any]]) -> None:
    notified = [r for r in rules if r["action"] == NOTIFY and "args" not in r]
    assert len(notified) == 1
    assert set(notified[0]["names"]) == ESCAPE_CLASS
    # The other notified entries are the refused socket families.
    conditional = {n for r in rules if r["action"] == NOTIFY and "args" in r for n in r["names"]}
    assert conditional == {"socket", "socketpair"}
    # No other EPERM entry: an escape-class name would be denied without being reported.
    assert not [r for r in rules if r["action"] == ERRNO and r["errnoRet"] == errno.EPERM]


def test_notify_is_never_the_default_nor_on_what_runc_needs(profile: dict[str, Any],
                                                          rules: list[dict[str, Any]]) -> None:
    # runc writes the notify fd to its parent after loading the filter: a notified write would
    # hang the container's init (runc refuses it), and read/close would wait on the daemon.
    assert profile["defaultAction"] != NOTIFY
    notified = {n for r in rules if r["action"] == NOTIFY for n in r["names"]}
    assert not notified & {"write", "read", "close", "execve", "exit", "exit_group"}


def test_the_profile_names_no_listener(profile: dict[str, Any]) -> None:
    # The daemon inserts its own listener socket; a profile never chooses where fds go.
    assert "listenerPath" not in profile and "listenerMetadata" not in profile


def test_clone3_returns_enosys(rules: list[dict[str, Any]]) -> None:
    # ENOSYS, not EPERM: glibc falls back to clone only on ENOSYS (fork, pthread_create).
    entries = _entries_for(rules, "clone3")
    assert entries == [{"names": ["clone3"], "action": ERRNO, "errnoRet": errno.ENOSYS}]


def test_clone_is_allowed_only_without_namespace_flags(rules: list[dict[str, Any]]) -> None:
    mask = 0
    for flag in NAMESPACE_FLAGS:
        mask |= flag
    assert mask == CLONE_NAMESPACE_MASK
    entries = _entries_for(rules, "clone")
    assert entries == [{
        "names": ["clone"],
        "action": ALLOW,
        "args": [{"index": 0, "value": CLONE_NAMESPACE_MASK, "valueTwo": 0,
                  "op": "SCMP_CMP_MASKED_EQ"}],
    }]


def test_personality_is_only_allowed_for_moby_values(rules: list[dict[str, Any]]) -> None:
    entries = _entries_for(rules, "personality")
    assert entries
    values = set()
    for entry in entries:
        assert entry["names"] == ["personality"] and entry["action"] == ALLOW
        [arg] = entry["args"]
        assert arg["index"] == 0 and arg["op"] == "SCMP_CMP_EQ"
        values.add(arg["value"])
    # PER_LINUX, PER_LINUX32, UNAME26, UNAME26 | PER_LINUX32, and 0xffffffff (query).
    assert values == {0x0, 0x8, 0x20000, 0x20008, 0xFFFFFFFF}


def test_no_name_appears_twice(rules: list[dict[str, Any]]) -> None:
    seen: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for rule in rules:
        assert len(rule["names"]) == len(set(rule["names"])), rule["names"]
        for name in rule["names"]:
            seen[name].append(rule)
    for name, entries in seen.items():
        if len(entries) == 1:
            continue
        # Only alternatives of one argument filter may repeat a name (an entry's args are
        # ANDed, so "personality(x) or personality(y)" needs two entries with the same action).
        assert all(e.get("args") and len(e["names"]) == 1 for e in entries), name
        if name not in ("socket", "socketpair"):  # a partition, checked below
            assert len({e["action"] for e in entries}) == 1, name


def test_names_are_sorted(rules: list[dict[str, Any]]) -> None:
    for rule in rules:
        assert rule["names"] == sorted(rule["names"])


@pytest.mark.parametrize("name", COMMON)
def test_common_syscall_is_allowed(rules: list[dict[str, Any]], name: str) -> None:
    assert _allowed(rules, name)
    assert all(e["action"] == ALLOW for e in _entries_for(rules, name))


def _matches(rule: dict[str, Any], args: tuple[int, ...]) -> bool:
    """libseccomp's comparison on x86_64: every arg of an entry, on all 64 bits, unsigned."""
    for arg in rule.get("args", []):
        value, datum = arg["value"], args[arg["index"]]
        op = arg["op"]
        if op == "SCMP_CMP_EQ":
            ok = datum == value
        elif op == "SCMP_CMP_NE":
            ok = datum != value
        elif op == "SCMP_CMP_GT":
            ok = datum > value
        elif op == "SCMP_CMP_MASKED_EQ":
            ok = datum & value == arg["valueTwo"]
        else:
            raise AssertionError(f"comparison {op} not modelled")
        if not ok:
            return False
    return True


def _socket_probes() -> list[tuple[int, int]]:
    families = [*range(0, 64), 255, 0xFFFFFFFF, (1 << 64) - 1]
    families += [HIGH | f for f in (1, 2, 10, 16, 40)]
    protocols = [0, 1, 4, 15, HIGH]
    return [(f, p) for f in families for p in protocols]


@pytest.mark.parametrize("name", ["socket", "socketpair"])
def test_socket_families_are_a_partition_allowing_only_what_agents_need(
        rules: list[dict[str, Any]], name: str) -> None:
    entries = _entries_for(rules, name)
    for family, protocol in _socket_probes():
        args = (family, 1, protocol, 0, 0, 0)
        actions = [e["action"] for e in entries if _matches(e, args)]
        # Exactly one entry decides each call: overlapping entries would leave the choice to
        # libseccomp, and no entry would leave it to the default (refused, but not counted).
        assert len(actions) == 1, (name, hex(family), protocol, actions)
        if name == "socketpair":
            expected = family == 1
        else:
            expected = (family, None) in ALLOWED_SOCKETS or (family, protocol) in ALLOWED_SOCKETS
        assert (actions[0] == ALLOW) == expected, (name, hex(family), protocol)
        assert actions[0] in (ALLOW, NOTIFY)


def test_vsock_is_refused_and_counted(rules: list[dict[str, Any]]) -> None:
    for family in (40, HIGH | 40):
        decided = [e for e in _entries_for(rules, "socket") if _matches(e, (family, 1, 0, 0, 0, 0))]
        assert [e["action"] for e in decided] == [NOTIFY]
