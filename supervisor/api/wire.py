"""HTTP/1.1 over a Unix socket, just what agentctl's client needs: one request per connection,
a response read by Content-Length, chunked transfer coding or to EOF. Standard library
`socket` only: http.client pulls in the email parser and ssl, which cost agentctl's every start
more than its request does. No privilege beyond access to the socket."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator

# A control-socket answer larger than this is not one the daemon sends (its pages are
# bounded); reading stops rather than letting a wrong peer fill agentctl's memory.
MAX_BODY = 64 * 1024 * 1024
_MAX_HEAD = 64 * 1024
_READ = 65536


class BadResponse(OSError):
    """The peer's answer is not HTTP/1.x as this client reads it."""


class Response:
    """One response; the body is read through `read` or `iter_body`, then `close`."""

    def __init__(self, sock: socket.socket, status: int, headers: dict[str, str],
                 buffered: bytes) -> None:
        self._sock = sock
        self.status = status
        self.headers = headers
        self._buffer = buffered
        self._eof = False

    def _recv(self) -> bytes:
        if self._eof:
            return b""
        data = self._sock.recv(_READ)
        if not data:
            self._eof = True
        return data

    def _take(self, count: int) -> bytes:
        """Exactly `count` bytes (fewer only at EOF)."""
        while len(self._buffer) < count:
            data = self._recv()
            if not data:
                break
            self._buffer += data
        taken, self._buffer = self._buffer[:count], self._buffer[count:]
        return taken

    def _line(self) -> bytes:
        while b"\r\n" not in self._buffer:
            if len(self._buffer) > _MAX_HEAD:
                raise BadResponse("a chunk-size line without an end")
            data = self._recv()
            if not data:
                raise BadResponse("the response ended inside a chunk-size line")
            self._buffer += data
        line, _, self._buffer = self._buffer.partition(b"\r\n")
        return line

    def iter_body(self) -> Iterator[bytes]:
        """The body as it arrives."""
        if self.headers.get("transfer-encoding", "").lower() == "chunked":
            while True:
                try:
                    size = int(self._line().split(b";", 1)[0].strip(), 16)
                except ValueError as exc:
                    raise BadResponse(f"a bad chunk size: {exc}") from None
                if size == 0:
                    return  # trailers, if any, are not read: the connection closes
                chunk = self._take(size)
                if len(chunk) < size:
                    raise BadResponse("the response ended inside a chunk")
                yield chunk
                self._take(2)
        elif "content-length" in self.headers:
            try:
                remaining = int(self.headers["content-length"])
            except ValueError:
                raise BadResponse("a bad Content-Length") from None
            while remaining > 0:
                chunk = self._take(min(remaining, _READ))
                if not chunk:
                    raise BadResponse("the response ended before its Content-Length")
                remaining -= len(chunk)
                yield chunk
        else:
            if self._buffer:
                yield self._buffer
                self._buffer = b""
            while data := self._recv():
                yield data

    def read(self) -> bytes:
        body = bytearray()
        for chunk in self.iter_body():
            body += chunk
            if len(body) > MAX_BODY:
                raise BadResponse(f"a response larger than {MAX_BODY} bytes")
        return bytes(body)

    def close(self) -> None:
        self._sock.close()


def request(socket_path: str, method: str, target: str, body: object, timeout: float | None
            ) -> Response:
    """Connect, send one request (JSON `body` unless None), read the status and headers.
    Connection errors propagate as the OSError the kernel gave (the caller decides which ones
    mean "not acted on"); a peer that closes without answering is ConnectionResetError."""
    payload = b"" if body is None else json.dumps(body).encode()
    head = [f"{method} {target} HTTP/1.1", "Host: localhost", "Accept: application/json",
            "Connection: close", f"Content-Length: {len(payload)}"]
    if body is not None:
        head.append("Content-Type: application/json")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(socket_path)
        sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + payload)
        buffered = b""
        while b"\r\n\r\n" not in buffered:
            if len(buffered) > _MAX_HEAD:
                raise BadResponse("response headers larger than 64 KiB")
            data = sock.recv(_READ)
            if not data:
                if not buffered:
                    raise ConnectionResetError("the daemon closed the connection without "
                                               "answering")
                raise BadResponse("the response ended inside its headers")
            buffered += data
        raw_head, _, rest = buffered.partition(b"\r\n\r\n")
        status_line, *header_lines = raw_head.decode("latin-1").split("\r\n")
        version, _, status_rest = status_line.partition(" ")
        if not version.startswith("HTTP/1."):
            raise BadResponse(f"not an HTTP/1 response: {status_line[:80]!r}")
        try:
            status = int(status_rest[:3])
        except ValueError:
            raise BadResponse(f"a bad status line: {status_line[:80]!r}") from None
        headers: dict[str, str] = {}
        for line in header_lines:
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        return Response(sock, status, headers, rest)
    except BaseException:
        sock.close()
        raise
