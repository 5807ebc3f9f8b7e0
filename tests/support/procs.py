"""Processes of a run, read from /proc, for the tests that check a restart or a stop left them
alive or dead: the run's init and its direct children (the processes that last, where the
agent's own short-lived children come and go), and which of a list still exist."""

from __future__ import annotations

from pathlib import Path


def alive(pids: list[int]) -> list[int]:
    return [p for p in pids if Path(f"/proc/{p}").exists()]


def lasting(init: int) -> list[int]:
    """The run's init (tini) and its direct children; [] once the init is gone."""
    try:
        children = Path(f"/proc/{init}/task/{init}/children").read_text().split()
    except OSError:
        return []
    return [init, *map(int, children)]
