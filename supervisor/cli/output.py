"""What agentctl prints, without click: lines written as click.echo writes them, JSON, tables,
and errors with their hint and exit status. Shared by the click commands (cli/main.py) and the
fast path of the incident verbs (cli/fast.py), so both print the same bytes. No privilege."""

from __future__ import annotations

import sys
import time

from supervisor.errors import InvalidRequest, SupervisorError

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (agentctl's fast path)
if TYPE_CHECKING:
    from typing import NoReturn

# click.echo's pattern: what it strips from text written to something other than a terminal.
_ANSI = r"\033\[[0-?]*[ -/]*[@-~]"


def stream_is_ascii(stream: object) -> bool:
    """click rewraps a stream whose encoding is ASCII (or missing) before writing to it."""
    import codecs

    try:
        return codecs.lookup(getattr(stream, "encoding", None) or "ascii").name == "ascii"
    except LookupError:
        return False


def echo(text: str, err: bool = False) -> None:
    """click.echo(text, err=err): a line, flushed, ANSI sequences stripped off a terminal."""
    stream = sys.stderr if err else sys.stdout
    if stream is None:
        return
    if stream_is_ascii(stream):  # never on the fast path: it hands such streams to click
        import click

        click.echo(text, err=err)
        return
    out = text + "\n"
    try:
        interactive = stream.isatty()
    except Exception:
        interactive = False
    if not interactive and "\033" in out:
        import re

        out = re.sub(_ANSI, "", out)
    stream.write(out)
    stream.flush()


def emit_json(data: object) -> None:
    import json  # here: an embedded run's agentctl reads its stream's encoding only

    echo(json.dumps(data, indent=2, sort_keys=True))


def fail(exc: SupervisorError, as_json: bool, status: int | None = None) -> NoReturn:
    if as_json:
        emit_json(exc.to_body())
    else:
        echo(f"agentctl: {exc.code}: {exc.message}", err=True)
        for error in exc.detail.get("errors") or []:  # a configuration's every error
            if isinstance(error, dict):
                echo(f"  {error.get('path')}: {error.get('key') or '-'}: "
                     f"{error.get('reason')}", err=True)
        if exc.hint:
            echo(f"hint: {exc.hint}", err=True)
    sys.exit(exc.exit_status if status is None else status)


def fail_local(exc: OSError | ValueError, as_json: bool) -> NoReturn:
    """A local file or argument agentctl itself could not use (a missing key file, a path with
    a NUL byte): the operator's input, said as such, never a traceback."""
    path = getattr(exc, "filename", None)
    fail(InvalidRequest(f"{exc}", **({"path": str(path)} if path else {}),
                        hint="check the paths and values given on the command line"), as_json)


def table(rows: list[list[str]], headers: list[str]) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows, strict=False)]
    for row in [headers, *rows]:
        echo("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=False)).rstrip())


def ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def clip(text: str, width: int) -> str:
    """Cut to `width` with an ellipsis, so a cut reason never reads as the whole one."""
    return text if len(text) <= width else text[:width - 1] + "…"


def ago(ts: float | None) -> str:
    if not ts:
        return "-"
    seconds = max(0, int(time.time() - ts))
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h"
