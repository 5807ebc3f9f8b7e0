"""Sandbox profiles (supervisor/profiles.py): the packaged default, overrides from a profile
dir, and malformed profiles rejected with the field that is wrong. Reads files in tmp only."""

from __future__ import annotations

from pathlib import Path

import pytest

from supervisor.errors import ProfileInvalid, ProfileNotFound
from supervisor.profiles import Profile, load_profile, load_seccomp

GIB = 1024**3
MIB = 1024**2


def write_profile(directory: Path, name: str, text: str | bytes) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.toml"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def test_packaged_default_profile_loads(tmp_path: Path) -> None:
    profile = load_profile("default", [tmp_path / "none"])
    assert isinstance(profile, Profile)
    assert profile.name == "default"
    assert profile.filesystem.root == "host"
    assert profile.filesystem.host_binds == ["/usr", "/etc"]
    assert profile.filesystem.tmp_size == 64 * MIB
    assert "/etc/shadow" in profile.filesystem.masked_paths
    assert profile.limits.memory == GIB
    assert profile.limits.pids == 4096
    assert profile.limits.cpus == 1.0
    assert profile.network.mode == "none"
    assert profile.seccomp.profile == "default"


def test_the_referenced_seccomp_profile_loads(tmp_path: Path) -> None:
    profile = load_profile("default", [])
    seccomp = load_seccomp(profile.seccomp.profile)
    assert seccomp["defaultAction"] == "SCMP_ACT_ERRNO"
    assert isinstance(seccomp["syscalls"], list) and seccomp["syscalls"]
    # NOTIFY: answered EPERM by the daemon's listener, or rendered as ERRNO without one.
    denied = {name for rule in seccomp["syscalls"]
              if rule["action"] in ("SCMP_ACT_ERRNO", "SCMP_ACT_NOTIFY") for name in rule["names"]}
    assert {"unshare", "mount", "ptrace", "bpf"} <= denied


def test_unknown_seccomp_profile_is_invalid() -> None:
    with pytest.raises(ProfileInvalid) as info:
        load_seccomp("no-such-seccomp")
    assert info.value.detail["field"] == "seccomp.profile"


def test_a_profile_dir_overrides_the_packaged_profile(tmp_path: Path) -> None:
    write_profile(tmp_path / "p", "default", '[limits]\npids = 64\nmemory = "256M"\n')
    profile = load_profile("default", [tmp_path / "p"])
    assert profile.limits.pids == 64
    assert profile.limits.memory == 256 * MIB
    assert profile.name == "default"


def test_the_first_profile_dir_wins(tmp_path: Path) -> None:
    write_profile(tmp_path / "a", "web", "[limits]\npids = 100\n")
    write_profile(tmp_path / "b", "web", "[limits]\npids = 200\n")
    assert load_profile("web", [tmp_path / "a", tmp_path / "b"]).limits.pids == 100
    assert load_profile("web", [tmp_path / "missing", tmp_path / "b"]).limits.pids == 200


def test_a_profile_only_in_a_dir_loads(tmp_path: Path) -> None:
    write_profile(tmp_path, "tiny", "\n".join([
        'description = "tiny"',
        "[filesystem]",
        'tmp_size = "8M"',
        'host_binds = ["/usr"]',
        "[limits]",
        "cpus = 0.5",
        "[env]",
        'LANG = "C.UTF-8"',
    ]))
    profile = load_profile("tiny", [tmp_path])
    assert profile.description == "tiny"
    assert profile.filesystem.tmp_size == 8 * MIB
    assert profile.filesystem.host_binds == ["/usr"]
    assert profile.limits.cpus == 0.5
    assert profile.env == {"LANG": "C.UTF-8"}


@pytest.mark.parametrize(("text", "field"), [
    ("bogus = 1\n", "bogus"),
    ("[limits]\nbogus = 1\n", "limits.bogus"),
    ("[filesystem]\nwritable = true\n", "filesystem.writable"),
    ('[limits]\nmemory = "12Q"\n', "limits.memory"),
    ('[filesystem]\ntmp_size = "12Q"\n', "filesystem.tmp_size"),
    ("[limits]\npids = -1\n", "limits.pids"),
    ("[limits]\npids = 2\n", "limits.pids"),
    ("[limits]\ncpus = 0\n", "limits.cpus"),
    ('[filesystem]\nhost_binds = ["usr"]\n', "filesystem.host_binds"),
    ('[filesystem]\nhost_binds = ["/usr/../root"]\n', "filesystem.host_binds"),
    ('[filesystem]\nmasked_paths = ["etc/shadow"]\n', "filesystem.masked_paths"),
    ('[filesystem]\nroot = "rootfs"\n', "filesystem.root"),
    ('[env]\n"1BAD" = "x"\n', "env"),
    ('[env]\n"A-B" = "x"\n', "env"),
    ('[network]\nmode = "host"\n', "network.mode"),
    ('[seccomp]\nprofile = "../x"\n', "seccomp.profile"),
])
def test_malformed_profile_names_the_field(tmp_path: Path, text: str, field: str) -> None:
    path = write_profile(tmp_path, "bad", text)
    with pytest.raises(ProfileInvalid) as info:
        load_profile("bad", [tmp_path])
    error = info.value
    assert error.code == "profile_invalid"
    assert error.http_status == 422
    assert error.detail["field"] == field
    assert error.detail["profile"] == "bad"
    assert error.detail["source"] == str(path)
    assert error.detail["reason"]
    assert field in error.message


def test_unknown_field_reason(tmp_path: Path) -> None:
    write_profile(tmp_path, "bad", "[limits]\nswap = 1\n")
    with pytest.raises(ProfileInvalid) as info:
        load_profile("bad", [tmp_path])
    assert info.value.detail["reason"] == "unknown field"


def test_invalid_toml(tmp_path: Path) -> None:
    path = write_profile(tmp_path, "bad", "[limits\npids = 1\n")
    with pytest.raises(ProfileInvalid) as info:
        load_profile("bad", [tmp_path])
    assert info.value.detail["field"] == ""
    assert info.value.detail["source"] == str(path)
    assert "not valid TOML" in info.value.message


def test_invalid_utf8_is_a_profile_error(tmp_path: Path) -> None:
    write_profile(tmp_path, "bad", b"description = '\xff'\n")
    with pytest.raises(ProfileInvalid):
        load_profile("bad", [tmp_path])


@pytest.mark.parametrize("name", ["../x", "x/../y", "/etc/passwd", "", ".hidden", "UPPER",
                                  "a b", "x" * 65])
def test_bad_profile_name(tmp_path: Path, name: str) -> None:
    # A valid profile where "../x" would resolve, to prove the name is refused before any read.
    write_profile(tmp_path, "x", "[limits]\npids = 64\n")
    (tmp_path / "dir").mkdir()
    with pytest.raises(ProfileInvalid) as info:
        load_profile(name, [tmp_path / "dir"])
    assert info.value.detail["field"] == "profile"
    assert info.value.detail["profile"] == name


def test_unknown_profile(tmp_path: Path) -> None:
    with pytest.raises(ProfileNotFound) as info:
        load_profile("no-such-profile", [tmp_path])
    error = info.value
    assert error.code == "profile_not_found"
    assert error.http_status == 404
    assert error.detail["profile"] == "no-such-profile"
    assert str(tmp_path / "no-such-profile.toml") in error.detail["searched"]
