"""The host mount table as the daemon reads it, and the mount flags its bind mounts use
(workspace_binds.py makes the binds). Reads /proc; no privilege."""

from __future__ import annotations

import os
from pathlib import Path

MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MNT_DETACH = 2


def is_mountpoint(path: Path) -> bool:
    """From the kernel's mount table: os.path.ismount misses a bind mount whose source is on
    the same file system (same st_dev), which is exactly the workspace case."""
    wanted = os.path.realpath(path)
    with open("/proc/self/mountinfo") as table:
        for line in table:
            mount_point = line.split(" ", 5)[4]
            decoded = mount_point.encode().decode("unicode_escape")  # \040 for spaces etc.
            if decoded == wanted:
                return True
    return False
