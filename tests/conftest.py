"""Shared fixtures. Privileged and e2e tests need root and runc; in CI (CI=true) a missing
requirement fails the test instead of skipping it, because a privileged test that skips in CI
proves nothing."""

from __future__ import annotations

import os
import shutil

import pytest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require(condition: bool, reason: str) -> None:
    if condition:
        return
    if IN_CI:
        pytest.fail(f"required in CI: {reason}", pytrace=False)
    pytest.skip(reason)


def require_root_and_runc() -> None:
    require(os.geteuid() == 0, "needs root (real namespaces, cgroups and runc)")
    require(shutil.which("runc") is not None, "needs runc (apt-get install runc)")
