"""The OCI bundle (supervisor/sandbox/bundle.py): what render_config puts in config.json, the
user-namespace id maps, and the files write_bundle creates. Rendering is pure; write_bundle
runs in tmp over a fake host tree."""

from __future__ import annotations

import json
import stat
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from supervisor.errors import EnforcementError
from supervisor.profiles import Profile, load_seccomp, validate_profile
from supervisor.sandbox.bundle import (
    SANDBOX_UID_COUNT,
    WORKSPACE_MOUNT,
    BundleSpec,
    IdMap,
    native_arch,
    render_config,
    render_seccomp,
    write_bundle,
)

MIB = 1024**2
HOST_BASE = 1_000_000
AGENT_ID = 1000
NETNS = "/run/netns/as-0123456789ab"
CAP_SETS = ("bounding", "effective", "inheritable", "permitted", "ambient")


def make_profile(**filesystem: Any) -> Profile:
    return validate_profile("test", {
        "filesystem": {"host_binds": ["/usr", "/etc", "/opt/absent"], "tmp_size": "32M",
                       **filesystem},
        "limits": {"memory": "256M", "pids": 128, "cpus": 0.5, "nofile": 1024},
        "env": {"LANG": "C.UTF-8"},
    }, "test")


@pytest.fixture
def host_root(tmp_path: Path) -> Path:
    """A merged-/usr host: bin, sbin and lib are symlinks into usr, lib64 is a real directory."""
    root = tmp_path / "host"
    for directory in ("usr/bin", "usr/sbin", "usr/lib", "etc", "lib64"):
        (root / directory).mkdir(parents=True)
    for name in ("bin", "sbin", "lib"):
        (root / name).symlink_to(f"usr/{name}")
    return root


def make_spec(host_root: Path, workspace: str | None = "/srv/ws/alice",
              profile: Profile | None = None, agent_host_id: int | None = None,
              env: dict[str, str] | None = None,
              seccomp_listener: str | None = None) -> BundleSpec:
    host_id = HOST_BASE + AGENT_ID if agent_host_id is None else agent_host_id
    return BundleSpec(
        run_id="0123456789ab", hostname="agent-a1", command=["python3", "agent.py"],
        profile=profile or make_profile(), seccomp=load_seccomp("default"),
        uid_map=IdMap(HOST_BASE, AGENT_ID, host_id), gid_map=IdMap(HOST_BASE, AGENT_ID, host_id),
        cgroups_path="/agent-supervisor/as-0123456789ab", netns_path=NETNS,
        workspace=workspace, env=env or {}, host_root=host_root,
        seccomp_listener=seccomp_listener,
    )


def mount_at(config: dict[str, Any], destination: str) -> dict[str, Any]:
    found = [m for m in config["mounts"] if m["destination"] == destination]
    assert len(found) == 1, f"{destination}: {found}"
    mount: dict[str, Any] = found[0]
    return mount


def env_of(config: dict[str, Any]) -> dict[str, str]:
    return dict(item.split("=", 1) for item in config["process"]["env"])


def test_namespaces_are_new_and_network_is_joined_by_path(host_root: Path) -> None:
    namespaces = render_config(make_spec(host_root))["linux"]["namespaces"]
    types = [ns["type"] for ns in namespaces]
    assert sorted(types) == sorted(["pid", "ipc", "uts", "mount", "cgroup", "user", "network"])
    assert len(types) == len(set(types))
    for ns in namespaces:
        if ns["type"] == "network":
            assert ns["path"] == NETNS
        else:
            assert "path" not in ns, f"{ns['type']} joins an existing namespace"


def test_every_capability_set_is_empty(host_root: Path) -> None:
    caps = render_config(make_spec(host_root))["process"]["capabilities"]
    assert set(caps) == set(CAP_SETS)
    assert all(caps[name] == [] for name in CAP_SETS)


def test_no_new_privileges_and_readonly_root(host_root: Path) -> None:
    config = render_config(make_spec(host_root))
    assert config["process"]["noNewPrivileges"] is True
    assert config["root"] == {"path": "rootfs", "readonly": True}
    assert config["process"]["user"] == {"uid": AGENT_ID, "gid": AGENT_ID}
    assert config["process"]["terminal"] is False
    assert config["process"]["args"] == ["python3", "agent.py"]
    assert config["hostname"] == "agent-a1"
    assert config["linux"]["cgroupsPath"] == "/agent-supervisor/as-0123456789ab"


def test_tmp_is_a_tmpfs_with_the_size_cap(host_root: Path) -> None:
    tmp = mount_at(render_config(make_spec(host_root)), "/tmp")
    assert tmp["type"] == "tmpfs"
    assert f"size={32 * MIB}" in tmp["options"]
    assert {"nosuid", "nodev"} <= set(tmp["options"])


def test_host_binds_are_read_only(host_root: Path) -> None:
    config = render_config(make_spec(host_root, workspace=None))
    binds = [m for m in config["mounts"] if m["type"] == "bind"]
    # /opt/absent does not exist on the host; lib64 is a real directory, so it is bound too.
    assert sorted(m["destination"] for m in binds) == ["/etc", "/lib64", "/usr"]
    for mount in binds:
        assert mount["source"] == mount["destination"]
        assert {"bind", "ro", "nosuid", "nodev"} <= set(mount["options"])
        assert "rw" not in mount["options"]


def test_a_host_bind_under_tmp_is_mounted_over_the_sandbox_tmp(host_root: Path) -> None:
    """A bound directory under /tmp (a checkout or venv there) must not be hidden by the
    sandbox's own /tmp tmpfs: it is mounted after it, read-only. /tmp itself stays the
    sandbox's tmpfs, never the host's /tmp."""
    (host_root / "tmp" / "ci" / "support").mkdir(parents=True)
    profile = make_profile(host_binds=["/usr", "/tmp/ci/support", "/tmp", "/etc"])
    mounts = render_config(make_spec(host_root, workspace=None, profile=profile))["mounts"]
    destinations = [m["destination"] for m in mounts]
    tmpfs = next(i for i, m in enumerate(mounts)
                 if m["destination"] == "/tmp" and m["type"] == "tmpfs")
    support = destinations.index("/tmp/ci/support")
    assert support > tmpfs
    assert mounts[support]["source"] == "/tmp/ci/support"
    assert {"bind", "ro", "nosuid", "nodev"} <= set(mounts[support]["options"])
    # A bind of /tmp itself is shadowed by the tmpfs mounted after it, as before.
    assert all(i < tmpfs for i, m in enumerate(mounts)
               if m["destination"] == "/tmp" and m["type"] == "bind")


def test_merged_usr_symlinks_are_not_bound(host_root: Path) -> None:
    destinations = {m["destination"] for m in render_config(make_spec(host_root))["mounts"]}
    assert not {"/bin", "/sbin", "/lib"} & destinations


def test_workspace_is_a_rw_bind_at_workspace(host_root: Path) -> None:
    config = render_config(make_spec(host_root, workspace="/srv/ws/alice"))
    workspace = mount_at(config, WORKSPACE_MOUNT)
    assert workspace["type"] == "bind"
    assert workspace["source"] == "/srv/ws/alice"
    assert "rw" in workspace["options"] and "ro" not in workspace["options"]
    assert {"nosuid", "nodev"} <= set(workspace["options"])
    assert config["process"]["cwd"] == WORKSPACE_MOUNT
    assert env_of(config)["HOME"] == WORKSPACE_MOUNT
    writable = [m for m in config["mounts"] if m["type"] == "bind" and "ro" not in m["options"]]
    assert writable == [workspace]


def test_no_workspace_no_workspace_mount(host_root: Path) -> None:
    config = render_config(make_spec(host_root, workspace=None))
    assert WORKSPACE_MOUNT not in {m["destination"] for m in config["mounts"]}
    assert all("rw" not in m["options"] for m in config["mounts"] if m["type"] == "bind")
    assert config["process"]["cwd"] == "/tmp"
    assert env_of(config)["HOME"] == "/tmp"


def test_masked_and_readonly_paths(host_root: Path) -> None:
    linux = render_config(make_spec(host_root))["linux"]
    assert {"/etc/shadow", "/etc/gshadow", "/etc/sudoers", "/proc/kcore", "/proc/keys",
            "/sys/firmware"} <= set(linux["maskedPaths"])
    assert {"/proc/sys", "/proc/sysrq-trigger"} <= set(linux["readonlyPaths"])


def test_resources_come_from_the_profile(host_root: Path) -> None:
    config = render_config(make_spec(host_root))
    resources = config["linux"]["resources"]
    assert resources["memory"] == {"limit": 256 * MIB, "swap": 256 * MIB}
    assert resources["pids"] == {"limit": 128}
    assert resources["cpu"] == {"quota": 50_000, "period": 100_000}
    rlimits = {r["type"]: (r["soft"], r["hard"]) for r in config["process"]["rlimits"]}
    assert rlimits["RLIMIT_NOFILE"] == (1024, 1024)
    assert rlimits["RLIMIT_CORE"] == (0, 0)


def test_seccomp_and_environment(host_root: Path) -> None:
    spec = make_spec(host_root, env={"TASK": "fix-bug"})
    config = render_config(spec)
    seccomp = config["linux"]["seccomp"]
    assert {k: v for k, v in seccomp.items() if k != "syscalls"} == {
        **{k: v for k, v in spec.seccomp.items() if k != "syscalls"},
        "architectures": ["SCMP_ARCH_X86_64"]}
    assert len(seccomp["syscalls"]) == len(spec.seccomp["syscalls"])
    env = env_of(config)
    assert env["LANG"] == "C.UTF-8"
    assert env["TASK"] == "fix-bug"
    assert env["AGENT_SUPERVISOR_RUN"] == "0123456789ab"
    assert env["PATH"].startswith("/usr/local/sbin")


NOTIFY = "SCMP_ACT_NOTIFY"
LISTENER = "/run/agent-supervisor/seccomp.sock"


def _by_action(seccomp: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    found: dict[str, list[dict[str, Any]]] = {}
    for rule in seccomp["syscalls"]:
        found.setdefault(rule["action"], []).append(rule)
    return found


def test_seccomp_with_a_listener_notifies_it(host_root: Path) -> None:
    spec = make_spec(host_root, seccomp_listener=LISTENER)
    seccomp = render_config(spec)["linux"]["seccomp"]
    assert seccomp["listenerPath"] == LISTENER
    assert seccomp["listenerMetadata"] == spec.run_id
    [notify] = [r for r in _by_action(seccomp)[NOTIFY] if "args" not in r]
    assert {"unshare", "mount", "ptrace", "bpf", "keyctl"} <= set(notify["names"])
    assert notify == {"names": notify["names"], "action": NOTIFY}  # no errnoRet for NOTIFY
    # Everything else is the profile's, untouched.
    others = [r for r in spec.seccomp["syscalls"] if r["action"] != NOTIFY]
    assert [r for r in seccomp["syscalls"] if r["action"] != NOTIFY] == others


def test_seccomp_without_a_listener_fails_closed_to_eperm(host_root: Path) -> None:
    spec = make_spec(host_root, seccomp_listener=None)
    seccomp = render_config(spec)["linux"]["seccomp"]
    assert "listenerPath" not in seccomp and "listenerMetadata" not in seccomp
    assert NOTIFY not in _by_action(seccomp)
    [notified] = [r for r in spec.seccomp["syscalls"]
                  if r["action"] == NOTIFY and "args" not in r]
    denied = [r for r in seccomp["syscalls"] if r["names"] == notified["names"]]
    assert denied == [{"names": notified["names"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1}]
    # The loaded profile is shared between runs: rendering never changes it.
    assert notified["action"] == NOTIFY


def test_seccomp_listener_is_only_ever_the_daemons() -> None:
    profile = {"defaultAction": "SCMP_ACT_ERRNO", "listenerPath": "/tmp/evil.sock",
               "listenerMetadata": "x",
               "syscalls": [{"names": ["unshare"], "action": NOTIFY, "errnoRet": 1}]}
    assert render_seccomp(profile, LISTENER, "r1")["listenerPath"] == LISTENER
    assert "listenerPath" not in render_seccomp(profile, None, "r1")
    # No NOTIFY entry, no listener: runc would connect for nothing.
    plain = {"defaultAction": "SCMP_ACT_ERRNO",
             "syscalls": [{"names": ["read"], "action": "SCMP_ACT_ALLOW"}]}
    assert render_seccomp(plain, LISTENER, "r1") == {**plain, "architectures": ["SCMP_ARCH_X86_64"]}


def test_seccomp_admits_only_the_native_abi() -> None:
    # A profile that lists i386 or x32 still gets a filter that admits x86_64 alone: the
    # compat entry points (int 0x80 socketcall and ipc, x32 numbers) are killed by the kernel.
    profile = {"defaultAction": "SCMP_ACT_ERRNO",
               "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
               "syscalls": [{"names": ["read"], "action": "SCMP_ACT_ALLOW"}]}
    assert render_seccomp(profile, None, "r1")["architectures"] == [native_arch("x86_64")]
    assert native_arch("x86_64") == "SCMP_ARCH_X86_64"
    assert native_arch("aarch64") == "SCMP_ARCH_AARCH64"
    with pytest.raises(EnforcementError):
        native_arch("mips")


def test_image_root_has_no_host_binds(host_root: Path) -> None:
    config = render_config(make_spec(host_root, profile=make_profile(root="/srv/images/py")))
    assert config["root"] == {"path": "/srv/images/py", "readonly": True}
    assert [m for m in config["mounts"] if m["type"] == "bind"] == [
        mount_at(config, WORKSPACE_MOUNT)]


def test_id_maps_are_rendered(host_root: Path) -> None:
    spec = make_spec(host_root, agent_host_id=1500)
    linux = render_config(spec)["linux"]
    assert linux["uidMappings"] == spec.uid_map.extents()
    assert linux["gidMappings"] == spec.gid_map.extents()


# ----------------------------------------------------------------------------- IdMap


def expand(extents: list[dict[str, int]]) -> dict[int, int]:
    """container id -> host id; every container id must appear exactly once."""
    seen: Counter[int] = Counter()
    mapping: dict[int, int] = {}
    for extent in extents:
        assert extent["size"] >= 1, f"empty extent (the kernel rejects it): {extent}"
        for offset in range(extent["size"]):
            seen[extent["containerID"] + offset] += 1
            mapping[extent["containerID"] + offset] = extent["hostID"] + offset
    assert max(seen.values()) == 1, "a sandbox id is mapped twice"
    return mapping


def test_identity_map_is_one_extent() -> None:
    assert IdMap(HOST_BASE, AGENT_ID, HOST_BASE + AGENT_ID).extents() == [
        {"containerID": 0, "hostID": HOST_BASE, "size": SANDBOX_UID_COUNT}]


# agent_uid is 1..65535 in the configuration; workspace owners are ordinary host users.
@pytest.mark.parametrize("agent_id", [1, 1000, 65534, 65535])
@pytest.mark.parametrize("agent_host_id", [None, 1000, 1500, 54321])
def test_id_map_never_reaches_low_host_ids(agent_id: int, agent_host_id: int | None) -> None:
    host_id = HOST_BASE + agent_id if agent_host_id is None else agent_host_id
    extents = IdMap(HOST_BASE, agent_id, host_id).extents()
    mapping = expand(extents)
    assert sorted(mapping) == list(range(SANDBOX_UID_COUNT))
    assert len(set(mapping.values())) == SANDBOX_UID_COUNT, "two sandbox ids share a host id"
    assert mapping[agent_id] == host_id
    for container_id, mapped in mapping.items():
        if container_id != agent_id:
            assert mapped == HOST_BASE + container_id
            assert mapped >= SANDBOX_UID_COUNT, f"sandbox id {container_id} -> host {mapped}"
    # Container ids are laid out in order, without gaps.
    position = 0
    for extent in extents:
        assert extent["containerID"] == position
        position += extent["size"]
    assert position == SANDBOX_UID_COUNT


def test_workspace_owner_extent() -> None:
    extents = IdMap(HOST_BASE, AGENT_ID, 1500).extents()
    assert {"containerID": AGENT_ID, "hostID": 1500, "size": 1} in extents
    low = [e for e in extents if e["hostID"] < SANDBOX_UID_COUNT]
    assert low == [{"containerID": AGENT_ID, "hostID": 1500, "size": 1}]


# ----------------------------------------------------------------------------- write_bundle


def test_write_bundle(tmp_path: Path, host_root: Path) -> None:
    spec = make_spec(host_root)
    bundle = write_bundle(tmp_path / "bundles" / "as-0123456789ab", spec)
    config_path = bundle / "config.json"
    assert stat.S_IMODE(config_path.stat().st_mode) == 0o600
    assert json.loads(config_path.read_text()) == render_config(spec)
    # runc, inside the user namespace, must traverse the bundle but not list it.
    assert stat.S_IMODE(bundle.stat().st_mode) == 0o711
    rootfs = bundle / "rootfs"
    for name in ("bin", "sbin", "lib"):
        assert (rootfs / name).is_symlink()
        assert str((rootfs / name).readlink()) == f"usr/{name}"
    for directory in ("usr", "etc", "lib64", "tmp", "proc", "dev/pts", "workspace"):
        assert (rootfs / directory).is_dir() and not (rootfs / directory).is_symlink()
    assert not any(rootfs.rglob("*.*")), "the rootfs skeleton holds only directories and links"


def test_write_bundle_refuses_an_existing_directory(tmp_path: Path, host_root: Path) -> None:
    target = tmp_path / "bundle"
    target.mkdir()
    with pytest.raises(FileExistsError):
        write_bundle(target, make_spec(host_root))


def test_write_bundle_for_an_image_root(tmp_path: Path, host_root: Path) -> None:
    spec = make_spec(host_root, profile=make_profile(root="/srv/images/py"))
    bundle = write_bundle(tmp_path / "bundle", spec)
    assert not (bundle / "rootfs").exists()
    assert stat.S_IMODE((bundle / "config.json").stat().st_mode) == 0o600
    assert json.loads((bundle / "config.json").read_text())["root"]["path"] == "/srv/images/py"
