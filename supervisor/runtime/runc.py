"""A thin async layer over the runc CLI; the verbs keep runc's names. Needs root.

All containers live under the daemon's own `--root`, so `list` and `delete` never see or touch
containers that other tools made on the host."""

from __future__ import annotations

import asyncio
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from supervisor.errors import RuntimeFailure
from supervisor.sandbox.childenv import child_env
from supervisor.sandbox.fstree import remove_tree

# `runc create` in an audit session of its own, which the container's processes inherit and
# cannot leave: the kernel's records of the seccomp kills it suffers name the run by it
# (supervisor/sandbox/seccomp_kills.py). Writing a loginuid starts a new session; where the
# host forbids it (loginuid immutable) runc runs all the same, and such kills go uncounted.
_NEW_AUDIT_SESSION = ("/bin/sh", "-c", '{ echo 0 >/proc/self/loginuid; } 2>/dev/null; exec "$@"',
                      "runc-create")


# What `runc create` leaves the container's init waiting on, in the container's state directory.
EXEC_FIFO = "exec.fifo"
# runc's record of a container, in the same directory.
STATE_FILE = "state.json"



def _which(binary: str) -> str | None:
    """shutil.which, imported when first needed: shutil loads bz2 and lzma with it, which an
    embedded run (its runc calls never niced, runc found) has no other use for."""
    import shutil

    return shutil.which(binary)

@dataclass(frozen=True)
class ContainerState:
    """A container as `runc list` shows it."""
    id: str
    status: str
    pid: int
    bundle: str


class Runc:
    def __init__(self, binary: str, root: Path) -> None:
        self.binary = binary
        self.root = root

    async def _run(
        self, *args: str, stdout: int | None = None, stderr: int | None = None,
        check: bool = True, new_audit_session: bool = False, stdin: int | None = None,
        nice: int = 0,
    ) -> tuple[int, bytes, bytes]:
        argv = [self.binary, "--root", str(self.root), *args]
        if new_audit_session:
            argv = [*_NEW_AUDIT_SESSION, *argv]
        if nice and (nice_binary := _which("nice")) is not None:
            argv = [nice_binary, "-n", str(nice), *argv]  # exec'd: the same process, niced
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL if stdin is None else stdin,
                stdout=asyncio.subprocess.PIPE if stdout is None else stdout,
                stderr=asyncio.subprocess.PIPE if stderr is None else stderr,
                env=child_env(),
            )
        except FileNotFoundError as exc:
            raise RuntimeFailure(f"runc binary not found: {self.binary}",
                                 binary=self.binary) from exc
        out, err = await proc.communicate()
        rc = proc.returncode if proc.returncode is not None else -1
        if check and rc != 0:
            message = (err or b"").decode(errors="replace").strip()
            raise RuntimeFailure(f"runc {args[0]} failed: {message}", verb=args[0], returncode=rc,
                                 stderr=message)
        return rc, out or b"", err or b""

    async def create(self, container_id: str, bundle: Path, pid_file: Path, stdio: int,
                     runc_log: Path, *, stdin: int | None = None,
                     stderr: int | None = None) -> int:
        """`runc create`: the container's init waits for `start`; its stdout and stderr are
        `stdio` (runc passes its own stdio through to the container), or `stderr` apart, and
        its stdin /dev/null or `stdin`. Returns the init pid."""
        rc, _out, _err = await self._run(
            "--log", str(runc_log), "create", "--bundle", str(bundle), "--pid-file",
            str(pid_file), container_id, stdout=stdio, check=False, stdin=stdin,
            stderr=stdio if stderr is None else stderr, new_audit_session=True,
        )
        if rc == 127 and _which(self.binary) is None:  # from the session wrapper's exec
            raise RuntimeFailure(f"runc binary not found: {self.binary}", binary=self.binary)
        if rc != 0:
            detail = _last_runc_error(runc_log)
            raise RuntimeFailure(f"runc create failed: {detail}", verb="create", returncode=rc,
                                 stderr=detail)
        return int(pid_file.read_text().strip())

    async def start(self, container_id: str, init_pidfd: int | None = None) -> None:
        """`runc start`. Given the created init's pidfd, done as runc's own start does it,
        without a runc process (~5 ms of every launch): `runc create` leaves the container's
        init blocked opening `<root>/<id>/exec.fifo` for writing; start opens it for reading,
        reads what the init writes to the end, and removes it; the init, let go, execs the
        command, and runc's state says running once the fifo is gone (libcontainer's
        `exec()`). Without the fifo (another runc's layout), `runc start` itself."""
        if init_pidfd is None:
            await self._run("start", container_id)
            return
        fifo = self.root / container_id / EXEC_FIFO
        try:
            fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOFOLLOW)
        except FileNotFoundError:
            await self._run("start", container_id)
            return
        except OSError as exc:
            raise RuntimeFailure(f"runc start failed: cannot open {fifo}: {exc.strerror}",
                                 verb="start", path=str(fifo)) from exc
        try:
            if not stat.S_ISFIFO(os.fstat(fd).st_mode):
                raise RuntimeFailure(f"runc start failed: {fifo} is not a fifo", verb="start",
                                     path=str(fifo))
            written = await _init_released(fd, init_pidfd)
        finally:
            os.close(fd)
        if not written:  # runc's own words for it
            raise RuntimeFailure("runc start failed: container process is already dead",
                                 verb="start", container=container_id)
        try:
            os.unlink(fifo)
        except OSError as exc:  # runc's state would still say created
            raise RuntimeFailure(f"runc start failed: cannot remove {fifo}: {exc.strerror}",
                                 verb="start", path=str(fifo)) from exc

    async def kill(self, container_id: str, signal: str = "KILL", all_processes: bool = True
                   ) -> None:
        args = ["kill", *(["--all"] if all_processes else []), container_id, signal]
        await self._run(*args)

    async def delete(self, container_id: str, force: bool = False, nice: int = 0) -> None:
        """`nice`: a delete that is background work (a run's cleanup after its kill) yields
        the CPU to kills and their answers, here and in any other daemon on the host."""
        await self._run("delete", *(["--force"] if force else []), container_id, nice=nice)

    def remove_stopped(self, container_id: str) -> bool:
        """`runc delete` of a container that has stopped, without a runc process (a Go
        runtime's start, ~5 ms and as much CPU, at every run's end). For a stopped container
        runc removes its cgroups (the caller removes a run's cgroup after any delete:
        RuncRunHandle.cleanup), its state directory under --root, and runs the bundle's
        poststop hooks, of which this supervisor's bundles have none. Only where the directory
        is runc's (it holds state.json); False otherwise, or if it could not all go, and the
        caller runs `runc delete`. The caller knows the container has stopped: its init is
        dead and no process is left in its cgroup. Blocking: call it off the event loop."""
        state = self.root / container_id
        if not (state / STATE_FILE).is_file():
            return False
        remove_tree(state)
        return not os.path.lexists(state)

    async def state(self, container_id: str) -> ContainerState | None:
        rc, out, _err = await self._run("state", container_id, check=False)
        if rc != 0:
            return None
        data = json.loads(out)
        return ContainerState(data["id"], data["status"], int(data.get("pid") or 0),
                              data.get("bundle", ""))

    async def list(self) -> list[ContainerState]:
        """Every container under our root. runc keeps one directory per container there and
        lists nothing else, so with none (a fresh root, or every run deleted) there is nothing
        to ask it: an embedded CI run's reconcile and teardown each skip a runc process."""
        if not _has_containers(self.root):
            return []
        _rc, out, _err = await self._run("list", "--format", "json")
        items: list[dict[str, Any]] = json.loads(out or b"null") or []
        return [ContainerState(i["id"], i["status"], int(i.get("pid") or 0), i.get("bundle", ""))
                for i in items]


def _has_containers(root: Path) -> bool:
    try:
        with os.scandir(root) as entries:
            return any(entry.is_dir(follow_symlinks=False) for entry in entries)
    except FileNotFoundError:
        return False
    except OSError:
        return True  # runc's own answer (its error) decides


async def _init_released(fifo: int, init_pidfd: int) -> bytes:
    """What the init writes to its exec fifo (`fifo`: read end, non-blocking) up to its close,
    as it execs the command; b"" when the init dies first (its pidfd readable). The kernel says
    a fifo opened without a writer readable only once one has come, so a read is made only
    when epoll says so."""
    loop = asyncio.get_running_loop()
    died = os.dup(init_pidfd)  # the loop's reader of init_pidfd itself belongs to wait_exit
    data = bytearray()
    try:
        while True:
            ready: asyncio.Future[str] = loop.create_future()

            def ready_as(what: str, fut: asyncio.Future[str] = ready) -> None:
                if not fut.done():
                    fut.set_result(what)

            loop.add_reader(fifo, ready_as, "fifo")
            loop.add_reader(died, ready_as, "died")
            try:
                what = await ready
            finally:
                loop.remove_reader(fifo)
                loop.remove_reader(died)
            try:
                chunk = os.read(fifo, 4096)
            except BlockingIOError:  # the writer is there, its byte not yet
                chunk = None
            if chunk:
                data += chunk
                continue
            if chunk == b"" or what == "died":  # its end: closed as it exec'd, or dead
                return bytes(data)
    finally:
        os.close(died)


def _last_runc_error(runc_log: Path) -> str:
    """runc writes JSON lines to --log; the last error line says why it failed."""
    try:
        lines = runc_log.read_text().splitlines()
    except OSError:
        return "no runc log"
    for line in reversed(lines):
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if entry.get("level") in ("error", "fatal"):
            return str(entry.get("msg", line))
    return lines[-1] if lines else "no output"


def ensure_root(root: Path) -> None:
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(root, 0o700)
