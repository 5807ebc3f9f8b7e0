"""The seccomp user-notification constants and syscall table (supervisor/sandbox/seccomp_notify.py)
against the kernel ABI and libseccomp. No privilege (libseccomp is loaded, nothing installed)."""

from __future__ import annotations

import ctypes
import ctypes.util
import json
from pathlib import Path

import pytest

from supervisor.sandbox import seccomp_notify
from supervisor.sandbox.seccomp_notify import (
    AUDIT_ARCH_I386,
    AUDIT_ARCH_X86_64,
    SECCOMP_IOCTL_NOTIF_RECV,
    SECCOMP_IOCTL_NOTIF_SEND,
    syscall_name,
    unsupported_reason,
)
from tests.conftest import require

PROFILE = Path(__file__).parents[2] / "sandbox_profiles" / "seccomp" / "default.json"


def _iowr(kind: str, nr: int, size: int) -> int:
    return (3 << 30) | (size << 16) | (ord(kind) << 8) | nr


def _notified_names() -> set[str]:
    rules = json.loads(PROFILE.read_text())["syscalls"]
    return {n for r in rules if r["action"] == "SCMP_ACT_NOTIFY" for n in r["names"]}


def test_structs_and_ioctls_match_the_kernel_abi() -> None:
    # struct seccomp_notif is 80 bytes (8 + 4 + 4 + struct seccomp_data 64) and
    # struct seccomp_notif_resp 24 (8 + 8 + 4 + 4): the sizes are encoded in the ioctl numbers.
    assert seccomp_notify._NOTIF.size == 80
    assert seccomp_notify._RESP.size == 24
    assert _iowr("!", 0, 80) == SECCOMP_IOCTL_NOTIF_RECV == 0xC0502100
    assert _iowr("!", 1, 24) == SECCOMP_IOCTL_NOTIF_SEND == 0xC0182101


def test_every_notified_syscall_has_a_name_on_x86_64() -> None:
    names = {syscall_name(AUDIT_ARCH_X86_64, nr) for nr in seccomp_notify._X86_64.values()}
    assert names == _notified_names() - {"umount"}  # umount is umount2 on x86_64


def test_unknown_numbers_are_reported_by_number() -> None:
    assert syscall_name(AUDIT_ARCH_X86_64, 0) == "nr 0"  # read: never notified
    assert syscall_name(0xC00000B7, 272) == "nr 272"  # aarch64: no table
    assert syscall_name(AUDIT_ARCH_I386, 310) == "unshare"
    assert syscall_name(AUDIT_ARCH_X86_64, 0x40000000 | 521) == "ptrace"  # x32


@pytest.mark.parametrize(("arch", "table"), [
    ("x86_64", seccomp_notify._X86_64),
    ("x86", seccomp_notify._I386),
    ("x32", seccomp_notify._X32),
])
def test_tables_agree_with_libseccomp(arch: str, table: dict[str, int]) -> None:
    path = ctypes.util.find_library("seccomp")
    require(path is not None, "needs libseccomp (apt-get install libseccomp2)")
    assert path is not None
    lib = ctypes.CDLL(path)
    lib.seccomp_arch_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_arch_resolve_name.restype = ctypes.c_uint32
    lib.seccomp_syscall_resolve_name_arch.argtypes = [ctypes.c_uint32, ctypes.c_char_p]
    lib.seccomp_syscall_resolve_name_arch.restype = ctypes.c_int
    token = lib.seccomp_arch_resolve_name(arch.encode())
    resolved = {}
    for name in _notified_names():
        nr = lib.seccomp_syscall_resolve_name_arch(token, name.encode())
        if nr >= 0:  # negative: a pseudo-number, the syscall does not exist on this arch
            resolved[name] = nr & ~0x40000000 if arch == "x32" else nr
    assert table == resolved


@pytest.mark.parametrize(("release", "supported"), [
    ("6.18.44-fc-v657", True), ("5.10.0-28-amd64", True), ("5.8.0", True),
    ("5.6.19", False), ("5.4.0-150-generic", False), ("4.19.0-26-amd64", False),
    ("weird", False),
])
def test_kernel_support(release: str, supported: bool) -> None:
    assert (unsupported_reason(release) is None) is supported
