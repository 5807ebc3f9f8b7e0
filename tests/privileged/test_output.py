"""The agent's output cannot be erased, inflated past its cap, or used to fill the host's disk,
attacked from inside real sandboxes (runc, and the Docker engine) started by a real daemon:
truncating, allocating and reopening its stdout, writing through sendfile and splice from many
processes, flooding far past the cap. Also RLIMIT_FSIZE on the files it writes. Needs root
(and dockerd for docker)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from supervisor.runtime.engine_log import ENGINE_LOG_DRIVER, ENGINE_LOG_FILE_SIZE, ENGINE_LOG_FILES
from tests.conftest import BOTH_RUNTIMES
from tests.support.daemon import Daemon, engine_request, wait_for

pytestmark = BOTH_RUNTIMES

CAP = 1024 * 1024
MARKER = b"[agent-supervisor]"

ATTACK = r"""
import errno, json, os, stat, sys
print("RECORDED-BEFORE-THE-ATTACK", flush=True)
out = {}
def attempt(name, fn):
    try:
        fn()
        out[name] = "ok"
    except OSError as exc:
        out[name] = errno.errorcode.get(exc.errno, str(exc.errno))
out["stdout_kind"] = "fifo" if stat.S_ISFIFO(os.fstat(1).st_mode) else (
    "file" if stat.S_ISREG(os.fstat(1).st_mode) else "other")
attempt("ftruncate_stdout", lambda: os.ftruncate(1, 0))
attempt("ftruncate_stderr", lambda: os.ftruncate(2, 0))
attempt("fallocate_stdout", lambda: os.posix_fallocate(1, 0, 1 << 30))
attempt("truncate_path", lambda: os.truncate("/proc/self/fd/1", 0))
def reopen(flags):
    fd = os.open("/proc/self/fd/1", flags | os.O_NONBLOCK)
    try:
        if flags & os.O_ACCMODE == os.O_RDONLY:
            steal(fd)
        else:
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)
def steal(fd):
    # The read side is open before anything is written, so the race with the recorder is the
    # attack's to win: it writes and reads back in a tight loop until a read takes bytes.
    stolen = b""
    for i in range(20000):
        os.write(1, b"WRITTEN-%d\n" % i)
        try:
            stolen += os.read(fd, 65536)
        except BlockingIOError:
            continue
        break
    out["written"] = i + 1
    out["stolen"] = stolen.decode(errors="replace")
attempt("reopen_trunc", lambda: reopen(os.O_WRONLY | os.O_TRUNC))
attempt("reopen_rdwr_trunc", lambda: reopen(os.O_RDWR | os.O_TRUNC))
attempt("reopen_read", lambda: reopen(os.O_RDONLY))
attempt("lseek_stdout", lambda: os.lseek(1, 0, os.SEEK_SET))
# A variant: output written through sendfile and splice, from child processes and via a dup
# of stderr (its own payload: see the test), then every trick again from a child.
for name, line in (("payload", b"SENDFILE-PAYLOAD\n"), ("payload-stderr", b"STDERR-PAYLOAD\n")):
    with open("/tmp/" + name, "wb") as f:
        f.write(line * 64)
for i in range(3):
    pid = os.fork()
    if pid == 0:
        fd = os.open("/tmp/payload" if i < 2 else "/tmp/payload-stderr", os.O_RDONLY)
        size = os.fstat(fd).st_size
        if i == 0:
            os.sendfile(1, fd, 0, size)
        elif i == 1:
            os.splice(fd, 1, size)
        else:
            dup = os.dup(2)
            os.sendfile(dup, fd, 0, size)
            for target in (1, 2, dup):
                try:
                    os.ftruncate(target, 0)
                except OSError:
                    pass
        os._exit(0)
    os.waitpid(pid, 0)
sys.stdout.write(json.dumps(out) + "\n")
sys.stdout.write("RECORDED-AFTER-THE-ATTACK\n")
"""

# A variant: no process of the sandbox (the agent, a child of it, the init) reaches the objects
# behind the stdio of any other (or its own) through /proc/<pid>/fd, whichever way it opens them;
# where one were opened for reading, the child reads stderr back as it writes it.
REACH = r"""
import errno, json, os, stat
print("VARIANT-BEFORE", flush=True)
def kind(path):
    mode = os.stat(path).st_mode
    if stat.S_ISCHR(mode):
        rdev = os.stat(path).st_rdev
        return "chr:%d:%d" % (os.major(rdev), os.minor(rdev))
    return "fifo" if stat.S_ISFIFO(mode) else "sock" if stat.S_ISSOCK(mode) else "other"
def probe(out, who, pid):
    for fd in (0, 1, 2):
        path = "/proc/%s/fd/%d" % (pid, fd)
        out["kind:%s:%d" % (who, fd)] = kind(path)
        for mode, flags in (("r", os.O_RDONLY), ("w", os.O_WRONLY), ("rw", os.O_RDWR)):
            try:
                opened = os.open(path, flags | os.O_NONBLOCK)
            except OSError as exc:
                out["%s:%d:%s" % (who, fd, mode)] = errno.errorcode[exc.errno]
            else:
                os.close(opened)
                out["%s:%d:%s" % (who, fd, mode)] = "opened"
def read_back(out):
    try:
        opened = os.open("/proc/1/fd/2", os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return
    stolen = b""
    for i in range(20000):
        os.write(2, b"ERR-WRITTEN-%d\n" % i)
        try:
            stolen += os.read(opened, 65536)
        except BlockingIOError:
            continue
        break
    out["stolen"] = stolen.decode(errors="replace")
agent = os.getpid()
out = {}
probe(out, "self", "self")
reader, writer = os.pipe()
child = os.fork()
if child == 0:
    os.close(reader)
    found = {}
    probe(found, "child", "self")
    probe(found, "init", 1)
    probe(found, "agent", agent)
    read_back(found)
    os.write(writer, json.dumps(found).encode())
    os._exit(0)
os.close(writer)
found = b""
while chunk := os.read(reader, 65536):
    found += chunk
os.waitpid(child, 0)
out.update(json.loads(found))
print(json.dumps(out))
print("VARIANT-AFTER", flush=True)
"""

FLOOD_FOREVER = ("for i in 1 2 3; do yes flood-$i >&2 & done; "
                 "/usr/bin/python3 -c 'import os\nwhile True: os.write(1, b\"x\" * 65536)'")


def _profile(daemon: Daemon, name: str, text: str) -> None:
    (daemon.root / "profiles" / f"{name}.toml").write_text(text)


def _log(daemon: Daemon, run_id: str) -> bytes:
    return (daemon.root / "state" / "logs" / f"{run_id}.log").read_bytes()


def _run_id(daemon: Daemon, name: str) -> str:
    return str(daemon.client.agent(name)["run"]["id"])


def _audit(daemon: Daemon, name: str) -> list[dict[str, Any]]:
    return [r for r in daemon.client.audit(limit=10_000)["entries"] if r["target"] == name]


def test_recorded_output_survives_truncate_fallocate_and_reopen(daemon: Daemon,
                                                                  runtime: str) -> None:
    result = daemon.agentctl("run", "--name", "eraser", "--", "/usr/bin/python3", "-c", ATTACK)
    assert result.returncode == 0, result.stderr
    recorded = _log(daemon, _run_id(daemon, "eraser"))
    # Everything the agent wrote is there, in order, from the first byte: nothing it did to
    # its stdout reached the recorded bytes. Under runc stdout and stderr are one pipe, so the
    # log is in the agent's order whole. Under Docker they are two pipes the engine reads
    # apart, so where stderr's lines fall among stdout's is the engine's doing (the docker CLI
    # alone misorders this script's two streams in some runs): there each stream is checked
    # in its own order.
    assert recorded.count(b"SENDFILE-PAYLOAD\n") == 2 * 64
    assert recorded.count(b"STDERR-PAYLOAD\n") == 64
    if runtime == "runc":
        assert b"SENDFILE-PAYLOAD\n" * 128 + b"STDERR-PAYLOAD\n" * 64 + b"{" in recorded
        stdout = recorded
    else:
        stdout = recorded.replace(b"STDERR-PAYLOAD\n", b"")
    assert stdout.startswith(b"RECORDED-BEFORE-THE-ATTACK\nSENDFILE-PAYLOAD\n"), stdout[:200]
    assert stdout.endswith(b"RECORDED-AFTER-THE-ATTACK\n"), stdout[-200:]
    out = json.loads(next(line for line in recorded.splitlines() if line.startswith(b"{")))
    assert out["stdout_kind"] == "fifo", out
    # A pipe cannot be truncated, allocated or rewound. Reopening it by its /proc path is
    # refused (the pipe belongs to the sandbox's root, not the agent) or gives another end
    # of the same pipe, where O_TRUNC means nothing; either way the log above is intact.
    for name in ("ftruncate_stdout", "ftruncate_stderr", "truncate_path"):
        assert out[name] in ("EINVAL", "EACCES", "ENXIO"), (name, out[name])
    assert out["fallocate_stdout"] in ("ESPIPE", "ENODEV", "EOPNOTSUPP"), out
    assert out["lseek_stdout"] == "ESPIPE", out
    for name in ("reopen_trunc", "reopen_rdwr_trunc"):
        assert out[name] in ("EACCES", "EINVAL", "ENXIO", "EAGAIN"), (name, out[name])
    # Reading back its own output is refused at the open: had the open succeeded, the agent's
    # loop would have written and read until it took bytes before the recorder did.
    assert out["reopen_read"] == "EACCES", out
    assert "stolen" not in out, out
    # The API serves the same bytes.
    served = daemon.agentctl("logs", "eraser")
    assert served.stdout.encode() == recorded


def test_no_process_in_the_sandbox_reaches_the_objects_behind_its_stdio(daemon: Daemon,
                                                                        runtime: str) -> None:
    result = daemon.agentctl("run", "--name", "reacher", "--", "/usr/bin/python3", "-c", REACH)
    assert result.returncode == 0, result.stderr
    recorded = _log(daemon, _run_id(daemon, "reacher"))
    assert recorded.startswith(b"VARIANT-BEFORE\n") and recorded.endswith(b"VARIANT-AFTER\n")
    out = json.loads(next(line for line in recorded.splitlines() if line.startswith(b"{")))
    for who in ("self", "child", "init", "agent"):
        # stdout and stderr are pipes nobody in the sandbox may open, by any path, either way.
        for fd in (1, 2):
            assert out[f"kind:{who}:{fd}"] == "fifo", (who, fd, out)
            for mode in ("r", "w", "rw"):
                assert out[f"{who}:{fd}:{mode}"] == "EACCES", (who, fd, mode, out)
        # stdin is /dev/null (the engine's or the supervisor's): reopening it reaches nothing.
        assert out[f"kind:{who}:0"] == "chr:1:3", (who, out)
    assert "stolen" not in out, out


def test_output_past_the_cap_is_discarded_and_the_agent_runs_on(daemon: Daemon,
                                                                  runtime: str) -> None:
    _profile(daemon, "capped", f'[output]\nmax_bytes = {CAP}\naction = "alert"\n')
    result = daemon.agentctl("run", "--name", "chatty", "--profile", "capped", "--",
                             "/bin/sh", "-c", "head -c 8M /dev/zero | tr '\\0' a; exit 7")
    # The agent was never blocked by its own output: it wrote 8 MiB and exited by itself.
    assert result.returncode == 7, result.stderr[-2000:]
    run_id = _run_id(daemon, "chatty")
    recorded = _log(daemon, run_id)
    assert recorded[:CAP] == b"a" * CAP
    tail = recorded[CAP:]
    assert len(tail) < 1024 and tail.count(MARKER) == 2, tail  # the cap, and the closing count
    assert b"7340032 bytes of output were not recorded" in tail, tail
    fired = [r for r in _audit(daemon, "chatty") if r["verb"] == "tripwire"]
    assert len(fired) == 1, fired
    assert fired[0]["outcome"] == "alert" and fired[0]["detail"]["rule"] == "output_cap"
    assert fired[0]["detail"]["metric"] == "output_bytes"
    assert fired[0]["detail"]["output"]["recorded"] == CAP
    summary = daemon.client.telemetry(run_id)["summary"]
    assert summary["output_bytes"] == 8 * 1024**2
    assert summary["output_recorded_bytes"] == CAP
    inspected = daemon.agentctl("inspect", "chatty", check=True).stdout.splitlines()
    assert ["output", "8.0M", "(1.0M", "recorded)"] in [line.split() for line in inspected]


def test_flood_from_many_processes_trips_the_kill(daemon: Daemon, runtime: str) -> None:
    _profile(daemon, "capkill", f'[output]\nmax_bytes = {CAP}\naction = "kill"\n')
    daemon.agentctl("run", "--detach", "--name", "flood", "--profile", "capkill", "--",
                    "/bin/sh", "-c", FLOOD_FOREVER, check=True)
    wait_for(lambda: daemon.client.agent("flood")["state"] == "killed", timeout=60,
             what="the output tripwire's kill")
    wait_for(lambda: any(r["verb"] == "kill" for r in _audit(daemon, "flood")), timeout=30,
             what="the kill's audit row")
    rows = _audit(daemon, "flood")
    fired = [r for r in rows if r["verb"] == "tripwire"]
    assert len(fired) == 1 and fired[0]["detail"]["rule"] == "output_cap", rows
    kill = next(r for r in rows if r["verb"] == "kill")
    assert kill["actor"] == "system:tripwire" and kill["detail"]["confirmed_empty"] is True
    recorded = _log(daemon, _run_id(daemon, "flood"))
    assert CAP <= len(recorded) < CAP + 1024, len(recorded)
    wait_for(lambda: daemon.residue() == {}, what="cleanup")


def test_a_flood_never_delays_a_kill(daemon: Daemon, runtime: str) -> None:
    """Past the cap the drain keeps reading (and discarding) at the agent's full speed; an
    operator's kill goes through meanwhile and is confirmed."""
    _profile(daemon, "capalert", f'[output]\nmax_bytes = {CAP}\naction = "alert"\n')
    daemon.agentctl("run", "--detach", "--name", "torrent", "--profile", "capalert", "--",
                    "/bin/sh", "-c", FLOOD_FOREVER, check=True)
    run_id = _run_id(daemon, "torrent")
    wait_for(lambda: any(r["verb"] == "tripwire" for r in _audit(daemon, "torrent")),
             timeout=30, what="the output cap")
    produced = [daemon.client.telemetry(run_id)["summary"]["output_bytes"] or 0]
    wait_for(lambda: (daemon.client.telemetry(run_id)["summary"]["output_bytes"] or 0)
             > produced[0] + 10 * CAP, timeout=30, what="the flood going on past the cap")
    assert daemon.client.agent("torrent")["state"] == "active"
    if runtime == "docker":  # and the engine's own copy on its disk stays within its bound
        container = engine_request("GET", f"/containers/{daemon.prefix}-{run_id}/json")
        assert container["HostConfig"]["LogConfig"] == {
            "Type": ENGINE_LOG_DRIVER, "Config": {"max-size": ENGINE_LOG_FILE_SIZE,
                                                  "max-file": str(ENGINE_LOG_FILES)}}
        kept = Path(engine_request("GET", "/info")["DockerRootDir"]) / "containers" \
            / container["Id"] / "local-logs"
        bound = ENGINE_LOG_FILES * int(ENGINE_LOG_FILE_SIZE.rstrip("m")) * 1024**2
        wait_for(lambda: (daemon.client.telemetry(run_id)["summary"]["output_bytes"] or 0)
                 > bound + 8 * 1024**2, timeout=60, what="the flood past the engine's bound")
        on_disk = sum(f.stat().st_size for f in kept.iterdir())
        assert 0 < on_disk <= bound + 1024**2, on_disk  # one message of slack
    killed = daemon.agentctl_json("kill", "torrent", "--reason", "flooding")
    assert killed["results"][0]["new_state"] == "killed", killed
    assert len(_log(daemon, run_id)) < CAP + 1024
    wait_for(lambda: daemon.residue() == {}, what="cleanup")


def test_files_the_agent_writes_are_bounded_by_rlimit_fsize(daemon: Daemon,
                                                            runtime: str) -> None:
    _profile(daemon, "smallfiles", '[limits]\nfile_size = "1M"\n')
    script = ("import os, resource, signal\n"
              "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
              "print(resource.getrlimit(resource.RLIMIT_FSIZE))\n"
              "fd = os.open('/tmp/big', os.O_WRONLY | os.O_CREAT, 0o600)\n"
              "os.write(fd, b'x' * (1 << 20))\n"
              "try:\n    os.write(fd, b'x')\nexcept OSError as e:\n    print('EFBIG', e.errno)\n"
              "print(os.path.getsize('/tmp/big'))\n"
              "os.write(1, b'y' * (2 << 20))\n")  # its output is a pipe: not bound by it
    result = daemon.agentctl("run", "--name", "bigfile", "--profile", "smallfiles", "--",
                             "/usr/bin/python3", "-u", "-c", script)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert lines[0] == f"({1 << 20}, {1 << 20})", lines[:3]
    assert lines[1] == "EFBIG 27" and lines[2] == str(1 << 20), lines[:3]
    assert result.stdout.count("y") == 2 << 20


def test_self_test_proves_the_output_is_a_pipe(daemon: Daemon, runtime: str) -> None:
    rows = [r for r in daemon.client.audit(limit=10_000)["entries"] if r["verb"] == "self_test"]
    assert rows and rows[-1]["outcome"] == "ok", rows
    checks = rows[-1]["detail"]["checks"]
    prefix = "docker:" if runtime == "docker" and "docker:output-is-a-file" in checks else ""
    assert checks[f"{prefix}output-is-a-file"] == "PASS", checks
    assert checks[f"{prefix}output-truncatable"] == "PASS", checks
    # The canary writes past its 64 KiB cap: counted, not recorded, its writes never blocked;
    # and RLIMIT_FSIZE is set for the files it writes.
    for name in ("output-counted-past-cap", "output-recorded-within-cap",
                 "file-size-unlimited"):
        assert checks[f"{prefix}{name}"] == "PASS", checks
