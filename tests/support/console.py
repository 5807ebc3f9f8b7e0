"""`agentctl console` as a real process for the browser tests (tests/e2e/test_console.py,
tests/fleet/test_console_fleet.py), and where their screenshots go. Needs root to start the
console as another user."""

from __future__ import annotations

import contextlib
import os
import pwd
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from selenium.webdriver.chrome.webdriver import WebDriver

from tests.support.daemon import Daemon

REPO = Path(__file__).resolve().parents[2]
# The committed set in docs/img/ is refreshed with AGENT_SUPERVISOR_SCREENSHOTS=docs/img; by
# default the screenshots go to a scratch directory so a test run leaves the tree clean.
SHOTS = Path(os.environ.get("AGENT_SUPERVISOR_SCREENSHOTS")
             or "/tmp/agent-supervisor-console-screenshots")


@dataclass
class Console:
    url: str  # with the token
    process: subprocess.Popen[str]

    @property
    def base(self) -> str:
        parts = urlsplit(self.url)
        return f"{parts.scheme}://{parts.netloc}"

    @property
    def port(self) -> int:
        return int(urlsplit(self.url).port or 0)


@contextlib.contextmanager
def console(daemon: Daemon, user: pwd.struct_passwd | None = None, *options: str,
            env_extra: dict[str, str] | None = None) -> Iterator[Console]:
    """`agentctl console` as root or as `user`; its first line of output is the URL."""
    env = {"AGENT_SUPERVISOR_SOCKET": str(daemon.socket), "PATH": "/usr/bin:/bin",
           "HOME": "/", "PYTHONPATH": str(REPO), **(env_extra or {})}
    extra: dict[str, Any] = {}
    if user is not None:
        extra = {"user": user.pw_uid, "group": user.pw_gid,
                 "extra_groups": os.getgrouplist(user.pw_name, user.pw_gid)}
    process = subprocess.Popen([sys.executable, "-m", "supervisor.cli", "console", "--poll",
                                "0.5", *options], env=env, cwd="/", text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, **extra)
    try:
        assert process.stdout is not None
        url = process.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:") and "?token=" in url, (
            url, process.stderr.read() if process.poll() is not None and process.stderr else "")
        yield Console(url, process)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()


def shot(page: WebDriver, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    path = SHOTS / f"console-{name}.png"
    assert page.save_screenshot(str(path))
    assert path.read_bytes().startswith(b"\x89PNG")
