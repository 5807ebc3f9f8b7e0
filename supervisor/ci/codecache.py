"""The embedded runner's cache of code compiled from strings while it imports: the methods
`dataclasses` generates for each of the ~110 dataclasses on the run path (`__init__`,
`__repr__`, `__eq__`, ...: one `exec` of generated source each, ~470 in all), `namedtuple`'s
`__new__`, and the string annotations `typing.ForwardRef` compiles when pydantic reads a
model's fields. Compiling them was ~35 ms of the runner's ~150 ms start, every run, for the
same text every time; their bytecode is kept in one file as Python keeps a module's in
`__pycache__`, keyed by the exact source text, so a changed source is a miss, never a stale
answer. Root only: the file lives in a directory of its own (mode 0700) in the per-host
directory of embedded runs (`/run/agent-supervisor-ci/codecache`), is written by root (a new
file renamed into place) and is read only when root owns it and nobody else can write it or
its directory; anything else about it (absent, short, another Python's bytecode, foreign)
means compiling as usual. No other privilege. Used by ci/__main__.py around the runner's
imports only: `install()` before them, `uninstall()` and `save()` after, so the run itself
compiles as stock Python does."""

import builtins
import collections
import contextlib
import dataclasses
import marshal
import os
import stat
import sys
import typing
from importlib.util import MAGIC_NUMBER
from types import CodeType
from typing import Any

# No `from __future__ import annotations` here: code compiled by this module must carry no
# future flags, as the code compiled by the stdlib modules it stands in for carries none.

# One file per interpreter version (its bytecode is that version's), in DIRECTORY_NAME.
DIRECTORY_NAME = "codecache"
FILE_NAME = sys.implementation.cache_tag
_HEADER = b"agent-supervisor codecache 1\n" + MAGIC_NUMBER
# What a cache of the runner's imports may weigh (it is ~0.5 MiB); a bigger file is not read.
MAX_BYTES = 16 * 1024 * 1024
# Where each stdlib module compiles from a string, by the builtin's name in its globals.
_SEAMS = ((dataclasses, "exec"), (collections, "eval"), (typing, "compile"))

Key = tuple[str, str, str]  # (mode, filename, source)


def _trusted(st: os.stat_result, owner: int) -> bool:
    return st.st_uid == owner and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)


class CodeCache:
    """Compiled code by source text, read from `path` at construction; compiles on a miss."""

    def __init__(self, path: str, owner: int = 0) -> None:
        self.path = path
        self.owner = owner
        self.codes: dict[Key, CodeType] = self._load()
        self.used: dict[Key, CodeType] = {}
        self.misses = 0

    def _directory_trusted(self) -> bool:
        try:
            return _trusted(os.lstat(os.path.dirname(self.path)), self.owner)
        except OSError:
            return False

    def _load(self) -> dict[Key, CodeType]:
        if not self._directory_trusted():
            return {}
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return {}
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or not _trusted(st, self.owner) \
                    or st.st_size > MAX_BYTES:
                return {}
            with os.fdopen(fd, "rb", closefd=False) as handle:
                data = handle.read(MAX_BYTES + 1)
        except OSError:
            return {}
        finally:
            os.close(fd)
        if not data.startswith(_HEADER):
            return {}
        try:
            codes = marshal.loads(data[len(_HEADER):])
        except (ValueError, EOFError, TypeError):
            return {}
        if not isinstance(codes, dict):
            return {}
        return {k: v for k, v in codes.items() if isinstance(v, CodeType)
                and isinstance(k, tuple) and len(k) == 3}

    def compile(self, source: Any, filename: Any, mode: str, flags: int = 0,
                dont_inherit: bool = False, optimize: int = -1) -> Any:
        """builtins.compile, from the cache for a plain string compiled without flags (what
        the seams pass: their modules have no future imports to inherit)."""
        if type(source) is not str or type(filename) is not str or flags or optimize != -1:
            return builtins.compile(source, filename, mode, flags, dont_inherit, optimize)
        key = (mode, filename, source)
        code = self.codes.get(key)
        if code is None:
            self.misses += 1
            code = self.codes[key] = builtins.compile(source, filename, mode, 0, True)
        self.used[key] = code
        return code

    def exec(self, source: Any, globals: Any = None, locals: Any = None, /) -> None:
        if type(source) is str:
            source = self.compile(source, "<string>", "exec")
        builtins.exec(source, globals, locals)

    def eval(self, source: Any, globals: Any = None, locals: Any = None, /) -> Any:
        if type(source) is str:
            source = self.compile(source, "<string>", "eval")
        return builtins.eval(source, globals, locals)

    def install(self) -> None:
        """Route the seams' compiling through the cache (each module's global shadows the
        builtin of that name)."""
        for module, name in _SEAMS:
            if name not in vars(module):
                setattr(module, name, getattr(self, name))

    def uninstall(self) -> None:
        for module, name in _SEAMS:
            if vars(module).get(name) == getattr(self, name):
                delattr(module, name)

    def save(self) -> bool:
        """Write the cache if anything was compiled: what was used, and what the file held
        besides (another installed version's runner, sharing the host) if that is no more than
        what was used, so the file stays within twice one start's code. True if written; any
        failure leaves the previous file, or none."""
        if not self.misses:
            return False
        others = {k: v for k, v in self.codes.items() if k not in self.used}
        keep = {**others, **self.used} if len(others) <= len(self.used) else self.used
        directory = os.path.dirname(self.path)
        try:
            os.makedirs(directory, mode=0o700, exist_ok=True)
        except OSError:
            return False
        if not self._directory_trusted():
            return False
        data = _HEADER + marshal.dumps(keep)
        if len(data) > MAX_BYTES:
            return False
        temporary = f"{self.path}.{os.getpid()}.tmp"
        try:
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o600)
        except OSError:
            return False
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            os.rename(temporary, self.path)
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            return False
        return True
