"""Gateway runs of CI mode side by side on one host: embedded runs in two slots, and an embedded
run beside a daemon's, with the egress pool they share (the default, 10.213.0.0/16). A run's
gateway listens on its /30's address before its link has that address (the host-interface check
of the pool cannot see it yet), so the first run is held in that window, its link not yet made,
while the second starts: when both drew from the same addresses the second picked the same /30
and its gateway could not listen (exit 125). Both must pass, each agent reaching its own gateway.
Real runc, namespaces, veths, nftables and gateway workers; needs root."""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import require, require_root_and_runc
from tests.support.daemon import running_daemon, wait_for
from tests.support.embedded import (
    MODEL_API_KEY,
    WORKSPACE_UID,
    agentctl_command,
    agentctl_env,
    clean_state_root,
)

pytestmark = pytest.mark.e2e

# In the runner (root, `python -I`): once supervisor.egress.link has loaded, its `attach` (the
# run's veth, addressed; daemon/egress.py RunNetwork.attach) says which address it is about to
# give the link, in $HOLD_LINK_AT, and waits for $HOLD_LINK_UNTIL (4 minutes at most) first.
# The module is patched as it is first imported, not imported here: the runner's own start
# (ci/__main__.py) loads it as it always does.
HOLD_RUNNER = r"""
import builtins, os, sys, time
real_import = builtins.__import__

def hold(attach):
    def held(netns, ifname, addresses):
        with open(os.environ["HOLD_LINK_AT"] + ".tmp", "w") as f:
            f.write(str(addresses.host_ip))
        os.rename(os.environ["HOLD_LINK_AT"] + ".tmp", os.environ["HOLD_LINK_AT"])
        deadline = time.monotonic() + 240
        while not os.path.exists(os.environ["HOLD_LINK_UNTIL"]) and time.monotonic() < deadline:
            time.sleep(0.01)
        return attach(netns, ifname, addresses)
    return held

def importing(*args, **kwargs):
    module = real_import(*args, **kwargs)
    link = sys.modules.get("supervisor.egress.link")
    if builtins.__import__ is importing and hasattr(link, "attach"):
        builtins.__import__ = real_import
        link.attach = hold(link.attach)
    return module

builtins.__import__ = importing
import runpy
runpy.run_module("supervisor.ci", run_name="__main__", alter_sys=True)
"""

# agentctl as ever, but exec'ing the runner above in place of `python -I -m supervisor.ci`.
HELD_AGENTCTL = f"""
import sys
from supervisor.cli import embedded, fast
embedded.runner_argv = lambda: [sys.executable, "-I", "-c", {HOLD_RUNNER!r}]
sys.argv = ["agentctl", *sys.argv[1:]]
fast.main()
"""

# Through the proxy its run was given, to a host off the allow-list: its gateway refuses it
# (403 egress_denied), which its run's report counts. Then up until the test says "go".
AGENT = r"""
import os, time, urllib.error, urllib.request
gateway = os.environ["AGENT_SUPERVISOR_GATEWAY"]
try:
    urllib.request.urlopen("http://example.com/", timeout=30)
    print("not refused")
except urllib.error.HTTPError as e:
    print("refused by", gateway, e.code, e.headers.get("X-Agent-Supervisor-Denied"))
with open(".ready", "w") as f:
    f.write(gateway)
os.rename(".ready", "ready")
deadline = time.monotonic() + 240
while not os.path.exists("go") and time.monotonic() < deadline:
    time.sleep(0.05)
print("done")
"""


@pytest.fixture
def ci(tmp_root: Path) -> Iterator[Path]:
    require_root_and_runc()
    require(shutil.which("nft") is not None, "needs nft (apt-get install nftables)")
    with clean_state_root(tmp_root / "ci-state") as state_root:
        yield state_root


def workspace(tmp_root: Path, name: str) -> Path:
    path = tmp_root / name
    path.mkdir()
    os.chown(path, WORKSPACE_UID, WORKSPACE_UID)
    return path


class Held:
    """An embedded gateway run whose runner stops before it makes the run's link."""

    def __init__(self, ci: Path, tmp_root: Path, ws: Path) -> None:
        self.at, self.until = tmp_root / "held-at", tmp_root / "held-until"
        self.report = tmp_root / "held.json"
        self.ws = ws
        self.proc = subprocess.Popen(
            [sys.executable, "-c", HELD_AGENTCTL, "run", "--embedded", "--profile",
             "coding-agent", "--workspace", str(ws), "--report", str(self.report), "--",
             "python3", "-c", AGENT],
            env=agentctl_env(ci, HOLD_LINK_AT=str(self.at), HOLD_LINK_UNTIL=str(self.until)),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd="/",
            start_new_session=True)

    def wait_held(self) -> ipaddress.IPv4Address:
        """The address its gateway listens on, its link not made yet."""
        wait_for(lambda: self.at.exists() or self.proc.poll() is not None, timeout=120,
                 what="the held run's gateway, listening before its link is made")
        assert self.proc.poll() is None, self.proc.communicate()
        return ipaddress.IPv4Address(self.at.read_text())

    def release(self) -> None:
        self.until.touch()

    def stop(self) -> None:
        """Released and, if still going, cancelled (SIGTERM: the run is killed and torn down),
        so a failed test leaves nothing; SIGKILLed only if that hangs."""
        stop(self.proc, self.release)


def stop(proc: subprocess.Popen[str], release: Callable[[], None] = lambda: None) -> None:
    release()
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()


def up(proc: subprocess.Popen[str], ws: Path, what: str) -> ipaddress.IPv4Address:
    """The gateway its agent reached, once the agent has (the run still going)."""
    wait_for(lambda: (ws / "ready").exists() or proc.poll() is not None, timeout=120,
             what=f"{what}'s agent")
    assert proc.poll() is None, (what, proc.communicate())
    host, _, port = (ws / "ready").read_text().rpartition(":")
    assert port == "3128"
    return ipaddress.IPv4Address(host)


def ended(proc: subprocess.Popen[str], ws: Path, report: Path,
          gateway: ipaddress.IPv4Address) -> None:
    (ws / "go").touch()
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, out + err
    assert f"refused by {gateway}:3128 403 egress_denied" in out and "done" in out, out
    egress = json.loads(report.read_text())["egress"]
    assert egress["denied"] == 1 and egress["calls"] == 0, egress


def test_two_slots_gateway_runs_side_by_side(ci: Path, tmp_root: Path) -> None:
    """The second run starts while the first one's gateway listens and its link is not made:
    it takes its own slot's address, and both agents reach their own gateways."""
    held = Held(ci, tmp_root, workspace(tmp_root, "ws-a"))
    ws_b, report_b = workspace(tmp_root, "ws-b"), tmp_root / "b.json"
    second: subprocess.Popen[str] | None = None
    try:
        first_at = held.wait_held()
        second = subprocess.Popen(
            agentctl_command("run", "--embedded", "--profile", "coding-agent", "--workspace",
                             str(ws_b), "--report", str(report_b), "--", "python3", "-c",
                             AGENT),
            env=agentctl_env(ci), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            cwd="/", start_new_session=True)
        second_at = up(second, ws_b, "the second run")
        held.release()
        assert up(held.proc, held.ws, "the first run") == first_at
        # Both agents up at once, each behind a gateway of its own, in its slot's /30.
        assert first_at != second_at
        upper = ipaddress.IPv4Network("10.213.128.0/17")
        assert first_at in upper and second_at in upper, (first_at, second_at)
        ended(second, ws_b, report_b, second_at)
        ended(held.proc, held.ws, held.report, first_at)
    finally:
        held.stop()
        if second is not None:
            stop(second)


def test_a_daemons_gateway_run_beside_an_embedded_one(ci: Path, tmp_root: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A daemon with the same pool launches a gateway run while an embedded run is held in the
    same window: the daemon's runs take the pool's lower half, the slots the upper."""
    monkeypatch.setenv("MODEL_API_KEY", MODEL_API_KEY)  # coding-agent's model route reads it
    ws_d = workspace(tmp_root, "ws-daemon")
    with running_daemon(tmp_root, egress={"pool": "10.213.0.0/16"}) as daemon:
        held = Held(ci, tmp_root, workspace(tmp_root, "ws-a"))
        try:
            embedded_at = held.wait_held()
            launched = daemon.agentctl("run", "--name", "beside", "--profile", "coding-agent",
                                       "--workspace", str(ws_d), "--detach", "--", "python3",
                                       "-c", AGENT)
            assert launched.returncode == 0, launched.stdout + launched.stderr
            wait_for(lambda: (ws_d / "ready").exists(), timeout=120,
                     what="the daemon run's agent")
            host, _, _ = (ws_d / "ready").read_text().rpartition(":")
            daemon_at = ipaddress.IPv4Address(host)
            held.release()
            assert up(held.proc, held.ws, "the embedded run") == embedded_at
            assert daemon_at in ipaddress.IPv4Network("10.213.0.0/17"), daemon_at
            assert embedded_at in ipaddress.IPv4Network("10.213.128.0/17"), embedded_at
            ended(held.proc, held.ws, held.report, embedded_at)
            (ws_d / "go").touch()
            assert daemon.settled("beside") == {}
            run = daemon.client.agent("beside")["run"]
            assert (run["state"], run["exit_code"]) == ("exited", 0), run
            log = daemon.agentctl("logs", "beside", check=True).stdout
            assert f"refused by {daemon_at}:3128 403 egress_denied" in log, log
        finally:
            held.stop()
