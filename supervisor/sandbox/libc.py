"""The C library, for the few calls Python's os module lacks (unshare, setns, mount, inotify).
Loaded from the running process (dlopen(NULL)) rather than by name: ctypes.util.find_library
runs ldconfig in a subprocess on every call, which every start of the daemon and every embedded
CI run paid once per module. No privilege of its own."""

from __future__ import annotations

import ctypes
import os

libc = ctypes.CDLL(None, use_errno=True)

_PR_SET_CHILD_SUBREAPER = 36


def set_child_subreaper() -> None:
    """prctl(PR_SET_CHILD_SUBREAPER, 1): orphaned descendants are re-parented to this process.
    Here rather than through pyprctl, whose import (its capability tables) cost an embedded CI
    run more than the rest of the sandbox's ctypes calls together."""
    if libc.prctl(_PR_SET_CHILD_SUBREAPER, ctypes.c_ulong(1), ctypes.c_ulong(0),
                  ctypes.c_ulong(0), ctypes.c_ulong(0)) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"prctl(PR_SET_CHILD_SUBREAPER): {os.strerror(errno)}")
