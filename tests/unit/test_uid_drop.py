"""How a docker run's process is taken from root to the agent's uid (supervisor/runtime/
uid_drop.py): gosu's argv around the init's, and its fail-closed check. No privilege."""

from __future__ import annotations

import socket
import struct
from pathlib import Path

import pytest

from supervisor.errors import EnforcementError
from supervisor.runtime.init import INIT_PATH, SandboxInit
from supervisor.runtime.uid_drop import DEFAULT_DROP_BINARY, DROP_PATH, UidDrop

_PT_LOAD, _PT_INTERP = 1, 3


def _executable(path: Path, mode: int = 0o755) -> Path:
    path.write_bytes(b"\x7fELF")
    path.chmod(mode)
    return path


def test_gosu_becomes_the_agent_then_execs_the_init(tmp_path: Path) -> None:
    drop = UidDrop(_executable(tmp_path / "gosu"))
    init = SandboxInit(_executable(tmp_path / "tini-static"))
    assert drop.wrap(1_001_000, 1_001_000, init.wrap(["python3", "agent.py"])) == [
        DROP_PATH, "1001000:1001000", INIT_PATH, "-g", "--", "python3", "agent.py"]
    assert drop.check() == str(tmp_path / "gosu")


@pytest.mark.parametrize("kind", ["missing", "not-executable", "directory", "setuid"])
def test_a_missing_or_unusable_gosu_fails_closed(tmp_path: Path, kind: str) -> None:
    binary = tmp_path / "gosu"
    if kind == "not-executable":
        _executable(binary, 0o644)
    elif kind == "directory":
        binary.mkdir()
    elif kind == "setuid":
        _executable(binary, 0o4755)
    with pytest.raises(EnforcementError) as refused:
        UidDrop(binary).check()
    assert str(binary) in refused.value.message and refused.value.hint


def test_the_default_is_a_static_build_that_runs_in_any_image() -> None:
    """Bound into images that have no libc of their own (tests/privileged/test_docker.py's
    probe image), so it must need none: an ELF without a PT_INTERP (no dynamic loader)."""
    if not Path(DEFAULT_DROP_BINARY).exists():
        pytest.fail(f"{DEFAULT_DROP_BINARY} is missing: apt-get install gosu "
                    f"(scripts/lib/packages.sh lists it)")
    with open(DEFAULT_DROP_BINARY, "rb") as binary:
        header = binary.read(64)
        assert header[:5] == b"\x7fELF\x02", header[:5]  # 64-bit
        phoff, = struct.unpack_from("<Q", header, 0x20)
        phentsize, phnum = struct.unpack_from("<HH", header, 0x36)
        binary.seek(phoff)
        table = binary.read(phentsize * phnum)
    types = [struct.unpack_from("<I", table, i * phentsize)[0] for i in range(phnum)]
    assert _PT_LOAD in types and _PT_INTERP not in types, types


def test_check_config_reports_a_missing_gosu_as_a_start_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With Docker enabled, a start without gosu is refused (`DockerRuntime.prepare`), so
    --check-config says so; a reload needs no gosu."""
    import supervisor.daemon.configcheck as configcheck

    monkeypatch.setattr(configcheck, "UidDrop", lambda: UidDrop(tmp_path / "no-gosu"))
    config = tmp_path / "daemon.toml"
    config.write_text(f'[docker]\nenabled = true\nsocket = "unix://{tmp_path}/engine.sock"\n'
                      f'[sandbox]\ninit = "{_executable(tmp_path / "tini")}"\n'
                      f'runc_path = "/bin/true"\n')
    with socket.socket(socket.AF_UNIX) as engine:
        engine.bind(str(tmp_path / "engine.sock"))
        checked = configcheck.check_config(config)
    assert [e["key"] for e in checked.engine_errors] == ["docker.enabled"], checked.all_errors
    assert "gosu" in checked.engine_errors[0]["reason"]
    assert not checked.ok and checked.engine_errors[0] in checked.all_errors
    assert not any(e["key"] == "docker.enabled" for e in checked.reload_errors)
