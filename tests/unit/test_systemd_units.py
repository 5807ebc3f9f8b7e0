"""The systemd unit, tmpfiles.d and sysusers.d files under systemd/: their contract with the
daemon, and systemd's own checks of them where the systemd tools are installed (CI installs
systemd; a host without systemd as PID 1 is fine, nothing here talks to a running manager)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from supervisor.config import DEFAULT_CONFIG_PATH, Config
from supervisor.models.units import parse_duration

SYSTEMD_DIR = Path(__file__).resolve().parents[2] / "systemd"
UNIT = SYSTEMD_DIR / "agent-supervisor.service"
TMPFILES = SYSTEMD_DIR / "agent-supervisor.tmpfiles.conf"
SYSUSERS = SYSTEMD_DIR / "agent-supervisor.sysusers.conf"

OPERATORS = "agent-operators"
RUNTIME_DIR = "/run/agent-supervisor"
RUNTIME_DIR_MODE = "0751"

# Options that would give the daemon its own mount namespace, network, or a seccomp filter that
# every agent inherits; the unit explains why each is left out on purpose.
FORBIDDEN_HARDENING = (
    "ProtectSystem", "ProtectHome", "PrivateTmp", "PrivateDevices", "PrivateMounts",
    "PrivateNetwork", "NetworkNamespacePath", "PrivateUsers", "PrivateIPC",
    "ProtectKernelTunables", "ProtectKernelModules", "ProtectKernelLogs",
    "ProtectControlGroups", "ProtectProc", "ProtectHostname", "ProtectClock",
    "ReadOnlyPaths", "ReadWritePaths", "InaccessiblePaths", "TemporaryFileSystem",
    "BindPaths", "BindReadOnlyPaths", "SystemCallFilter", "SystemCallArchitectures",
    "RestrictNamespaces", "RestrictAddressFamilies", "MemoryDenyWriteExecute",
    "LockPersonality", "RestrictSUIDSGID", "RestrictRealtime", "CapabilityBoundingSet",
    "OOMScoreAdjust", "UMask",
)

Unit = dict[str, dict[str, list[str]]]


def parse_unit(text: str) -> Unit:
    """Sections -> key -> every value the key was given, in order (keys may repeat)."""
    sections: Unit = {}
    current: dict[str, list[str]] | None = None
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        assert not line.endswith("\\"), f"line {number}: continuation lines are not expected"
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"line {number}: {line!r} is outside any section"
        key, sep, value = line.partition("=")
        assert sep, f"line {number}: {line!r} is not key=value"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def one(unit: Unit, section: str, key: str) -> str:
    values = unit.get(section, {}).get(key, [])
    assert len(values) == 1, f"[{section}] {key} is set {len(values)} times: {values}"
    return values[0]


def config_lines(path: Path) -> list[list[str]]:
    """The whitespace-separated fields of each non-comment line of a *.d config file."""
    return [line.split() for line in path.read_text().splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (CI installs systemd, so it runs there)")
    return path


def run(argv: list[str], cwd: Path | None = None, log_level: str = "warning"
        ) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SYSTEMD_LOG_LEVEL": log_level, "SYSTEMD_LOG_COLOR": "0",
           "SYSTEMD_PAGER": "cat", "LC_ALL": "C.UTF-8"}
    return subprocess.run(argv, capture_output=True, text=True, env=env, cwd=cwd, timeout=60,
                          check=False)


def help_text(binary: str) -> str:
    result = run([binary, "--help"])
    return result.stdout + result.stderr


def version_of(binary: str) -> str:
    lines = run([binary, "--version"]).stdout.splitlines()
    return lines[0] if lines else "unknown version"


def verifiable_copy(directory: Path, unit_text: str) -> Path:
    """The unit under its own name in `directory`, with ExecStart's binary (not installed on
    test machines) replaced by one that exists, arguments kept."""
    true = shutil.which("true") or "/bin/true"
    lines = []
    for line in unit_text.splitlines():
        for key in ("ExecStart=", "ExecReload="):
            if line.startswith(key):
                _binary, _sep, args = line.removeprefix(key).partition(" ")
                line = f"{key}{true} {args}".rstrip()
        lines.append(line)
    copy = directory / UNIT.name
    copy.write_text("\n".join(lines) + "\n")
    return copy


def verify(unit_file: Path) -> tuple[int, list[str], list[str]]:
    """`systemd-analyze verify`: exit status, lines about this unit, every other line."""
    analyze = tool("systemd-analyze")
    argv = [analyze, "verify"]
    if "--recursive-errors" in help_text(analyze):
        # Only this unit's problems set the exit status; the installed units it pulls in
        # (network.target, multi-user.target...) are not ours to fix.
        argv.append("--recursive-errors=no")
    result = run([*argv, str(unit_file)], cwd=unit_file.parent)
    ours: list[str] = []
    other: list[str] = []
    for line in (result.stdout + result.stderr).splitlines():
        if not line.strip():
            continue
        about_us = UNIT.name in line or str(unit_file.parent) in line
        (ours if about_us else other).append(line)
    return result.returncode, ours, other


# ------------------------------------------------------------------ the unit's contract


def test_unit_contract() -> None:
    unit = parse_unit(UNIT.read_text())
    assert one(unit, "Service", "Type") == "notify"
    assert one(unit, "Service", "NotifyAccess") == "main"
    assert one(unit, "Service", "KillMode") == "mixed"
    assert one(unit, "Service", "Delegate") == "yes"
    assert one(unit, "Service", "Restart") == "on-failure"
    assert one(unit, "Service", "TimeoutStopSec") == "30s"
    assert one(unit, "Install", "WantedBy") == "multi-user.target"
    assert "network.target" in one(unit, "Unit", "After").split()
    # The daemon outweighs local floods for the CPU through its unit's cgroup, never through
    # a nice value that runc and every agent would inherit.
    assert int(one(unit, "Service", "CPUWeight")) > 100
    assert "Nice" not in unit["Service"]

    # No --config: the daemon reads DEFAULT_CONFIG_PATH when it exists and starts on its
    # defaults when it does not (a missing file is no reason to fail the unit).
    argv = one(unit, "Service", "ExecStart").split()
    assert Path(argv[0]).name == "agent-supervisord"
    assert argv[1:] == []
    # The daemon's own --reload: it reads the config ExecStart= reads, so it reaches the
    # control socket that names ([daemon] socket_path, runtime_dir), not agentctl's default.
    reload = one(unit, "Service", "ExecReload").split()
    assert Path(reload[0]).name == "agent-supervisord" and reload[1:] == ["--reload"]
    assert parse_duration(one(unit, "Service", "WatchdogSec")) > 0


def test_a_restart_is_told_from_a_stop_by_its_signal_and_restarts_on_its_status() -> None:
    """Issue 13: `systemctl restart` sends SIGUSR2 (a handover), `stop` SIGTERM (a kill), so
    the daemon asks nothing in front of a kill; a handover's exit status (EXIT_RESTART) is a
    success that systemd always restarts on, so a bare SIGUSR2 does not leave the unit
    inactive with the agents held until the window ends."""
    from supervisor.daemon.main import EXIT_RESTART

    unit = parse_unit(UNIT.read_text())
    assert one(unit, "Service", "RestartKillSignal") == "SIGUSR2"
    assert "KillSignal" not in unit["Service"]  # SIGTERM, systemd's default, for a stop
    assert one(unit, "Service", "SuccessExitStatus").split() == [str(EXIT_RESTART)]
    assert one(unit, "Service", "RestartForceExitStatus").split() == [str(EXIT_RESTART)]
    assert str(EXIT_RESTART) not in one(unit, "Service", "RestartPreventExitStatus").split()


def test_a_start_refused_by_the_single_instance_lock_is_not_restarted() -> None:
    """Audit F15: the lock's refusal has a status of its own, which the unit neither counts a
    success nor restarts on (a loop that hits the start limit), unlike a handover's."""
    from supervisor.daemon.main import EXIT_RESTART
    from supervisor.errors import DaemonRunning

    unit = parse_unit(UNIT.read_text())
    assert DaemonRunning.exit_status != EXIT_RESTART
    assert str(DaemonRunning.exit_status) in one(unit, "Service",
                                                 "RestartPreventExitStatus").split()
    assert str(DaemonRunning.exit_status) not in one(unit, "Service",
                                                     "SuccessExitStatus").split()


def test_unit_directories_match_the_daemon_defaults() -> None:
    unit = parse_unit(UNIT.read_text())
    daemon = Config().daemon
    assert Path("/run", one(unit, "Service", "RuntimeDirectory")) == daemon.runtime_dir
    assert one(unit, "Service", "RuntimeDirectoryMode") == RUNTIME_DIR_MODE
    # Audit F6: a restart whose next daemon fails (exit 78) must not delete the handover
    # socket and the runc state of the agents the watchdog holds (uninstall removes it).
    assert one(unit, "Service", "RuntimeDirectoryPreserve") == "yes"
    assert Path("/var/lib", one(unit, "Service", "StateDirectory")) == daemon.state_dir
    assert one(unit, "Service", "StateDirectoryMode") == "0700"
    config_dir = Path("/etc", one(unit, "Service", "ConfigurationDirectory"))
    assert config_dir == DEFAULT_CONFIG_PATH.parent


def test_unit_leaves_out_hardening_that_breaks_the_daemon_or_leaks_into_agents() -> None:
    service = parse_unit(UNIT.read_text())["Service"]
    present = sorted(set(service) & set(FORBIDDEN_HARDENING))
    assert not present, f"see the hardening notes in {UNIT.name} before adding {present}"


# ------------------------------------------------------------- tmpfiles.d and sysusers.d


def test_tmpfiles_contract() -> None:
    entries = {fields[1]: fields for fields in config_lines(TMPFILES)}
    assert entries == {
        # root:root: systemd chows any other owner back, recursively, before each Exec*.
        RUNTIME_DIR: ["d", RUNTIME_DIR, RUNTIME_DIR_MODE, "root", "root", "-", "-"],
        "/var/lib/agent-supervisor": ["d", "/var/lib/agent-supervisor", "0700", "root", "root",
                                      "-", "-"],
        "/etc/agent-supervisor": ["d", "/etc/agent-supervisor", "0755", "root", "root", "-",
                                  "-"],
        "/etc/agent-supervisor/secrets": ["d", "/etc/agent-supervisor/secrets", "0700", "root",
                                          "root", "-", "-"],
    }
    daemon = Config().daemon
    assert Path(RUNTIME_DIR) == daemon.runtime_dir
    assert daemon.socket_group == OPERATORS


def test_sysusers_contract() -> None:
    assert config_lines(SYSUSERS) == [["g", OPERATORS, "-"]]


# ------------------------------------------------------------------ systemd's own checks


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    copy = verifiable_copy(tmp_path, UNIT.read_text())
    status, ours, other = verify(copy)
    for line in other:
        print(f"ignored (not about {UNIT.name}): {line}")
    assert not ours, "systemd-analyze verify complained about the unit:\n" + "\n".join(ours)
    assert status == 0, f"systemd-analyze verify exited {status}:\n" + "\n".join(other)


def test_verify_catches_a_broken_unit(tmp_path: Path) -> None:
    """The check above must not pass vacuously: systemd-analyze verify exits 0 on unknown keys
    and bad values, so the output scan is what catches them on this systemd version."""
    broken = UNIT.read_text().replace("KillMode=mixed", "KillMod=mixed")
    broken = broken.replace("Delegate=yes", "Delegate=perhaps")
    copy = verifiable_copy(tmp_path, broken)
    status, ours, _other = verify(copy)
    assert status != 0 or ours, "a broken unit passed the check"
    assert any("KillMod" in line for line in ours), ours


def test_sysusers_dry_run(tmp_path: Path) -> None:
    sysusers = tool("systemd-sysusers")
    if "--dry-run" not in help_text(sysusers):
        pytest.skip(f"{version_of(sysusers)}: systemd-sysusers has no --dry-run")
    (tmp_path / "etc").mkdir()
    # "Creating group ..." is logged at info level.
    result = run([sysusers, "--dry-run", f"--root={tmp_path}", str(SYSUSERS)], log_level="info")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert SYSUSERS.name not in output, output
    assert OPERATORS in output, output
    assert not (tmp_path / "etc" / "group").exists(), "--dry-run wrote a file"
