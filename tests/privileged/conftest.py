from __future__ import annotations

import pytest

from tests.conftest import require_root_and_runc


@pytest.fixture(autouse=True)
def _privileged() -> None:
    require_root_and_runc()
