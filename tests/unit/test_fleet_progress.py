"""The settled-revision line of a host's fleet progress (supervisor/fleet/progress.py): it never
passes an action the loop has not applied, whatever order the watch's callbacks and the worker
interleave in. Each case is a sequence the daemon met under load in the fleet tier. No I/O."""

from __future__ import annotations

from supervisor.fleet.progress import Progress


def _offer(progress: Progress, revision: int, action_id: str) -> bool:
    """What FleetMember._on_action does with one event from the watch."""
    wanted = progress.wanted(revision, action_id)
    if wanted:
        progress.queue(action_id, revision)
    progress.saw_event(revision)
    return wanted


def test_two_actions_of_one_transaction_with_the_worker_between_their_events() -> None:
    # `fleet lift --all-holds` writes one lift per hold in one transaction: one revision.
    progress = Progress(revision=100)
    assert _offer(progress, 105, "lift-a")
    progress.done("lift-a")  # the worker ran before the second event's callback
    assert progress.revision < 105
    assert _offer(progress, 105, "lift-b"), "the second action of the transaction was lost"
    progress.done("lift-b")
    assert not progress.wanted(105, "lift-b")


def test_a_read_ahead_of_the_loop_does_not_settle_what_is_still_queued() -> None:
    progress = Progress(revision=10)
    assert _offer(progress, 11, "kill")
    assert _offer(progress, 12, "verify")
    progress.saw_read(40)  # the periodic re-read, at the store's newest revision
    progress.done("kill")
    assert progress.revision == 11  # not 40: verify (12) is still waiting
    # A later re-read must still offer it, and the watch must not resume above it.
    assert progress.pending("verify") and not progress.settled("verify")
    progress.done("verify")
    assert progress.revision == 40


def test_an_action_a_full_queue_refused_stays_below_the_line_until_a_read_offers_it() -> None:
    progress = Progress(revision=5)
    progress.refuse(7)
    progress.saw_event(7)
    assert _offer(progress, 8, "next")
    progress.done("next")
    assert progress.revision == 6  # the refused action (7) is re-read, not skipped
    progress.start_read()
    assert progress.wanted(7, "refused")
    progress.queue("refused", 7)
    progress.saw_read(9)
    progress.done("refused")
    assert progress.revision == 9


def test_what_was_applied_survives_a_restart_and_stays_bounded() -> None:
    progress = Progress(revision=3, keep=2)
    for n, name in enumerate(["a", "b", "c"], start=4):
        _offer(progress, n, name)
        progress.done(name)
    again = Progress.loads(progress.dumps(), keep=2)
    assert again.revision == progress.revision == 5  # "c" (6) may have company at 6
    assert list(again.applied) == ["b", "c"]
    assert not again.wanted(6, "c") and again.wanted(7, "d")
