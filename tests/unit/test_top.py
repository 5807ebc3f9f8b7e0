"""agentctl top (supervisor/cli/top.py) without a terminal: the pure frame renderer over the
daemon's JSON, the CPU meter, the unit formatting, and `top --once` against the real API
server. No root. The live curses view is tested in a real terminal by tests/e2e/test_top.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from supervisor.cli.main import cli
from supervisor.cli.top import (
    HALT_BANNER,
    MIN_HEIGHT,
    MIN_WIDTH,
    CpuMeter,
    Line,
    Snapshot,
    duration,
    human_bytes,
    render,
)
from tests.unit.conftest import ServerThread

NOW = 1_700_000_000.0
HEALTH = {"status": "ok", "version": "1.2.3", "global_halt": False, "agents": 4,
          "active_runs": 3, "cgroup_mode": "hybrid"}


def agent(name: str, state: str, agent_class: str = "web", *, run_id: str | None = "r1",
          started_ago: float | None = 75, cpu_usec: int = 0, memory: int | None = 5 << 20,
          processes: int | None = 3, actor: str | None = "alice(uid=1000)",
          reason: str | None = None) -> dict[str, Any]:
    """An agent as GET /v1/agents returns it."""
    live = state in ("active", "paused") and run_id is not None
    run = None
    if run_id is not None:
        run = {"id": run_id, "agent": name, "state": "running" if live else "killed",
               "started_at": NOW - (started_ago or 0), "ended_at": None if live else NOW - 1}
    return {"name": name, "class": agent_class, "state": state, "profile": "default",
            "last_actor": actor, "last_reason": reason, "run": run, "time_to_halt_ms": None,
            "stats": {"cpu_usec": cpu_usec, "memory_bytes": memory, "processes": processes}
            if live else None}


def snapshot(agents: list[dict[str, Any]], **extra: Any) -> Snapshot:
    return Snapshot(agents=agents, health=HEALTH, taken_at=NOW, **extra)


def texts(lines: list[Line]) -> list[str]:
    return [line.text for line in lines]


def row_of(lines: list[Line], name: str) -> Line:
    [line] = [line for line in lines[2:] if f"  {name}" in line.text]
    return line


FOUR = [agent("a-active", "active", run_id="r1"),
        agent("b-paused", "paused", "batch", run_id="r2", reason="looks odd"),
        agent("c-killed", "killed", run_id="r3", actor="root(uid=0)", reason="exfiltrating"),
        agent("d-idle", "idle", run_id=None, actor=None)]


def test_a_frame_has_a_header_columns_and_one_row_per_agent() -> None:
    lines = render(snapshot(FOUR), 120, 40)
    header, columns, *rows = lines
    assert header.text.startswith("daemon ok  4 agents: 1 active 1 paused 1 killed 1 idle  3 runs")
    assert "agent-supervisor 1.2.3" in header.text and "q quit" in header.text
    assert columns.text.split()[:8] == ["STATE", "NAME", "CLASS", "CPU%", "MEM", "PROCS", "UP",
                                        "LAST"]
    assert [r.text.split()[:3] for r in rows] == [
        ["ACTIVE", "a-active", "web"], ["PAUSED", "b-paused", "batch"],
        ["KILLED", "c-killed", "web"], ["IDLE", "d-idle", "web"]]
    assert all(len(line.text) <= 120 for line in lines)


def test_badges_carry_the_state_as_their_style() -> None:
    lines = render(snapshot(FOUR), 120, 40)
    for name, state in (("a-active", "active"), ("b-paused", "paused"),
                        ("c-killed", "killed"), ("d-idle", "idle")):
        line = row_of(lines, name)
        [span] = line.spans
        assert span.style == state
        assert line.text[span.start:span.end] == state.upper()
    assert row_of(lines, "d-idle").style == "dim"
    assert row_of(lines, "a-active").style == "normal"


def test_live_numbers_and_the_last_action() -> None:
    lines = render(snapshot(FOUR, cpu={"a-active": 42.25}), 120, 40)
    active = row_of(lines, "a-active").text.split()
    assert active[3:7] == ["42.2", "5.0M", "3", "1m15s"]
    paused = row_of(lines, "b-paused").text
    assert paused.split()[3] == "-"  # no earlier sample of its run: no CPU % yet
    assert paused.endswith("alice(uid=1000): looks odd")
    killed = row_of(lines, "c-killed").text.split()
    assert killed[3:7] == ["-", "-", "-", "-"]  # no live run: no numbers, no uptime
    assert row_of(lines, "c-killed").text.endswith("root(uid=0): exfiltrating")
    assert row_of(lines, "d-idle").text.split()[-1] == "-"


def test_cpu_percent_comes_from_successive_samples_of_the_same_run() -> None:
    meter = CpuMeter()
    first = [agent("a", "active", run_id="r1", cpu_usec=1_000_000)]
    assert meter.update(first, 100.0) == {}
    second = [agent("a", "active", run_id="r1", cpu_usec=1_500_000)]
    assert meter.update(second, 101.0) == {"a": pytest.approx(50.0)}
    # Two cores busy for two seconds.
    third = [agent("a", "active", run_id="r1", cpu_usec=5_500_000)]
    assert meter.update(third, 103.0) == {"a": pytest.approx(200.0)}
    # A new run of the same agent starts over; a run that ended is forgotten.
    fresh = [agent("a", "active", run_id="r2", cpu_usec=10)]
    assert meter.update(fresh, 104.0) == {}
    assert meter.update([], 105.0) == {}
    assert meter.update(fresh, 106.0) == {}


def test_an_empty_agent_list_says_how_to_start_one() -> None:
    lines = render(snapshot([]), 100, 20)
    assert "0 agents" in lines[0].text
    assert lines[-1].text.startswith("no agents yet") and lines[-1].style == "dim"


def test_a_global_halt_is_a_banner_under_the_header() -> None:
    lines = render(snapshot(FOUR, global_halt=True), 120, 40)
    assert lines[1].style == "halt"
    assert lines[1].text.startswith(HALT_BANNER)
    assert lines[2].text.startswith("STATE")


def test_an_unreachable_daemon_is_one_line_and_no_table() -> None:
    stale = Snapshot(error="no control socket at /run/x.sock: is agent-supervisord running?",
                     taken_at=NOW)
    [line] = render(stale, 100, 30)
    assert line.style == "error"
    assert line.text.startswith("daemon unavailable: no control socket at /run/x.sock")
    assert "(retrying)" in line.text


@pytest.mark.parametrize(("width", "height"), [(MIN_WIDTH - 1, 30), (120, MIN_HEIGHT - 1),
                                               (20, 2)])
def test_a_too_small_terminal_gets_one_line(width: int, height: int) -> None:
    [line] = render(snapshot(FOUR), width, height)
    assert line.text.startswith("terminal too small"[:width - 1])
    assert len(line.text) <= width


def test_rows_that_do_not_fit_are_counted() -> None:
    many = [agent(f"a{i:02d}", "active", run_id=f"r{i}") for i in range(30)]
    lines = render(snapshot(many), 100, 10)
    assert len(lines) == 10
    assert lines[-1].text.startswith("... 23 more agents")
    assert sum(1 for line in lines if line.spans) == 7
    # --once (no height) prints them all.
    assert len(render(snapshot(many), 100)) == 32


def test_long_names_and_reasons_are_cut_to_the_terminal() -> None:
    long_name = "a" + "x" * 62
    lines = render(snapshot([agent(long_name, "active", "c" * 63, reason="r" * 500)]), 80, 20)
    row = lines[2].text
    assert len(row) <= 80 and all(len(line.text) <= 80 for line in lines)
    name_cell = row.split()[1]
    assert name_cell.endswith("~") and long_name.startswith(name_cell[:-1])
    assert row.endswith("~")
    wide = render(snapshot([agent(long_name, "active", reason="r" * 500)]), 200, 20)[2].text
    assert len(wide) <= 200 and wide.split()[1] == long_name[:31] + "~"


def test_resizing_recomputes_the_columns() -> None:
    agents = [agent("a-rather-long-agent-name", "active", reason="a reason")]
    for width in (60, 61, 79, 80, 100, 160, 300):
        lines = render(snapshot(agents), width, 24)
        assert all(len(line.text) <= width for line in lines), width
        assert lines[2].text.startswith("ACTIVE")


def test_control_characters_from_a_reason_never_reach_the_terminal() -> None:
    evil = agent("a", "killed", reason="bye\x1b[2J\x1b]0;owned\x07\nnext line\r\t")
    row = row_of(render(snapshot([evil]), 160, 20), "a").text
    assert "\x1b" not in row and "\n" not in row and "\r" not in row and "\x07" not in row
    assert "bye?[2J?]0;owned??next line??" in row


@pytest.mark.parametrize(("count", "text"), [(None, "-"), (0, "0B"), (1023, "1023B"),
                                             (1024, "1.0K"), (5 << 20, "5.0M"),
                                             (300 << 20, "300M"), (3 << 30, "3.0G"),
                                             (2048 << 40, "2048T")])
def test_human_bytes(count: int | None, text: str) -> None:
    assert human_bytes(count) == text


@pytest.mark.parametrize(("seconds", "text"), [(-3, "0s"), (59, "59s"), (61, "1m01s"),
                                               (3600, "1h00m"), (86399, "23h59m"),
                                               (90061, "1d01h")])
def test_duration(seconds: float, text: str) -> None:
    assert duration(seconds) == text


# ----------------------------------------------------------------------------- the command


def agentctl(socket_path: Path, *args: str) -> Any:
    return CliRunner().invoke(cli, ["--socket", str(socket_path), *args], catch_exceptions=False)


def test_top_once_prints_a_plain_frame(server: ServerThread) -> None:
    for name in ("w1", "w2"):
        result = agentctl(server.socket_path, "run", "--name", name, "--class", "web",
                          "--detach", "--", "sleep", "infinity")
        assert result.exit_code == 0, result.output
    assert agentctl(server.socket_path, "pause", "w2", "--reason", "odd").exit_code == 0
    result = agentctl(server.socket_path, "top", "--once")
    assert result.exit_code == 0, result.output
    header, columns, *rows = result.stdout.splitlines()
    assert "2 agents: 1 active 1 paused 0 killed 0 idle" in header
    assert "q quit" not in header
    assert columns.startswith("STATE")
    assert [r.split()[:3] for r in rows] == [["ACTIVE", "w1", "web"], ["PAUSED", "w2", "web"]]
    assert rows[1].endswith(": odd")
    assert "\x1b" not in result.stdout


def test_top_once_without_a_daemon_fails_with_its_status(tmp_path: Path) -> None:
    result = agentctl(tmp_path / "absent.sock", "top", "--once")
    assert result.exit_code == 7
    assert "daemon_unavailable" in result.stderr and "absent.sock" in result.stderr


def test_live_top_needs_a_terminal(tmp_path: Path) -> None:
    result = agentctl(tmp_path / "absent.sock", "top")
    assert result.exit_code == 2
    assert "--once" in result.stderr
