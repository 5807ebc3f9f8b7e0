"""What an agent can and cannot do from inside its sandbox, probed from inside a real container
(runc, and the Docker engine) started by a real daemon. Needs root (and dockerd for docker)."""

from __future__ import annotations

import json
import os
import socket
import threading
from pathlib import Path

from tests.conftest import BOTH_RUNTIMES
from tests.support.daemon import Daemon

pytestmark = BOTH_RUNTIMES

PROBE = r"""
import ctypes, errno, json, os, socket, sys
libc = ctypes.CDLL(None, use_errno=True)
out = {}
def attempt(name, fn):
    try:
        value = fn()
        out[name] = {"ok": True, "value": value}
    except OSError as exc:
        out[name] = {"ok": False, "errno": exc.errno}
def call(result):
    if result == -1:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return result
attempt("read_shadow", lambda: open("/etc/shadow").read())
attempt("write_usr", lambda: open("/usr/agent-was-here", "w").write("x"))
attempt("write_etc", lambda: open("/etc/agent-was-here", "w").write("x"))
attempt("write_tmp", lambda: open("/tmp/scratch", "w").write("x"))
st = os.stat("/tmp"); vfs = os.statvfs("/tmp")
out["tmp_mode"] = oct(st.st_mode & 0o7777)
out["tmp_bytes"] = vfs.f_blocks * vfs.f_frsize
out["pids"] = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
out["uid"] = os.getuid()
out["interfaces"] = sorted(os.listdir("/proc/sys/net/ipv4/conf"))
status = dict(l.split(":", 1) for l in open("/proc/self/status"))
out["cap_eff"] = status["CapEff"].strip()
out["caps"] = {k: int(status[k], 16) for k in ("CapInh", "CapPrm", "CapEff", "CapAmb", "CapBnd")}
out["groups"] = os.getgroups()
attempt("setuid_root", lambda: os.setuid(0))
attempt("setgroups_root", lambda: os.setgroups([0]))
out["no_new_privs"] = status["NoNewPrivs"].strip()
out["seccomp"] = status["Seccomp"].strip()
def tcp(host, port):
    s = socket.create_connection((host, port), timeout=2)
    s.close()
    return "connected"
attempt("tcp_host_loopback", lambda: tcp("127.0.0.1", int(sys.argv[1])))
attempt("tcp_outside", lambda: tcp("192.0.2.1", 80))
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
attempt("udp_dns", lambda: udp.sendto(b"x", ("192.0.2.53", 53)))
attempt("unshare_user", lambda: call(libc.unshare(0x10000000)))
attempt("unshare_net", lambda: call(libc.unshare(0x40000000)))
attempt("mount_tmpfs", lambda: call(libc.mount(b"none", b"/tmp", b"tmpfs", 0, None)))
attempt("ptrace_attach", lambda: call(libc.ptrace(16, os.getppid() or 1, None, None)))
attempt("bpf", lambda: call(libc.syscall(321, 0, None, 0)))
attempt("keyctl", lambda: call(libc.syscall(250, 0, 0, 0, 0)))
attempt("control_socket", lambda: socket.socket(socket.AF_UNIX).connect(sys.argv[2]))
attempt("runtime_dir", lambda: os.listdir(sys.argv[3]))
for sock in ("/var/run/docker.sock", "/run/docker.sock", "/run/containerd/containerd.sock"):
    attempt("engine:" + sock, lambda: socket.socket(socket.AF_UNIX).connect(sock))
print(json.dumps(out))
"""


def _listener() -> tuple[socket.socket, list[str]]:
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.settimeout(0.2)
    accepted: list[str] = []

    def accept() -> None:
        while True:
            try:
                conn, peer = server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            accepted.append(str(peer))
            conn.close()

    threading.Thread(target=accept, daemon=True).start()
    return server, accepted


def test_sandbox_blocks_escape_routes(daemon: Daemon, runtime: str) -> None:
    server, accepted = _listener()
    port = server.getsockname()[1]
    try:
        result = daemon.agentctl("run", "--name", "probe", "--", "/usr/bin/python3", "-c", PROBE,
                                 str(port), str(daemon.socket), str(daemon.root / "run"))
    finally:
        server.close()
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])

    # Host secrets are masked and the host file systems are read-only.
    assert not out["read_shadow"]["ok"] or out["read_shadow"]["value"] == ""
    assert out["write_usr"] == {"ok": False, "errno": 30}  # EROFS
    assert out["write_etc"] == {"ok": False, "errno": 30}
    # A private, writable, size-capped /tmp (the default profile caps it at 64 MiB).
    assert out["write_tmp"]["ok"], out["write_tmp"]
    assert out["tmp_mode"] == "0o1777"
    assert out["tmp_bytes"] == 64 * 1024**2
    # Its own pid namespace: it sees itself (pid 1) and nothing of the host.
    assert out["pids"][0] == 1 and len(out["pids"]) < 5
    assert os.getpid() not in out["pids"] or len(out["pids"]) < 5
    # Unprivileged: not root, no capabilities, no_new_privs, seccomp filter mode.
    # runc maps the agent to uid 1000 of its own user namespace; Docker has no per-container
    # user namespace, so there the agent is an unprivileged host uid outright.
    assert out["uid"] == (1000 if runtime == "runc" else 1_001_000), out["uid"]
    assert int(out["cap_eff"], 16) == 0
    # No capability in any set. Docker's process starts as root with CAP_SETUID and CAP_SETGID
    # to drop to the agent's uid (supervisor/runtime/uid_drop.py): the uid change empties the
    # other sets, the bounding set keeps those two, which no_new_privs keeps out of reach.
    bounding = 0 if runtime == "runc" else (1 << 6) | (1 << 7)
    assert out["caps"] == {"CapInh": 0, "CapPrm": 0, "CapEff": 0, "CapAmb": 0,
                           "CapBnd": bounding}, out["caps"]
    assert out["setuid_root"] == {"ok": False, "errno": 1}, out["setuid_root"]
    assert out["setgroups_root"] == {"ok": False, "errno": 1}, out["setgroups_root"]
    if runtime == "docker":  # gosu keeps no supplementary group, not even root's
        assert out["groups"] == [], out["groups"]
    assert out["no_new_privs"] == "1"
    assert out["seccomp"] == "2"
    # Network: loopback only, so neither the host's listener nor the outside is reachable.
    assert out["interfaces"] == ["all", "default", "lo"]
    assert not out["tcp_host_loopback"]["ok"]
    assert not out["tcp_outside"]["ok"]
    assert out["tcp_outside"]["errno"] in (101, 113)  # ENETUNREACH / EHOSTUNREACH
    assert not out["udp_dns"]["ok"]
    assert accepted == []
    # Escape-class syscalls are denied by seccomp with EPERM. unshare(CLONE_NEWUSER) needs no
    # privilege at all, so its EPERM proves the filter rather than missing capabilities.
    for name in ("unshare_user", "unshare_net", "mount_tmpfs", "ptrace_attach", "bpf", "keyctl"):
        assert out[name] == {"ok": False, "errno": 1}, (name, out[name])
    # The control socket and the daemon's runtime directory do not exist in its world.
    assert out["control_socket"] == {"ok": False, "errno": 2}
    assert out["runtime_dir"] == {"ok": False, "errno": 2}
    # Neither is the container engine's socket, on either runtime (it is never mounted).
    for sock in ("/var/run/docker.sock", "/run/docker.sock", "/run/containerd/containerd.sock"):
        assert out[f"engine:{sock}"] == {"ok": False, "errno": 2}, (sock, out[f"engine:{sock}"])
    assert not Path("/usr/agent-was-here").exists()


def test_agent_uid_maps_to_unprivileged_host_range(daemon: Daemon, runtime: str) -> None:
    result = daemon.agentctl("run", "--name", "uidcheck", "--", "/bin/sh", "-c",
                             "cat /proc/self/uid_map; cat /proc/self/gid_map; id -u; id -g")
    assert result.returncode == 0, result.stderr
    *maps, uid, gid = result.stdout.strip().splitlines()
    if runtime == "docker":
        # No user namespace: the ids themselves are the unprivileged host ids.
        assert int(uid) >= 65536 and int(gid) >= 65536, (uid, gid)
        return
    for line in maps:
        _inside, host, count = (int(x) for x in line.split())
        assert host >= 65536, f"sandbox ids must never map to host system ids: {line}"
        assert not (host <= 0 < host + count)
