"""A private dockerd for tests that stop and restart the engine: its own socket, data and exec
roots, no bridge and no iptables rules, so nothing else on the host notices. Needs root."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.support.daemon import docker_reachable


@dataclass
class PrivateDockerd:
    root: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.root}/docker.sock"

    def start(self, timeout: float = 60.0) -> None:
        log = open(self.root / "dockerd.log", "ab")  # noqa: SIM115 - handed to the child
        self.proc = subprocess.Popen(
            ["dockerd", "--host", self.url, "--data-root", str(self.root / "data"),
             "--exec-root", str(self.root / "exec"), "--pidfile", str(self.root / "docker.pid"),
             "--bridge=none", "--iptables=false", "--ip6tables=false", "--ip-forward=false",
             "--ip-masq=false"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        while not docker_reachable(self.url):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"private dockerd did not come up: {self.logs()[-2000:]}")
            time.sleep(0.1)

    def freeze(self) -> None:
        """SIGSTOP dockerd: the engine stops answering (as a hung or stopped dockerd does),
        while containerd keeps the containers running."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        """SIGTERM dockerd, then end whatever is left of its session (its containerd)."""
        if self.proc is None:
            return
        pgid = self.proc.pid
        if self.proc.poll() is None:
            self.thaw()
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)

    def logs(self) -> str:
        try:
            return (self.root / "dockerd.log").read_text(errors="replace")
        except FileNotFoundError:
            return ""


@contextlib.contextmanager
def private_dockerd() -> Iterator[PrivateDockerd]:
    # Short: containerd's socket under the exec root must fit a sockaddr_un.
    root = Path(tempfile.mkdtemp(prefix="as-dkr-", dir="/tmp"))
    engine = PrivateDockerd(root)
    try:
        engine.start()
        yield engine
    finally:
        engine.stop()
        # Overlay mounts of the data root go with their containers; unmount any left.
        with open("/proc/self/mountinfo") as table:
            mounted = [line.split()[4] for line in table if str(root) in line.split()[4]]
        for point in sorted(mounted, key=len, reverse=True):
            subprocess.run(["umount", "-l", point], check=False)
        shutil.rmtree(root, ignore_errors=True)
