"""How a gateway adds a secret to what it forwards, as pydantic field types shared by an egress
route (models/egress.py) and a remote MCP server (models/mcp.py): where the secret is read
from, and the header it goes in as `<header>: <format with {secret}>`. No I/O."""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import AfterValidator

_SECRET_REF = re.compile(r"^(file|env):[A-Za-z0-9_.\-]{1,128}$")
_HEADER_NAME = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~\-]{1,64}$")
SECRET_HINT = ("must be 'file:NAME' (a file in the secrets directory) or 'env:NAME' (the "
               "daemon's environment)")


def check_secret_ref(ref: str) -> str:
    if not _SECRET_REF.match(ref):
        raise ValueError(SECRET_HINT)
    return ref


def _check_header(header: str) -> str:
    if not _HEADER_NAME.match(header):
        raise ValueError(f"{header!r} is not an HTTP header name")
    return header


def _check_format(fmt: str) -> str:
    if "{secret}" not in fmt or any(c in fmt for c in "\r\n"):
        raise ValueError("must contain '{secret}' and no line breaks")
    return fmt


SecretRef = Annotated[str, AfterValidator(check_secret_ref)]
HeaderName = Annotated[str, AfterValidator(_check_header)]
SecretFormat = Annotated[str, AfterValidator(_check_format)]


def header_value(fmt: str, secret: str) -> str:
    """The header's value: the format with the secret in place of `{secret}`."""
    return fmt.replace("{secret}", secret)
