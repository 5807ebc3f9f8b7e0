"""The egress gateway's own process, end to end: a real daemon, real sandboxes and veths, the
worker in its own cgroup on the real kernel. It is confined (cgroup limits, an unprivileged
uid, lower CPU priority, not dumpable, no way into the control socket); killing or hanging it
cuts gateway runs' network, is audited, and the daemon replaces it; it cannot delay a kill,
even while an agent floods it; and when it cannot run, gateway launches are refused."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from supervisor.egress.worker_process import worker_cgroup_path, worker_limits
from supervisor.sandbox.cgroups import Cgroup, CgroupMode, detect_mode
from tests.conftest import require_gateway
from tests.support.daemon import wait_for
from tests.support.egress import LLM_ROUTE, GatewayRig, gateway_rig, host_request

SLEEPER = """
import time
time.sleep(600)
"""
CHAT = (b"GET http://llm.gateway/v1/chat HTTP/1.1\r\nHost: llm.gateway\r\n"
        b"Connection: close\r\n\r\n")


@pytest.fixture
def rig(tmp_root: Path) -> Iterator[GatewayRig]:
    require_gateway()
    with gateway_rig(tmp_root) as prepared:
        yield prepared


def _cgroup(rig: GatewayRig) -> Cgroup:
    from supervisor.config import Config

    config = Config.model_validate({"sandbox": {"cgroup_parent": rig.daemon.cgroup_parent}})
    return Cgroup(worker_cgroup_path(config))


def _worker_pid(rig: GatewayRig) -> int | None:
    pids = _cgroup(rig).pids()
    return pids[0] if len(pids) == 1 else None


def _start(rig: GatewayRig, name: str, script: str = SLEEPER, breaker: bool = True
           ) -> dict[str, str]:
    """A detached gateway run; the proxy environment it was given."""
    profile = rig.profile("gw", LLM_ROUTE) if breaker else rig.profile(
        "gw-nobreaker", LLM_ROUTE + "\n[network.gateway.breaker]\nenabled = false\n")
    path = rig.script(f"{name}.py", script)
    rig.daemon.agentctl_json("run", "--name", name, "--profile", profile, "--workspace",
                             str(rig.workspace), "--detach", "--", "python3", "-u", path)
    return rig.proxy_env(name)


def _audit(rig: GatewayRig, verb: str) -> list[dict[str, Any]]:
    entries = rig.daemon.agentctl_json("audit", "--limit", "1000")["entries"]
    return [e for e in entries if e["verb"] == verb]


def _refused(env: dict[str, str]) -> bool:
    """True when the run's gateway address answers nothing (no listener for it)."""
    try:
        reply = host_request(env, CHAT, timeout=5)
    except OSError:
        return True
    return reply == b""


def _status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return dict(line.split(":\t", 1) for line in lines if ":\t" in line)


def test_the_worker_is_a_confined_process_of_its_own(rig: GatewayRig) -> None:
    assert _worker_pid(rig) is None, "no gateway run yet: no worker (started with the first)"
    env = _start(rig, "first")
    assert host_request(env, CHAT).startswith(b"HTTP/1.1 200")
    pid = _worker_pid(rig)
    assert pid is not None
    assert rig.daemon.proc is not None and pid != rig.daemon.proc.pid
    assert int(_status(pid)["PPid"]) == rig.daemon.proc.pid

    # Its cgroup, with the limits of [egress] (defaults), in every hierarchy that holds one.
    cgroup, limits = _cgroup(rig), worker_limits(_default_config())
    assert str(pid) in (cgroup.path / "cgroup.procs").read_text().split()
    if detect_mode() is CgroupMode.HYBRID:
        own = {line.split(":")[1]: line.split(":")[2]
               for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines()}
        for controller in ("memory", "pids", "cpu,cpuacct" if "cpu,cpuacct" in own else "cpu"):
            assert own[controller] == "/" + cgroup.relative, own
        assert int(cgroup.read("memory.limit_in_bytes")) == limits.memory_max
        assert int(cgroup.read("cpu.shares")) < 1024
        assert int(cgroup.read("cpu.cfs_quota_us")) == int(limits.cpu_max * 100_000)
    else:
        assert int(cgroup.read("memory.max")) == limits.memory_max
        assert int(cgroup.read("cpu.weight")) < 100
        assert cgroup.read("cpu.max").split()[0] == str(int(limits.cpu_max * 100_000))
    assert int(cgroup.read("pids.max")) == limits.pids_max

    # Below the daemon's CPU priority, every thread of it.
    for task in Path(f"/proc/{pid}/task").iterdir():
        nice = int((task / "stat").read_text().rsplit(")", 1)[1].split()[16])
        assert nice == 10, (task, nice)

    # Unprivileged, no capabilities, not dumpable (/proc of it is root's: its uid cannot read
    # the secrets out of its memory), and the secret is nowhere in its argv or environment.
    status = _status(pid)
    uids = {int(u) for u in status["Uid"].split()}
    assert 0 not in uids and int(status["CapEff"], 16) == 0 and int(status["CapPrm"], 16) == 0
    assert status["NoNewPrivs"].strip() == "1"
    assert os.stat(f"/proc/{pid}/mem").st_uid == 0
    for exposed in ("cmdline", "environ"):
        assert rig.secret.encode() not in Path(f"/proc/{pid}/{exposed}").read_bytes()
    assert b"llm-key" not in Path(f"/proc/{pid}/environ").read_bytes()

    # Its uid cannot reach the control socket (the kill switch is not the gateway's to hold).
    uid = next(iter(uids))
    probe = subprocess.run(
        [sys.executable, "-c", "import socket, sys\n"
         "s = socket.socket(socket.AF_UNIX)\n"
         "try:\n    s.connect(sys.argv[1])\nexcept PermissionError:\n    print('refused')\n"
         "else:\n    print('connected')", str(rig.daemon.socket)],
        user=uid, group=int(status["Gid"].split()[0]), extra_groups=[], capture_output=True,
        text=True, timeout=30, cwd="/")
    assert probe.stdout.strip() == "refused", probe
    rig.daemon.agentctl("kill", "first", "--reason", "test over", check=True)


def test_a_killed_worker_cuts_gateway_runs_is_audited_and_replaced(rig: GatewayRig) -> None:
    env = _start(rig, "cut")
    assert host_request(env, CHAT).startswith(b"HTTP/1.1 200")
    run_id = rig.daemon.agentctl_json("inspect", "cut")["run"]["id"]
    old = _worker_pid(rig)
    assert old is not None
    os.kill(old, signal.SIGKILL)

    wait_for(lambda: _audit(rig, "gateway_exited"), 30, what="the worker's exit in the audit")
    exited = _audit(rig, "gateway_exited")[-1]
    assert exited["detail"]["signal"] == "SIGKILL" and exited["detail"]["pid"] == old
    assert exited["detail"]["runs_without_network"] == [run_id]
    wait_for(lambda: _worker_pid(rig) not in (None, old), 60, what="a new worker")
    # The run behind the dead worker stays without network: its token is never re-issued.
    assert _refused(env)
    assert rig.daemon.agentctl_json("inspect", "cut")["state"] == "active"

    # New gateway runs get a listener from the new worker.
    fresh = _start(rig, "fresh")
    assert host_request(fresh, CHAT).startswith(b"HTTP/1.1 200")
    rig.daemon.agentctl("kill", "--all", "--reason", "test over", check=True)
    summary = [e for e in _audit(rig, "egress_summary") if e["detail"]["run"] == run_id]
    assert summary and summary[0]["detail"]["gateway_lost"] is True
    assert not rig.daemon.residue()


def test_a_hung_worker_cannot_delay_a_kill(rig: GatewayRig) -> None:
    env = _start(rig, "stuck")
    assert host_request(env, CHAT).startswith(b"HTTP/1.1 200")
    old = _worker_pid(rig)
    assert old is not None
    os.kill(old, signal.SIGSTOP)
    try:
        rig.daemon.agentctl("kill", "stuck", "--reason", "worker hung", check=True)
        assert rig.daemon.agentctl_json("inspect", "stuck")["state"] == "killed"
        kill = next(e for e in _audit(rig, "kill") if e["target"] == "stuck")
        assert kill["detail"]["confirmed_empty"] is True
        assert not rig.daemon.agent_pids()
        # The run's end asks the worker to close its listener; no answer, so it is replaced.
        wait_for(lambda: _audit(rig, "gateway_exited"), 60, what="the hung worker's removal")
        assert "no answer" in _audit(rig, "gateway_exited")[-1]["reason"]
        wait_for(lambda: _worker_pid(rig) not in (None, old), 60, what="a new worker")
    finally:
        if Path(f"/proc/{old}").exists():
            os.kill(old, signal.SIGCONT)
    assert not rig.daemon.residue()


def test_a_kill_during_a_refusal_flood_is_confirmed_and_the_flood_summarised(
        rig: GatewayRig) -> None:
    flood = r"""
        import base64, os, socket, threading, time
        proxy = os.environ["HTTP_PROXY"].removeprefix("http://")
        creds, _, gw = proxy.rpartition("@")
        host, port = gw.split(":")[0], int(gw.split(":")[1])
        auth = base64.b64encode(creds.encode()).decode()
        count = [0]
        def hammer(n):
            while True:
                try:
                    s = socket.create_connection((host, port), timeout=5)
                    target = f"denied{count[0] % 200}.example:443"
                    s.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n"
                              f"Proxy-Authorization: Basic {auth}\r\n\r\n".encode())
                    s.recv(4096)
                    s.close()
                    count[0] += 1
                    if count[0] == 300:
                        open("/workspace/flooding", "w").close()
                except OSError:
                    pass
        for n in range(8):
            threading.Thread(target=hammer, args=(n,), daemon=True).start()
        time.sleep(600)
    """
    # The breaker would pause the flooder (refusals count toward it); here the kill must land
    # while the flood is still on.
    _start(rig, "flooder", flood.replace("\n        ", "\n"), breaker=False)
    run_id = rig.daemon.agentctl_json("inspect", "flooder")["run"]["id"]
    wait_for(lambda: rig.exists("flooding"), 60, what="the refusal flood")
    result = rig.daemon.agentctl("kill", "flooder", "--reason", "flood", "--json", check=True)
    answer = json.loads(result.stdout)["results"][0]
    assert answer["new_state"] == "killed" and answer["error"] is None, result.stdout
    assert rig.daemon.agentctl_json("inspect", "flooder")["state"] == "killed"
    kill = next(e for e in _audit(rig, "kill") if e["target"] == "flooder")
    assert kill["detail"]["confirmed_empty"] is True
    assert not rig.daemon.agent_pids()
    # The flood reached the audit log as a bounded set of rows and one summary with counts.
    wait_for(lambda: [e for e in _audit(rig, "egress_summary")
                      if e["detail"]["run"] == run_id], 30, what="the run's egress summary")
    rows = [e for e in _audit(rig, "egress_denied") if e["detail"].get("run") == run_id]
    summary = next(e for e in _audit(rig, "egress_summary") if e["detail"]["run"] == run_id)
    counted = sum(summary["detail"]["denials"].values())
    assert 1 <= len(rows) <= 50 and counted >= 300 > len(rows), (len(rows), counted)
    assert not rig.daemon.residue()


def test_gateway_launches_are_refused_while_the_worker_cannot_run(tmp_root: Path) -> None:
    require_gateway()
    # 4 MiB cannot hold an interpreter: the worker is OOM-killed before it is ready.
    with gateway_rig(tmp_root, worker_memory_max="4M") as rig:
        profile = rig.profile("gw", LLM_ROUTE)
        result = rig.daemon.agentctl("run", "--name", "nogw", "--profile", profile, "--json",
                                     "--", "true")
        assert result.returncode == 125, result.stdout + result.stderr
        body = json.loads(result.stdout)["error"]
        assert body["code"] == "gateway_unavailable", body
        launch = [e for e in _audit(rig, "launch") if e["target"] == "nogw"]
        assert launch and launch[-1]["outcome"] == "failed:gateway_unavailable"
        assert not rig.daemon.residue()
        # A run without network does not need the gateway and is not refused.
        none = rig.daemon.agentctl("run", "--name", "offline", "--json", "--", "true")
        assert none.returncode == 0, none.stdout + none.stderr


def _default_config() -> Any:
    from supervisor.config import Config

    return Config()



# Another process of the worker's uid (nobody, by default: any service's on the host). It
# seizes the worker with ptrace as soon as it sees it (in its cgroup, by its argv), then, once
# the worker holds the route's secret, makes it call prctl(PR_SET_DUMPABLE, 1) in place of its
# next syscall (which is then made as it was), and reads its memory; or (`mem`) opens its
# /proc/PID/mem and maps at once and reads them then. Both are judged once, at the attach or
# the open: a worker that is never open to its uid, from its exec on, is never held.
SEIZER = r"""
import ctypes, os, sys, time
libc = ctypes.CDLL(None, use_errno=True)
libc.ptrace.restype = ctypes.c_long
libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
SEIZE, INTERRUPT, SYSCALL, GETREGS, SETREGS, DETACH, WALL = 0x4206, 0x4207, 24, 12, 13, 17, 1 << 30
ORIG_RAX, RDI, RSI, RAX, RIP, ENOSYS = 15, 14, 13, 10, 16, (1 << 64) - 38
out, go, secret, how, procs = sys.argv[1], sys.argv[2], sys.argv[3].encode(), *sys.argv[4:]
def say(text):
    with open(out, "a") as f:
        f.write(text + "\n")
pid, deadline = None, time.monotonic() + 120
while pid is None and time.monotonic() < deadline:  # its cgroup's processes (world-readable)
    try:
        with open(procs, "rb") as f:
            listed = f.read().split()
    except OSError:
        continue
    for name in listed:
        try:
            with open(f"/proc/{int(name)}/cmdline", "rb") as f:
                if b"supervisor.egress.worker" in f.read().split(b"\0"):
                    pid = int(name)
        except (OSError, ValueError):
            pass
if pid is None:
    say("no worker seen")
    sys.exit(1)
say(f"worker {pid}")
if how == "mem":  # no ptrace: /proc/PID/mem and maps, opened while it may be; read later
    try:
        maps, mem = open(f"/proc/{pid}/maps", "rb", 0), open(f"/proc/{pid}/mem", "rb", 0)
    except OSError as exc:
        say(f"open refused: {exc.strerror}")
        sys.exit(0)
    say("opened")
    while not os.path.exists(go):
        time.sleep(0.05)
    found = False
    for line in maps.read().decode().splitlines():
        where, mode = line.split()[:2]
        start, end = (int(x, 16) for x in where.split("-"))
        if mode.startswith("r") and not found:
            try:
                mem.seek(start)
                found = secret in mem.read(end - start)
            except (OSError, ValueError, OverflowError):
                pass
    say("secret read" if found else "secret not found")
    sys.exit(0)
if libc.ptrace(SEIZE, pid, None, None) != 0:
    say(f"seize refused: {os.strerror(ctypes.get_errno())}")
    sys.exit(0)
say("seized")
while not os.path.exists(go):  # held, and let run: each signal it gets is passed on
    got, status = os.waitpid(pid, os.WNOHANG | WALL)
    if got and os.WIFSTOPPED(status):
        passed = os.WSTOPSIG(status) if status >> 16 == 0 else 0
        libc.ptrace(7, pid, None, ctypes.c_void_p(passed))  # PTRACE_CONT
    time.sleep(0.01)
regs = (ctypes.c_ulonglong * 27)()
libc.ptrace(INTERRUPT, pid, None, None)
os.waitpid(pid, WALL)
while True:  # to the entry of a syscall (rax -ENOSYS there)
    libc.ptrace(SYSCALL, pid, None, None)
    os.waitpid(pid, WALL)
    libc.ptrace(GETREGS, pid, None, ctypes.byref(regs))
    if regs[RAX] == ENOSYS:
        break
saved = list(regs)
regs[ORIG_RAX], regs[RDI], regs[RSI] = 157, 4, 1  # prctl(PR_SET_DUMPABLE, 1)
libc.ptrace(SETREGS, pid, None, ctypes.byref(regs))
libc.ptrace(SYSCALL, pid, None, None)
os.waitpid(pid, WALL)
for i, value in enumerate(saved):  # the syscall it meant to make, made again
    regs[i] = value
regs[RIP], regs[RAX] = saved[RIP] - 2, saved[ORIG_RAX]
libc.ptrace(SETREGS, pid, None, ctypes.byref(regs))
libc.ptrace(DETACH, pid, None, None)
found = False
with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb", 0) as mem:
    for line in maps:
        where, mode = line.split()[:2]
        start, end = (int(x, 16) for x in where.split("-"))
        if mode.startswith("r") and not found:
            try:
                mem.seek(start)
                found = secret in mem.read(end - start)
            except (OSError, ValueError, OverflowError):
                pass
say("secret read" if found else "secret not found")
"""


@pytest.mark.parametrize("how", ["ptrace", "mem"])
def test_no_process_of_the_workers_uid_can_take_hold_of_it(rig: GatewayRig, tmp_root: Path,
                                                            how: str) -> None:
    """The worker holds every gateway run's secrets and runs as an unprivileged uid that other
    processes of the host may share (nobody, by default). Started as that uid, it was dumpable
    from its exec until its main() cleared it, a Python start and imports later: long enough
    for another process of the uid to seize it with ptrace and keep it, or (a variant) to open
    its /proc/PID/mem, which is judged at open only; either read the secrets out once the
    worker had them. It must never be open to its uid, from its first instruction on."""
    attack = tmp_root / "attack"
    attack.mkdir(mode=0o777)
    attack.chmod(0o777)
    said, go = attack / "said", attack / "go"
    seizer = subprocess.Popen(
        ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "--",
         sys.executable, "-I", "-c", SEIZER, str(said), str(go), rig.secret, how,
         str(_cgroup(rig).path / "cgroup.procs")], cwd="/")
    try:
        env = _start(rig, "held")
        wait_for(lambda: said.exists() and "worker" in said.read_text(), 60,
                 what="the seizer to see the worker")
        # The route's key on a request: the worker holds it now.
        assert host_request(env, CHAT).startswith(b"HTTP/1.1 200")
        go.touch()
        assert seizer.wait(timeout=60) == 0, said.read_text()
    finally:
        if seizer.poll() is None:
            seizer.kill()
            seizer.wait()
    text = said.read_text()
    assert "secret read" not in text and "seized" not in text and "opened" not in text, text
    assert host_request(env, CHAT).startswith(b"HTTP/1.1 200")  # the worker serves on
    rig.daemon.agentctl("kill", "held", "--reason", "test over", check=True)
