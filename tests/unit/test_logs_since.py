"""`agentctl logs --since` (issue 16): the output drain writes a time index beside the log
while the log keeps the agent's bytes exactly; the index is bounded; the API starts at the
right offset (alone and with --tail); the CLI takes durations and ISO 8601 times and refuses
anything else. Real pipes and files, no root."""

from __future__ import annotations

import asyncio
import os
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from click.testing import CliRunner

from supervisor.api.client import Client
from supervisor.cli.main import cli, duration_seconds
from supervisor.errors import InvalidRequest
from supervisor.profiles import Profile
from supervisor.runtime import output_index
from supervisor.runtime.output import Outputs
from supervisor.runtime.output_index import (
    IndexWriter,
    index_path,
    max_records_for,
    read_index,
    since_offset,
)
from tests.unit.conftest import WAIT, ServerThread


def _write_log(log: Path, parts: list[tuple[float, bytes]], max_records: int = 1000) -> None:
    """A log and its index as the drain would leave them, with chosen arrival times."""
    writer = IndexWriter(index_path(log), max_records)
    offset = 0
    with open(log, "wb") as handle:
        for when, data in parts:
            writer.mark(offset, when)
            handle.write(data)
            offset += len(data)
    writer.close()


def test_since_starts_at_the_first_record_whose_bytes_may_be_that_late(tmp_path: Path
                                                                       ) -> None:
    log = tmp_path / "r.log"
    _write_log(log, [(100.0, b"one\n"), (100.5, b"half\n"), (102.0, b"two\n"),
                     (110.0, b"ten\n")])
    assert read_index(index_path(log)) == [(0, 100.0), (9, 102.0), (13, 110.0)]
    data = log.read_bytes()
    assert data == b"one\nhalf\ntwo\nten\n"  # the log holds the bytes only
    assert data[since_offset(log, 50.0):] == data
    # "half" came within a second of 100 (else the drain had marked it): maybe after 100.2.
    assert data[since_offset(log, 100.2):] == data
    assert data[since_offset(log, 101.0):] == b"two\nten\n"
    assert data[since_offset(log, 102.0):] == b"two\nten\n"
    assert data[since_offset(log, 102.9):] == b"two\nten\n"
    assert data[since_offset(log, 105.0):] == b"ten\n"
    assert data[since_offset(log, 110.5):] == b"ten\n"
    assert data[since_offset(log, 111.0):] == b""  # nothing arrived a second after the last
    assert since_offset(tmp_path / "absent.log", 1.0) == 0


def test_a_full_index_stops_growing_and_answers_more_never_less(tmp_path: Path) -> None:
    log = tmp_path / "r.log"
    _write_log(log, [(100.0 + i, b"%d\n" % i) for i in range(10)], max_records=4)
    records = read_index(index_path(log))
    assert len(records) == 4 and records[-1][1] == float("inf")
    data = log.read_bytes()
    # Past the last real record (102): everything from the +inf record on, whenever it came.
    assert records[-1][0] == 6
    assert data[since_offset(log, 108.0):] == b"3\n4\n5\n6\n7\n8\n9\n"
    assert data[since_offset(log, 101.5):] == data[2:]  # "1" came at 101, so before 102
    assert max_records_for(1 << 10) == 64
    assert max_records_for(64 * 1024**2) == 65536
    assert max_records_for(1 << 40) == output_index.MAX_RECORDS


def test_a_torn_last_record_is_ignored(tmp_path: Path) -> None:
    log = tmp_path / "r.log"
    _write_log(log, [(100.0, b"a\n"), (200.0, b"b\n")])
    with open(index_path(log), "ab") as handle:
        handle.write(b"\x01\x02\x03")
    assert read_index(index_path(log)) == [(0, 100.0), (2, 200.0)]


def test_the_drain_indexes_a_real_pipe_and_keeps_the_bytes_exact(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch
                                                                  ) -> None:
    monkeypatch.setattr(output_index, "SPACING", 0.2)

    async def drain() -> None:
        recorder = Outputs(1 << 20).open("r1", tmp_path / "r1.log", Profile())
        write_fd = recorder.pipe()
        try:
            os.write(write_fd, b"early\n")
            await asyncio.sleep(0.6)
            marks.append(time.time())
            await asyncio.sleep(0.3)
            os.write(write_fd, b"late\n")
            await asyncio.sleep(0.1)
        finally:
            os.close(write_fd)
        await recorder.finish(WAIT)

    marks: list[float] = []
    asyncio.run(drain())
    log = tmp_path / "r1.log"
    assert log.read_bytes() == b"early\nlate\n"
    records = read_index(index_path(log))
    assert records[0][0] == 0 and (6, records[-1][1]) == records[-1]
    assert log.read_bytes()[since_offset(log, marks[0]):] == b"late\n"
    assert oct(index_path(log).stat().st_mode & 0o777) == "0o600"


def test_an_index_that_cannot_be_made_never_stops_the_run(tmp_path: Path) -> None:
    log = tmp_path / "r1.log"
    index_path(log).write_bytes(b"")  # O_EXCL: the drain's index cannot be created

    async def drain() -> None:
        recorder = Outputs(1 << 20).open("r1", log, Profile())
        write_fd = recorder.pipe()
        os.write(write_fd, b"output\n")
        os.close(write_fd)
        await recorder.finish(WAIT)

    asyncio.run(drain())
    assert log.read_bytes() == b"output\n"
    assert since_offset(log, time.time()) == 0  # no index: the whole log


@pytest.mark.parametrize(("text", "seconds"), [
    ("90s", 90.0), ("10m", 600.0), ("1h30m", 5400.0), ("1.5h", 5400.0), ("2d", 172800.0),
    ("500ms", 0.5), ("10", None), ("m", None), ("10x", None), ("-5m", None), ("1h 30m", None),
])
def test_durations(text: str, seconds: float | None) -> None:
    assert duration_seconds(text) == seconds


def test_logs_since_through_the_api_and_the_cli(server: ServerThread) -> None:
    result = CliRunner().invoke(cli, ["--socket", str(server.socket_path), "run", "--name",
                                      "a1", "--detach", "--", "sleep", "infinity"])
    assert result.exit_code == 0, result.output
    log = Path(server.call(lambda: server.arbiter.resolve_run("a1")[0].log_path))
    now = time.time()
    log.unlink()
    _write_log(log, [(now - 3600, b"an hour ago\n"), (now - 1200, b"20 minutes ago 1\n"
                                                      b"20 minutes ago 2\n"),
                     (now - 60, b"a minute ago\n")])

    def logs(*args: str) -> str:
        result = CliRunner().invoke(cli, ["--socket", str(server.socket_path), "logs", "a1",
                                          *args])
        assert result.exit_code == 0, (result.output, result.stderr)
        return result.stdout

    assert logs() == ("an hour ago\n20 minutes ago 1\n20 minutes ago 2\na minute ago\n")
    assert logs("--since", "30m") == "20 minutes ago 1\n20 minutes ago 2\na minute ago\n"
    assert logs("--since", "5m") == "a minute ago\n"
    assert logs("--since", "1s") == ""
    assert logs("--since", "30m", "--tail", "2") == "20 minutes ago 2\na minute ago\n"
    iso = datetime.fromtimestamp(now - 1800, tz=UTC).isoformat()
    assert logs("--since", iso) == "20 minutes ago 1\n20 minutes ago 2\na minute ago\n"
    local = datetime.fromtimestamp(now - 1800).replace(microsecond=0).isoformat()
    assert logs("--since", local) == "20 minutes ago 1\n20 minutes ago 2\na minute ago\n"

    bad = CliRunner().invoke(cli, ["--socket", str(server.socket_path), "logs", "a1",
                                   "--since", "yesterday"])
    assert bad.exit_code == 2 and "neither a duration" in bad.stderr
    client = Client(server.socket_path, timeout=WAIT)
    for query in ("since=nan", "since=-1", "since=1e12", "since=abc", "since="):
        with pytest.raises(InvalidRequest) as caught:
            b"".join(client.stream(f"/v1/runs/a1/logs?{query}"))
        assert caught.value.detail["field"] == "since"
