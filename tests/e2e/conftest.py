from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import require_root_and_runc
from tests.support.daemon import Daemon, running_daemon


@pytest.fixture(autouse=True)
def _privileged() -> None:
    require_root_and_runc()


@pytest.fixture
def tmp_root() -> Iterator[Path]:
    import shutil
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="as-test-", dir="/tmp"))
    root.chmod(0o755)
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def daemon(tmp_root: Path) -> Iterator[Daemon]:
    with running_daemon(tmp_root) as d:
        yield d
