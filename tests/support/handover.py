"""Fake handover records for the unit tests of a restart's handover: what
supervisor/daemon/handover.py `hand_over` writes, one builder for every test that needs one
(the record's check, its crossing of the watchdog's channel, a gateway run's entry). No I/O."""

from __future__ import annotations

from typing import Any

from supervisor.daemon import handover


def run_entry(run_id: str = "r1", **fields: Any) -> dict[str, Any]:
    """One handed-over run: its output pipe at descriptor index 0 and its seccomp notify fd
    at 1, unless `fields` say otherwise (a gateway run adds "gateway")."""
    entry: dict[str, Any] = {"run_id": run_id, "agent": "a", "container_id": f"as-{run_id}",
                             "pid": 10, "output_fd": 0, "produced": 0, "recorded": 0,
                             "seccomp_fds": [1], "tripwires": []}
    return {**entry, **fields}


def record(*runs: dict[str, Any], **fields: Any) -> dict[str, Any]:
    """A handover record of `runs` (one run_entry() when none are given); `fields` add to or
    replace the record's own keys (version, from_pid, window, socket, ...)."""
    return {"version": handover.VERSION, "from_pid": 1, "runs": list(runs) or [run_entry()],
            **fields}
