"""Which slot an embedded run claims (ci/runner.py claim_slot, left_slots): a slot whose
directory its state root still holds (a run of that state root killed before its teardown)
first, so that the next run of the state root reaps it; else the lowest free one."""

from __future__ import annotations

import os
from pathlib import Path

from supervisor.ci.runner import claim_slot, left_slots


def test_a_run_takes_first_the_slots_its_state_root_left(tmp_path: Path) -> None:
    locks, root = tmp_path / "locks", tmp_path / "state"
    for name in ("slot7", "slot2", "slotx", "slot-1", "quarantine"):
        (root / name).mkdir(parents=True)
    assert left_slots(root) == [2, 7]
    held: list[int] = []
    try:
        claimed = []
        for _ in range(3):
            slot, fd = claim_slot(locks, left_slots(root))
            held.append(fd)
            claimed.append(slot)
        # 2 and 7 first; with both taken (a run of the state root still going), the lowest free.
        assert claimed == [2, 7, 0]
        os.close(held.pop(0))  # slot 2's run ends
        slot, fd = claim_slot(locks, left_slots(root))
        held.append(fd)
        assert slot == 2
    finally:
        for fd in held:
            os.close(fd)


def test_without_a_left_slot_the_lowest_free_one(tmp_path: Path) -> None:
    assert left_slots(tmp_path / "missing") == []
    slot, fd = claim_slot(tmp_path / "locks", left_slots(tmp_path / "missing"))
    os.close(fd)
    assert slot == 0
