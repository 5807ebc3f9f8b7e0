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
its directory; anything else about it (absent, short, damaged, another Python's bytecode, foreign)
means compiling as usual. No other privilege. Used by ci/__main__.py around the runner's
imports only: `install()` before them, `uninstall()` and `save()` after, so the run itself
compiles as stock Python does.

The same file keeps the bytecode of the modules those imports load (~250 from `.py` files, ~15
extension modules' locations): Python finds each one by listing and probing the directories on
its path and reads its `.pyc` file, ~10 ms of the start for ~250 modules, where one read of
this file and one `stat` each serve them. A module is served from the cache only while Python's
own search would find that same file: its source's mtime (ns) and size as recorded (stricter
than a `.pyc` file's check), and every directory searched up to its own unchanged (a file
added or removed there changes its mtime), in the same order on the search path; anything
else is a miss, found as usual and recorded. The finder sits just before the path finder, so
builtin and frozen modules are found as always."""

import builtins
import contextlib
import importlib
import marshal
import mmap
import os
import stat
import sys
from importlib.machinery import (
    ExtensionFileLoader,
    ModuleSpec,
    PathFinder,
    SourceFileLoader,
)
from importlib.util import MAGIC_NUMBER, spec_from_file_location
from types import CodeType

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

# No `from __future__ import annotations` here: code compiled by this module must carry no
# future flags, as the code compiled by the stdlib modules it stands in for carries none (so
# `Any` is quoted: typing is one of the modules the cache serves, imported once it is in place).

# One file per interpreter version (its bytecode is that version's), in DIRECTORY_NAME; the
# ".2" is the format with modules (the first format's file, of runners before it, is left alone).
DIRECTORY_NAME = "codecache"
FILE_NAME = f"{sys.implementation.cache_tag}.2"
_HEADER = (b"agent-supervisor codecache 2\n" + MAGIC_NUMBER
           + b"O%d\n" % sys.flags.optimize)
# What a cache of the runner's imports may weigh (it is ~6 MiB: ~0.5 of compiled strings, the
# rest the modules' bytecode); a bigger file is not read.
MAX_BYTES = 32 * 1024 * 1024
# Where each stdlib module compiles from a string, by the builtin's name in its globals (the
# modules imported by install(), after the finder is in place).
_SEAMS = (("dataclasses", "exec"), ("collections", "eval"), ("typing", "compile"))

Key = tuple[str, str, str]  # (mode, filename, source)
# What marshal raises for data it refuses: cut short or unknown (EOFError, ValueError,
# TypeError), and a code object whose parts are of the wrong type (SystemError: marshal is not
# safe against damaged data). Any of them is a miss, never the runner's end.
_REFUSED = (ValueError, EOFError, TypeError, SystemError)
# A module's entry: (its file, the file's st_mtime_ns and st_size, each directory searched up
# to and including the one that holds it with that directory's st_mtime_ns (-1: absent), its
# marshalled bytecode; None for an extension module, which is loaded from its file as usual).
Searched = tuple[tuple[str, int], ...]
ModuleEntry = tuple[str, int, int, Searched, bytes | memoryview | None]


def _trusted(st: os.stat_result, owner: int) -> bool:
    return st.st_uid == owner and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)


class CodeCache:
    """Compiled code by source text, read from `path` at construction; compiles on a miss."""

    def __init__(self, path: str, owner: int = 0) -> None:
        self.path = path
        self.owner = owner
        self.modules: dict[str, list[ModuleEntry]] = {}
        self.codes: dict[Key, CodeType] = self._load()
        self.used: dict[Key, CodeType] = {}
        self.misses = 0
        # Modules served from the cache or found and recorded while installed, by name.
        self.used_modules: dict[str, ModuleEntry] = {}
        self.module_misses = 0
        self._mtimes: dict[str, int] = {}  # directories' st_mtime_ns, each read once

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
            # Mapped, not read: the modules' bytecode (~5 MiB) is unmarshalled from the page
            # cache as each module loads. The file is never written in place (save renames).
            data = mmap.mmap(fd, 0, prot=mmap.PROT_READ) if st.st_size else b""
        except (OSError, ValueError):
            return {}
        finally:
            os.close(fd)
        view = memoryview(data)
        start = len(_HEADER) + 8
        if view[:len(_HEADER)] != _HEADER or len(view) < start:
            return {}
        end = start + int.from_bytes(view[len(_HEADER):start], "little")
        try:
            loaded = marshal.loads(view[start:end]) if end <= len(view) else None
        except _REFUSED:
            return {}
        if not isinstance(loaded, tuple) or len(loaded) != 2 \
                or not isinstance(loaded[0], dict) or not isinstance(loaded[1], dict):
            return {}
        codes, modules = loaded
        blob = view[end:]
        for name, entries in modules.items():
            if not isinstance(name, str) or not isinstance(entries, list):
                continue
            self.modules[name] = [(*entry[:4], None if entry[4] is None
                                   else blob[entry[4][0]:entry[4][0] + entry[4][1]])
                                  for entry in entries if _well_formed(entry, len(blob))]
        return {k: v for k, v in codes.items() if isinstance(v, CodeType)
                and isinstance(k, tuple) and len(k) == 3}

    def compile(self, source: "Any", filename: "Any", mode: str, flags: int = 0,
                dont_inherit: bool = False, optimize: int = -1) -> "Any":
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

    def exec(self, source: "Any", globals: "Any" = None, locals: "Any" = None, /) -> None:
        if type(source) is str:
            source = self.compile(source, "<string>", "exec")
        builtins.exec(source, globals, locals)

    def eval(self, source: "Any", globals: "Any" = None, locals: "Any" = None, /) -> "Any":
        if type(source) is str:
            source = self.compile(source, "<string>", "eval")
        return builtins.eval(source, globals, locals)

    # ------------------------------------------------------------------ modules

    def _mtime(self, directory: str) -> int:
        mtime = self._mtimes.get(directory)
        if mtime is None:
            try:  # "" on the path is the current directory, as the path finder reads it
                mtime = os.stat(directory or ".").st_mtime_ns
            except OSError:
                mtime = -1
            self._mtimes[directory] = mtime
        return mtime

    def find_spec(self, name: str, path: "Any" = None, target: "Any" = None) -> ModuleSpec | None:
        """The meta path finder's method: the cached module if Python's search would find
        the same file, else the path finder's answer, recorded when it is a `.py` file's or
        an extension module's."""
        search = list(sys.path if path is None else path)
        for entry in self.modules.get(name, ()):
            origin, mtime_ns, size, searched, code = entry
            if len(searched) > len(search) or any(
                    search[i] != directory or self._mtime(directory) != mtime
                    for i, (directory, mtime) in enumerate(searched)):
                continue
            try:
                st = os.stat(origin)
            except OSError:
                continue
            if st.st_mtime_ns != mtime_ns or st.st_size != size:
                continue
            self.used_modules[name] = entry
            loader = (_CachedLoader(name, origin, code) if code is not None
                      else ExtensionFileLoader(name, origin))
            return spec_from_file_location(name, origin, loader=loader)
        spec = PathFinder.find_spec(name, path, target)
        if spec is not None and spec.origin is not None and type(spec.loader) in (
                SourceFileLoader, ExtensionFileLoader):
            self._record(name, spec, search)
        return spec

    def _record(self, name: str, spec: ModuleSpec, search: list[str]) -> None:
        origin = spec.origin
        assert origin is not None
        holder = os.path.dirname(origin)
        if spec.submodule_search_locations is not None:  # a package: <holder>/<name>/__init__
            holder = os.path.dirname(holder)
        if holder not in search:
            return
        try:
            st = os.stat(origin)
        except OSError:
            return
        searched = tuple((d, self._mtime(d)) for d in search[:search.index(holder) + 1])
        self.module_misses += 1
        if type(spec.loader) is ExtensionFileLoader:
            self.used_modules[name] = (origin, st.st_mtime_ns, st.st_size, searched, None)
        else:
            spec.loader = _RecordingLoader(name, origin, self, (st, searched))

    def install(self) -> None:
        """Route the seams' compiling through the cache (each module's global shadows the
        builtin of that name), and find modules through it, just before the path finder."""
        where = sys.meta_path.index(PathFinder) if PathFinder in sys.meta_path \
            else len(sys.meta_path)
        sys.meta_path.insert(where, self)
        for module_name, name in _SEAMS:
            module = importlib.import_module(module_name)
            if name not in vars(module):
                setattr(module, name, getattr(self, name))

    def uninstall(self) -> None:
        for module_name, name in _SEAMS:
            module = sys.modules[module_name]
            if vars(module).get(name) == getattr(self, name):
                delattr(module, name)
        if self in sys.meta_path:
            sys.meta_path.remove(self)

    def save(self) -> bool:
        """Write the cache if anything was compiled: what was used, and what the file held
        besides (another installed version's runner, sharing the host) if that is no more than
        what was used, so the file stays within twice one start's code. True if written; any
        failure leaves the previous file, or none."""
        if not self.misses and not self.module_misses:
            return False
        others = {k: v for k, v in self.codes.items() if k not in self.used}
        keep = {**others, **self.used} if len(others) <= len(self.used) else self.used
        used = self.used_modules
        other_modules = {name: [e for e in entries if e is not used.get(name)]
                         for name, entries in self.modules.items()}
        modules: dict[str, list[ModuleEntry]] = {name: [entry]
                                                 for name, entry in used.items()}
        if sum(map(len, other_modules.values())) <= len(used):
            for name, entries in other_modules.items():
                modules.setdefault(name, []).extend(entries)
        blob: list[bytes] = []
        offset = 0
        index: dict[str, list[tuple[str, int, int, Searched, tuple[int, int] | None]]] = {}
        for name, entries in modules.items():
            for origin, mtime_ns, size, searched, code in entries:
                where = None
                if code is not None:
                    blob.append(bytes(code))
                    where = (offset, len(code))
                    offset += len(code)
                index.setdefault(name, []).append((origin, mtime_ns, size, searched, where))
        directory = os.path.dirname(self.path)
        try:  # each with its mode, never the umask's (0: the per-host directory anyone's)
            for made, mode in ((os.path.dirname(directory), 0o711), (directory, 0o700)):
                with contextlib.suppress(FileExistsError):
                    os.mkdir(made, mode)
        except OSError:
            return False
        if not self._directory_trusted():
            return False
        head = marshal.dumps((keep, index))
        data = b"".join((_HEADER, len(head).to_bytes(8, "little"), head, *blob))
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


def _well_formed(entry: object, blob_size: int) -> bool:
    """An index entry as save() writes it, its code (offset, length) inside the blob."""
    if not (isinstance(entry, tuple) and len(entry) == 5 and isinstance(entry[0], str)
            and isinstance(entry[1], int) and isinstance(entry[2], int)
            and isinstance(entry[3], tuple)
            and all(isinstance(d, tuple) and len(d) == 2 and isinstance(d[0], str)
                    and isinstance(d[1], int) for d in entry[3])):
        return False
    where = entry[4]
    return where is None or (isinstance(where, tuple) and len(where) == 2
                             and all(isinstance(n, int) and n >= 0 for n in where)
                             and where[0] + where[1] <= blob_size)


class _CachedLoader(SourceFileLoader):
    """A `.py` file's loader whose bytecode comes from the cache; the rest (the source for
    tracebacks and inspect, the package's data files) is the file's, as usual."""

    def __init__(self, fullname: str, path: str, code: bytes | memoryview) -> None:
        super().__init__(fullname, path)
        self._code = code

    def get_code(self, fullname: str) -> CodeType | None:
        if fullname == self.name:
            try:
                code = marshal.loads(self._code)
            except _REFUSED:
                code = None
            if isinstance(code, CodeType):
                return code
        return super().get_code(fullname)  # not what was cached: the .pyc file, as usual


class _RecordingLoader(SourceFileLoader):
    """A `.py` file's usual loader that hands the code it loads to the cache."""

    def __init__(self, fullname: str, path: str, cache: CodeCache,
                 found: tuple[os.stat_result, Searched]) -> None:
        super().__init__(fullname, path)
        self._cache = cache
        self._found = found

    def get_code(self, fullname: str) -> CodeType | None:
        code = super().get_code(fullname)
        if fullname == self.name and code is not None:
            st, searched = self._found
            self._cache.used_modules[fullname] = (self.path, st.st_mtime_ns, st.st_size,
                                                  searched, marshal.dumps(code))
        return code
