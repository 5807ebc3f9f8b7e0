"""The sandbox's init (supervisor/runtime/init.py) as the bundle renders it, its fail-closed
check, the not-executable answer of the command check, and the exit statuses of a run that did
not start (errors.launch_exit_status). No privilege."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from supervisor.errors import (
    CommandNotExecutable,
    CommandNotFound,
    EnforcementError,
    EngineUnavailable,
    GatewayUnavailable,
    InvalidRequest,
    RuntimeFailure,
    launch_exit_status,
)
from supervisor.profiles import validate_profile
from supervisor.runtime.init import INIT_PATH, SandboxInit, needs_loader
from supervisor.runtime.network_gate import NetworkGate
from supervisor.runtime.uid_drop import UidDrop
from supervisor.sandbox.bundle import render_config, write_bundle
from supervisor.sandbox.command import check_command
from tests.unit.test_bundle import make_spec, mount_at


@pytest.fixture
def host_root(tmp_path: Path) -> Path:
    """A merged-/usr host, as test_bundle.py's."""
    root = tmp_path / "host"
    for directory in ("usr/bin", "usr/sbin", "usr/lib", "etc", "lib64"):
        (root / directory).mkdir(parents=True)
    for name in ("bin", "sbin", "lib"):
        (root / name).symlink_to(f"usr/{name}")
    return root


def _executable(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x7fELF")
    path.chmod(0o755)
    return path


def test_the_init_wraps_the_command_and_forwards_to_its_process_group(tmp_path: Path) -> None:
    init = SandboxInit(_executable(tmp_path / "tini-static"))
    assert init.wrap(["python3", "agent.py"]) == [INIT_PATH, "-g", "--", "python3", "agent.py"]
    assert init.check() == str(tmp_path / "tini-static")


@pytest.mark.parametrize("kind", ["missing", "not-executable", "directory"])
def test_a_missing_or_unusable_init_fails_closed(tmp_path: Path, kind: str) -> None:
    binary = tmp_path / "tini-static"
    if kind == "not-executable":
        binary.write_bytes(b"\x7fELF")
        binary.chmod(0o644)
    elif kind == "directory":
        binary.mkdir()
    with pytest.raises(EnforcementError) as refused:
        SandboxInit(binary).check()
    assert str(binary) in refused.value.message and refused.value.hint


def test_the_bundle_binds_the_init_read_only_at_dev_init(host_root: Path,
                                                         tmp_path: Path) -> None:
    binary = str(_executable(tmp_path / "tini-static"))
    spec = make_spec(host_root, workspace=None)
    spec = dataclasses.replace(spec, command=SandboxInit(Path(binary)).wrap(spec.command),
                               init_binary=binary)
    config = render_config(spec)
    mount = mount_at(config, INIT_PATH)
    assert mount["source"] == binary and "ro" in mount["options"]
    assert "nosuid" in mount["options"] and "nodev" in mount["options"]
    # After /dev's tmpfs, so it lands on it (and not under it).
    destinations = [m["destination"] for m in config["mounts"]]
    assert destinations.index("/dev") < destinations.index(INIT_PATH)
    assert config["process"]["args"][:3] == [INIT_PATH, "-g", "--"]
    bundle = write_bundle(tmp_path / "bundle", spec)
    assert not (bundle / "rootfs" / "dev" / "init").exists()  # runc makes it on the tmpfs


def test_without_an_init_the_bundle_has_none(host_root: Path) -> None:
    config = render_config(make_spec(host_root, workspace=None))
    assert INIT_PATH not in [m["destination"] for m in config["mounts"]]


def test_what_is_there_but_not_executable_is_126_not_127(host_root: Path) -> None:
    profile = validate_profile("t", {"filesystem": {"host_binds": ["/usr", "/etc"]}}, "t")
    (host_root / "etc" / "passwd").write_text("root:x:0:0::/root:/bin/sh\n")
    _executable(host_root / "usr" / "bin" / "tool")
    (host_root / "usr" / "bin" / "notes").write_text("text")
    for command in (["/etc/passwd"], ["/usr/bin"], ["/bin/notes"], ["notes"]):
        with pytest.raises(CommandNotExecutable) as refused:
            check_command(command, profile, None, {}, None, host_root)
        assert refused.value.exit_status == 126 and refused.value.http_status == 422
    for command in (["/nope"], ["nope"], ["./tool"]):
        with pytest.raises(CommandNotFound) as missing:
            check_command(command, profile, None, {}, None, host_root)
        assert missing.value.exit_status == 127 and missing.value.http_status == 422
        assert missing.value.detail["working_directory"] == "/tmp"
        assert "--workspace" in (missing.value.hint or "")
    # Directories only the sandbox has: its own /tmp (the working directory without a
    # workspace) and the empty root's directories that hold a bind.
    binds = validate_profile("t", {"filesystem": {"host_binds": ["/usr", "/etc", "/opt/x"]}},
                             "t")
    for command in (["/tmp"], ["."], ["/opt"], ["/tmp/../opt"]):
        with pytest.raises(CommandNotExecutable):
            check_command(command, binds, None, {}, None, host_root)
    with pytest.raises(CommandNotFound):
        check_command(["/tmp/tool"], binds, None, {}, None, host_root)
    # A PATH search passes over what it cannot run, as execvp does.
    check_command(["tool"], profile, None, {}, None, host_root)
    _executable(host_root / "usr" / "sbin" / "notes")
    check_command(["notes"], profile, None, {}, None, host_root)


def test_a_run_that_did_not_start_exits_as_docker_run_does() -> None:
    for error in (EnforcementError("x"), RuntimeFailure("x"), GatewayUnavailable("x"),
                  EngineUnavailable("x")):
        assert launch_exit_status(error) == 125
    assert launch_exit_status(CommandNotExecutable("x")) == 126
    assert launch_exit_status(CommandNotFound("x")) == 127
    assert launch_exit_status(InvalidRequest("x")) == InvalidRequest.exit_status


@pytest.mark.parametrize("binary", [Path("/bin/true"), Path("/usr/bin/env")])
def test_a_dynamically_linked_host_binary_is_never_bound(binary: Path) -> None:
    """Bound into a sandbox before the agent's uid is taken (the init; gosu and busybox run as
    the container's root), a dynamic binary would run the image's own ld.so and libc there:
    only a static build is bound, whichever of the three it is."""
    assert needs_loader(binary) == "is dynamically linked"
    for check in (SandboxInit(binary).check, UidDrop(binary).check, NetworkGate(binary).check):
        with pytest.raises(EnforcementError) as refused:
            check()
        assert "is dynamically linked" in refused.value.message
        assert refused.value.hint


def test_a_script_is_never_bound(tmp_path: Path) -> None:
    script = tmp_path / "tini-static"
    script.write_text("#!/bin/sh\nexec \"$@\"\n")
    script.chmod(0o755)
    with pytest.raises(EnforcementError) as refused:
        SandboxInit(script).check()
    assert "is a script" in refused.value.message


def test_the_static_builds_the_packages_install_are_bound() -> None:
    for binary in ("/usr/bin/tini-static", "/usr/sbin/gosu", "/bin/busybox"):
        assert needs_loader(Path(binary)) is None, binary
