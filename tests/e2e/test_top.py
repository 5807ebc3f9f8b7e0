"""`agentctl top` in a real terminal: tmux runs it against a real daemon; send-keys types,
capture-pane reads the screen (with -e, the colours). Needs root (the daemon) and tmux."""

from __future__ import annotations

import os
import re
import secrets
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import require
from tests.support.daemon import REPO, Daemon, new_daemon, wait_for

WIDTH, HEIGHT = 160, 40
# Generous: each frame is one request round trip, but CI machines are slow and shared.
SCREEN_WAIT = 20.0
# A badge is filled with its state's colour: SGR background 42 green, 43 yellow, 41 red.
BADGE_COLOUR = {"ACTIVE": "42", "PAUSED": "43", "KILLED": "41"}


class Terminal:
    """One tmux server of the test's own (its socket in the test's directory), one session
    running one command."""

    def __init__(self, directory: Path) -> None:
        self.socket = directory / f"tmux-{secrets.token_hex(4)}.sock"
        self.session = "top"

    def tmux(self, *args: str) -> str:
        result = subprocess.run(["tmux", "-S", str(self.socket), "-f", "/dev/null", *args],
                                capture_output=True, text=True, timeout=30, check=True)
        return result.stdout

    def start(self, command: list[str], socket_path: Path) -> None:
        shell = (f"env AGENT_SUPERVISOR_SOCKET={shlex.quote(str(socket_path))} "
                 + " ".join(shlex.quote(arg) for arg in command))
        # remain-on-exit keeps the pane after the command ends, so its exit status is readable.
        self.tmux("new-session", "-d", "-s", self.session, "-x", str(WIDTH), "-y", str(HEIGHT),
                  "-c", str(REPO), shell, ";", "set-option", "-t", self.session,
                  "remain-on-exit", "on")

    def screen(self, colours: bool = False) -> str:
        return self.tmux("capture-pane", "-p", "-t", self.session, *(["-e"] if colours else []))

    def wait_screen(self, pattern: str, what: str) -> str:
        """The screen once `pattern` (a regex) shows on it; fails with the last screen."""
        last = {"screen": ""}

        def shows() -> str | None:
            last["screen"] = self.screen()
            return last["screen"] if re.search(pattern, last["screen"], re.MULTILINE) else None

        try:
            return str(wait_for(shows, timeout=SCREEN_WAIT, interval=0.1, what=what))
        except AssertionError as exc:
            raise AssertionError(f"{exc}; the screen was:\n{last['screen']}") from None

    def pane(self, fmt: str) -> str:
        return self.tmux("display-message", "-p", "-t", self.session, fmt).strip()

    def wait_exit(self) -> str:
        """How the command in the pane ended: "status N" or "signal N".

        tmux (3.3a) sometimes leaves the exited command unreaped, a zombie, and then never
        reports the pane dead; the zombie's wait status is in /proc/PID/stat (field 52)."""
        pid = self.pane("#{pane_pid}")

        def ended() -> str | None:
            dead, status, signal = self.pane(
                "#{pane_dead}:#{pane_dead_status}:#{pane_dead_signal}").split(":")
            # The pane can read dead a moment before tmux has its status: poll again.
            if dead == "1" and (status or signal):
                return f"status {status}" if status else f"signal {signal}"
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
            except FileNotFoundError:
                return None
            if fields[0] != "Z":
                return None
            wait_status = int(fields[52 - 3])
            if os.WIFSIGNALED(wait_status):
                return f"signal {os.WTERMSIG(wait_status)}"
            return f"status {os.WEXITSTATUS(wait_status)}"

        try:
            return str(wait_for(ended, timeout=SCREEN_WAIT, interval=0.1,
                                what="agentctl top to exit"))
        except AssertionError as exc:
            raise AssertionError(f"{exc}; the screen was:\n{self.screen()}") from None

    def kill_server(self) -> None:
        subprocess.run(["tmux", "-S", str(self.socket), "kill-server"], capture_output=True,
                       timeout=30, check=False)
        self.socket.unlink(missing_ok=True)  # tmux 3.3a leaves it behind


@pytest.fixture
def terminal(tmp_root: Path) -> Iterator[Terminal]:
    require(shutil.which("tmux") is not None, "needs tmux (apt-get install tmux)")
    term = Terminal(tmp_root)
    try:
        yield term
    finally:
        term.kill_server()


def top_command(*extra: str) -> list[str]:
    return [sys.executable, "-m", "supervisor.cli", "top", "--interval", "0.3", *extra]


def row(name: str, state: str) -> str:
    return rf"^{state}\s+{re.escape(name)}\s"


def badge_line(screen: str, name: str) -> str:
    [line] = [line for line in screen.splitlines() if re.search(rf"\s{re.escape(name)}\s", line)]
    return line


def test_top_shows_agents_live_and_quits_on_q(daemon: Daemon, terminal: Terminal) -> None:
    for name in ("alpha", "paused-one", "killed-one"):
        daemon.agentctl("run", "--detach", "--name", name, "--class", "crew", "--",
                        "sleep", "600", check=True)
    daemon.agentctl("pause", "paused-one", "--reason", "looks odd", check=True)
    daemon.agentctl("kill", "killed-one", "--reason", "runaway", check=True)

    terminal.start(top_command(), daemon.socket)
    screen = terminal.wait_screen(row("alpha", "ACTIVE"), "alpha active")
    assert re.search(row("paused-one", "PAUSED"), screen, re.MULTILINE)
    assert re.search(row("killed-one", "KILLED"), screen, re.MULTILINE)
    assert "3 agents: 1 active 1 paused 1 killed 0 idle" in screen
    assert "root(uid=0): looks odd" in screen and "root(uid=0): runaway" in screen
    # The second frame has a CPU % for the live runs (the first can only show "-").
    terminal.wait_screen(r"^ACTIVE\s+alpha\s+crew\s+\d+\.\d\s", "a CPU % for alpha")

    coloured = terminal.screen(colours=True)
    for name, badge in (("alpha", "ACTIVE"), ("paused-one", "PAUSED"), ("killed-one", "KILLED")):
        line = badge_line(coloured, name)
        assert re.search(rf"\x1b\[[0-9;]*\b{BADGE_COLOUR[badge]}m{badge}", line), repr(line)

    daemon.agentctl("kill", "alpha", "--reason", "seen in top", check=True)
    screen = terminal.wait_screen(row("alpha", "KILLED"), "alpha's badge to turn KILLED")
    assert "3 agents: 0 active 1 paused 2 killed 0 idle" in screen
    assert "root(uid=0): seen in top" in screen

    terminal.tmux("send-keys", "-t", terminal.session, "q")
    assert terminal.wait_exit() == "status 0"


def test_top_waits_for_the_daemon_and_survives_it_going_away(tmp_root: Path,
                                                             terminal: Terminal) -> None:
    daemon = new_daemon(tmp_root)
    terminal.start(top_command(), daemon.socket)
    terminal.wait_screen(r"^daemon unavailable: no control socket at .*\(retrying\)",
                         "the unavailable message")
    try:
        daemon.start()
        terminal.wait_screen(r"^daemon ok  0 agents", "the daemon to show up")
        terminal.wait_screen(r"^no agents yet", "the empty list")
        daemon.agentctl("run", "--detach", "--name", "late", "--", "sleep", "600", check=True)
        terminal.wait_screen(row("late", "ACTIVE"), "the new agent")
    finally:
        assert daemon.stop() == 0
        daemon.cleanup_host()
    terminal.wait_screen(r"^daemon unavailable: ", "the daemon going away")
    # Ctrl-C quits as q does.
    terminal.tmux("send-keys", "-t", terminal.session, "C-c")
    assert terminal.wait_exit() == "status 0"
    assert daemon.clean() == {}


def test_top_follows_a_resize_and_says_when_the_terminal_is_too_small(
        daemon: Daemon, terminal: Terminal) -> None:
    daemon.agentctl("run", "--detach", "--name", "a-" + "x" * 60, "--", "sleep", "600",
                    check=True)
    terminal.start(top_command(), daemon.socket)
    terminal.wait_screen(r"^ACTIVE\s+a-x{29}~\s", "the long name, cut")
    terminal.tmux("resize-window", "-t", terminal.session, "-x", "40", "-y", "10")
    terminal.wait_screen(r"^terminal too small: 40x10", "the too-small message")
    terminal.tmux("resize-window", "-t", terminal.session, "-x", "70", "-y", "12")
    screen = terminal.wait_screen(r"^ACTIVE\s+a-x{9}~\s", "the table at 70 columns")
    assert all(len(line) <= 70 for line in screen.splitlines())
    terminal.tmux("send-keys", "-t", terminal.session, "q")
    assert terminal.wait_exit() == "status 0"
