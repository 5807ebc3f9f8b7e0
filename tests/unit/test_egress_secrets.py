"""Route secrets: `env:NAME` from the environment, `file:NAME` from a root-owned directory, in a
root-owned file of mode 0600 or stricter, one line, opened without following symlinks. Every
refusal names the reference and never contains the value.

These hold as root and as an unprivileged user alike; nothing is skipped. Where root-ness
decides the outcome (a file this test creates is owned by root only when the test runs as root),
the expectation is chosen from os.geteuid(). The real directory check is exercised on its own;
for the file checks as non-root (where no directory the test can write is root-owned) it is
replaced by a recorder, so the file checks still run."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from supervisor.egress import secrets
from supervisor.egress.secrets import MAX_SECRET, load_secret
from supervisor.errors import EgressSetupFailed

ROOT = os.geteuid() == 0
VALUE = "sk-test-0123456789abcdef-do-not-leak"


def refused(ref: str, directory: Path, *, value: str = VALUE) -> EgressSetupFailed:
    """The refusal load_secret gives; checked to name `ref` and never to contain `value`."""
    with pytest.raises(EgressSetupFailed) as info:
        load_secret(ref, directory)
    error = info.value
    assert ref in str(error)
    assert error.detail["secret"] == ref
    assert error.code == "egress_setup_failed"
    for text in (str(error), error.message, repr(error.detail), repr(error.to_body())):
        assert value not in text
    return error


@pytest.fixture
def secrets_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A directory for the file checks: a real, passing one when root (tmp_path is root-owned
    and 0700 then); otherwise the directory check is recorded instead of judged."""
    directory = tmp_path / "secrets"
    directory.mkdir(mode=0o700)
    directory.chmod(0o700)
    checked: list[tuple[Path, str]] = []
    if not ROOT:
        monkeypatch.setattr(secrets, "_check_directory",
                            lambda d, ref: checked.append((d, ref)))
    yield directory
    if not ROOT:
        assert all(d == directory for d, _ in checked)


def write(directory: Path, name: str, content: bytes | str, mode: int = 0o600) -> Path:
    path = directory / name
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    path.chmod(mode)
    return path


# ----------------------------------------------------------------------------- env:


def test_env_secret_is_read_and_stripped(monkeypatch: pytest.MonkeyPatch,
                                         tmp_path: Path) -> None:
    monkeypatch.setenv("EGRESS_TEST_KEY", f"  {VALUE}\n")
    # The directory plays no part for env: references, even a missing one.
    assert load_secret("env:EGRESS_TEST_KEY", tmp_path / "missing") == VALUE


@pytest.mark.parametrize("content", [None, "", "   \n"])
def test_env_secret_missing_or_blank_is_refused(monkeypatch: pytest.MonkeyPatch,
                                                tmp_path: Path, content: str | None) -> None:
    if content is None:
        monkeypatch.delenv("EGRESS_TEST_KEY", raising=False)
    else:
        monkeypatch.setenv("EGRESS_TEST_KEY", content)
    error = refused("env:EGRESS_TEST_KEY", tmp_path)
    assert "environment has no EGRESS_TEST_KEY" in str(error)


# ----------------------------------------------------------------------------- the directory


def test_directory_owned_by_this_user_is_accepted_only_as_root(tmp_path: Path) -> None:
    directory = tmp_path / "secrets"
    directory.mkdir()
    directory.chmod(0o700)
    write(directory, "key", VALUE)
    if ROOT:
        assert load_secret("file:key", directory) == VALUE
    else:
        error = refused("file:key", directory)
        assert "secrets directory" in str(error) and "must be owned by root" in str(error)
        assert f"uid {os.geteuid()}" in str(error)
        assert error.detail["path"] == str(directory)


@pytest.mark.parametrize("mode", [0o720, 0o702, 0o777, 0o1777])
def test_group_or_other_writable_directory_is_refused(tmp_path: Path, mode: int) -> None:
    directory = tmp_path / "secrets"
    directory.mkdir()
    write(directory, "key", VALUE)
    directory.chmod(mode)
    error = refused("file:key", directory)
    assert "writable by root only" in str(error)
    assert f"mode {mode:04o}" in str(error)


def test_directory_not_owned_by_root_is_refused_even_if_0700(tmp_path: Path) -> None:
    directory = tmp_path / "secrets"
    directory.mkdir()
    write(directory, "key", VALUE)
    directory.chmod(0o700)
    if ROOT:
        os.chown(directory, 65534, 65534)
    error = refused("file:key", directory)
    assert "must be owned by root" in str(error)
    assert f"uid {65534 if ROOT else os.geteuid()}" in str(error)


def test_missing_directory_is_refused(tmp_path: Path) -> None:
    error = refused("file:key", tmp_path / "nowhere")
    assert "secrets directory" in str(error) and "No such file or directory" in str(error)


def test_world_readable_root_file_in_a_root_directory_is_refused() -> None:
    # /etc is root-owned and 0755 everywhere; /etc/passwd is root's and world-readable: the
    # real directory check passes and the file check refuses, as root and as anyone else.
    error = refused("file:passwd", Path("/etc"), value="root:")
    assert "must be owned by root with mode 0600 or stricter" in str(error)
    assert error.detail["path"] == "/etc/passwd"


# ----------------------------------------------------------------------------- the file


@pytest.mark.parametrize("mode", [0o600, 0o400])
def test_file_owned_by_this_user_with_mode_0600_or_stricter(secrets_dir: Path,
                                                            mode: int) -> None:
    write(secrets_dir, "key", f"{VALUE}\n", mode)
    if ROOT:
        assert load_secret("file:key", secrets_dir) == VALUE
    else:
        error = refused("file:key", secrets_dir)
        assert f"(it is uid {os.geteuid()}, mode {mode:04o})" in str(error)


def test_file_not_owned_by_root_is_refused(secrets_dir: Path) -> None:
    path = write(secrets_dir, "key", VALUE)
    if ROOT:
        os.chown(path, 65534, 65534)
    error = refused("file:key", secrets_dir)
    assert "must be owned by root with mode 0600 or stricter" in str(error)
    assert f"uid {65534 if ROOT else os.geteuid()}" in str(error)
    assert error.detail["path"] == str(path)


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660, 0o610])
def test_file_with_group_or_other_access_is_refused(secrets_dir: Path, mode: int) -> None:
    write(secrets_dir, "key", VALUE, mode)
    error = refused("file:key", secrets_dir)
    assert f"mode {mode:04o})" in str(error)


def test_missing_file_is_refused(secrets_dir: Path) -> None:
    error = refused("file:absent", secrets_dir)
    assert "cannot open" in str(error) and "No such file or directory" in str(error)
    assert error.detail["path"] == str(secrets_dir / "absent")


def test_symlink_is_refused_not_followed(secrets_dir: Path, tmp_path: Path) -> None:
    # The target would be acceptable on its own (as root); the link is refused anyway.
    target = write(secrets_dir, "real", VALUE)
    (secrets_dir / "link").symlink_to(target)
    error = refused("file:link", secrets_dir)
    assert "cannot open" in str(error)
    assert "symbolic links" in str(error)  # ELOOP from O_NOFOLLOW
    outside = write(tmp_path, "outside", VALUE)
    (secrets_dir / "escape").symlink_to(outside)
    assert "cannot open" in str(refused("file:escape", secrets_dir))


def test_a_directory_is_not_a_secret_file(secrets_dir: Path) -> None:
    sub = secrets_dir / "sub"
    sub.mkdir(mode=0o700)
    error = refused("file:sub", secrets_dir)
    assert "is not a regular file" in str(error)
    # "file:.." passes the reference syntax; it names a directory and is refused the same way.
    assert "is not a regular file" in str(refused("file:..", secrets_dir))


def test_oversize_file_is_refused(secrets_dir: Path) -> None:
    big = "k" * (MAX_SECRET + 1)
    write(secrets_dir, "big", big)
    error = refused("file:big", secrets_dir, value=big)
    if ROOT:
        assert f"larger than {MAX_SECRET} bytes" in str(error)


def test_a_file_of_exactly_max_size_is_accepted_as_root(secrets_dir: Path) -> None:
    exact = "k" * MAX_SECRET
    write(secrets_dir, "exact", exact)
    if ROOT:
        assert load_secret("file:exact", secrets_dir) == exact
    else:
        refused("file:exact", secrets_dir, value=exact)


@pytest.mark.parametrize(("content", "message"), [
    (f"{VALUE}\nsecond-line", "must hold one non-empty line"),
    (f"{VALUE}\r\nx", "must hold one non-empty line"),
    ("", "must hold one non-empty line"),
    (" \n\n ", "must hold one non-empty line"),
    (b"\xff\xfe" + VALUE.encode(), "is not UTF-8"),
])
def test_file_content_must_be_one_utf8_line(secrets_dir: Path, content: str | bytes,
                                            message: str) -> None:
    write(secrets_dir, "key", content)
    error = refused("file:key", secrets_dir)
    if ROOT:
        assert message in str(error)
    else:
        assert "must be owned by root" in str(error)


def test_surrounding_whitespace_is_trimmed(secrets_dir: Path) -> None:
    write(secrets_dir, "key", f"\n  {VALUE}  \n\n")
    if ROOT:
        assert load_secret("file:key", secrets_dir) == VALUE
    else:
        refused("file:key", secrets_dir)
