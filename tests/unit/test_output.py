"""The output drain on a real pipe and a real file, without root: the cap, the counts, the
markers, the cap listener, the end of a run's output and a writer that never lets go."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from supervisor.config import Config
from supervisor.errors import EnforcementError
from supervisor.profiles import Profile
from supervisor.runtime.output import MARKER, OutputCounts, Outputs

CAP = 64 * 1024


def _profile(**output: object) -> Profile:
    return Profile.model_validate({"name": "p", "output": output})


def _write(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


async def _drain(outputs: Outputs, log: Path, chunks: list[bytes],
                 profile: Profile | None = None) -> OutputCounts:
    recorder = outputs.open("r1", log, profile or _profile())
    write_fd = recorder.pipe()
    loop = asyncio.get_running_loop()

    def produce() -> None:
        try:
            for chunk in chunks:
                _write(write_fd, chunk)
        finally:
            os.close(write_fd)

    await loop.run_in_executor(None, produce)
    return await recorder.finish(10.0)


def test_cap_is_the_hosts_unless_the_profile_asks_for_less() -> None:
    outputs = Outputs(CAP)
    assert outputs.cap_for(_profile()) == CAP
    assert outputs.cap_for(_profile(max_bytes=1024)) == 1024
    assert outputs.cap_for(_profile(max_bytes="1G")) == CAP
    assert Config().output.max_bytes == 64 * 1024**2
    assert Config.model_validate({"disk": {"min_free_bytes": 0}}).disk.min_free_bytes == 0
    assert Config.model_validate({"disk": {"min_free_bytes": "2G"}}).disk.min_free_bytes == 2**31
    assert Profile().limits.file_size == 4 * 1024**3
    with pytest.raises(ValueError):
        _profile(action="explode")


def test_output_under_the_cap_is_recorded_whole(tmp_path: Path) -> None:
    outputs = Outputs(CAP)
    capped: list[OutputCounts] = []
    outputs.tripwires = lambda _run, counts: capped.append(counts)
    counts = asyncio.run(_drain(outputs, tmp_path / "logs" / "r1.log", [b"hello\n", b"x" * 1000]))
    assert (tmp_path / "logs" / "r1.log").read_bytes() == b"hello\n" + b"x" * 1000
    assert counts == OutputCounts(produced=1006, recorded=1006, cap=CAP, capped=False)
    assert capped == []
    assert outputs.counts("r1") is None  # finished runs leave the registry


def test_output_past_the_cap_is_counted_discarded_and_reported_once(tmp_path: Path) -> None:
    outputs = Outputs(CAP)
    capped: list[tuple[str, OutputCounts]] = []
    outputs.tripwires = lambda run, counts: capped.append((run, counts))
    log = tmp_path / "r1.log"
    counts = asyncio.run(_drain(outputs, log, [b"a" * 50_000, b"b" * 50_000, b"c" * 300_000]))
    data = log.read_bytes()
    assert data[:CAP] == b"a" * 50_000 + b"b" * (CAP - 50_000)
    notes = data[CAP:].split(b"\n")
    assert [n for n in notes if n] == [
        MARKER + f" output cap of {CAP} bytes reached: the rest of this run's output is "
                 f"discarded (and counted)".encode(),
        MARKER + f" {400_000 - CAP} bytes of output were not recorded (400000 produced, "
                 f"{CAP} recorded)".encode()]
    assert counts.produced == 400_000 and counts.recorded == CAP and counts.capped
    assert len(capped) == 1 and capped[0][0] == "r1" and capped[0][1].recorded == CAP


def test_totals_count_every_run_once_past_its_end(tmp_path: Path) -> None:
    """The metrics' output totals: ended runs' bytes stay counted, a run closed twice counts
    once, bytes past the cap count as produced and not as recorded."""
    outputs = Outputs(CAP)
    assert outputs.totals() == (0, 0)
    asyncio.run(_drain(outputs, tmp_path / "r1.log", [b"x" * 1000]))
    assert outputs.totals() == (1000, 1000)

    async def second() -> None:
        counts = await _drain(outputs, tmp_path / "r2.log", [b"y" * (CAP + 500)])
        assert counts.capped
        recorder = outputs.open("r3", tmp_path / "r3.log", _profile())
        assert outputs.totals() == (1000 + CAP + 500, 1000 + CAP)  # r3 live, nothing yet
        await recorder.finish(1.0)
        await recorder.finish(1.0)

    asyncio.run(second())
    assert outputs.totals() == (1000 + CAP + 500, 1000 + CAP)


def test_exactly_the_cap_is_not_over_it(tmp_path: Path) -> None:
    outputs = Outputs(CAP)
    counts = asyncio.run(_drain(outputs, tmp_path / "r1.log", [b"z" * CAP]))
    assert (tmp_path / "r1.log").read_bytes() == b"z" * CAP
    assert not counts.capped


def test_copy_fallback_records_the_same(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                        ) -> None:
    """A filesystem that refuses splice into it (EINVAL): read and write instead."""
    real_splice = os.splice

    def splice(src: int, dst: int, count: int, *args: object, **kwargs: object) -> int:
        if os.path.realpath(f"/proc/self/fd/{dst}") == str(tmp_path / "r1.log"):
            raise OSError(22, "Invalid argument")
        return real_splice(src, dst, count, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "splice", splice)
    outputs = Outputs(CAP)
    counts = asyncio.run(_drain(outputs, tmp_path / "r1.log", [b"q" * 100_000]))
    assert (tmp_path / "r1.log").read_bytes().startswith(b"q" * CAP + b"\n" + MARKER)
    assert counts.produced == 100_000 and counts.recorded == CAP


def test_a_writer_that_never_lets_go_is_cut_off(tmp_path: Path) -> None:
    """finish waits a bounded time for the end of the output, then stops the drain; what was
    already written is recorded, and the log file is closed."""
    async def scenario() -> tuple[OutputCounts, int]:
        outputs = Outputs(CAP)
        recorder = outputs.open("r1", tmp_path / "r1.log", _profile())
        write_fd = recorder.pipe()
        _write(write_fd, b"still here\n")
        counts = await recorder.finish(0.2)
        return counts, write_fd

    counts, write_fd = asyncio.run(scenario())
    try:
        assert counts.recorded == 11
        assert (tmp_path / "r1.log").read_bytes() == b"still here\n"
        with pytest.raises(BrokenPipeError):  # the drain's read end is closed
            os.write(write_fd, b"late")
    finally:
        os.close(write_fd)


def test_the_drain_ends_when_the_daemon_says_not_at_the_agents_last_exit(tmp_path: Path
                                                                          ) -> None:
    """The recorder keeps a write end of its pipe: the agent's last write end closing (its
    processes all gone, a scoped halt's hundred runs at once) wakes no drain; `finish` lets
    go and the drain reads to the end. A handover lets go too, so the next daemon's drain
    ends at the agent's last exit. No descriptor of either pipe is left behind."""
    def open_fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    async def scenario() -> tuple[bool, OutputCounts, bytes, int, int]:
        outputs = Outputs(CAP)
        before = open_fds()
        recorder = outputs.open("r1", tmp_path / "r1.log", _profile())
        write_fd = recorder.pipe()
        _write(write_fd, b"last words\n")
        os.close(write_fd)
        ended_alone = await recorder.ended(0.3)
        counts = await recorder.finish(10.0)

        handed = outputs.open("r2", tmp_path / "r2.log", _profile())
        agent_end = handed.pipe()
        kept = await handed.hand_over(10.0)
        assert kept is not None
        os.close(agent_end)
        try:
            at_the_end = os.read(kept, 16)  # b"": no write end left open on this side
        finally:
            os.close(kept)
        await handed.finish(1.0)
        return ended_alone, counts, at_the_end, before, open_fds()

    ended_alone, counts, at_the_end, before, after = asyncio.run(scenario())
    assert not ended_alone, "the drain ended on the agent's exit, not at finish"
    assert counts.recorded == counts.produced == 11
    assert (tmp_path / "r1.log").read_bytes() == b"last words\n"
    assert at_the_end == b""
    assert after == before


def test_stream_source_is_capped_too(tmp_path: Path) -> None:
    def chunks() -> Iterator[bytes]:
        yield b"s" * 40_000
        yield b"t" * 40_000
        raise ConnectionResetError("engine gone")

    async def scenario() -> OutputCounts:
        outputs = Outputs(CAP)
        recorder = outputs.open("r1", tmp_path / "r1.log", _profile())
        closed: list[bool] = []
        recorder.follow(chunks(), lambda: closed.append(True))
        counts = await recorder.finish(10.0)
        assert closed
        return counts

    counts = asyncio.run(scenario())
    data = (tmp_path / "r1.log").read_bytes()
    assert data[:CAP] == b"s" * 40_000 + b"t" * (CAP - 40_000)
    assert b"output capture ended: the docker engine is unreachable" in data[CAP:]
    assert counts.produced == 80_000 and counts.capped


def test_an_existing_log_file_is_never_reused(tmp_path: Path) -> None:
    (tmp_path / "r1.log").write_bytes(b"old")

    async def scenario() -> None:
        Outputs(CAP).open("r1", tmp_path / "r1.log", _profile())

    with pytest.raises(EnforcementError):
        asyncio.run(scenario())
    (tmp_path / "target").write_bytes(b"")
    (tmp_path / "r2.log").symlink_to(tmp_path / "target")

    async def linked() -> None:
        Outputs(CAP).open("r2", tmp_path / "r2.log", _profile())

    with pytest.raises(EnforcementError):
        asyncio.run(linked())
