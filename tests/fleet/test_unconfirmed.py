"""A live host that does not answer a fleet kill: its daemon frozen (SIGSTOP) while its lease
is kept alive, so the store still lists it as a member. `agentctl fleet kill` prints its row
as "no answer", exits 13 and names it; once it runs again it applies the kill, and `agentctl
fleet status` shows every host confirmed."""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import signal
import threading

import pytest

from supervisor.errors import SupervisorError
from supervisor.fleet.etcd import Etcd
from tests.fleet.support import Fleet
from tests.fleet.test_halt import _launch, _lift_all, _registered, _state
from tests.support.daemon import wait_for

pytestmark = [pytest.mark.privileged, pytest.mark.e2e]


def test_a_live_host_that_does_not_answer_is_named_and_the_command_fails(
        fleet: Fleet, request: pytest.FixtureRequest) -> None:
    tag = secrets.token_hex(2)
    name, agent_class = f"m-{tag}", f"mute{tag}"
    for host in fleet.hosts:
        _launch(host, name, agent_class)
    _registered(fleet, name)
    mute = fleet.hosts[1]
    assert mute.daemon.proc is not None
    pid = mute.daemon.proc.pid
    with fleet.operator_client() as operator:
        registration = operator.get(fleet.keys.registration(mute.host_id))
    assert registration is not None and registration.lease

    # The host's lease, kept alive with its own credentials while its daemon cannot.
    stop = threading.Event()

    def keep_alive() -> None:
        with Etcd(mute.creds(fleet)) as etcd:
            while True:
                with contextlib.suppress(SupervisorError):
                    etcd.keepalive(registration.lease)
                if stop.wait(1.0):
                    return

    keeper = threading.Thread(target=keep_alive, daemon=True)
    keeper.start()

    def thaw() -> None:
        stop.set()
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
        keeper.join(10)

    request.addfinalizer(thaw)
    os.kill(pid, signal.SIGSTOP)
    try:
        ran = fleet.agentctl("kill", "--class", agent_class, "--reason", "one host mute",
                             "--deadline", "20", timeout=120)
    finally:
        thaw()
    said = f"exit {ran.returncode}\n{ran.stdout}\n{ran.stderr}"
    assert ran.returncode == 13, said
    rows = {line.split()[0]: line for line in ran.stdout.splitlines()
            if line and line.split()[0] in {h.host_id for h in fleet.hosts}}
    assert sorted(rows) == ["h1", "h2", "h3", "h4", "h5"], said
    assert "no answer" in rows["h2"], said
    assert all("confirmed" in rows[h] for h in ("h1", "h3", "h4", "h5")), said
    assert "not confirmed by: h2\n" in ran.stderr, said
    found = re.search(r"^fleet kill (\S+):", ran.stdout, re.MULTILINE)
    assert found is not None, said

    # Running again, the host applies the kill it missed; the operator's follow-up sees it.
    code, status = fleet.agentctl_json("status", found.group(1), "--deadline", "60",
                                       timeout=120)
    assert code == 0 and all(r["status"] == "confirmed" for r in status["hosts"]), status
    wait_for(lambda: _state(mute, name) == "killed", timeout=30, what="the kill on h2")
    _lift_all(fleet)
