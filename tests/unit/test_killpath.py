"""The kill path (supervisor/daemon/killpath.py) over fakes of its three collaborators: each
step happens, in order, and no failing step stops the ones after it. Then the arbiter's use of
it: a scoped halt in one sweep, the parent's single write, a second kill of a killed agent whose
run is alive, step 6 after the answer. No root."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from supervisor.api.client import Client
from supervisor.config import KillSection
from supervisor.daemon import ending, killpath
from supervisor.daemon.killpath import HaltReport, RevocationCheck, RunKill, sweep
from supervisor.daemon.observers import RunObservers
from supervisor.errors import IllegalTransition, KillUnconfirmed
from supervisor.models import ActionRequest, RunRequest, Scope
from supervisor.runtime.fake import FakeRuntime
from supervisor.states import EndCause
from tests.unit.conftest import ALICE, WAIT, ArbiterEnv, MakeEnv, ServeFactory


class Journal:
    """One ordered record of what every collaborator was asked to do."""

    def __init__(self) -> None:
        self.steps: list[str] = []


class FakeCredentials:
    def __init__(self, journal: Journal, fail: bool = False) -> None:
        self.journal = journal
        self.fail = fail
        self.revoked: set[str] = set()

    async def revoke(self, run_id: str) -> bool:
        self.journal.steps.append(f"revoke {run_id}")
        if self.fail:
            raise RuntimeError("gateway unreachable")
        self.revoked.add(run_id)
        return True

    def revocation_check(self, run_id: str) -> RevocationCheck | None:
        return None


class FakeCgroup:
    """A cgroup with `processes` in it; `kill_fails` makes the cgroup.kill write fail like a
    full descriptor table would; `stubborn` survives that many kills of any kind."""

    def __init__(self, journal: Journal, name: str, processes: int = 3, *,
                 kill_fails: OSError | None = None, stubborn: int = 0) -> None:
        self.journal = journal
        self.name = name
        self.processes = processes
        self.kill_fails = kill_fails
        self.stubborn = stubborn
        self.waits = 0

    def _die(self) -> None:
        if self.stubborn:
            self.stubborn -= 1
        else:
            self.processes = 0

    def kill(self, *, force_fallback: bool = False) -> str:
        if force_fallback:
            return self.kill_fallback()
        self.journal.steps.append(f"cgroup.kill {self.name}")
        if self.kill_fails is not None:
            raise self.kill_fails
        self._die()
        return "cgroup.kill"

    def kill_fallback(self) -> str:
        self.journal.steps.append(f"fallback {self.name}")
        self._die()
        return "freeze+sigkill"

    def wait_empty(self, timeout: float) -> bool:
        self.waits += 1
        self.journal.steps.append(f"confirm {self.name}")
        return self.processes == 0

    def pids(self) -> list[int]:
        return list(range(self.processes))

    # As a parent (killpath.ParentCgroup): `removed`, its directory was removed since hold().
    removed = False

    def stale(self) -> bool:
        return self.removed

    def hold(self) -> FakeCgroup:
        self.removed = False
        return self

    def release(self) -> None:
        pass


class FakeNetwork:
    def __init__(self, journal: Journal, name: str, fail: bool = False) -> None:
        self.journal = journal
        self.name = name
        self.fail = fail

    def teardown_network(self) -> bool:
        self.journal.steps.append(f"network {self.name}")
        if self.fail:
            raise OSError(errno.EBUSY, "netns busy")
        return True


def run_kill(journal: Journal, name: str, credentials: FakeCredentials | None = None,
             **cgroup: object) -> tuple[RunKill, FakeCgroup]:
    group = FakeCgroup(journal, name, **cgroup)  # type: ignore[arg-type]
    kill = RunKill(name, credentials=credentials or FakeCredentials(journal), cgroup=group,
                   network=FakeNetwork(journal, name), confirm_timeout=0.01)
    return kill, group


def test_the_four_steps_happen_in_order() -> None:
    journal = Journal()
    credentials = FakeCredentials(journal)
    kill, group = run_kill(journal, "r1", credentials)
    report = asyncio.run(kill.halt())
    assert journal.steps == ["revoke r1", "cgroup.kill r1", "confirm r1", "network r1"]
    assert credentials.revoked == {"r1"} and group.processes == 0
    assert (report.credentials_revoked, report.mechanism, report.confirmed,
            report.netns_removed) == (True, "cgroup.kill", True, True)
    assert report.halted_at is not None and not report.errors


def test_a_failed_cgroup_kill_write_falls_back_and_keeps_killing() -> None:
    journal = Journal()
    kill, group = run_kill(journal, "r1", kill_fails=OSError(errno.EMFILE, "too many files"))
    report = asyncio.run(kill.halt())
    assert journal.steps == ["revoke r1", "cgroup.kill r1", "fallback r1", "confirm r1",
                             "network r1"]
    assert group.processes == 0 and report.confirmed
    assert report.mechanism == "freeze+sigkill" and "too many files" in report.errors["kill"]


def test_a_failed_revocation_or_network_teardown_never_stops_the_kill() -> None:
    journal = Journal()
    group = FakeCgroup(journal, "r1")
    kill = RunKill("r1", credentials=FakeCredentials(journal, fail=True), cgroup=group,
                   network=FakeNetwork(journal, "r1", fail=True), confirm_timeout=0.01)
    report = asyncio.run(kill.halt())
    assert journal.steps == ["revoke r1", "cgroup.kill r1", "confirm r1", "network r1"]
    assert group.processes == 0 and report.confirmed
    assert set(report.errors) == {"credentials", "network"}


def test_a_late_confirmation_escalates_then_reports_the_survivors() -> None:
    journal = Journal()
    kill, group = run_kill(journal, "r1", stubborn=2)
    report = asyncio.run(kill.halt())
    assert journal.steps == ["revoke r1", "cgroup.kill r1", "confirm r1", "fallback r1",
                             "confirm r1", "network r1"]
    assert not report.confirmed and report.survivors == [0, 1, 2]
    attempts = asyncio.run(kill.keep_killing())
    assert attempts == 1 and group.processes == 0 and kill.report.confirmed


def test_a_sweep_kills_everything_before_it_confirms_anything() -> None:
    journal = Journal()
    kills = [run_kill(journal, name)[0] for name in ("a", "b", "c")]
    reports = asyncio.run(sweep(kills))
    revokes, rest = journal.steps[:3], journal.steps[3:]
    assert revokes == ["revoke a", "revoke b", "revoke c"]
    assert rest[:3] == ["cgroup.kill a", "cgroup.kill b", "cgroup.kill c"]
    # Steps 4 and 5 of a sweep run side by side, once every run has its SIGKILL.
    assert sorted(rest[3:]) == ["confirm a", "confirm b", "confirm c",
                                "network a", "network b", "network c"]
    assert all(r.confirmed and r.netns_removed for r in reports)


def test_a_sweep_hushes_its_runs_listeners_before_its_first_sigkill() -> None:
    """Nothing of the daemon's may wake on the deaths while the kernel kills: `hush` is
    called once, after the revocations and before any SIGKILL; one that fails never stops
    the kill. A single run's kill hushes nothing."""
    for fail in (False, True):
        journal = Journal()
        kills = [run_kill(journal, name)[0] for name in ("a", "b", "c")]

        def hush(journal: Journal = journal, fail: bool = fail) -> None:
            journal.steps.append("hush")
            if fail:
                raise RuntimeError("listener gone")

        reports = asyncio.run(sweep(kills, hush=hush))
        assert journal.steps[:7] == ["revoke a", "revoke b", "revoke c", "hush",
                                     "cgroup.kill a", "cgroup.kill b", "cgroup.kill c"]
        assert journal.steps.count("hush") == 1
        assert all(r.confirmed and not r.errors for r in reports)

    journal = Journal()
    kill, _group = run_kill(journal, "a")
    [report] = asyncio.run(sweep([kill], hush=lambda: journal.steps.append("hush")))
    assert "hush" not in journal.steps and report.confirmed


def test_a_sweep_hands_its_line_to_its_caller_instead_of_logging_it(
        caplog: pytest.LogCaptureFixture) -> None:
    """Between the confirmation and the audit rows nothing is logged: given `log_line`, a
    sweep appends its line there for the caller to log after the answer; without, it logs
    the line itself."""
    journal = Journal()
    line: list[str] = []
    with caplog.at_level("INFO", logger="supervisor.daemon.killpath"):
        asyncio.run(sweep([run_kill(journal, name)[0] for name in ("a", "b")], log_line=line))
        assert [r for r in caplog.records if "sweep of" in r.getMessage()] == []
        assert len(line) == 1 and line[0].startswith("sweep of 2 runs: ")
        asyncio.run(sweep([run_kill(journal, name)[0] for name in ("c", "d")]))
    assert [r.getMessage()[:16] for r in caplog.records
            if "sweep of" in r.getMessage()] == ["sweep of 2 runs:"]


class HeldCgroup(FakeCgroup):
    """Its kernel confirms only once `emptied` is set: a wait that outlasts the kill's other
    work, as the kernel's does."""

    def __init__(self, journal: Journal, name: str, emptied: threading.Event) -> None:
        super().__init__(journal, name)
        self.emptied = emptied

    def wait_empty(self, timeout: float) -> bool:
        self.waits += 1
        self.journal.steps.append(f"confirm {self.name}")
        return self.emptied.wait(timeout) and self.processes == 0


@pytest.mark.parametrize("names", [("a",), ("a", "b", "c")])
def test_the_work_beside_a_sweep_runs_while_the_kernel_confirms(names: tuple[str, ...]
                                                                 ) -> None:
    """`beside` (the kill's store write of step 1) runs after every SIGKILL and while the
    confirmations wait: here the kernel confirms only once it has run, so a `beside` run
    after the confirmation (or not at all) would leave every run unconfirmed."""
    journal = Journal()
    emptied = threading.Event()
    kills = [RunKill(name, credentials=FakeCredentials(journal),
                     cgroup=HeldCgroup(journal, name, emptied),
                     network=FakeNetwork(journal, name), confirm_timeout=WAIT)
             for name in names]
    ran: list[list[str]] = []

    def beside() -> None:
        ran.append([s for s in journal.steps if s.startswith("cgroup.kill")])
        emptied.set()

    reports = asyncio.run(sweep(kills, beside=beside))
    assert ran == [[f"cgroup.kill {name}" for name in names]], "once, after every SIGKILL"
    assert all(r.confirmed and not r.escalated for r in reports)


def test_the_work_beside_a_sweep_runs_once_with_no_run_and_never_stops_it() -> None:
    calls: list[str] = []
    asyncio.run(sweep([], beside=lambda: calls.append("beside")))
    assert calls == ["beside"]

    journal = Journal()
    kill, group = run_kill(journal, "a")

    def failing() -> None:
        calls.append("failing")
        raise OSError(errno.ENOSPC, "disk full")

    [report] = asyncio.run(sweep([kill], beside=failing))
    assert calls == ["beside", "failing"]
    assert report.confirmed and group.processes == 0 and report.netns_removed


class NotedHeldCgroup(HeldCgroup):
    """A HeldCgroup that notes the thread each wait ran on; `emptied` None: empty at once."""

    def __init__(self, journal: Journal, name: str, emptied: threading.Event | None) -> None:
        super().__init__(journal, name, emptied or threading.Event())
        if emptied is None:
            self.emptied.set()
        self.threads: list[int] = []

    def wait_empty(self, timeout: float) -> bool:
        self.threads.append(threading.get_ident())
        return super().wait_empty(timeout)


def noted_sweep(emptied: threading.Event | None, beside: Callable[[], None] | None = None
                ) -> tuple[list[NotedHeldCgroup], list[HaltReport], int]:
    """A sweep of three runs: their cgroups, their reports and the loop's thread."""
    journal = Journal()
    groups = [NotedHeldCgroup(journal, name, emptied) for name in ("a", "b", "c")]
    kills = [RunKill(group.name, credentials=FakeCredentials(journal), cgroup=group,
                     network=FakeNetwork(journal, group.name), confirm_timeout=WAIT)
             for group in groups]

    async def body() -> tuple[list[HaltReport], int]:
        return await sweep(kills, beside=beside), threading.get_ident()

    reports, loop_thread = asyncio.run(body())
    return groups, reports, loop_thread


def test_a_sweep_the_kernel_confirms_at_once_is_waited_for_in_the_loops_thread() -> None:
    """A class halt the kernel confirms within CONFIRM_ON_LOOP goes from its SIGKILLs to its
    reports without a thread to wake: every run's wait ran in the loop's thread, once."""
    groups, reports, loop_thread = noted_sweep(None)
    assert all(r.confirmed and not r.escalated and r.netns_removed for r in reports)
    assert [group.threads for group in groups] == [[loop_thread]] * 3


def test_a_sweep_the_kernel_is_slow_to_confirm_frees_the_loop_then_confirms() -> None:
    """A kernel slower than CONFIRM_ON_LOOP: the wait leaves the loop's thread after that
    long and goes on on a thread of its own until the kill's deadline, so the loop runs
    other work meanwhile (here the kernel empties the cgroups only once a callback of the
    loop has run: a loop held until the deadline would leave every run unconfirmed), and
    no run is escalated."""
    emptied = threading.Event()
    loop: list[asyncio.AbstractEventLoop] = []

    def beside() -> None:  # after every SIGKILL; what it schedules needs a free loop
        loop.append(asyncio.get_running_loop())
        loop[0].call_soon(emptied.set)

    groups, reports, loop_thread = noted_sweep(emptied, beside)
    assert all(r.confirmed and not r.escalated for r in reports)
    assert [s for s in groups[0].journal.steps if s.startswith("fallback")] == []
    worker = groups[0].threads[-1]
    assert worker != loop_thread
    assert [group.threads for group in groups] == [[loop_thread, worker]] * 3


class GatedNetwork(FakeNetwork):
    """A network whose teardown (on its thread) ends only once `gate` is set."""

    def __init__(self, journal: Journal, name: str, gate: threading.Event) -> None:
        super().__init__(journal, name)
        self.gate = gate

    def teardown_network(self) -> bool:
        assert self.gate.wait(WAIT), "the gate was never opened"
        return super().teardown_network()


def gated_sweep(gate: threading.Event, beside: Callable[[], None], turned: list[bool]
                ) -> tuple[list[HaltReport], list[bool]]:
    """A sweep of three runs the kernel confirms at once, whose networks wait for `gate`;
    its reports and what `turned` held as it returned (before asyncio.run's own turns)."""
    journal = Journal()
    kills = [RunKill(name, credentials=FakeCredentials(journal),
                     cgroup=FakeCgroup(journal, name),
                     network=GatedNetwork(journal, name, gate), confirm_timeout=WAIT)
             for name in ("a", "b", "c")]

    async def body() -> tuple[list[HaltReport], list[bool]]:
        return await sweep(kills, beside=beside), list(turned)

    return asyncio.run(body())


def test_a_sweep_joins_its_networks_in_the_loops_thread_when_they_end_in_time(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The networks' threads outlast the kernel's confirmation but end within what is left
    of CONFIRM_ON_LOOP (here raised, so the test does not race a clock): the sweep joins
    them in the loop's thread and returns without a turn of the loop, so a callback the
    loop was given before the join has not run when the reports are back."""
    monkeypatch.setattr(killpath, "CONFIRM_ON_LOOP", WAIT)
    gate = threading.Event()
    turned: list[bool] = []

    def beside() -> None:  # after every SIGKILL: the teardowns go once this has run
        asyncio.get_running_loop().call_soon(turned.append, True)
        threading.Timer(0.05, gate.set).start()

    reports, at_return = gated_sweep(gate, beside, turned)
    assert all(r.confirmed and r.netns_removed for r in reports)
    assert at_return == [], "the loop turned while the sweep waited for its networks"


def test_a_sweep_whose_networks_outlast_the_loops_wait_frees_the_loop_for_them(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Networks slower than what is left of CONFIRM_ON_LOOP are awaited on the loop: here
    they end only once a callback of the loop has run, so a loop held until they end
    would never see them end."""
    monkeypatch.setattr(killpath, "CONFIRM_ON_LOOP", 0.05)
    gate = threading.Event()

    def beside() -> None:
        asyncio.get_running_loop().call_soon(gate.set)

    reports, _turned = gated_sweep(gate, beside, [])
    assert all(r.confirmed and r.netns_removed and not r.errors for r in reports)


def test_a_sweep_escalates_only_the_run_the_kernel_did_not_empty() -> None:
    """A sweep confirms its runs together; the one still populated at the deadline is
    escalated like a single kill, the others are not touched again."""
    journal = Journal()
    (a, group_a), (b, group_b), (c, group_c) = (
        run_kill(journal, "a"), run_kill(journal, "b", stubborn=1), run_kill(journal, "c"))
    reports = asyncio.run(sweep([a, b, c]))
    assert [s for s in journal.steps if s.startswith("fallback")] == ["fallback b"]
    assert (group_a.waits, group_b.waits, group_c.waits) == (1, 2, 1)
    assert all(r.confirmed for r in reports) and reports[1].escalated == "freeze+sigkill"
    assert reports[0].escalated is None and reports[2].escalated is None


def test_a_sweep_writes_no_cgroup_kill_again_for_a_run_signalled_for_it_already() -> None:
    """A run whose cgroup.kill the owners' acceptor wrote for this kill (`signalled`): its
    processes are dying, so the sweep does not write it again; it confirms it as any run,
    and one the kernel did not empty (a process moved in since) escalates as ever."""
    journal = Journal()
    (a, group_a), (b, group_b), (c, group_c) = (run_kill(journal, name)
                                                for name in ("a", "b", "c"))
    group_a.processes = 0  # what the acceptor's write did
    group_c.processes = 1  # ...and a process moved into c after it
    reports = asyncio.run(sweep([a, b, c], signalled={"a": "cgroup.kill", "c": "cgroup.kill"}))
    kill_steps = [s for s in journal.steps if s.startswith(("cgroup.kill", "fallback"))]
    assert kill_steps == ["cgroup.kill b", "fallback c"]
    assert [s for s in journal.steps if s.startswith("confirm")][:3] == [
        "confirm a", "confirm b", "confirm c"]
    assert all(r.confirmed for r in reports)
    assert [(r.mechanism, r.escalated) for r in reports] == [
        ("cgroup.kill", None), ("cgroup.kill", None), ("cgroup.kill", "freeze+sigkill")]
    assert group_a.processes == group_b.processes == group_c.processes == 0


def test_a_global_sweep_is_one_write_to_the_parent() -> None:
    journal = Journal()
    parent = FakeCgroup(journal, "parent")
    kills, groups = zip(*(run_kill(journal, name) for name in ("a", "b")), strict=True)

    class Parent(FakeCgroup):
        def kill(self, *, force_fallback: bool = False) -> str:
            for group in groups:  # what the kernel does for the subtree
                group.processes = 0
            return super().kill(force_fallback=force_fallback)

    parent = Parent(journal, "parent")
    reports = asyncio.run(sweep(list(kills), parent, frozenset({"a", "b"})))
    kill_steps = [s for s in journal.steps if "kill" in s or "fallback" in s]
    assert kill_steps == ["cgroup.kill parent"], "one write, not one per run"
    assert all(r.confirmed and r.mechanism == "cgroup.kill (parent)" for r in reports)


def test_a_failed_parent_write_falls_back_to_every_run() -> None:
    journal = Journal()
    kills, groups = zip(*(run_kill(journal, name) for name in ("a", "b")), strict=True)
    parent = FakeCgroup(journal, "parent", kill_fails=OSError(errno.EIO, "io"))
    reports = asyncio.run(sweep(list(kills), parent, frozenset({"a", "b"})))
    assert [s for s in journal.steps if s.startswith("cgroup.kill")] == [
        "cgroup.kill parent", "cgroup.kill a", "cgroup.kill b"]
    assert all(r.confirmed for r in reports) and all(g.processes == 0 for g in groups)


def test_a_parent_removed_since_it_was_held_is_passed_over_for_every_run() -> None:
    """Its held files would kill nothing and read empty at once (ENODEV): each run's own
    cgroup.kill, each run's own confirmation."""
    journal = Journal()
    kills, groups = zip(*(run_kill(journal, name) for name in ("a", "b")), strict=True)
    parent = FakeCgroup(journal, "parent")
    parent.removed = True
    reports = asyncio.run(sweep(list(kills), parent, frozenset({"a", "b"})))
    assert [s for s in journal.steps if "kill" in s or "confirm" in s] == [
        "cgroup.kill a", "cgroup.kill b", "confirm a", "confirm b"]
    assert all(r.confirmed and r.mechanism == "cgroup.kill" for r in reports)
    assert all(g.processes == 0 for g in groups)


# ---------------------------------------------------------------------------- in the arbiter


def _request(name: str, agent_class: str = "web") -> RunRequest:
    return RunRequest.model_validate({"name": name, "class": agent_class,
                                      "command": ["/bin/true"]})


def test_a_class_halt_answers_before_the_runtime_cleans_up(env: ArbiterEnv) -> None:
    async def body() -> None:
        arbiter = env.arbiter()
        views = [await arbiter.launch(_request(f"w{i}"), ALICE) for i in range(3)]
        gate = asyncio.Event()
        for view in views:
            handle = env.runtime.handles[view.id]

            async def slow_cleanup(handle: object = handle) -> None:
                await gate.wait()
                handle.cleaned = True  # type: ignore[attr-defined]

            handle.cleanup = slow_cleanup  # type: ignore[method-assign]
        result = await asyncio.wait_for(arbiter.act(
            "kill", ActionRequest(scope=Scope(agent_class="web"), reason="r"), ALICE), WAIT)
        assert [r.new_state for r in result.results] == ["killed"] * 3
        handles = [env.runtime.handles[v.id] for v in views]
        assert all(h.processes == 0 and not h.network for h in handles)
        assert not any(h.cleaned for h in handles), "runtime deletion came before the answer"
        assert all(h.cgroup.kills == ["cgroup.kill"] for h in handles)
        gate.set()
        for view in views:
            await asyncio.wait_for(arbiter.settled(view.id), WAIT)
        assert all(h.cleaned for h in handles)
        runs = [env.store.run(v.id) for v in views]
        assert all(r is not None and r.end_cause == "killed" for r in runs)
        for _ in range(100):  # the scoped halt's cleanup is audited once it is all done
            if any(e.verb == "cleanup" for e in env.audit.list()):
                break
            await asyncio.sleep(0.01)
        [row] = [e for e in env.audit.list() if e.verb == "cleanup"]
        assert (row.scope, row.outcome, row.detail["runs"]) == ("class:web", "ok", 3)
        kills = [e.seq for e in env.audit.list() if e.verb == "kill"]
        assert row.seq > max(kills), "the cleanup is audited after the answer's rows"

    asyncio.run(body())


def test_a_single_agents_kill_answers_before_the_runtime_cleans_up(env: ArbiterEnv) -> None:
    """One agent's kill, as a scoped halt: step 6 (runc delete, bundle) after the answer."""
    async def body() -> None:
        arbiter = env.arbiter()
        view = await arbiter.launch(_request("w0"), ALICE)
        handle = env.runtime.handles[view.id]
        gate = asyncio.Event()

        async def slow_cleanup() -> None:
            await gate.wait()
            handle.cleaned = True

        handle.cleanup = slow_cleanup  # type: ignore[method-assign]
        result = await asyncio.wait_for(arbiter.act(
            "kill", ActionRequest(scope=Scope(agent="w0"), reason="r"), ALICE), WAIT)
        assert [r.new_state for r in result.results] == ["killed"]
        assert handle.processes == 0 and not handle.network
        assert not handle.cleaned, "runtime deletion came before the answer"
        gate.set()
        await asyncio.wait_for(arbiter.settled(view.id), WAIT)
        assert handle.cleaned

    asyncio.run(body())


def test_a_global_halt_writes_the_parent_once(env: ArbiterEnv) -> None:
    async def body() -> None:
        arbiter = env.arbiter()
        views = [await arbiter.launch(_request(f"g{i}"), ALICE) for i in range(3)]
        handles = [env.runtime.handles[v.id] for v in views]
        writes: list[str] = []

        class Parent:
            def kill(self, *, force_fallback: bool = False) -> str:
                writes.append("parent")
                for handle in handles:
                    handle.kill()
                return "cgroup.kill"

            def kill_fallback(self) -> str:
                raise AssertionError("not needed")

            def wait_empty(self, timeout: float) -> bool:
                return True

            def pids(self) -> list[int]:
                return []

            def hold(self) -> object:
                return self

            def release(self) -> None:
                pass

            def stale(self) -> bool:
                return False

        arbiter.parent = Parent()
        arbiter.parent_path = env.config.sandbox.cgroup_parent.strip("/")
        result = await arbiter.act("kill", ActionRequest(scope=Scope(all=True), reason="r"),
                                   ALICE, cause=EndCause.BREAK_GLASS)
        assert writes == ["parent"]
        assert all(h.cgroup.kills == [] and h.processes == 0 for h in handles)
        assert result.global_halt and all(r.new_state == "killed" for r in result.results)
        rows = [e for e in env.audit.list() if e.verb == "kill"]
        assert len(rows) == 3
        assert all(e.detail["mechanism"] == "cgroup.kill (parent)" for e in rows)
        assert all(e.detail["cause"] == "break_glass" for e in rows)
        assert all("request_arrived_at" in e.detail for e in rows)
        for view in views:
            record = env.store.run(view.id)
            assert record is not None and record.end_cause == "break_glass"

    asyncio.run(body())


def test_a_killed_agent_with_a_live_run_can_be_killed_again(make_env: MakeEnv) -> None:
    runtime = FakeRuntime(leave_survivor=True)
    env = make_env(runtime=runtime, kill=KillSection(confirm_timeout=0.2, default_grace=1.0))

    async def body() -> None:
        arbiter = env.arbiter()
        view = await arbiter.launch(_request("s1"), ALICE)
        handle = runtime.handles[view.id]
        kill = ActionRequest(scope=Scope(agent="s1"), reason="again")
        with pytest.raises(KillUnconfirmed):
            await arbiter.act("kill", kill, ALICE)
        assert arbiter.agents["s1"].state == "killed" and view.id in arbiter.live
        runtime.leave_survivor = False
        result = await arbiter.act("kill", kill, ALICE)  # not a 409: the run is alive
        assert result.results[0].new_state == "killed" and handle.processes == 0
        await asyncio.wait_for(arbiter.settled(view.id), WAIT)
        record = env.store.run(view.id)
        assert record is not None and record.state == "killed"
        assert view.id not in arbiter.live
        with pytest.raises(IllegalTransition):  # with no run left, a kill is a 409 again
            await arbiter.act("kill", kill, ALICE)

    asyncio.run(body())


def test_a_failed_cgroup_kill_in_the_arbiter_still_confirms(env: ArbiterEnv) -> None:
    async def body() -> None:
        arbiter = env.arbiter()
        view = await arbiter.launch(_request("f1"), ALICE)
        handle = env.runtime.handles[view.id]
        handle.cgroup.fail_kill = OSError(errno.EMFILE, "Too many open files")
        result = await arbiter.act("kill", ActionRequest(scope=Scope(agent="f1"), reason="r"),
                                   ALICE)
        assert result.results[0].new_state == "killed"
        assert handle.cgroup.kills == ["cgroup.kill failed", "fallback"]
        assert handle.processes == 0
        row = [e for e in env.audit.list() if e.verb == "kill"][-1]
        assert row.outcome == "ok" and row.detail["confirmed_empty"] is True
        assert "Too many open files" in row.detail["errors"]["kill"]

    asyncio.run(body())


def test_the_cgroup_is_held_from_launch_and_released_after_cleanup(env: ArbiterEnv) -> None:
    async def body() -> None:
        arbiter = env.arbiter()
        view = await arbiter.launch(_request("h1"), ALICE)
        handle = env.runtime.handles[view.id]
        assert handle.cgroup.held, "the kill path's files must be open before the agent runs"
        await arbiter.act("kill", ActionRequest(scope=Scope(agent="h1"), reason="r"), ALICE)
        await asyncio.wait_for(arbiter.settled(view.id), WAIT)
        assert not handle.cgroup.held

    asyncio.run(body())


class Background:
    """A `StandsAside` (daemon/observers.py) that notes when it is inside, or fails to enter."""

    def __init__(self, journal: list[str], fail: bool = False) -> None:
        self.journal = journal
        self.fail = fail

    @contextlib.contextmanager
    def stand_aside(self) -> Iterator[None]:
        if self.fail:
            raise RuntimeError("observer bug")
        self.journal.append("aside")
        try:
            yield
        finally:
            self.journal.append("back")


@pytest.mark.parametrize("fail", [False, True])
def test_the_background_stands_aside_from_the_kill_to_its_records(env: ArbiterEnv,
                                                                   fail: bool) -> None:
    """The telemetry sampler's /proc walk stands aside across the whole kill (marks, SIGKILL,
    confirmation, records and audit); one that cannot stand aside never stops the kill."""
    async def body() -> None:
        arbiter = env.arbiter()
        journal: list[str] = []
        arbiter.observers = RunObservers(background=Background(journal, fail))
        views = [await arbiter.launch(_request(f"w{i}"), ALICE) for i in range(2)]
        for view in views:
            cgroup = env.runtime.handles[view.id].cgroup
            kill = cgroup.kill

            def noted_kill(*, force_fallback: bool = False, kill: Any = kill) -> str:
                journal.append("sigkill")
                return str(kill(force_fallback=force_fallback))

            cgroup.kill = noted_kill  # type: ignore[method-assign]
        append = arbiter.audit.append

        def noted_append(**row: Any) -> Any:
            journal.append(f"audit {row['verb']}")
            return append(**row)

        arbiter.audit.append = noted_append  # type: ignore[method-assign]
        result = await asyncio.wait_for(arbiter.act(
            "kill", ActionRequest(scope=Scope(agent_class="web"), reason="r"), ALICE), WAIT)
        assert [r.new_state for r in result.results] == ["killed"] * 2
        during = ["sigkill", "sigkill", "audit kill", "audit kill"]
        assert journal == (during if fail else ["aside", *during, "back"])

    asyncio.run(body())


def test_the_collector_is_off_from_a_kills_start_until_its_answer_is_out(
        env: ArbiterEnv) -> None:
    """No automatic garbage collection inside a kill (a generation-0 one took 0.2-0.3 ms of a
    class halt's loop): off at its SIGKILLs and its audit rows, still off when the action
    returns to a caller that writes the answer itself, on again once the work it left for
    after the answer has run (or at once without such a caller); and left off by a kill if
    it was off before."""
    assert gc.isenabled()

    async def body() -> None:
        arbiter = env.arbiter()
        seen: list[tuple[str, bool]] = []
        views = [await arbiter.launch(_request(f"g{i}"), ALICE) for i in range(2)]
        for view in views:
            cgroup = env.runtime.handles[view.id].cgroup
            kill = cgroup.kill

            def noted_kill(*, force_fallback: bool = False, kill: Any = kill) -> str:
                seen.append(("sigkill", gc.isenabled()))
                return str(kill(force_fallback=force_fallback))

            cgroup.kill = noted_kill  # type: ignore[method-assign]
        append = arbiter.audit.append

        def noted_append(**row: Any) -> Any:
            seen.append((f"audit {row['verb']}", gc.isenabled()))
            return append(**row)

        arbiter.audit.append = noted_append  # type: ignore[method-assign]
        left: list[Callable[[], None]] = []
        result = await asyncio.wait_for(arbiter.act(
            "kill", ActionRequest(scope=Scope(agent_class="web"), reason="r"), ALICE,
            after_answer=left.append), WAIT)
        assert [r.new_state for r in result.results] == ["killed"] * 2
        assert seen == [("sigkill", False)] * 2 + [("audit kill", False)] * 2
        assert left and not gc.isenabled(), "on again before the answer was out"
        for call in left:
            call()
        assert gc.isenabled()
        await arbiter.launch(_request("g8", agent_class="db"), ALICE)
        await asyncio.wait_for(arbiter.act(
            "kill", ActionRequest(scope=Scope(agent="g8"), reason="r"), ALICE), WAIT)
        assert gc.isenabled(), "a kill without a caller of its own: on again at its return"
        gc.disable()
        await arbiter.launch(_request("g9", agent_class="db"), ALICE)
        await asyncio.wait_for(arbiter.act(
            "kill", ActionRequest(scope=Scope(agent="g9"), reason="r"), ALICE), WAIT)
        assert not gc.isenabled(), "a kill turned on a collector that was off before it"

    try:
        asyncio.run(body())
    finally:
        gc.enable()


class HeldLaunchRuntime(FakeRuntime):
    """A runtime whose launches wait for `gate`: a launch in flight for as long as a test
    needs."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = asyncio.Event()
        self.gate = asyncio.Event()

    async def launch(self, params: Any) -> Any:
        self.entered.set()
        await self.gate.wait()
        return await super().launch(params)


def test_the_collector_is_not_held_off_past_its_bound(make_env: MakeEnv,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A kill that waits for a launch in flight held the collector off for as long as the
    launch took (up to 30 s), and kills that overlap one after another for as long as they
    kept coming, while everything the daemon does went on making garbage. Past
    COLLECTOR_HOLD_MAX it is on again although the kill still waits; the kill then ends as
    ever, and the next kill holds it off again."""
    monkeypatch.setattr(ending, "COLLECTOR_HOLD_MAX", 0.05, raising=False)
    assert gc.isenabled()

    async def body() -> None:
        runtime = HeldLaunchRuntime()
        arbiter = make_env(runtime=runtime).arbiter()
        launching = asyncio.create_task(arbiter.launch(_request("h1"), ALICE))
        await asyncio.wait_for(runtime.entered.wait(), WAIT)
        killing = asyncio.create_task(arbiter.act(
            "kill", ActionRequest(scope=Scope(agent="h1"), reason="r"), ALICE))
        while gc.isenabled() and not killing.done():  # the kill takes the collector off
            await asyncio.sleep(0)
        assert not gc.isenabled() and not killing.done()
        while not gc.isenabled() and not killing.done():  # ... and lets go past its bound
            await asyncio.sleep(0.01)
        assert not killing.done(), "the kill ended before its launch did"
        runtime.gate.set()
        result = await asyncio.wait_for(killing, WAIT)
        await asyncio.wait_for(launching, WAIT)
        assert [r.new_state for r in result.results] == ["killed"]
        assert gc.isenabled()
        # A kill after it holds the collector off again, and lets go at its return.
        append = arbiter.audit.append
        seen: list[bool] = []

        def noted_append(**row: Any) -> Any:
            seen.append(gc.isenabled())
            return append(**row)

        arbiter.audit.append = noted_append  # type: ignore[method-assign]
        await arbiter.launch(_request("h2"), ALICE)
        await asyncio.wait_for(arbiter.act(
            "kill", ActionRequest(scope=Scope(agent="h2"), reason="r"), ALICE), WAIT)
        assert False in seen and gc.isenabled()

    try:
        asyncio.run(asyncio.wait_for(body(), WAIT * 2))
    finally:
        gc.enable()


class Seccomp:
    """The seccomp listener as the observers see it: what it was asked, in order."""

    def __init__(self, journal: list[str]) -> None:
        self.journal = journal

    def hush(self, container_ids: list[str]) -> None:
        self.journal.append(f"hush {' '.join(container_ids)}")

    def forget(self, container_id: str) -> None:
        self.journal.append(f"forget {container_id}")


def test_a_scoped_halt_hushes_its_runs_until_after_the_answer(env: ArbiterEnv) -> None:
    """A class halt hushes each run's exit watcher (its handle) and seccomp fds before the
    SIGKILL; the fds are forgotten (closed) with the observers after the answer, and the
    handle catches up at its cleanup. A single agent's kill hushes nothing."""
    async def body() -> None:
        arbiter = env.arbiter()
        journal: list[str] = []
        arbiter.observers = RunObservers(seccomp=Seccomp(journal))
        views = [await arbiter.launch(_request(f"w{i}"), ALICE) for i in range(2)]
        solo = await arbiter.launch(_request("solo", agent_class="db"), ALICE)
        handles = [env.runtime.handles[v.id] for v in views]
        for view, handle in zip(views, handles, strict=True):
            kill = handle.cgroup.kill

            def noted_kill(*, force_fallback: bool = False, kill: Any = kill,
                           handle: Any = handle, name: str = view.agent) -> str:
                journal.append(f"sigkill {name} (watcher hushed: {handle.hushed})")
                return str(kill(force_fallback=force_fallback))

            handle.cgroup.kill = noted_kill  # type: ignore[method-assign]
        result = await asyncio.wait_for(arbiter.act(
            "kill", ActionRequest(scope=Scope(agent_class="web"), reason="r"), ALICE), WAIT)
        assert [r.new_state for r in result.results] == ["killed"] * 2
        containers = [env.store.run(v.id).container_id for v in views]  # type: ignore[union-attr]
        assert journal[:3] == [f"hush {' '.join(containers)}"] + [
            f"sigkill {v.agent} (watcher hushed: True)" for v in views]
        for view in views:
            await arbiter.settled(view.id, WAIT)
        assert sorted(journal[3:]) == sorted(f"forget {c}" for c in containers)
        assert all(h.cleaned for h in handles)

        journal.clear()
        await asyncio.wait_for(arbiter.act(
            "kill", ActionRequest(scope=Scope(agent="solo"), reason="r"), ALICE), WAIT)
        await arbiter.settled(solo.id, WAIT)
        assert not env.runtime.handles[solo.id].hushed
        assert not any(step.startswith("hush") for step in journal)

    asyncio.run(body())


def test_a_halt_sigkilled_at_the_acceptor_does_not_hush_the_listener_again(
        env: ArbiterEnv, caplog: pytest.LogCaptureFixture) -> None:
    """The owners' acceptor asked the seccomp listener to hush the runs it SIGKILLed (the
    record's `hushed`): the loop's sweep still hushes every run's exit watcher, and asks the
    listener only for the runs the acceptor did not hush. Its line is logged once the
    answer's work is done (`after_answer`), not in front of the audit rows."""
    from supervisor.sandbox.killindex import PreSignal

    async def body() -> None:
        arbiter = env.arbiter()
        journal: list[str] = []
        arbiter.observers = RunObservers(seccomp=Seccomp(journal))
        views = [await arbiter.launch(_request(f"w{i}"), ALICE) for i in range(3)]
        request = ActionRequest(scope=Scope(agent_class="web"), reason="r")
        record = PreSignal(request=request, actor=ALICE, arrived=0.0)
        for view in views:  # (no write recorded: the sweep writes each run's cgroup.kill)
            record.runs[view.id] = view.agent
        record.hushed = {views[0].id, views[1].id}  # the third had no container there
        later: list[Callable[[], None]] = []
        with caplog.at_level("INFO"):
            result = await asyncio.wait_for(arbiter.act(
                "kill", request, ALICE, presignal=record, after_answer=later.append), WAIT)
            assert [r.new_state for r in result.results] == ["killed"] * 3
            third = env.store.run(views[2].id)
            assert third is not None
            assert journal == [f"hush {third.container_id}"]
            assert all(env.runtime.handles[v.id].hushed for v in views)
            assert not any("sweep of" in r.getMessage() for r in caplog.records)
            assert later, "the records were not left for after the answer"
            for call in later:
                call()
            assert [r.getMessage()[:16] for r in caplog.records
                    if "sweep of" in r.getMessage()] == ["sweep of 3 runs:"]
        for view in views:
            await arbiter.settled(view.id, WAIT)

    asyncio.run(body())


def test_a_launch_holds_a_parent_made_again(env: ArbiterEnv) -> None:
    """A parent removed while empty and made again by runc for a new run is held again at that
    launch, so the next global halt is one write to the live parent."""
    async def body() -> None:
        arbiter = env.arbiter()
        parent = FakeCgroup(Journal(), "parent")
        arbiter.parent = parent
        await arbiter.launch(_request("w0"), ALICE)
        assert not parent.stale()
        parent.removed = True
        await arbiter.launch(_request("w1"), ALICE)
        assert not parent.stale(), "the launch did not hold the new parent"

    asyncio.run(body())


def test_a_kills_answer_waits_for_its_audit_rows_while_its_records_overlap(
        serve: ServeFactory) -> None:
    """Over the real API with the audit writer's thread: step 1's store write comes after
    every SIGKILL (beside the confirmation), and the run records are committed while the
    writer still holds the kill's audit rows (a seam in front of its commit; the halt waits
    for the writer only ROWS_ON_LOOP before its records), but the answer waits for the
    rows: not out while they are held, out once they are durable."""
    server = serve()
    client = Client(server.socket_path, timeout=WAIT)
    views = [client.run({"name": f"w{i}", "class": "web", "command": ["sleep", "infinity"]})
             for i in range(3)]
    handles = [server.runtime.handles[view["id"]] for view in views]
    kills_at_marks: list[list[list[str]]] = []
    holding, release = threading.Event(), threading.Event()

    def install() -> None:
        arbiter = server.arbiter
        assert arbiter is not None
        put_agents = arbiter.store.put_agents

        def marks(agents: list[Any]) -> None:
            kills_at_marks.append([list(h.cgroup.kills) for h in handles])
            put_agents(agents)

        arbiter.store.put_agents = marks  # type: ignore[method-assign]
        audit = arbiter.audit
        commit = audit._commit_retrying

        def held_commit(db: Any, rows: list[dict[str, Any]]) -> Any:
            if any(row["verb"] == "kill" for row in rows):
                holding.set()
                release.wait(WAIT)
            return commit(db, rows)

        audit._commit_retrying = held_commit  # type: ignore[method-assign]
        audit.start(asyncio.get_running_loop())

    server.call(install)
    answer: dict[str, Any] = {}
    caller = threading.Thread(target=lambda: answer.update(
        client.action("kill", {"class": "web"}, reason="overlap")))
    caller.start()
    try:
        assert holding.wait(WAIT), "the writer never got the kill's rows"

        def durable() -> tuple[list[str], list[str], int]:
            assert server.arbiter is not None
            db = server.arbiter.store.db
            runs = [db.execute("SELECT state FROM runs WHERE id = ?", (v["id"],)).fetchone()[0]
                    for v in views]
            agents = [db.execute("SELECT state FROM agents WHERE name = ?",
                                 (f"w{i}",)).fetchone()[0] for i in range(3)]
            rows = db.execute("SELECT COUNT(*) FROM audit WHERE verb = 'kill'").fetchone()[0]
            return runs, agents, rows

        runs, agents, rows = server.call(durable)
        assert runs == ["killed"] * 3, "the records were not written beside the audit commit"
        assert agents == ["killed"] * 3 and rows == 0
        assert caller.is_alive() and not answer, "answered before its audit rows were durable"
    finally:
        release.set()
        caller.join(WAIT)
    assert [r["new_state"] for r in answer["results"]] == ["killed"] * 3
    assert server.call(durable)[2] == 3
    # The first write of the agents is step 1's (finalise writes each again).
    assert kills_at_marks[0] == [["cgroup.kill"]] * 3, "step 1's store write before a SIGKILL"
    server.settle()
    server.call(server.audit.close)


def test_a_scoped_halts_records_follow_its_audit_rows_once_durable(
        serve: ServeFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Over the real API with the audit writer's thread: a class halt waits, in the loop's
    thread, for the writer to commit its audit rows before it writes its records (their
    commit and the records took turns at the GIL, and the answer waited for the writer's
    hand-back, docs/benchmarks.md run 12). The wait is made long here so the order is the
    code's, not the host's speed: every record is written with every row already durable."""
    monkeypatch.setattr(ending, "ROWS_ON_LOOP", WAIT)
    server = serve()
    client = Client(server.socket_path, timeout=WAIT)
    views = [client.run({"name": f"w{i}", "class": "web", "command": ["sleep", "infinity"]})
             for i in range(3)]
    durable_at_records: list[bool] = []

    def install() -> None:
        arbiter = server.arbiter
        assert arbiter is not None
        put_run = arbiter.store.put_run

        def noted(run: Any) -> None:
            if run.id in {v["id"] for v in views} and run.state == "killed":
                durable_at_records.append(arbiter.audit.flush_blocking(0))
            put_run(run)

        arbiter.store.put_run = noted  # type: ignore[method-assign]
        arbiter.audit.start(asyncio.get_running_loop())

    server.call(install)
    answer = client.action("kill", {"class": "web"}, reason="rows first")
    assert [r["new_state"] for r in answer["results"]] == ["killed"] * 3
    server.call(lambda: None)  # the records may follow the answer, in the loop's same turn
    assert durable_at_records == [True] * 3, "a record was written before the rows were durable"
    server.settle()
    server.call(server.audit.close)


def test_a_scoped_halts_answer_goes_before_its_records_once_its_rows_are_durable(
        serve: ServeFactory) -> None:
    """Over the real API with the audit writer's thread: a class halt whose rows are durable
    writes its answer, then its records (docs/benchmarks.md run 16), still inside the kill
    (no audit checkpoint begun meanwhile), and before the loop reads another request: a read
    sent after the answer sees every run ended, in memory and in the store."""
    server = serve()
    client = Client(server.socket_path, timeout=WAIT)
    views = [client.run({"name": f"w{i}", "class": "web", "command": ["sleep", "infinity"]})
             for i in range(3)]
    ids = {view["id"] for view in views}
    answered = threading.Event()
    at_records: list[tuple[bool, bool]] = []  # (the answer was read, a kill was under way)

    def install() -> None:
        arbiter = server.arbiter
        assert arbiter is not None
        put_run = arbiter.store.put_run

        def noted(run: Any) -> None:
            if run.id in ids and run.state == "killed":
                # Blocks the loop: were the answer still to be written, it never would be.
                at_records.append((answered.wait(WAIT), arbiter.audit._kills > 0))
            put_run(run)

        arbiter.store.put_run = noted  # type: ignore[method-assign]
        arbiter.audit.start(asyncio.get_running_loop())

    server.call(install)
    answer = client.action("kill", {"class": "web"}, reason="answer first")
    answered.set()
    assert [r["new_state"] for r in answer["results"]] == ["killed"] * 3
    assert [client.get_run(view["id"])["state"] for view in views] == ["killed"] * 3
    assert at_records == [(True, True)] * 3, "the records came before the answer"

    def stored() -> list[str]:
        assert server.arbiter is not None
        db = server.arbiter.store.db
        return [db.execute("SELECT state FROM runs WHERE id = ?", (view["id"],)).fetchone()[0]
                for view in views]

    assert server.call(stored) == ["killed"] * 3
    server.settle()
    server.call(server.audit.close)


class EndedRuns:
    """A `Sampler` (daemon/observers.py) that notes which runs it was told had ended."""

    def __init__(self) -> None:
        self.ended: list[str] = []

    def run_started(self, run_id: str, cgroup: str, started_at: float) -> None:
        pass

    def run_ended(self, run_id: str) -> None:
        self.ended.append(run_id)


def test_a_kills_observers_are_told_after_its_answer_or_at_a_read_of_the_run(
        env: ArbiterEnv) -> None:
    """A kill's runs reach the observers (telemetry summary, tripwires, seccomp, gateway)
    after its answer, not in front of it; a read of one of them before that tells its
    observers first, so no view shows an ended run with a live summary. A run that ends by
    itself is told at once."""
    async def body() -> None:
        arbiter = env.arbiter()
        sampler = EndedRuns()
        arbiter.observers = RunObservers(sampler=sampler)
        views = [await arbiter.launch(_request(f"w{i}"), ALICE) for i in range(3)]
        result = await arbiter.act(
            "kill", ActionRequest(scope=Scope(agent_class="web"), reason="r"), ALICE)
        assert [r.new_state for r in result.results] == ["killed"] * 3
        assert sampler.ended == [], "the observers were in front of the answer"
        assert set(arbiter.unobserved) == {v.id for v in views}
        arbiter.agent_view("w0")  # a read of w0 before the gate: its observers first
        assert sampler.ended == [views[0].id]
        arbiter.get_run(views[1].id)
        assert sampler.ended == [views[0].id, views[1].id]
        for view in views:
            await asyncio.wait_for(arbiter.settled(view.id), WAIT)
        assert sorted(sampler.ended) == sorted(v.id for v in views)
        assert not arbiter.unobserved

        exited = await arbiter.launch(_request("e0", "batch"), ALICE)
        env.runtime.handles[exited.id].finish(0)  # its command ends by itself
        await asyncio.wait_for(arbiter.settled(exited.id), WAIT)
        assert sampler.ended[-1] == exited.id

    asyncio.run(body())
