"""A Debian 12 machine with systemd as PID 1, for the systemd tier. Needs root and dockerd.

Why Docker and not systemd-nspawn: the tier must run agents inside, which means runc creating
cgroups on a hybrid host. systemd-nspawn mounts the v1 controller hierarchies read-only in the
container (only its unified tree is writable), so runc inside cannot give a sandbox its
memory, pids and cpu limits. A Docker container with every capability the host grants,
seccomp/AppArmor/masked paths off, every device allowed, and the host's cgroup namespace
with /sys/fs/cgroup bound read-write sees the cgroup tree exactly as the host does: systemd
runs its units under /docker/<id>, and the daemon inside puts agents under its cgroup_parent
as on a real host. (Not --privileged: Docker then asks for every capability, including ones
the host's own bounding set may lack, and refuses to start.) Network "none": only loopback;
nftables and the agents' network namespaces live in the container's own namespace.

Docker bind-mounts /etc/hosts, /etc/hostname and /etc/resolv.conf into every container; a
sandbox's bind of /etc in its user namespace would then carry locked submounts, which the
kernel refuses (EINVAL), so the entry point unmounts them before it execs systemd.

The root is built on this machine by mmdebstrap from Debian's archive (no registry image),
with the packages scripts/install.sh installs plus systemd-sysv, and cached as a tarball
under /var/cache/agent-supervisor-test keyed by a hash of what went into it; the Python
wheels the install needs are downloaded once into a wheelhouse keyed the same way, because
the container has no network (pip there runs with PIP_NO_INDEX and PIP_FIND_LINKS)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shlex
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from supervisor.sandbox.cgroups import CGROUP_ROOT, CgroupMode, detect_mode, v1_hierarchies

REPO = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("AGENT_SUPERVISOR_TEST_CACHE", "/var/cache/agent-supervisor-test"))
SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
# Beyond what scripts/install.sh installs: systemd as init, and what the tests use inside.
EXTRA_PACKAGES = ["systemd-sysv"]
# Smaller and faster to unpack; nothing in the tier reads documentation.
DPKG_OPTIONS = ["path-exclude=/usr/share/man/*", "path-exclude=/usr/share/doc/*",
                "path-exclude=/usr/share/locale/*", "path-exclude=/usr/share/info/*",
                "force-unsafe-io"]
IMAGE = "agent-supervisor-test/systemd"
WORKDIR = "/src"
WHEELS = "/wheels"


def install_packages() -> list[str]:
    """The Debian packages scripts/install.sh installs (scripts/lib/packages.sh, `service`)."""
    done = subprocess.run(["bash", str(REPO / "scripts" / "lib" / "packages.sh"), "service"],
                          capture_output=True, text=True, check=True)
    return done.stdout.split()


def root_packages() -> list[str]:
    return sorted(set(install_packages()) | set(EXTRA_PACKAGES))


def _key(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def root_key() -> str:
    return _key(SUITE, MIRROR, root_packages(), DPKG_OPTIONS, "minbase")


def build_root() -> Path:
    """The root tarball, built once per package list."""
    CACHE.mkdir(parents=True, exist_ok=True)
    tarball = CACHE / f"systemd-root-{root_key()}.tar"
    if tarball.exists():
        return tarball
    partial = tarball.with_suffix(f".partial-{os.getpid()}.tar")
    argv = ["mmdebstrap", "--quiet", "--variant=minbase", "--mode=root",
            f"--include={','.join(root_packages())}",
            *(f"--dpkgopt={option}" for option in DPKG_OPTIONS),
            SUITE, str(partial), MIRROR]
    subprocess.run(argv, check=True, timeout=900)
    partial.rename(tarball)
    return tarball


def wheelhouse() -> Path:
    """The runtime dependencies (and the build backend) as wheels, for the offline install."""
    pyproject = (REPO / "pyproject.toml").read_bytes()
    directory = CACHE / f"wheels-{_key(pyproject.decode(), sys.version_info[:2])}"
    if (directory / ".complete").exists():
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    import tomllib
    meta = tomllib.loads(pyproject.decode())
    requirements = [*meta["project"]["dependencies"], *meta["build-system"]["requires"],
                    "wheel"]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q",
                    "--disable-pip-version-check", "--only-binary=:all:", "-d", str(directory),
                    *requirements], check=True, timeout=600)
    (directory / ".complete").touch()
    return directory


def image() -> str:
    """The Docker image of the root (imported once per root)."""
    tag = f"{IMAGE}:{root_key()}"
    probe = subprocess.run(["docker", "image", "inspect", tag], capture_output=True)
    if probe.returncode != 0:
        with open(build_root(), "rb") as tarball:
            subprocess.run(["docker", "import", "-", tag], stdin=tarball, check=True,
                           capture_output=True, timeout=600)
    return tag


class Machine:
    """One booted container; `run` is `docker exec` as root unless told otherwise."""

    def __init__(self, name: str) -> None:
        self.name = name

    def run(self, *argv: str, check: bool = True, env: dict[str, str] | None = None,
            timeout: float = 120, input: str | None = None
            ) -> subprocess.CompletedProcess[str]:
        command = ["docker", "exec", *(["-i"] if input is not None else [])]
        for key, value in (env or {}).items():
            command += ["-e", f"{key}={value}"]
        command += [self.name, *argv]
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                              input=input)
        if check and done.returncode != 0:
            raise AssertionError(f"{shlex.join(argv)} exited {done.returncode}\n"
                                 f"stdout: {done.stdout}\nstderr: {done.stderr}")
        return done

    def sh(self, script: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
        return self.run("bash", "-euo", "pipefail", "-c", script, **kwargs)  # type: ignore[arg-type]

    def as_user(self, user: str, *argv: str, check: bool = True
                ) -> subprocess.CompletedProcess[str]:
        """As a login would: the user's uid and all their groups (runuser calls initgroups)."""
        return self.run("runuser", "-u", user, "--", *argv, check=check)

    def unit(self, *properties: str) -> dict[str, str]:
        out = self.run("systemctl", "show", "agent-supervisor.service",
                       *(f"--property={p}" for p in properties)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def wait_for(self, what: str, predicate: object, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():  # type: ignore[operator]
                return
            time.sleep(0.5)
        raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}\n"
                             + self.run("journalctl", "-u", "agent-supervisor", "-n", "60",
                                        "--no-pager", check=False).stdout)

    def journal(self) -> str:
        return self.run("journalctl", "-u", "agent-supervisor", "--no-pager", "-o", "cat",
                        check=False).stdout


@contextlib.contextmanager
def booted() -> Iterator[Machine]:
    """A fresh container booted to multi-user with this checkout at /src and the wheelhouse
    at /wheels; removed afterwards."""
    subprocess.run(["bash", str(REPO / "scripts" / "start-dockerd.sh")], check=True,
                   capture_output=True)
    tag = image()
    wheels = wheelhouse()
    name = f"as-systemd-{uuid.uuid4().hex[:8]}"
    entry = ("umount /etc/hosts /etc/hostname /etc/resolv.conf 2>/dev/null; "
             "exec /lib/systemd/systemd")
    subprocess.run(
        ["docker", "run", "-d", "--name", name, "--hostname", "agent-host",
         "--cap-add", "ALL", "--cap-drop", "SYS_RESOURCE",
         "--security-opt", "seccomp=unconfined", "--security-opt", "apparmor=unconfined",
         "--security-opt", "systempaths=unconfined", "--device-cgroup-rule", "a *:* rwm",
         "--cgroupns", "host", "-v", "/sys/fs/cgroup:/sys/fs/cgroup:rw",
         "--network", "none", "--tmpfs", "/run:exec", "--tmpfs", "/run/lock",
         "-v", f"{wheels}:{WHEELS}:ro", "-e", "container=docker",
         "--stop-signal", "SIGRTMIN+3", tag, "/bin/sh", "-c", entry],
        check=True, capture_output=True, timeout=120)
    machine = Machine(name)
    try:
        files = subprocess.run(["git", "-C", str(REPO), "ls-files", "-co", "--exclude-standard",
                                "-z"], check=True, capture_output=True).stdout
        present = b"\0".join(f for f in files.split(b"\0") if f and (REPO / f.decode()).exists())
        tar = subprocess.run(["tar", "-C", str(REPO), "--null", "-T", "-", "-c"],
                             input=present, check=True, capture_output=True).stdout
        subprocess.run(["docker", "exec", "-i", name, "sh", "-c",
                        f"mkdir -p {WORKDIR} && tar -C {WORKDIR} -x"],
                       input=tar, check=True, capture_output=True)
        machine.wait_for("systemd to finish booting", lambda: machine.run(
            "systemctl", "is-system-running", check=False).stdout.strip()
            in ("running", "degraded"), timeout=120)
        yield machine
    finally:
        # Every process of the machine, its agents included, is in its pid namespace and
        # dies with it; then the agents' cgroups (on the host's tree) can go.
        subprocess.run(["docker", "rm", "-f", name], capture_output=True)
        remove_service_cgroups()


SERVICE_CGROUPS = ("agent-supervisor", "agent-supervisor-gateway",
                   "agent-supervisor-watchdog")


@dataclass(frozen=True)
class CgroupLayout:
    """Where the machine's cgroups are, on this host's layout (the machine shares the host's
    cgroup namespace and tree): the daemon's own detection (supervisor.sandbox.cgroups) says
    pure v2 or hybrid, and the tier reads the same trees the daemon writes."""

    mode: CgroupMode
    v2: Path  # the unified tree: runs' cgroups, cgroup.kill
    # The trees systemd tracks units by: name=systemd (v1) and the unified tree on a hybrid
    # host, the one tree on pure v2.
    tracking: tuple[Path, ...]
    # Every tree a cgroup of the daemon's may appear in (the v1 controllers on hybrid).
    all_trees: tuple[Path, ...]

    def agents(self, parent: str = "/agent-supervisor") -> Path:
        return self.v2 / parent.lstrip("/")


def cgroup_layout(root: Path = CGROUP_ROOT) -> CgroupLayout:
    mode = detect_mode(root)
    if mode is CgroupMode.V2:
        return CgroupLayout(mode, root, (root,), (root,))
    if mode is CgroupMode.HYBRID:
        v1 = tuple(v1_hierarchies(root))
        return CgroupLayout(mode, root / "unified", (root / "systemd", root / "unified"),
                            (root / "unified", *v1))
    raise AssertionError(f"no cgroup v2 tree under {root}: the tier needs pure v2 or hybrid")


def remove_service_cgroups() -> None:
    """What a test that failed before uninstall left of the daemon's default cgroups."""
    for hierarchy in cgroup_layout().all_trees:
        for name in SERVICE_CGROUPS:
            top = hierarchy / name
            if not top.is_dir():
                continue
            below = [p for p in top.rglob("*") if p.is_dir()]
            # Deepest first: a cgroup directory goes only once it has no children.
            for directory in [*sorted(below, key=lambda p: len(p.parts), reverse=True), top]:
                with contextlib.suppress(OSError):
                    directory.rmdir()


def readme_service_commands() -> list[str]:
    """The shell lines of the first ```sh block in the README's service section, comments
    stripped: the tier runs exactly what an operator copies."""
    text = (REPO / "README.md").read_text()
    section = text.split("## Running it as a service", 1)[1].split("\n## ", 1)[0]
    block = section.split("```sh\n", 1)[1].split("```", 1)[0]
    lines = [line.split(" #", 1)[0].strip() for line in block.splitlines()]
    return [line for line in lines if line and not line.startswith("#")]
