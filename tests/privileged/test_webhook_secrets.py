"""A webhook secret file owned by another user is refused: giving a file away needs root."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from supervisor.errors import ConfigInvalid
from supervisor.events import load_endpoints
from tests.unit.test_events import config_endpoint, secret_file


def test_the_secret_file_must_belong_to_the_daemon(tmp_path: Path) -> None:
    path = secret_file(tmp_path)
    os.chown(path, 65534, 65534)
    with pytest.raises(ConfigInvalid, match="owned by uid 65534"):
        load_endpoints([config_endpoint(secret_file=path)])
