"""agentctl top: a live table of agents, refreshed every --interval seconds, in curses (stdlib,
so it works over SSH in any terminal); q or Ctrl-C quits. `--once` prints one plain frame.
Talks to the daemon only through the control socket; runs unprivileged.

Rendering is a pure function of the daemon's JSON (`render`), so it is tested without a
terminal; the curses part only paints the lines it returns."""

from __future__ import annotations

import contextlib
import locale
import os
import shutil
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import click

from supervisor.api.client import Client
from supervisor.cli.units import human_bytes
from supervisor.errors import SupervisorError

if TYPE_CHECKING:
    import curses

    from supervisor.api.shapes import AgentView, Health

MIN_WIDTH = 60
MIN_HEIGHT = 5
GAP = "  "
STATES = ("active", "paused", "killed", "idle")
BADGES = {"active": "ACTIVE", "paused": "PAUSED", "killed": "KILLED", "idle": "IDLE"}
HALT_BANNER = ("GLOBAL HALT in force: new runs are refused until an owner runs "
               "'agentctl reactivate --all --reason ...'")
# Fixed column widths; NAME, CLASS and LAST ACTION are sized per frame to the terminal.
_STATE_W, _CPU_W, _MEM_W, _PROCS_W, _UP_W = 6, 6, 6, 5, 6


@dataclass(frozen=True)
class Span:
    start: int
    end: int
    style: str


@dataclass(frozen=True)
class Line:
    """One screen line: plain text, a style for the whole line and styled spans within it.
    Styles: normal, header, columns, halt, error, dim, and each state name (the badges)."""

    text: str
    style: str = "normal"
    spans: tuple[Span, ...] = ()


@dataclass
class Snapshot:
    """What one poll of the daemon returned (or why it could not)."""

    agents: list[AgentView] = field(default_factory=list)
    global_halt: bool = False
    health: Health | None = None
    error: str | None = None
    cpu: dict[str, float] = field(default_factory=dict)
    taken_at: float = 0.0


class CpuMeter:
    """CPU % of each agent's current run from successive cumulative `stats.cpu_usec` samples
    (100 = one core busy). A run seen for the first time has no percentage yet."""

    def __init__(self) -> None:
        self._last: dict[str, tuple[float, int]] = {}

    def update(self, agents: Iterable[Mapping[str, Any]], monotonic: float) -> dict[str, float]:
        percents: dict[str, float] = {}
        seen: dict[str, tuple[float, int]] = {}
        for agent in agents:
            run_id = (agent.get("run") or {}).get("id")
            usec = (agent.get("stats") or {}).get("cpu_usec")
            if not run_id or not isinstance(usec, int):
                continue
            seen[run_id] = (monotonic, usec)
            previous = self._last.get(run_id)
            if previous is not None and monotonic > previous[0] and usec >= previous[1]:
                elapsed_usec = (monotonic - previous[0]) * 1_000_000
                percents[agent["name"]] = (usec - previous[1]) / elapsed_usec * 100
        self._last = seen  # runs that ended are forgotten
        return percents


def fetch(client: Client, meter: CpuMeter) -> Snapshot:
    """One frame's data from the daemon; raises its SupervisorError."""
    data = client.agents()
    health = client.health()
    agents = list(data.get("agents") or [])
    return Snapshot(agents=agents, global_halt=bool(data.get("global_halt")), health=health,
                    cpu=meter.update(agents, time.monotonic()), taken_at=time.time())


def poll(client: Client, meter: CpuMeter) -> Snapshot:
    """fetch(), but a daemon that cannot be reached is a Snapshot with `error`."""
    try:
        return fetch(client, meter)
    except SupervisorError as exc:
        return Snapshot(error=exc.message, taken_at=time.time())


# ----------------------------------------------------------------------------- formatting


def clean(text: str) -> str:
    """Printable text only: a reason is operator input and must not drive the terminal."""
    return "".join(c if c.isprintable() else "?" for c in text)


def fit(text: str, width: int) -> str:
    """`text` cut to `width` columns, a cut marked with '~'."""
    if width <= 0:
        return ""
    return text if len(text) <= width else text[:width - 1] + "~"


def duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"


def cpu_text(percent: float | None) -> str:
    if percent is None:
        return "-"
    return f"{percent:.1f}" if percent < 1000 else f"{percent:.0f}"


def last_action(agent: Mapping[str, Any]) -> str:
    actor = agent.get("last_actor")
    reason = agent.get("last_reason")
    if not actor:
        return "-"
    return clean(f"{actor}: {reason}" if reason else str(actor))


def uptime(agent: Mapping[str, Any], now: float) -> str:
    run = agent.get("run") or {}
    if not run or run.get("ended_at") is not None or not run.get("started_at"):
        return "-"
    return duration(now - float(run["started_at"]))


# ----------------------------------------------------------------------------- the frame


def _header(snapshot: Snapshot, width: int, live: bool) -> Line:
    clock = time.strftime("%H:%M:%S", time.localtime(snapshot.taken_at))
    version = ""
    if snapshot.error is not None:
        left = f"daemon unavailable: {clean(snapshot.error)} (retrying)"
        style = "error"
    else:
        counts = {state: 0 for state in STATES}
        for agent in snapshot.agents:
            state = str(agent.get("state", ""))
            counts[state] = counts.get(state, 0) + 1
        health: Mapping[str, object] = snapshot.health or {}
        status = str(health.get("status", "?"))
        version = f"agent-supervisor {health.get('version', '?')}  "
        left = (f"daemon {status}  {len(snapshot.agents)} agents: "
                + " ".join(f"{counts[s]} {s}" for s in STATES)
                + f"  {health.get('active_runs', '?')} runs")
        style = "header" if status == "ok" else "error"
    # The clock and the key hint give way to the state of things when space is short.
    hint = "  q quit" if live else ""
    for right in (f"{version}{clock}{hint}", f"{clock}{hint}", clock, ""):
        room = width - len(right) - 1
        if right and len(left) <= room:
            return Line(left.ljust(room) + " " + right, style)
    return Line(fit(left, width), style)


def _widths(agents: Sequence[Mapping[str, Any]], width: int) -> tuple[int, int, int]:
    """NAME, CLASS and LAST ACTION widths for a terminal `width` columns wide."""
    name_w = min(max([4, *(len(str(a.get("name", ""))) for a in agents)]), 32)
    class_w = min(max([5, *(len(str(a.get("class", ""))) for a in agents)]), 16)
    fixed = _STATE_W + _CPU_W + _MEM_W + _PROCS_W + _UP_W + len(GAP) * 7
    # Long names give way before the last action does, down to a floor for each.
    while fixed + name_w + class_w + 20 > width and (name_w > 12 or class_w > 8):
        if name_w > 12:
            name_w -= 1
        else:
            class_w -= 1
    return name_w, class_w, max(0, width - fixed - name_w - class_w)


def _row(cells: Sequence[tuple[str, int, bool]]) -> str:
    return GAP.join(c.rjust(w) if right else c.ljust(w) for c, w, right in cells)


def render(snapshot: Snapshot, width: int, height: int | None = None, live: bool = True
           ) -> list[Line]:
    """The frame for a terminal of `width` x `height`; height None (--once): every row, and
    no key hint (`live` False)."""
    if width < MIN_WIDTH or (height is not None and height < MIN_HEIGHT):
        size = f"{width}x{height}" if height is not None else f"{width} wide"
        return [Line(fit(f"terminal too small: {size}, need {MIN_WIDTH}x{MIN_HEIGHT}", width),
                     "error")]
    lines = [_header(snapshot, width, live)]
    if snapshot.error is None and snapshot.global_halt:
        lines.append(Line(fit(HALT_BANNER, width).ljust(width), "halt"))
    if snapshot.error is not None:
        return lines
    agents = snapshot.agents
    name_w, class_w, action_w = _widths(agents, width)
    lines.append(Line(_row([
        ("STATE", _STATE_W, False), ("NAME", name_w, False), ("CLASS", class_w, False),
        ("CPU%", _CPU_W, True), ("MEM", _MEM_W, True), ("PROCS", _PROCS_W, True),
        ("UP", _UP_W, True), ("LAST ACTION", action_w, False)]).ljust(width)[:width],
        "columns"))
    if not agents:
        lines.append(Line(fit("no agents yet: agentctl run --name NAME -- COMMAND", width),
                          "dim"))
        return lines
    room = len(agents) if height is None else height - len(lines)
    shown = agents if room >= len(agents) else agents[:max(0, room - 1)]
    for agent in shown:
        state = str(agent.get("state", "?"))
        stats = agent.get("stats") or {}
        processes = stats.get("processes")
        text = _row([
            (BADGES.get(state, state.upper()), _STATE_W, False),
            (fit(clean(str(agent.get("name", ""))), name_w), name_w, False),
            (fit(clean(str(agent.get("class", ""))), class_w), class_w, False),
            (cpu_text(snapshot.cpu.get(agent.get("name", ""))), _CPU_W, True),
            (human_bytes(stats.get("memory_bytes")), _MEM_W, True),
            ("-" if processes is None else str(processes), _PROCS_W, True),
            (uptime(agent, snapshot.taken_at), _UP_W, True),
            (fit(last_action(agent), action_w), action_w, False),
        ]).rstrip()[:width]
        badge = len(BADGES.get(state, state))
        lines.append(Line(text, "dim" if state == "idle" else "normal",
                          (Span(0, badge, state),)))
    if len(shown) < len(agents):
        lines.append(Line(fit(f"... {len(agents) - len(shown)} more agents: enlarge the "
                              f"terminal, or agentctl ls", width), "dim"))
    return lines


# ----------------------------------------------------------------------------- curses


def _attributes(curses_mod: Any) -> dict[str, int]:
    attrs = {"normal": curses_mod.A_NORMAL, "header": curses_mod.A_BOLD,
             "columns": curses_mod.A_REVERSE, "dim": curses_mod.A_DIM,
             "idle": curses_mod.A_DIM, "error": curses_mod.A_BOLD,
             "halt": curses_mod.A_BOLD | curses_mod.A_REVERSE,
             "active": curses_mod.A_BOLD, "paused": curses_mod.A_BOLD | curses_mod.A_UNDERLINE,
             "killed": curses_mod.A_BOLD | curses_mod.A_REVERSE}
    if not curses_mod.has_colors():
        return attrs
    curses_mod.start_color()
    background = -1
    try:
        curses_mod.use_default_colors()
    except curses_mod.error:
        background = curses_mod.COLOR_BLACK
    # Badges are filled (black on the state's colour) so they read at a glance over SSH.
    pairs = {"active": (curses_mod.COLOR_BLACK, curses_mod.COLOR_GREEN),
             "paused": (curses_mod.COLOR_BLACK, curses_mod.COLOR_YELLOW),
             "killed": (curses_mod.COLOR_WHITE, curses_mod.COLOR_RED),
             "error": (curses_mod.COLOR_RED, background),
             "halt": (curses_mod.COLOR_WHITE, curses_mod.COLOR_RED)}
    for number, (style, (fg, bg)) in enumerate(pairs.items(), start=1):
        curses_mod.init_pair(number, fg, bg)
        attrs[style] = curses_mod.color_pair(number) | curses_mod.A_BOLD
    return attrs


def _paint(screen: curses.window, lines: Sequence[Line], attrs: Mapping[str, int],
           ascii_only: bool) -> None:
    import curses as curses_mod

    height, width = screen.getmaxyx()
    screen.erase()
    for y, line in enumerate(lines[:height]):
        text = line.text[:width]
        if ascii_only:
            text = text.encode("ascii", "replace").decode("ascii")
        # The bottom-right cell cannot be written without an error from curses; the text is
        # already clipped, so whatever it refuses is that one cell.
        try:
            screen.addnstr(y, 0, text, width, attrs.get(line.style, 0))
            for span in line.spans:
                if span.start < width:
                    screen.addnstr(y, span.start, text[span.start:span.end],
                                   width - span.start, attrs.get(span.style, 0))
        except curses_mod.error:
            pass
    screen.noutrefresh()
    curses_mod.doupdate()


def _loop(screen: curses.window, client: Client, interval: float) -> None:
    import curses as curses_mod

    with contextlib.suppress(curses_mod.error):
        curses_mod.curs_set(0)
    attrs = _attributes(curses_mod)
    ascii_only = "utf" not in locale.getpreferredencoding(False).lower()
    meter = CpuMeter()
    snapshot = poll(client, meter)
    next_poll = time.monotonic() + interval
    while True:
        height, width = screen.getmaxyx()
        _paint(screen, render(snapshot, width, height), attrs, ascii_only)
        screen.timeout(max(0, int((next_poll - time.monotonic()) * 1000)))
        key = screen.getch()
        if key in (ord("q"), ord("Q")):
            return
        if key == curses_mod.KEY_RESIZE:
            curses_mod.update_lines_cols()
        if time.monotonic() >= next_poll:
            snapshot = poll(client, meter)
            next_poll = time.monotonic() + interval


@click.command()
@click.option("--interval", "-n", type=click.FloatRange(min=0.1), default=1.0,
              show_default=True, help="Seconds between refreshes.")
@click.option("--once", is_flag=True,
              help="Print one plain-text frame (no curses, no CPU %) and exit.")
@click.pass_context
def top(ctx: click.Context, interval: float, once: bool) -> None:
    """A live table of agents: state, class, CPU, memory, processes, uptime, last action.
    Press q (or Ctrl-C) to quit."""
    base: Client = ctx.obj.client
    # Short timeout: a hung daemon must show as unavailable, not freeze the screen.
    client = Client(base.socket_path, timeout=5.0)
    if once:
        try:
            snapshot = fetch(client, CpuMeter())
        except SupervisorError as exc:
            click.echo(f"agentctl: {exc.code}: {exc.message}", err=True)
            sys.exit(exc.exit_status)
        width = shutil.get_terminal_size((120, 24)).columns
        for line in render(snapshot, max(width, MIN_WIDTH), live=False):
            click.echo(line.text.rstrip())
        return
    if not sys.stdout.isatty():
        raise click.UsageError("agentctl top needs a terminal; use --once for plain text")
    import curses as curses_mod

    # The terminal's own size, never LINES/COLUMNS from the environment (readline exports
    # them): ncurses prefers them to the tty's size and would pin the frame to a stale one.
    # (use_env(False) is no cure: it falls back to terminfo's 80x24, not to the tty.)
    for name in ("LINES", "COLUMNS"):
        os.environ.pop(name, None)
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C quits like q
        curses_mod.wrapper(_loop, client, interval)
