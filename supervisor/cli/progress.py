"""Progress for agentctl verbs that take seconds (stop's grace period, drills): a countdown
redrawn in place on a terminal, one plain line otherwise (logs and pipes stay readable).
Runs the blocking call on the main thread and draws from a daemon thread. No privilege."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from typing import IO, TypeVar

T = TypeVar("T")

_TICK = 0.25  # redraw period; a second-resolution countdown never looks stuck


def run_with_progress(call: Callable[[], T], label: str, seconds: float | None, *,
                      quiet: bool = False, stream: IO[str] | None = None,
                      tty: bool | None = None) -> T:
    """Run `call`, showing `label` with a countdown from `seconds` (or the time elapsed when
    None) on stderr until it returns. `quiet` (e.g. --json) shows nothing."""
    out = sys.stderr if stream is None else stream
    if quiet:
        return call()
    interactive = out.isatty() if tty is None else tty
    if not interactive:
        bound = f" (up to {seconds:g}s)" if seconds is not None else ""
        out.write(f"{label}{bound} ...\n")
        out.flush()
        return call()
    done = threading.Event()
    started = time.monotonic()

    def draw() -> None:
        width = 0
        while not done.wait(_TICK):
            elapsed = time.monotonic() - started
            if seconds is not None and elapsed < seconds:
                text = f"{label}: {seconds - elapsed:4.0f}s left of {seconds:g}s grace"
            elif seconds is not None:
                text = f"{label}: grace over, killing ({elapsed:.0f}s)"
            else:
                text = f"{label}: {elapsed:.0f}s"
            width = max(width, len(text))
            out.write("\r" + text.ljust(width))
            out.flush()
        if width:
            out.write("\r" + " " * width + "\r")
            out.flush()

    drawer = threading.Thread(target=draw, name="agentctl-progress", daemon=True)
    drawer.start()
    try:
        return call()
    finally:
        done.set()
        drawer.join()
