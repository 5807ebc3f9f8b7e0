"""The C library, for the few calls Python's os module lacks (unshare, setns, mount, inotify).
Loaded from the running process (dlopen(NULL)) rather than by name: ctypes.util.find_library
runs ldconfig in a subprocess on every call, which every start of the daemon and every embedded
CI run paid once per module. No privilege of its own."""

from __future__ import annotations

import ctypes

libc = ctypes.CDLL(None, use_errno=True)
