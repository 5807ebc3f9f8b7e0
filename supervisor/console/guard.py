"""Who may talk to the console: the one-time token exchanged for a session cookie, and the
Host and Origin checks that keep other web pages (DNS rebinding, cross-site requests) out.
Pure logic, no I/O, no privilege."""

from __future__ import annotations

import hmac
import secrets
from collections import OrderedDict
from collections.abc import Mapping

COOKIE_PREFIX = "agent_supervisor_console_"
# Sessions are per browser; a handful is plenty and the set must not grow without bound.
MAX_SESSIONS = 16
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


class Gate:
    """The token is good for one exchange: after that only the session cookie it bought opens
    the console, so a token copied from a terminal's scrollback later opens nothing."""

    def __init__(self, host: str, token: str | None = None) -> None:
        self.token = token or secrets.token_urlsafe(32)
        self.host = host
        self._spent = False
        self._sessions: OrderedDict[str, None] = OrderedDict()
        self.port = 0
        self.hosts: frozenset[str] = frozenset()
        self.origins: frozenset[str] = frozenset()

    def bind(self, port: int) -> None:
        """The port the server got; until it is known every request is refused."""
        names = {self.host, "localhost"} if self.host in ("127.0.0.1", "::1") else {self.host}
        self.port = port
        self.hosts = frozenset(
            f"[{name}]:{port}" if ":" in name else f"{name}:{port}" for name in names)
        self.origins = frozenset(f"http://{h}" for h in self.hosts)

    @property
    def cookie(self) -> str:
        """Cookies ignore ports: two consoles on one host (say an owner's and a viewer's) each
        need a cookie name of their own."""
        return f"{COOKIE_PREFIX}{self.port}"

    def exchange(self, offered: str) -> str | None:
        """A new session id for the right, unspent token; None otherwise."""
        if self._spent or not hmac.compare_digest(offered.encode(), self.token.encode()):
            return None
        self._spent = True
        return self.new_session()

    def new_session(self) -> str:
        session = secrets.token_urlsafe(32)
        self._sessions[session] = None
        while len(self._sessions) > MAX_SESSIONS:
            self._sessions.popitem(last=False)
        return session

    def has_session(self, cookie: str | None) -> bool:
        if not cookie:
            return False
        return any(hmac.compare_digest(cookie.encode(), s.encode()) for s in self._sessions)

    def host_ok(self, host: str | None) -> bool:
        """DNS rebinding: a page on evil.example resolved to 127.0.0.1 still sends its own
        name as Host."""
        return host is not None and host.lower() in self.hosts

    def origin_ok(self, method: str, headers: Mapping[str, str]) -> bool:
        """A state-changing request must say it comes from this console's own pages; a read
        may omit Origin but must not name another one."""
        origin = headers.get("Origin")
        fetch_site = headers.get("Sec-Fetch-Site")
        if fetch_site is not None and fetch_site not in ("same-origin", "none"):
            return False
        if origin is None:
            return method in _SAFE_METHODS
        return origin.lower() in self.origins
