"""Route secrets: `file:NAME` from the secrets directory (root-owned, no group or other
access), `env:NAME` from the supervisor's own environment (the daemon's, or agentctl's in CI
mode). Read when a run starts, kept only in the supervisor's memory, never written anywhere
the sandbox can see. Needs root to read files."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from supervisor.errors import EgressSetupFailed

MAX_SECRET = 16384


def load_secret(ref: str, secrets_dir: Path) -> str:
    """The secret `ref` names; EgressSetupFailed (naming the reference, never the value)."""
    kind, _, name = ref.partition(":")
    if kind == "env":
        from_env = os.environ.get(name, "").strip()
        if not from_env:
            raise EgressSetupFailed(
                f"secret {ref}: the supervisor's environment has no {name}", secret=ref,
                hint=f"give the supervisor {name}: the daemon through its unit (Environment= "
                f"or EnvironmentFile=), `agentctl run --embedded` in its own environment "
                f"(a CI secret; sudo --preserve-env={name})")
        return from_env
    path = secrets_dir / name
    _check_directory(secrets_dir, ref)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        raise EgressSetupFailed(f"secret {ref}: cannot open {path}: {exc.strerror}",
                                secret=ref, path=str(path)) from exc
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise EgressSetupFailed(f"secret {ref}: {path} is not a regular file", secret=ref,
                                    path=str(path))
        if info.st_uid != 0 or info.st_mode & 0o077:
            raise EgressSetupFailed(
                f"secret {ref}: {path} must be owned by root with mode 0600 or stricter "
                f"(it is uid {info.st_uid}, mode {stat.S_IMODE(info.st_mode):04o})",
                secret=ref, path=str(path))
        value = os.read(fd, MAX_SECRET + 1)
    finally:
        os.close(fd)
    if len(value) > MAX_SECRET:
        raise EgressSetupFailed(f"secret {ref}: {path} is larger than {MAX_SECRET} bytes",
                                secret=ref, path=str(path))
    try:
        text = value.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise EgressSetupFailed(f"secret {ref}: {path} is not UTF-8", secret=ref,
                                path=str(path)) from None
    if not text or any(c in text for c in "\r\n"):
        raise EgressSetupFailed(f"secret {ref}: {path} must hold one non-empty line",
                                secret=ref, path=str(path))
    return text


def _check_directory(directory: Path, ref: str) -> None:
    try:
        info = os.stat(directory)
    except OSError as exc:
        raise EgressSetupFailed(f"secret {ref}: secrets directory {directory}: {exc.strerror}",
                                secret=ref, path=str(directory)) from exc
    if info.st_uid != 0 or info.st_mode & 0o022:
        raise EgressSetupFailed(
            f"secret {ref}: secrets directory {directory} must be owned by root and writable "
            f"by root only (mode {stat.S_IMODE(info.st_mode):04o}, uid {info.st_uid})",
            secret=ref, path=str(directory))
