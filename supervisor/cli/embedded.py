"""`agentctl run --embedded`: the run's request and CI options read from argv, and the exec into
the one-shot supervisor (supervisor/ci/runner.py). Shared by the click command (cli/main.py's
`run`) and agentctl's fast path (cli/fast.py), which takes `run --embedded ... -- COMMAND`
without importing click, so a CI job pays one interpreter start and a few small modules before
the runner. plan_run() reads only argv that click would read the same way, as fast.plan() does;
anything else (help, a usage error, an option's value click would refuse, a value that looks
like an option) goes to click unchanged. tests/unit/test_cli_embedded.py holds the two readings
equal. No privilege (the runner checks for root)."""

from __future__ import annotations

import os
import stat
import sys
from _json import encode_basestring_ascii

from supervisor.ci import ENV_VAR
from supervisor.errors import InvalidRequest

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (agentctl's fast path)
if TYPE_CHECKING:
    import signal as _signal  # typed; the same functions and numbers as its C module's
    from collections.abc import Mapping, Sequence
    from typing import Any, NoReturn

    from supervisor.api.shapes import RunRequest, TripwireRule
else:
    # signal's C module: `signal` itself builds enums as it loads (enum, functools...)
    import _signal

SIGNING_KEY_ENV = "AGENT_SUPERVISOR_SIGNING_KEY"  # --signing-key's environment variable
CANCEL_SIGNALS = (_signal.SIGINT, _signal.SIGTERM, _signal.SIGHUP)

# `run`'s options as click declares them (tests/unit/test_cli_embedded.py checks this against
# the click command): spelling -> (dest, kind). Kinds: "text"; "multiple" (repeatable text);
# "flag"; "dir" (a path that must not be a file), "file" (a path that must not be a directory).
OPTIONS: dict[str, tuple[str, str]] = {
    "--name": ("name", "text"), "--class": ("agent_class", "text"),
    "--profile": ("profile", "text"), "--workspace": ("workspace", "dir"),
    "--timeout": ("timeout", "text"), "--image": ("image", "text"),
    "--env": ("env", "multiple"), "--tripwire": ("tripwires", "multiple"),
    "--detach": ("detach", "flag"), "-d": ("detach", "flag"),
    "--embedded": ("embedded", "flag"), "--allow-changes": ("allow_changes", "multiple"),
    "--report": ("report", "file"), "--summary": ("summary", "file"),
    "--audit": ("audit_path", "file"), "--signing-key": ("signing_key", "file"),
    "--self-test": ("self_test", "flag"), "--config": ("config_path", "file"),
    "--json": ("as_json", "flag"),
}
# click's path types check an existing path; these read it as readable (the default).
_READABLE = {"file"}


def run_body(command: Sequence[str], *, name: str | None = None,
             agent_class: str | None = None, profile: str | None = None,
             workspace: str | os.PathLike[str] | None = None, timeout: str | None = None,
             image: str | None = None, env: Sequence[str] = (),
             tripwires: Sequence[str] = ()) -> RunRequest:
    """The run request `agentctl run` sends (or embeds), from its options."""
    body: RunRequest = {"command": list(command)}
    if name:
        body["name"] = name
    if agent_class:
        body["class"] = agent_class
    if profile:
        body["profile"] = profile
    if workspace is not None:
        body["workspace"] = os.path.realpath(workspace)
    if timeout:
        body["timeout"] = timeout
    if image:
        body["image"] = image
    if env:
        pairs = {}
        for item in env:
            key, sep, value = item.partition("=")
            if not sep:
                raise InvalidRequest(f"--env {item!r} is not KEY=VALUE", field="env")
            pairs[key] = value
        body["env"] = pairs
    if tripwires:
        body["tripwires"] = [parse_tripwire(spec) for spec in tripwires]
    return body


def parse_tripwire(spec: str) -> TripwireRule:
    """NAME:METRIC>VALUE[:ACTION]; the daemon validates metric, value and action."""
    name, sep, rest = spec.partition(":")
    condition, _, action = rest.partition(":")
    metric, gt, value = condition.partition(">")
    if not (sep and gt and name and metric and value):
        raise InvalidRequest(f"--tripwire {spec!r} is not NAME:METRIC>VALUE[:ACTION]",
                             field="tripwires")
    return {"name": name, "metric": metric, "above": value, "action": action or "alert"}


def spec(body: RunRequest, *, allow_changes: Sequence[str] = (),
         report: str | os.PathLike[str] | None = None,
         summary: str | os.PathLike[str] | None = None,
         audit: str | os.PathLike[str] | None = None,
         signing_key: str | os.PathLike[str] | None = None, self_test: bool = False,
         config: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """What the runner reads from $AGENT_SUPERVISOR_EMBEDDED_RUN (supervisor/ci/spec.py)."""
    def real(path: str | os.PathLike[str] | None) -> str | None:
        return None if path is None else os.path.realpath(path)

    return {"run": body, "allow_changes": list(allow_changes), "report": real(report),
            "summary": real(summary), "audit": real(audit), "signing_key": real(signing_key),
            "self_test": self_test, "config": real(config)}


def exec_runner(run_spec: dict[str, Any], early: Sequence[int] = ()) -> NoReturn:
    """Replace agentctl by the one-shot supervisor, so the CI job's signals reach it directly;
    agentctl itself never loads daemon code. `-I`: root must not import modules from the
    current directory (a checkout) or $PYTHONPATH. `early`: cancel signals agentctl took
    before this point (fast.py remembers them while it starts); they go to the runner, which
    cancels the run through the audited kill path, as it does for one that comes later."""
    env = {**os.environ, ENV_VAR: spec_json(run_spec)}
    sys.stdout.flush()
    # Blocked across the exec (the mask and the pending set survive it): a Ctrl-C or cancel
    # that comes while the new interpreter starts waits for the runner's handler
    # (ci/__main__.py), instead of ending in a KeyboardInterrupt traceback or being lost.
    _signal.pthread_sigmask(_signal.SIG_BLOCK, CANCEL_SIGNALS)
    for signum in dict.fromkeys(early):
        os.kill(os.getpid(), signum)  # pending until the runner unblocks it
    try:
        os.execve(sys.executable, runner_argv(), env)
    finally:  # reached only if the exec failed
        _signal.pthread_sigmask(_signal.SIG_UNBLOCK, CANCEL_SIGNALS)


# The runner's interpreter without `site` (-S): what `python -I -m supervisor.ci` would be
# given by site in a plain venv (its site-packages on the path; the venv's .pth files run,
# pyvenv.cfg read again, sitecustomize imported) is this one line, ~1 ms of its start.
_WITHOUT_SITE = ("import sys\nsys.path.append({path!r})\nimport runpy\n"
                 "runpy.run_module('supervisor.ci', run_name='__main__', alter_sys=True)\n")


def runner_argv() -> list[str]:
    """How agentctl execs the runner: `python -I -m supervisor.ci` (-I: root imports nothing
    from the current directory, a checkout, or $PYTHONPATH), or the same without `site` where
    site would add nothing but the venv's site-packages: agentctl runs from a venv that does
    not see the system's packages, that directory is the last on its path (no .pth file added
    one after it) and holds no .pth file but setuptools' (which only shims distutils). The
    path is agentctl's own prefix's, which its interpreter found from where it lies."""
    plain = [sys.executable, "-I", "-m", "supervisor.ci"]
    site = sys.modules.get("site")
    if site is None or sys.prefix == sys.base_prefix or [sys.prefix] != site.PREFIXES:
        return plain
    path = f"{sys.prefix}/lib/python{sys.version_info[0]}.{sys.version_info[1]}/site-packages"
    if sys.path.count(path) != 1 or sys.path[-1] != path:
        return plain
    try:
        pth = [name for name in os.listdir(path) if name.endswith(".pth")]
    except OSError:
        return plain
    if pth not in ([], ["distutils-precedence.pth"]):
        return plain
    return [sys.executable, "-I", "-S", "-c", _WITHOUT_SITE.format(path=path)]


def spec_json(value: object) -> str:
    """`json.dumps(value)` for what a spec holds (str, int, bool, None, lists and str-keyed
    dicts of them), without the json package: its encoder and decoder compile regular
    expressions as they load (re, enum, functools...), ~3 ms of agentctl's start before the
    exec. The same text as json.dumps with its defaults (tests/unit/test_cli_embedded.py)."""
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, str):
        return encode_basestring_ascii(value)
    if isinstance(value, int):
        return int.__repr__(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(spec_json(item) for item in value) + "]"
    if isinstance(value, dict):
        for key in value:
            if not isinstance(key, str):
                raise TypeError(f"a run spec's keys are strings, not {type(key).__name__}")
        return "{" + ", ".join(f"{encode_basestring_ascii(key)}: {spec_json(item)}"
                               for key, item in value.items()) + "}"
    raise TypeError(f"a run spec holds no {type(value).__name__}")


def _plain(value: str) -> bool:
    """A value click reads as this one: not empty, nothing that reads as an option, no NUL,
    encodable as given."""
    if not value or value.startswith("-") or "\0" in value:
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _path_click_takes(value: str, kind: str) -> bool:
    """click.Path(exists=False) refuses an existing path of the wrong type, or unreadable;
    such a value is left to click, which says so."""
    try:
        st = os.stat(value)
    except OSError:
        return True
    if kind == "dir" and stat.S_ISREG(st.st_mode):
        return False
    if kind == "file" and stat.S_ISDIR(st.st_mode):
        return False
    return not (kind in _READABLE and not os.access(value, os.R_OK))


def plan_run(argv: Sequence[str], environ: Mapping[str, str]) -> dict[str, Any] | None:
    """The runner's spec for `run` ARGV (what follows the word `run`) when it is an explicit
    `--embedded` run in the form `[OPTIONS] -- COMMAND...`, read as click reads it; None when
    it is not, or when click would refuse or question it (then click takes the whole argv)."""
    if "--" not in argv:
        return None
    split = list(argv).index("--")
    options, command = list(argv[:split]), list(argv[split + 1:])
    if not command or not all(_encodable(arg) for arg in command):
        return None
    given: dict[str, Any] = {}
    multiple: dict[str, list[str]] = {}
    while options:
        token = options.pop(0)
        name, eq, value = token.partition("=") if token.startswith("--") else (token, "", "")
        if name not in OPTIONS:
            return None  # a positional before `--`, --help, an unknown or combined option
        dest, kind = OPTIONS[name]
        if kind == "flag":
            if eq or dest in given:
                return None
            given[dest] = True
            continue
        if not eq:
            if not options:
                return None
            value = options.pop(0)
        if not _plain(value):
            return None
        if kind == "multiple":
            multiple.setdefault(dest, []).append(value)
            continue
        if dest in given:
            return None  # click keeps the last; left to it
        if kind in ("dir", "file") and not _path_click_takes(value, kind):
            return None
        given[dest] = value
    if not given.get("embedded") or given.get("detach"):
        return None  # a daemon's run, or click's refusal of --detach with --embedded
    if "signing_key" not in given and (key := environ.get(SIGNING_KEY_ENV)):
        if not _plain(key) or not _path_click_takes(key, "file"):
            return None
        given["signing_key"] = key
    try:
        body = run_body(command, name=given.get("name"), agent_class=given.get("agent_class"),
                        profile=given.get("profile"), workspace=given.get("workspace"),
                        timeout=given.get("timeout"), image=given.get("image"),
                        env=multiple.get("env", ()), tripwires=multiple.get("tripwires", ()))
    except InvalidRequest:
        return None  # click's command says what is wrong
    return spec(body, allow_changes=multiple.get("allow_changes", ()),
                report=given.get("report"), summary=given.get("summary"),
                audit=given.get("audit_path"), signing_key=given.get("signing_key"),
                self_test=bool(given.get("self_test")), config=given.get("config_path"))


def _encodable(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
