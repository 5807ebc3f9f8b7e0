"""Stands in for pydantic's plugin loader (`pydantic.plugin._loader`) in the runner's process.
The runner turns pydantic's plugins off (`PYDANTIC_DISABLE_PLUGINS=__all__`, ci/__main__.py),
and with that setting pydantic's own `get_plugins()` returns no plugins; but its module imports
`importlib.metadata` (with email, zipfile and csv: ~8 ms, ~4 % of the runner's imports) before
reading the setting, the first time a model is built. This module answers the same without
it. tests/unit/test_ci_imports.py holds the two answers equal."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

MODULE = "pydantic.plugin._loader"


def get_plugins() -> Iterable[Any]:
    """What pydantic's loader returns with PYDANTIC_DISABLE_PLUGINS=__all__: no plugins."""
    return ()
