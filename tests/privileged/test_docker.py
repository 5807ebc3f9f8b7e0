"""What only the docker runtime has: agents from an image (`--image`, built here with `docker
import`, no registry), images and profiles that would weaken containment refused before
anything runs, and the runtime chosen per profile. Needs root and dockerd."""

from __future__ import annotations

import io
import secrets
import shutil
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import require_docker
from tests.support.daemon import Daemon, engine_request, remove_test_images


def _add_file(tar: tarfile.TarFile, path: str, data: bytes, mode: int = 0o755) -> None:
    info = tarfile.TarInfo(path)
    info.size, info.mode = len(data), mode
    tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def probe_image() -> Iterator[str]:
    """A tiny image of its own: dash as /bin/sh with its libraries, and a marker file."""
    require_docker()
    dash = Path(shutil.which("dash") or "/bin/dash").resolve()
    libs = subprocess.run(["ldd", str(dash)], capture_output=True, text=True, check=True)
    files = [dash] + [Path(part) for line in libs.stdout.splitlines()
                      for part in line.split() if part.startswith("/")]
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for directory in ("bin", "tmp", "etc", "workspace"):
            info = tarfile.TarInfo(directory)
            info.type, info.mode = tarfile.DIRTYPE, 0o1777 if directory == "tmp" else 0o755
            tar.addfile(info)
        for path in files:
            _add_file(tar, str(path).lstrip("/"), path.read_bytes())
        _add_file(tar, "bin/sh", dash.read_bytes())
        _add_file(tar, "image-marker", b"from-the-image\n", 0o644)
    image = f"agent-supervisor-test/probe:{secrets.token_hex(3)}"
    repository, _, tag = image.rpartition(":")
    engine_request("POST", f"/images/create?fromSrc=-&repo={repository}&tag={tag}",
                   body=buffer.getvalue())
    yield image
    remove_test_images([image])


@pytest.mark.parametrize("runtime", ["docker"], indirect=True)
def test_agent_runs_from_an_image_named_on_the_command_line(daemon: Daemon,
                                                           probe_image: str) -> None:
    result = daemon.agentctl("run", "--name", "imaged", "--image", probe_image, "--", "/bin/sh",
                             "-c", "read -r m < /image-marker; echo $m; "
                             "test -e /usr/bin/python3 && echo host; "
                             "{ echo x > /image-marker; } 2>/dev/null || echo read-only")
    assert result.returncode == 0, result.stderr
    # The image is the root: its own files, none of the host's /usr, and read-only.
    assert result.stdout.split() == ["from-the-image", "read-only"], result.stdout


@pytest.mark.parametrize("runtime", ["docker"], indirect=True)
def test_a_missing_image_is_refused_and_nothing_runs(daemon: Daemon) -> None:
    result = daemon.agentctl("run", "--name", "ghost", "--image",
                             "agent-supervisor-test/absent:nope", "--", "/bin/true")
    assert result.returncode == 6 and "image_not_found" in result.stderr, result.stderr
    assert "never pulls" in result.stderr
    # A refused launch changes nothing: no agent is registered (issue 11, item 9).
    assert "ghost" not in [a["name"] for a in daemon.client.agents()["agents"]]
    assert daemon.clean() == {}


@pytest.mark.parametrize("runtime", ["docker"], indirect=True)
def test_a_bind_that_would_expose_the_engine_socket_is_refused(daemon: Daemon) -> None:
    (daemon.root / "profiles" / "leaky.toml").write_text(
        '[filesystem]\nhost_binds = ["/usr", "/etc", "/run"]\n')
    result = daemon.agentctl("run", "--name", "leaky", "--profile", "leaky", "--", "/bin/true")
    assert result.returncode == 125 and "enforcement_failed" in result.stderr, result.stderr
    assert "socket" in result.stderr
    assert daemon.clean() == {}


def test_an_image_on_runc_is_refused(daemon: Daemon) -> None:
    result = daemon.agentctl("run", "--name", "wrong", "--image", "busybox", "--", "true")
    assert result.returncode == 6 and "runtime_unsupported" in result.stderr, result.stderr
    assert daemon.clean() == {}


@pytest.mark.parametrize("runtime", ["runc"], indirect=True)
def test_docker_is_refused_where_it_is_not_enabled(daemon: Daemon) -> None:
    (daemon.root / "profiles" / "dockered.toml").write_text('runtime = "docker"\n')
    result = daemon.agentctl("run", "--name", "d", "--profile", "dockered", "--", "true")
    assert result.returncode == 6 and "runtime_unsupported" in result.stderr, result.stderr


def test_a_profile_picks_docker_while_the_default_stays_runc(tmp_root: Path) -> None:
    require_docker()
    from tests.support.daemon import TEST_HOST_ROOT_IMAGE, running_daemon

    with running_daemon(tmp_root, docker={"enabled": True,
                                          "host_root_image": TEST_HOST_ROOT_IMAGE}) as daemon:
        (daemon.root / "profiles" / "dockered.toml").write_text('runtime = "docker"\n')
        on_runc = daemon.agentctl("run", "--name", "r", "--", "/bin/sh", "-c", "id -u")
        on_docker = daemon.agentctl("run", "--name", "d", "--profile", "dockered", "--",
                                    "/bin/sh", "-c", "id -u")
        assert (on_runc.returncode, on_docker.returncode) == (0, 0), on_docker.stderr
        # runc: uid 1000 in its user namespace; docker: an unprivileged host uid.
        assert on_runc.stdout.split() == ["1000"]
        assert int(on_docker.stdout.split()[0]) >= 1_000_000
        # The startup self-test proved both runtimes before the daemon served anything.
        [test] = [e for e in daemon.client.audit()["entries"] if e["verb"] == "self_test"]
        assert test["outcome"] == "ok"
        assert test["detail"]["checks"]["docker:seccomp-unshare"] == "PASS"
        assert test["detail"]["checks"]["seccomp-unshare"] == "PASS"
