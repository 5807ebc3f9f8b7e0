"""asyncio in the runner's process without `ssl` until something imports it.

asyncio's base_events, selector_events and sslproto import ssl if they can, for the TLS
connections a loop may make: ~4 ms of the runner's ~120 ms start (libssl loaded, ssl's enums
built) that a run never uses, as the runner's loop makes no TLS connection (the egress
gateway's TLS is in its own process, egress/worker.py). So ci/__main__.py imports asyncio while
ssl cannot be imported (`sys.modules["ssl"] = None`: asyncio then sets itself up as on a Python
built without ssl), and puts a finder first on `sys.meta_path` that hands the real module to
those three modules at the first import of ssl, by whatever module, after that: they end as
they would have been had ssl been there when they loaded (tests/unit/test_ci_late_tls.py: their
globals, and a TLS handshake on the loop). Until then a TLS connection on the loop fails with
asyncio's RuntimeError("stdlib ssl module not available"), never silently without TLS."""

from __future__ import annotations

import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence
    from importlib.machinery import ModuleSpec
    from types import ModuleType
    from typing import Any

# The modules of asyncio that take ssl as they load (`try: import ssl except ImportError`).
USERS = ("asyncio.base_events", "asyncio.selector_events", "asyncio.sslproto")


def import_asyncio() -> bool:
    """Import asyncio without ssl and arm the hand-over; False (asyncio imported as usual, or
    already there) when ssl or asyncio is already loaded."""
    if "ssl" in sys.modules or "asyncio" in sys.modules:
        import asyncio
        return False
    sys.modules["ssl"] = None  # type: ignore[assignment]  # read by imports as absent
    try:
        import asyncio  # noqa: F401
    finally:
        del sys.modules["ssl"]
    sys.meta_path.insert(0, SslFinder)
    return True


def hand_over(ssl: ModuleType) -> None:
    """Give the real ssl to asyncio's modules that loaded without it, with what sslproto
    derives from it as it loads."""
    for name in USERS:
        module = sys.modules.get(name)
        if module is not None and getattr(module, "ssl", None) is None:
            module.ssl = ssl  # type: ignore[attr-defined]
    sslproto = sys.modules.get("asyncio.sslproto")
    if sslproto is not None and not hasattr(sslproto, "SSLAgainErrors"):
        sslproto.SSLAgainErrors = (  # type: ignore[attr-defined]
            ssl.SSLWantReadError, ssl.SSLSyscallError)


class SslFinder:
    """First on sys.meta_path until ssl has been imported: finds it as the finders after it
    do, with a loader that hands it to asyncio once it has run (and takes the finder off)."""

    @staticmethod
    def find_spec(name: str, path: Sequence[str] | None = None,
                  target: ModuleType | None = None) -> ModuleSpec | None:
        if name != "ssl":
            return None
        # Still first on the path until ssl has run: a look-up alone (importlib.util.find_spec)
        # loads nothing, and the import after it must still hand the module over.
        for finder in [finder for finder in sys.meta_path if finder is not SslFinder]:
            find = getattr(finder, "find_spec", None)
            spec = None if find is None else find(name, path, target)
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = HandingLoader(spec.loader)
                return spec  # type: ignore[no-any-return]
        return None


class HandingLoader:
    """ssl's own loader, then the hand-over; anything else asked of it is the real loader's
    (get_source, is_package...)."""

    def __init__(self, loader: Any) -> None:
        self.loader = loader

    def create_module(self, spec: ModuleSpec) -> ModuleType | None:
        return self.loader.create_module(spec)  # type: ignore[no-any-return]

    def exec_module(self, module: ModuleType) -> None:
        self.loader.exec_module(module)
        hand_over(module)
        if SslFinder in sys.meta_path:
            sys.meta_path.remove(SslFinder)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.loader, name)
