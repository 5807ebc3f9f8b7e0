"""The runner's asyncio without ssl until something imports it (supervisor/ci/late_tls.py): once
ssl is imported, asyncio's modules are as a plain import leaves them, and a TLS connection on
the loop goes through TLS. Each check in a fresh interpreter; no privilege."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# What asyncio's modules that take ssl as they load hold: every global's name, and the values
# that come from ssl.
_STATE = """
def state():
    import sys
    from supervisor.ci.late_tls import USERS
    out = {}
    for name in USERS:
        module = sys.modules[name]
        out[name] = {"names": sorted(vars(module)),
                     "ssl": repr(getattr(module, "ssl", "missing")),
                     "again": repr(getattr(module, "SSLAgainErrors", "missing"))}
    return out
"""

_PLAIN = _STATE + """
import asyncio, json
print(json.dumps(state()))
"""

_LATE = _STATE + """
import json, sys
from supervisor.ci import late_tls
armed = late_tls.import_asyncio()
import asyncio
before = {"armed": armed, "ssl_loaded": "ssl" in sys.modules,
          "asyncio_ssl": repr(sys.modules["asyncio.sslproto"].ssl)}

async def client_hello(context):
    # What the loop's TLS client sends first over a socket pair (the peer then hangs up), or
    # asyncio's refusal.
    import socket
    mine, peer = socket.socketpair()
    peer.setblocking(False)
    loop = asyncio.get_running_loop()
    connecting = asyncio.ensure_future(asyncio.open_connection(
        sock=mine, ssl=context, server_hostname="localhost"))
    receiving = asyncio.ensure_future(loop.sock_recv(peer, 5))
    await asyncio.wait([connecting, receiving], timeout=30,
                       return_when=asyncio.FIRST_COMPLETED)
    if connecting.done() and isinstance(connecting.exception(), RuntimeError):
        receiving.cancel()
        peer.close()
        mine.close()
        return str(connecting.exception())
    first = await asyncio.wait_for(receiving, 30)
    peer.close()
    try:
        await connecting
    except (OSError, EOFError):
        pass  # the peer's hang-up (ssl.SSLError is an OSError)
    mine.close()
    return "record:" + first[:1].hex()

before["tls_before"] = asyncio.run(client_hello(True))
import importlib.util
before["looked_up"] = importlib.util.find_spec("ssl") is not None  # a look-up loads nothing
before["still_unloaded"] = "ssl" not in sys.modules
import ssl  # by whatever module: here, directly

before["tls_after"] = asyncio.run(client_hello(ssl.create_default_context()))
before["finder_left"] = any(f is late_tls.SslFinder for f in sys.meta_path)
before["loader_source"] = ssl.__loader__.get_source("ssl") is not None
print(json.dumps({"late": before, "state": state()}))
"""


def _run(code: str) -> dict[str, object]:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=REPO, check=False, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stderr == ""
    result: dict[str, object] = json.loads(done.stdout)
    return result


def test_asyncio_loads_without_ssl_and_gets_it_at_its_first_import() -> None:
    late = _run(_LATE)
    assert late["late"] == {
        "armed": True, "ssl_loaded": False, "asyncio_ssl": "None",
        # a TLS connection before ssl is imported is refused, never made in the clear
        "tls_before": "stdlib ssl module not available",
        "looked_up": True, "still_unloaded": True,
        # after it, the loop speaks TLS: its first record is a handshake (0x16, ClientHello)
        "tls_after": "record:16", "finder_left": False, "loader_source": True}
    assert late["state"] == _run(_PLAIN), "asyncio's modules differ from a plain import's"


def test_nothing_changes_when_ssl_or_asyncio_is_already_loaded() -> None:
    for first in ("ssl", "asyncio"):
        code = f"""
import json, sys
import {first}
from supervisor.ci import late_tls
print(json.dumps([late_tls.import_asyncio(), repr(sys.modules["asyncio.sslproto"].ssl)[:20],
                  any(f is late_tls.SslFinder for f in sys.meta_path)]))
"""
        armed, asyncio_ssl, finder = _run(code)  # type: ignore[misc]
        assert (armed, finder) == (False, False)
        assert asyncio_ssl == "<module 'ssl' from '"
