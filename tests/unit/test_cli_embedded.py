"""`agentctl run --embedded` without click (cli/embedded.py, issue 17): the fast path must hand
the runner exactly the spec the click command would, take only argv click reads the same way
(everything else goes to click, which prints its own usage errors), and declare the same
options as the click command. A Ctrl-C while agentctl starts must never print a traceback: it
goes to the runner on an embedded run and is "Aborted!" on every other path. Each signal case
runs as a fresh process with the signal delivered at a fixed point of agentctl's start (inside
its reading of argv, where its imports happen). No root: the runner refuses a non-root caller,
which is enough to see the exec; tests/e2e/test_ci_embedded.py sees the cancel as root."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import click
import pytest

import supervisor.cli.main as click_cli
from supervisor.cli import embedded, fast
from supervisor.errors import EmbeddedNeedsRoot
from tests.support.embedded import INTERRUPTED_AGENTCTL

REPO = Path(__file__).resolve().parents[2]


class _Exec(Exception):
    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec


def _click_spec(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> dict[str, Any] | None:
    """The spec the click command would exec the runner with; None if it would not."""
    def exec_runner(spec: dict[str, Any], early: object = ()) -> None:
        raise _Exec(spec)

    monkeypatch.setattr(click_cli, "exec_runner", exec_runner)
    try:
        click_cli.cli.main(argv, prog_name="agentctl", standalone_mode=False)
    except _Exec as taken:
        return taken.spec
    except (click.ClickException, SystemExit):
        return None
    return None


def _fast_spec(argv: list[str], environ: dict[str, str]) -> dict[str, Any] | None:
    todo = fast.plan(argv, environ)
    if todo is None:
        return None
    assert todo.verb == "run" and todo.embedded is not None
    return todo.embedded


@pytest.fixture
def place(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "ws").mkdir()
    (tmp_path / "key.pem").write_text("k")
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "link").symlink_to(tmp_path / "ws")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(embedded.SIGNING_KEY_ENV, raising=False)
    return tmp_path


TAKEN = [
    ["run", "--embedded", "--", "true"],
    ["--socket", "/nowhere.sock", "run", "--embedded", "--", "true"],
    ["run", "--embedded", "--workspace", "ws", "--", "sh", "-c", "echo -x; exit 3"],
    ["run", "--name=a1", "--class", "ci", "--profile", "coding-agent", "--embedded",
     "--timeout", "10m", "--image", "debian:12", "--", "agent", "--", "-v"],
    ["run", "--embedded", "--workspace=link", "--allow-changes", "src/**",
     "--allow-changes=tests/**", "--report", "out/r.json", "--summary", "s.md",
     "--audit", "a.jsonl", "--signing-key", "key.pem", "--self-test", "--config", "c.toml",
     "--json", "--", "python3", "agent.py"],
    ["run", "--env", "A=1", "--env=B=x=y", "--env", "C=", "--tripwire", "mem:memory_bytes>1G",
     "--tripwire", "t:cpu_percent>90:kill", "--embedded", "--", "true"],
]

DECLINED = [
    ["run", "--embedded", "true"],  # no `--`: click reads interspersed options itself
    ["run", "--", "true"],  # not --embedded: a daemon's run (or root's implicit embedded)
    ["run", "--embedded", "-d", "--", "true"],  # click's --detach refusal
    ["run", "--embedded", "--detach", "--", "true"],
    ["run", "--embedded", "--embedded", "--", "true"],
    ["run", "--embedded=1", "--", "true"],
    ["run", "--embedded", "--name", "a", "--name", "b", "--", "true"],
    ["run", "--embedded", "--name", "-x", "--", "true"],
    ["run", "--embedded", "--name=", "--", "true"],
    ["run", "--embedded", "--name", "--", "true"],
    ["run", "--embedded", "--help", "--", "true"],
    ["run", "--embedded", "--nosuch", "--", "true"],
    ["run", "--embedded", "stray", "--", "true"],
    ["run", "--embedded", "--"],
    ["run", "--embedded", "--env", "NOEQUALS", "--", "true"],
    ["run", "--embedded", "--tripwire", "bad", "--", "true"],
    ["run", "--embedded", "--workspace", "a-file", "--", "true"],  # click: is a file
    ["run", "--embedded", "--report", "ws", "--", "true"],  # click: is a directory
    ["--socket", "-s", "run", "--embedded", "--", "true"],
    ["--help", "run", "--embedded", "--", "true"],
]


@pytest.mark.parametrize("argv", TAKEN, ids=lambda v: " ".join(v)[:70])
def test_the_fast_path_execs_the_runner_with_clicks_spec(
        argv: list[str], place: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mine = _fast_spec(argv, {})
    assert mine is not None
    assert mine == _click_spec(argv, monkeypatch)
    assert mine["run"]["command"] == argv[argv.index("--") + 1:]


@pytest.mark.parametrize("argv", TAKEN, ids=lambda v: " ".join(v)[:70])
def test_the_runners_spec_is_the_text_json_writes(argv: list[str], place: Path) -> None:
    """agentctl writes the spec without the json package (embedded.spec_json): the same text
    json.dumps gives, for every spec the fast path builds and for any text an argument holds."""
    spec = _fast_spec(argv, {})
    assert spec is not None
    assert embedded.spec_json(spec) == json.dumps(spec)
    odd = ["", "\"quoted\" \\ back/slash", "tab\tnew\nline\x00\x1f\x7f", "caf\u00e9 \u2603",
           "\U0001f600", "\ud800 lone", "</script>", "-1", "null"]
    value = {"run": {"command": odd, "env": dict(zip(odd, reversed(odd), strict=True)),
                     "timeout": None, "n": 3, "neg": -7, "big": 2**70},
             "self_test": True, "report": False, "allow_changes": [], "nested": [[], {}, ()]}
    assert embedded.spec_json(value) == json.dumps(value)


@pytest.mark.parametrize("value", [1.5, {1: "x"}, {"a": b"bytes"}, {"a": {None: 1}}, object()])
def test_the_spec_writer_refuses_what_a_spec_never_holds(value: object) -> None:
    with pytest.raises(TypeError):
        embedded.spec_json(value)


def test_what_the_fast_path_reads(place: Path) -> None:
    spec = _fast_spec(TAKEN[4], {})
    assert spec == {
        "run": {"command": ["python3", "agent.py"], "workspace": str(place / "ws")},
        "allow_changes": ["src/**", "tests/**"], "report": str(place / "out/r.json"),
        "summary": str(place / "s.md"), "audit": str(place / "a.jsonl"),
        "signing_key": str(place / "key.pem"), "self_test": True,
        "config": str(place / "c.toml")}
    spec = _fast_spec(TAKEN[5], {})
    assert spec is not None and spec["run"]["env"] == {"A": "1", "B": "x=y", "C": ""}
    assert spec["run"]["tripwires"] == [
        {"name": "mem", "metric": "memory_bytes", "above": "1G", "action": "alert"},
        {"name": "t", "metric": "cpu_percent", "above": "90", "action": "kill"}]


def test_the_signing_key_comes_from_the_environment_as_clicks_does(
        place: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    argv = ["run", "--embedded", "--", "true"]
    monkeypatch.setenv(embedded.SIGNING_KEY_ENV, "key.pem")
    spec = _fast_spec(argv, dict(os.environ))
    assert spec is not None and spec["signing_key"] == str(place / "key.pem")
    assert spec == _click_spec(argv, monkeypatch)
    monkeypatch.setenv(embedded.SIGNING_KEY_ENV, "ws")  # a directory: click refuses it
    assert _fast_spec(argv, dict(os.environ)) is None
    assert _click_spec(argv, monkeypatch) is None


@pytest.mark.parametrize("argv", DECLINED, ids=lambda v: " ".join(v)[:70])
def test_argv_the_fast_path_is_not_sure_of_goes_to_click(argv: list[str], place: Path) -> None:
    assert fast.plan(argv, {}) is None


def test_the_declarations_are_the_click_commands() -> None:
    """Every option of click's `run` is in embedded.OPTIONS with its dest and kind, and
    nothing else is: an option added to one side only fails here."""
    ctx = click.Context(click_cli.cli, info_name="agentctl")
    command = click_cli.cli.get_command(ctx, "run")
    assert command is not None
    declared: dict[str, tuple[str, str]] = {}
    for param in command.params:
        if not isinstance(param, click.Option) or param.name == "help":
            continue
        assert param.name is not None
        if param.is_flag:
            kind = "flag"
        elif param.multiple:
            kind = "multiple"
        elif isinstance(param.type, click.Path):
            kind = "dir" if not param.type.file_okay else "file"
            assert not param.type.exists and param.type.dir_okay == (kind == "dir")
            assert param.type.readable == (kind in embedded._READABLE)
        else:
            kind = "text"
        for spelling in param.opts + param.secondary_opts:
            declared[spelling] = (param.name, kind)
        if param.envvar:
            assert (param.name, param.envvar) == ("signing_key", embedded.SIGNING_KEY_ENV)
    assert declared == embedded.OPTIONS
    assert [p.name for p in command.params if isinstance(p, click.Argument)] == ["command"]


def _agentctl_interrupted(*argv: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """As nobody (CI runs this tier as nobody; under root the runner would start a run)."""
    env = {**os.environ, "AGENT_SUPERVISOR_SOCKET": str(tmp_path / "none.sock"),
           "AGENT_SUPERVISOR_CI_ROOT": str(tmp_path / "ci"), "PYTHONIOENCODING": "utf-8"}
    nobody: dict[str, Any] = ({"user": 65534, "group": 65534, "extra_groups": []}
                              if os.geteuid() == 0 else {})
    return subprocess.run([sys.executable, "-c", INTERRUPTED_AGENTCTL, *argv], capture_output=True,
                          text=True, cwd=REPO, env=env, timeout=120, **nobody)


def test_a_ctrl_c_while_agentctl_starts_an_embedded_run_goes_to_the_runner(
        tmp_path: Path) -> None:
    """The runner gets it (as root it cancels the run: tests/e2e); here, not root, the runner
    refuses to start, quietly."""
    result = _agentctl_interrupted("run", "--embedded", "--", "true", tmp_path=tmp_path)
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == EmbeddedNeedsRoot.exit_status, result.stderr
    assert "embedded_needs_root" in result.stderr


@pytest.mark.parametrize("argv", [["kill", "a1", "--reason", "r"], ["--version"],
                                  ["logs", "a1"], ["run", "--", "true"]],
                         ids=lambda v: " ".join(v))
def test_a_ctrl_c_while_agentctl_starts_is_aborted_as_click_does(argv: list[str],
                                                                 tmp_path: Path) -> None:
    """The fast path's verbs and --version, and click's commands: "Aborted!", status 1,
    nothing sent (the socket does not exist; a request would have failed otherwise)."""
    result = _agentctl_interrupted(*argv, tmp_path=tmp_path)
    assert "Traceback" not in result.stderr, result.stderr
    assert (result.returncode, result.stderr, result.stdout) == (1, "\nAborted!\n", "")


# ------------------------------------------------------------------ the runner's interpreter

_VENV_SITE = f"lib/python{sys.version_info[0]}.{sys.version_info[1]}/site-packages"


def test_without_site_the_runner_gets_the_path_site_would_give_it() -> None:
    """The -S form agentctl execs in a plain venv (this one, as install-deps makes it) starts
    the runner with the sys.path that `python -I` has: the stdlib's, then the venv's
    site-packages; and its modules come from there (supervisor from the venv, not a checkout
    in the current directory)."""
    assert sys.prefix != sys.base_prefix, "the tests run from a venv (scripts/install-deps.sh)"
    site_packages = f"{sys.prefix}/{_VENV_SITE}"
    code = embedded._WITHOUT_SITE.format(path=site_packages)
    boot, run = code.split("import runpy\n")
    assert "run_module('supervisor.ci', run_name='__main__'" in run
    probe = boot + "import json, pydantic\nprint(json.dumps([sys.path, pydantic.__file__]))"
    without = subprocess.run([sys.executable, "-I", "-S", "-c", probe], capture_output=True,
                             text=True, check=True, cwd=REPO)
    plain = subprocess.run([sys.executable, "-I", "-c", "import json, sys, pydantic\n"
                            "print(json.dumps([sys.path, pydantic.__file__]))"],
                           capture_output=True, text=True, check=True, cwd=REPO)
    assert json.loads(without.stdout) == json.loads(plain.stdout)
    assert json.loads(without.stdout)[0][-1] == site_packages


def test_the_runner_without_site_refuses_as_the_module_does() -> None:
    """Exec'd as agentctl would (the -S form), unprivileged or without a spec, the runner's
    entry point refuses as `python -I -m supervisor.ci` does, with no traceback."""
    site_packages = f"{sys.prefix}/{_VENV_SITE}"
    env = {k: v for k, v in os.environ.items() if k != "AGENT_SUPERVISOR_EMBEDDED_RUN"}
    for argv in ([sys.executable, "-I", "-S", "-c",
                  embedded._WITHOUT_SITE.format(path=site_packages)],
                 [sys.executable, "-I", "-m", "supervisor.ci"]):
        done = subprocess.run(argv, capture_output=True, text=True, env=env, cwd="/",
                              check=False, timeout=120)
        assert (done.returncode, done.stdout) == (6, "")
        assert done.stderr.startswith("agentctl: invalid_request: ") and "Traceback" not in \
            done.stderr


@pytest.fixture
def plain_venv(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A venv as install-deps makes one, seen by runner_argv: its site-packages last on the
    path, with setuptools' .pth only."""
    import site

    prefix = tmp_path / "venv"
    site_packages = prefix / _VENV_SITE
    site_packages.mkdir(parents=True)
    (site_packages / "distutils-precedence.pth").write_text("import os\n")
    (site_packages / "pydantic").mkdir()
    monkeypatch.setattr(sys, "prefix", str(prefix))
    monkeypatch.setattr(sys, "base_prefix", "/usr")
    monkeypatch.setattr(site, "PREFIXES", [str(prefix)])
    monkeypatch.setattr(sys, "path", ["", "/usr/lib/python3.11", str(site_packages)])
    return site_packages


def test_a_plain_venv_gets_the_runner_without_site(plain_venv: Path) -> None:
    argv = embedded.runner_argv()
    assert argv[:4] == [sys.executable, "-I", "-S", "-c"]
    assert argv[4] == embedded._WITHOUT_SITE.format(path=str(plain_venv))


@pytest.mark.parametrize("change", ["system_site", "no_venv", "pth_entry", "pth_file",
                                    "other_layout"])
def test_anything_site_would_add_keeps_the_runner_with_site(
        plain_venv: Path, monkeypatch: pytest.MonkeyPatch, change: str) -> None:
    import site

    if change == "system_site":  # include-system-site-packages = true
        monkeypatch.setattr(site, "PREFIXES", [sys.prefix, "/usr"])
    elif change == "no_venv":
        monkeypatch.setattr(sys, "base_prefix", sys.prefix)
    elif change == "pth_entry":  # a .pth file's directory (an editable install)
        sys.path.append("/src/checkout")
    elif change == "pth_file":  # a .pth file that may run code (coverage's, a namespace's)
        (plain_venv / "coverage.pth").write_text("import coverage\n")
    else:  # site-packages not where the prefix says (another layout), or not on the path
        monkeypatch.setattr(sys, "prefix", str(plain_venv.parent / "elsewhere"))
        monkeypatch.setattr(site, "PREFIXES", [sys.prefix])
    assert embedded.runner_argv() == [sys.executable, "-I", "-m", "supervisor.ci"]
