"""The embedded runner's cache of code compiled from strings (supervisor/ci/codecache.py): what
it hands back is what compiling gives (the runner's whole import, with and without it, compared
class by class), it is read only when it is the owner's alone, and it stays bounded. Each
cache here is in a temporary directory and trusted for the test's own uid; no privilege."""

from __future__ import annotations

import collections
import dataclasses
import json
import marshal
import os
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from supervisor.ci import codecache
from supervisor.ci.codecache import CodeCache

REPO = Path(__file__).resolve().parents[2]


def _cache(tmp_path: Path) -> CodeCache:
    directory = tmp_path / "codecache"
    directory.mkdir(mode=0o700, exist_ok=True)
    return CodeCache(str(directory / codecache.FILE_NAME), owner=os.geteuid())


def _define(cache: CodeCache, fields: str = "a: int\n    b: list[str]") -> type:
    """A frozen dataclass, a namedtuple and a forward reference made with `cache` installed."""
    cache.install()
    try:
        namespace: dict[str, object] = {"dataclasses": dataclasses}
        source = f"@dataclasses.dataclass(frozen=True)\nclass Point:\n    {fields}\n"
        exec(compile(source, "<test>", "exec", dont_inherit=True), namespace)
        collections.namedtuple("Pair", "left right")
        typing.ForwardRef("list[int] | None")
    finally:
        cache.uninstall()
    point = namespace["Point"]
    assert isinstance(point, type)
    return point


def test_a_second_cache_answers_from_the_file_what_the_first_compiled(tmp_path: Path) -> None:
    first = _cache(tmp_path)
    _define(first)
    assert first.misses >= 6 and first.save() is True
    second = _cache(tmp_path)
    assert set(second.codes) == set(first.used)
    point = _define(second)
    assert second.misses == 0 and second.save() is False
    one = point(1, ["x"])
    assert one == point(1, ["x"]) and repr(one) == "Point(a=1, b=['x'])"
    assert point.__init__.__annotations__ == {"a": int, "b": list[str], "return": None}
    with pytest.raises(dataclasses.FrozenInstanceError):
        one.a = 2  # type: ignore[attr-defined]
    changed = _cache(tmp_path)
    _define(changed, fields="a: int\n    c: float")
    assert changed.misses > 0  # another source text is another entry, never the old code


def test_install_and_uninstall_leave_the_stdlib_modules_as_they_were(tmp_path: Path) -> None:
    cache = _cache(tmp_path)
    before = [sorted(vars(m)) for m in (dataclasses, collections, typing)]
    cache.install()
    assert vars(dataclasses)["exec"] == cache.exec
    cache.uninstall()
    assert [sorted(vars(m)) for m in (dataclasses, collections, typing)] == before


def _written(tmp_path: Path) -> Path:
    cache = _cache(tmp_path)
    _define(cache)
    assert cache.save()
    return Path(cache.path)


@pytest.mark.parametrize("spoil", ["group_writable_file", "other_writable_directory",
                                   "symlink", "another_owner", "another_python", "garbage",
                                   "too_big"])
def test_a_cache_not_the_owners_alone_or_not_ours_is_not_read(tmp_path: Path,
                                                            spoil: str) -> None:
    path = _written(tmp_path)
    owner = os.geteuid()
    if spoil == "group_writable_file":
        path.chmod(0o620)
    elif spoil == "other_writable_directory":
        path.parent.chmod(0o703)
    elif spoil == "symlink":
        path.rename(path.with_name("real"))
        path.symlink_to(path.with_name("real"))
    elif spoil == "another_owner":
        owner += 1
    elif spoil == "another_python":
        data = path.read_bytes()
        path.write_bytes(data.replace(codecache.MAGIC_NUMBER, b"\0\0\r\n", 1))
    elif spoil == "garbage":
        path.write_bytes(path.read_bytes()[:200])
    elif spoil == "too_big":
        with path.open("ab") as handle:
            handle.truncate(codecache.MAX_BYTES + 1)
    cache = CodeCache(str(path), owner=owner)
    assert cache.codes == {}
    _define(cache)  # compiles as usual
    assert cache.misses >= 6


def _rejected_with_system_error(value: object) -> bytes:
    """`value` marshalled with its code object's name `xyz` made an int: marshal refuses it with
    SystemError ("non-string found in code slot"), not with the ValueError, EOFError or
    TypeError of data that is cut short or unknown."""
    data = marshal.dumps(value)
    bad = data.replace(b"\xda\x03xyz", b"\xe9\x07\x00\x00\x00", 1)  # interned str -> int
    with pytest.raises(SystemError):
        marshal.loads(bad)
    return bad


def test_a_cache_whose_code_marshal_refuses_is_a_miss_not_a_crash(tmp_path: Path) -> None:
    """marshal is not safe against damaged data and refuses some of it with SystemError: a
    cache read so (its index or a module's code) is compiled and found as usual, the runner
    does not die at its start, at every start, until the file is removed."""
    cache = _cache(tmp_path)
    code = compile("xyz", "<damaged>", "eval")
    head = _rejected_with_system_error(({("eval", "<damaged>", "x y z!"): code}, {}))
    Path(cache.path).write_bytes(codecache._HEADER + len(head).to_bytes(8, "little") + head)
    damaged = CodeCache(cache.path, owner=os.geteuid())
    assert damaged.codes == {} and damaged.modules == {}
    _define(damaged)  # compiles as usual
    assert damaged.misses >= 6
    source = tmp_path / "served.py"
    source.write_text("VALUE = 'from the file'\n")
    loader = codecache._CachedLoader("served", str(source), _rejected_with_system_error(code))
    namespace: dict[str, object] = {}
    served = loader.get_code("served")
    assert served is not None
    exec(served, namespace)
    assert namespace["VALUE"] == "from the file"


def test_a_cache_in_a_directory_others_can_write_is_not_written(tmp_path: Path) -> None:
    cache = _cache(tmp_path)
    Path(cache.path).parent.chmod(0o777)
    _define(cache)
    assert cache.save() is False and not Path(cache.path).exists()


def test_the_file_keeps_another_versions_code_only_within_twice_its_own(tmp_path: Path) -> None:
    other = _cache(tmp_path)
    _define(other, fields="x: int")
    other.save()
    small = _cache(tmp_path)
    _define(small, fields="y: int")
    assert small.save()
    assert set(_cache(tmp_path).codes) == set(small.used) | set(other.used)
    big = _cache(tmp_path)
    big.install()
    try:
        for n in range(3 * len(small.codes)):
            collections.namedtuple(f"T{n}", [f"f{i}" for i in range(n % 7 + 1)] + [f"g{n}"])
    finally:
        big.uninstall()
    assert big.save()
    assert set(_cache(tmp_path).codes) == set(big.used) | set(small.used) | set(other.used)
    last = _cache(tmp_path)
    _define(last, fields="z: int")
    assert last.save()
    assert set(_cache(tmp_path).codes) == set(last.used)  # the rest outweighed it: dropped


_DIGEST = """
import dataclasses, inspect, json, os, sys
os.environ["PYDANTIC_DISABLE_PLUGINS"] = "__all__"
from supervisor.ci import codecache, no_plugins
sys.modules.setdefault(no_plugins.MODULE, no_plugins)
cache = None
if sys.argv[1] != "none":
    cache = codecache.CodeCache(sys.argv[1], owner=os.geteuid())
    cache.install()
import supervisor.ci.runner
if cache is not None:
    cache.uninstall()
    cache.save()
def code(c):
    return [c.co_name, c.co_code.hex(), repr(c.co_consts), c.co_names, c.co_varnames,
            c.co_flags]
seen = {}
for name, module in sorted(sys.modules.items()):
    for attr, cls in sorted(vars(module).items()):
        if isinstance(cls, type) and dataclasses.is_dataclass(cls) and cls.__module__ == name:
            methods = [vars(cls)[m] for m in ("__init__", "__repr__", "__eq__", "__setattr__")
                       if hasattr(vars(cls).get(m), "__code__")]
            seen[f"{name}.{attr}"] = [str(inspect.signature(cls)),
                                      repr(cls.__init__.__annotations__),
                                      *(code(m.__code__) for m in methods)]
        elif isinstance(cls, type) and issubclass(cls, tuple) and hasattr(cls, "_fields") \\
                and cls.__module__ == name:
            seen[f"{name}.{attr}"] = [str(inspect.signature(cls)), code(cls.__new__.__code__)]
functions = {}
for name, module in sorted(sys.modules.items()):
    if name.startswith(("supervisor", "pydantic", "asyncio", "dataclasses", "typing")):
        functions[name] = sorted([attr, value.__code__.co_code.hex()]
                                 for attr, value in vars(module).items()
                                 if inspect.isfunction(value))
def loaded_by(name):
    return sorted(m for m, module in sys.modules.items()
                  if type(getattr(getattr(module, "__spec__", None), "loader", None)).__name__
                  == name)
served, recorded = loaded_by("_CachedLoader"), loaded_by("_RecordingLoader")
print(json.dumps({"classes": seen, "functions": functions, "served": served,
                  "recorded": recorded,
                  "misses": cache.misses if cache else None,
                  "module_misses": cache.module_misses if cache else None}))
"""


def test_the_runners_imports_make_the_same_classes_with_the_cache_as_without(
        tmp_path: Path) -> None:
    """Without a cache, filling one, answered from it: every dataclass and namedtuple the
    runner's imports define has the same signature, annotations and generated code."""
    directory = tmp_path / "codecache"
    directory.mkdir(mode=0o700)
    path = str(directory / codecache.FILE_NAME)
    results = []
    for which in ("none", path, path):
        done = subprocess.run([sys.executable, "-c", _DIGEST, which], capture_output=True,
                              text=True, cwd=REPO, check=True)
        results.append(json.loads(done.stdout))
    plain, filling, answered = results
    assert len(plain["classes"]) > 100
    assert filling["misses"] > 400 and answered["misses"] == 0
    assert plain["classes"] == filling["classes"] == answered["classes"]
    # The modules' own bytecode, served from the cache the third time: the same functions.
    assert filling["module_misses"] > 200 and answered["module_misses"] == 0
    assert plain["served"] == filling["served"] == [] and len(answered["served"]) > 150
    assert plain["recorded"] == answered["recorded"] == [] and "supervisor.daemon.core" in \
        answered["served"] and set(answered["served"]) == set(filling["recorded"])
    assert plain["functions"] == filling["functions"] == answered["functions"]


_IMPORT = """
import collections, dataclasses, json, os, sys, typing  # the seams' modules: no misses
from supervisor.ci import codecache
cache = codecache.CodeCache(sys.argv[1], owner=os.geteuid())
sys.path[:0] = sys.argv[2:]
cache.install()
import pkgx.mod
cache.uninstall()
cache.save()
print(json.dumps({"value": pkgx.mod.VALUE, "file": pkgx.mod.__file__,
                  "loader": type(pkgx.mod.__spec__.loader).__name__,
                  "package_path": list(sys.modules["pkgx"].__path__),
                  "misses": cache.module_misses}))
"""


def test_a_module_is_served_from_the_cache_only_while_the_search_would_find_that_file(
        tmp_path: Path) -> None:
    """The cache answers for a module only while its file is as recorded and every directory
    searched up to it is unchanged: an edited source, a new file in its package and a module
    that would now shadow it from an earlier directory on the path are each found as usual."""
    directory = tmp_path / "codecache"
    directory.mkdir(mode=0o700)
    path = str(directory / codecache.FILE_NAME)
    early, late = tmp_path / "early", tmp_path / "late"
    early.mkdir()
    (late / "pkgx").mkdir(parents=True)
    (late / "pkgx" / "__init__.py").write_text("")
    module = late / "pkgx" / "mod.py"
    module.write_text("VALUE = 'first'\n")

    def start() -> dict[str, typing.Any]:
        done = subprocess.run([sys.executable, "-c", _IMPORT, path, str(early), str(late)],
                              capture_output=True, text=True, cwd=REPO, check=True)
        answer: dict[str, typing.Any] = json.loads(done.stdout)
        return answer

    first = start()
    assert first == {"value": "first", "file": str(module), "loader": "_RecordingLoader",
                     "package_path": [str(late / "pkgx")], "misses": 2}
    second = start()
    assert second == {**first, "loader": "_CachedLoader", "misses": 0}
    module.write_text("VALUE = 'edited'\n")  # same size, another mtime
    assert start() == {**first, "value": "edited", "misses": 1}
    assert start() == {**first, "value": "edited", "loader": "_CachedLoader", "misses": 0}
    (late / "pkgx" / "other.py").write_text("")  # the package's directory changed
    assert start()["misses"] == 1
    (early / "pkgx.py").write_text("raise SystemExit('the earlier directory shadows it')\n")
    shadowed = subprocess.run([sys.executable, "-c", _IMPORT, path, str(early), str(late)],
                              capture_output=True, text=True, cwd=REPO, check=False)
    assert "the earlier directory shadows it" in shadowed.stderr
