"""Launches are refused, audited, and change nothing while the disk under the state directory
and the run logs is nearly full. The disk is real: a small tmpfs mounted under the test
daemon's (and an embedded run's) state, filled with a real file. Needs root and runc."""

from __future__ import annotations

import contextlib
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from supervisor.errors import DiskSpaceLow
from supervisor.runtime.output import check_free_space
from tests.support.daemon import new_daemon
from tests.support.embedded import host_residue, run_embedded

MiB = 1024**2


@contextlib.contextmanager
def small_disk(path: Path, size_mib: int) -> Iterator[Path]:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mib}m,mode=0700", "tmpfs",
                    str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(path: Path, mib: int) -> None:
    with open(path, "wb") as handle:
        for _ in range(mib):
            handle.write(b"\0" * MiB)


def test_daemon_refuses_launches_under_the_watermark(tmp_root: Path) -> None:
    daemon = new_daemon(tmp_root, disk={"min_free_bytes": "24M", "min_free_percent": 0})
    with small_disk(daemon.root / "state", 64) as state:
        daemon.start()
        try:
            first = daemon.agentctl("run", "--name", "roomy", "--", "/bin/echo", "hello")
            assert first.returncode == 0 and first.stdout == "hello\n", first.stderr

            fill(state / "filler", 48)  # 16 MiB left: under the 24 MiB watermark
            audit_rows = len(daemon.client.audit(limit=10_000)["entries"])
            refused = daemon.agentctl("run", "--json", "--name", "cramped", "--",
                                      "/bin/echo", "never")
            assert refused.returncode == DiskSpaceLow.exit_status, refused
            error = json.loads(refused.stdout or refused.stderr)["error"]
            assert error["code"] == "disk_space_low", error
            assert error["detail"]["min_free_bytes"] == 24 * MiB
            assert error["detail"]["free_bytes"] < 24 * MiB
            assert error["detail"]["hint"]
            # Loud and explainable: one audit row, in the daemon's log too.
            rows = daemon.client.audit(limit=10_000)["entries"][audit_rows:]
            assert [(r["verb"], r["target"], r["outcome"]) for r in rows] == [
                ("launch", "cramped", "refused:disk_space_low")], rows
            assert "launch of agent cramped refused" in daemon.logs()
            # Nothing changed: no agent, no run, no log file.
            assert [a["name"] for a in daemon.client.agents()["agents"]] == ["roomy"]
            # (each run's log has its time index beside it: <run>.log.idx, for logs --since)
            assert len(list((state / "logs").glob("*.log"))) == 1
            assert len(list((state / "logs").iterdir())) == 2
            assert daemon.residue() == {}

            (state / "filler").unlink()
            again = daemon.agentctl("run", "--name", "cramped", "--", "/bin/echo", "room")
            assert again.returncode == 0 and again.stdout == "room\n", again.stderr
        finally:
            daemon.stop()
            residue = daemon.residue()
            daemon.cleanup_host()
        assert not residue, residue


def test_embedded_run_refused_under_the_watermark(tmp_root: Path) -> None:
    config = tmp_root / "daemon.toml"
    config.write_text('[disk]\nmin_free_bytes = 0\nmin_free_percent = 50\n')
    with small_disk(tmp_root / "ci", 64) as disk:
        state_root = disk / "root"  # host_residue looks for mounts under it: not this one
        fill(disk / "filler", 40)  # 37.5% free: under the 50% watermark
        result = run_embedded(state_root, "--config", str(config), "--report",
                              str(tmp_root / "report.json"), "--", "/bin/echo", "never")
        assert result.returncode == DiskSpaceLow.exit_status, result.stderr
        assert "disk_space_low" in result.stderr
        assert "never" not in result.stdout
        report = json.loads((tmp_root / "report.json").read_text())
        assert report["ending"] == "not_started"
        assert report["errors"][0]["code"] == "disk_space_low"
        assert any(row["outcome"] == "refused:disk_space_low"
                   for row in json.loads("[" + ",".join(
                       (tmp_root / "report.json.audit.jsonl").read_text().splitlines()) + "]"))
        assert host_residue(state_root) == {}


def test_watermark_checks_each_filesystem_and_missing_paths_by_ancestor(tmp_root: Path) -> None:
    with small_disk(tmp_root / "small", 16) as small:
        fill(small / "filler", 14)  # 2 MiB (12.5%) left
        check_free_space([tmp_root], 1, 0.001)  # the host's disk is fine
        for min_bytes, min_percent in ((8 * MiB, 0.0), (0, 20.0)):
            with pytest.raises(DiskSpaceLow) as refused:
                # The log directory does not exist yet: its nearest ancestor is judged.
                check_free_space([small / "logs" / "later"], min_bytes, min_percent)
            assert refused.value.detail["path"] == str(small)
            assert refused.value.detail["free_bytes"] <= 2 * MiB
        check_free_space([small], 1 * MiB, 10.0)  # above both
        check_free_space([small], 0, 0.0)  # both watermarks off
