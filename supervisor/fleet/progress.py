"""What a host has applied of the fleet's actions: the revision below which every action is
settled (applied, or not for this host), and the ids of the ones applied. The daemon's watch
resumes above that revision and its periodic re-read skips what lies at or below it (holds
excepted), so the revision must never pass an action that was not applied. Pure bookkeeping
on the control loop; no I/O, no privilege.

Why it is not simply "the newest revision seen": the link's threads run ahead of the loop, one
transaction writes several actions at one revision whose events reach the loop one callback at
a time, and the worker applies actions in between those callbacks."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any


class Progress:
    def __init__(self, revision: int = 0, ids: list[str] | None = None,
                 keep: int = 1000) -> None:
        self.revision = revision  # every action created at or below it is settled
        self.applied: OrderedDict[str, None] = OrderedDict.fromkeys(ids or [])
        self.keep = keep
        self.seen = revision  # every action at or below it has been handed to the loop
        self.queued: dict[str, int] = {}  # action id -> the revision that created it
        self.refused: int | None = None  # the oldest revision a full queue turned away

    @classmethod
    def loads(cls, saved: dict[str, Any], keep: int) -> Progress:
        return cls(int(saved.get("revision", 0)), list(saved.get("ids", [])), keep)

    def dumps(self) -> dict[str, Any]:
        return {"revision": self.revision, "ids": list(self.applied)}

    def settled(self, action_id: str) -> bool:
        return action_id in self.applied

    def pending(self, action_id: str) -> bool:
        return action_id in self.queued

    def wanted(self, revision: int, action_id: str) -> bool:
        """An action from the watch: not applied, not queued, and above the settled line."""
        return (action_id not in self.applied and action_id not in self.queued
                and revision > self.revision)

    def saw_event(self, revision: int) -> None:
        # More actions of the same transaction may follow at this very revision.
        self.seen = max(self.seen, revision - 1)

    def saw_read(self, revision: int) -> None:
        """A whole read of control/ at `revision` was handed over: nothing below it is
        missing, and whatever a full queue refused has been offered again."""
        self.seen = max(self.seen, revision)

    def start_read(self) -> None:
        self.refused = None

    def queue(self, action_id: str, revision: int) -> None:
        self.queued[action_id] = revision

    def refuse(self, revision: int) -> None:
        self.refused = revision if self.refused is None else min(self.refused, revision)

    def done(self, action_id: str) -> None:
        self.applied[action_id] = None
        self.queued.pop(action_id, None)
        while len(self.applied) > self.keep:
            self.applied.popitem(last=False)
        self.advance()

    def advance(self) -> None:
        floor = self.seen
        waiting = [*self.queued.values()]
        if self.refused is not None:
            waiting.append(self.refused)
        if waiting:
            floor = min(floor, min(waiting) - 1)
        self.revision = max(self.revision, floor)
