"""agentctl under incident conditions (issue 16), through click's CliRunner against the real API
server on a Unix socket in tmp: typos are errors with suggestions, reasons are required where an
incident review needs them (client and server side), the audit table names the target and the
whole reason with zoned timestamps, `ls -q`, `logs --tail`, usage errors instead of tracebacks
(fuzzed), progress output, and a hint on every error code. No root."""

from __future__ import annotations

import io
import json
import os
import random
import re
import time
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner, Result

from supervisor import errors
from supervisor.api.client import Client
from supervisor.api.server import tail_offset
from supervisor.cli import progress
from supervisor.cli.main import cli, iso_time
from supervisor.errors import ProfileNotFound, ReasonRequired, ScopeEmpty
from supervisor.limits import reason_text
from supervisor.profiles import load_profile
from tests.unit.conftest import ServerThread

ISO_ZONED = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:[+-]\d\d:\d\d|Z)")


def agentctl(server: ServerThread, *args: str) -> Result:
    return CliRunner().invoke(cli, ["--socket", str(server.socket_path), *args],
                              catch_exceptions=True)


def launch(server: ServerThread, name: str, agent_class: str = "coders") -> dict[str, Any]:
    result = agentctl(server, "run", "--name", name, "--class", agent_class, "--detach",
                      "--json", "--", "sleep", "infinity")
    assert result.exit_code == 0, (result.output, result.stderr)
    view = json.loads(result.stdout)
    assert isinstance(view, dict)
    return view


def error_of(result: Result) -> dict[str, Any]:
    body = json.loads(result.stdout)
    assert isinstance(body, dict)
    error = body["error"]
    assert isinstance(error, dict)
    return error


def test_a_class_that_matches_nothing_is_an_error_with_suggestions(server: ServerThread
                                                                     ) -> None:
    launch(server, "a1", "coders")
    before = server.snapshot()
    result = agentctl(server, "kill", "--class", "coderz", "--reason", "incident 7", "--json")
    assert result.exit_code == ScopeEmpty.exit_status == 3
    error = error_of(result)
    assert error["code"] == "scope_empty"
    assert error["detail"]["did_you_mean"] == ["coders"]
    assert "agentctl ls" in error["detail"]["hint"]
    plain = agentctl(server, "pause", "--class", "coderz", "--reason", "incident 7")
    assert plain.exit_code == 3
    assert "did you mean coders?" in plain.stderr and "hint:" in plain.stderr
    assert server.snapshot() == before, "a typo'd scope changed something"


def test_an_unknown_agent_gets_did_you_mean(server: ServerThread) -> None:
    launch(server, "builder-1")
    result = agentctl(server, "kill", "bulder-1", "--reason", "x", "--json")
    assert result.exit_code == 3
    error = error_of(result)
    assert (error["code"], error["detail"]["did_you_mean"]) == ("agent_not_found", ["builder-1"])
    assert "did you mean builder-1?" in agentctl(server, "inspect", "bulder-1").stderr


def test_pause_of_every_agent_when_there_are_none_is_an_error(server: ServerThread) -> None:
    result = agentctl(server, "pause", "--all", "--reason", "x", "--json")
    assert (result.exit_code, error_of(result)["code"]) == (3, "scope_empty")
    # A global kill with no agents still means something: it halts new launches.
    assert agentctl(server, "kill", "--all", "--reason", "halt the host").exit_code == 0


@pytest.mark.parametrize("args", [
    ["kill", "a1"],
    ["kill", "a1", "--reason", "   "],
    ["kill", "--class", "coders"],
    ["pause", "--class", "coders"],
    ["resume", "--all"],
    ["stop", "--class", "coders"],
    ["reactivate", "--all"],
])
def test_reason_is_required_for_kill_and_wide_scopes(server: ServerThread, args: list[str]
                                                     ) -> None:
    launch(server, "a1")
    before = server.snapshot()
    result = agentctl(server, *args, "--json")
    assert result.exit_code == ReasonRequired.exit_status == 6
    error = error_of(result)
    assert (error["code"], error["detail"]["field"]) == ("reason_required", "reason")
    assert "--reason" in error["detail"]["hint"]
    assert server.snapshot() == before


@pytest.mark.parametrize(("argv", "sent"), [
    (b"incident 7", "incident 7"),
    ("caf\u00e9 \U0001f525".encode(), "caf\u00e9 \U0001f525"),  # UTF-8: unchanged
    (b"caf\xe9", "caf\ufffd"),  # a Latin-1 byte
    (b"\xff\xfe\x80", "\ufffd\ufffd\ufffd"),  # one U+FFFD a byte
    (b"\xc3", "\ufffd"),  # a UTF-8 sequence cut short
    (b"\xed\xa0\x80 x", "\ufffd\ufffd\ufffd x"),  # a surrogate encoded in UTF-8
])
def test_a_reasons_argv_bytes_that_are_not_utf8_are_sent_as_replacement_characters(
        argv: bytes, sent: str) -> None:
    """What Python makes of the argv bytes (surrogateescape) is sent as UTF-8 can carry it,
    one U+FFFD a byte that is not UTF-8, so the length the limit counts never grows."""
    decoded = os.fsdecode(argv)
    assert reason_text(decoded) == sent and len(sent) == len(decoded)
    assert sent.encode("utf-8").decode("utf-8") == sent
    # A lone surrogate given some other way (not from argv bytes) too.
    assert reason_text("a\ud800b\udfff") == "a\ufffdb\ufffd"


def test_a_kill_whose_reason_holds_bytes_that_are_not_utf8_goes_through(
        server: ServerThread) -> None:
    launch(server, "a1")
    result = agentctl(server, "kill", "a1", "--reason", os.fsdecode(b"caf\xe9 \xff"), "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["results"][0]["new_state"] == "killed"
    rows = Client(server.socket_path).audit()["entries"]
    assert [r["reason"] for r in rows if r["verb"] == "kill"] == ["caf\ufffd \ufffd"]


def test_pause_of_one_agent_needs_no_reason(server: ServerThread) -> None:
    launch(server, "a1")
    assert agentctl(server, "pause", "a1").exit_code == 0


@pytest.mark.parametrize(("verb", "scope"), [
    ("kill", {"agent": "a1"}), ("kill", {"class": "coders"}), ("kill", {"all": True}),
    ("pause", {"class": "coders"}), ("stop", {"all": True}), ("reactivate", {"class": "coders"}),
])
def test_the_api_refuses_an_empty_reason(server: ServerThread, verb: str,
                                         scope: dict[str, Any]) -> None:
    """Server-side too: a client that skips agentctl's check still cannot write a reasonless
    row, and nothing changes."""
    launch(server, "a1")
    before = server.snapshot()
    for reason in ("", " \t\n"):
        with pytest.raises(ReasonRequired) as caught:
            Client(server.socket_path).action(verb, scope, reason=reason)
        assert caught.value.detail["field"] == "reason"
    assert server.snapshot() == before


def test_audit_names_the_target_and_the_whole_reason_with_zoned_times(server: ServerThread
                                                                       ) -> None:
    for name in ("a1", "a2", "a3"):
        launch(server, name)
    reason = ("suspected exfiltration through the package mirror; ticket INC-4711, "
              "paging the owner of the coders class before anything is reactivated")
    assert agentctl(server, "kill", "--class", "coders", "--reason", reason).exit_code == 0
    wide = agentctl(server, "audit", "--wide")
    assert wide.exit_code == 0, wide.stderr
    header, *rows = wide.stdout.splitlines()
    assert "TARGET" in header.split()
    kills = [row for row in rows if " kill " in row and "class:coders" in row]
    assert {row.split()[5] for row in kills} == {"a1", "a2", "a3"}
    assert all(row.endswith(reason) for row in kills)
    assert all(ISO_ZONED.search(row) for row in rows)
    wrapped = agentctl(server, "audit")
    assert wrapped.exit_code == 0
    # Wrapped under its row (the runner's terminal is 80 wide): every word is there, in order.
    assert " ".join(reason.split()) in " ".join(wrapped.stdout.split())
    assert max(len(line) for line in wrapped.stdout.splitlines()) < len(reason) + 40


def test_iso_time_carries_the_zone() -> None:
    assert iso_time(0, utc=True) == "1970-01-01T00:00:00+00:00"
    assert ISO_ZONED.fullmatch(iso_time(time.time()))


def test_ls_quiet_and_class(server: ServerThread) -> None:
    launch(server, "a1", "coders")
    launch(server, "b1", "batch")
    result = agentctl(server, "ls", "-q")
    assert result.stdout.splitlines() == ["a1", "b1"]
    assert agentctl(server, "ls", "--class", "batch", "-q").stdout.splitlines() == ["b1"]
    assert agentctl(server, "ls", "--class", "batch", "--state", "paused", "-q").stdout == ""


def test_ls_of_a_class_no_agent_has_is_an_error_with_suggestions(server: ServerThread) -> None:
    """`ls --class coderz` (a typo) is not an empty list: the verbs' scope_empty, did-you-mean
    included, on stderr and with --json (the fast path prints the same: test_cli_fast)."""
    launch(server, "a1", "coders")
    result = agentctl(server, "ls", "--class", "coderz", "-q")
    assert (result.exit_code, result.stdout) == (3, "")
    assert "scope_empty" in result.stderr and "did you mean coders?" in result.stderr
    assert "hint:" in result.stderr
    error = error_of(agentctl(server, "ls", "--class", "coderz", "--json"))
    assert (error["code"], error["detail"]["did_you_mean"]) == ("scope_empty", ["coders"])


def test_logs_tail(server: ServerThread) -> None:
    view = launch(server, "a1")
    log_path = Path(server.call(lambda: server.arbiter.resolve_run(view["id"])[0].log_path))
    log_path.write_bytes(b"".join(b"line %d\n" % i for i in range(1, 501)))
    result = agentctl(server, "logs", "a1", "--tail", "3")
    assert result.exit_code == 0, result.stderr
    assert result.stdout == "line 498\nline 499\nline 500\n"
    assert agentctl(server, "logs", "a1", "-n", "0").stdout == ""
    assert agentctl(server, "logs", "a1", "-n", "9999").stdout.count("\n") == 500


@pytest.mark.parametrize(("data", "lines", "expected"), [
    (b"", 3, b""), (b"a\nb\nc\n", 1, b"c\n"), (b"a\nb\nc\n", 2, b"b\nc\n"),
    (b"a\nb\nc", 1, b"c"), (b"a\nb\nc", 0, b""), (b"a\nb\nc\n", 0, b""),
    (b"a\nb\nc\n", 3, b"a\nb\nc\n"), (b"a\nb\nc\n", 10, b"a\nb\nc\n"),
    (b"x" * 200_000 + b"\n" + b"y" * 70_000 + b"\n", 1, b"y" * 70_000 + b"\n"),
])
def test_tail_offset(tmp_path: Path, data: bytes, lines: int, expected: bytes) -> None:
    path = tmp_path / "log"
    path.write_bytes(data)
    assert data[tail_offset(path, lines):] == expected
    assert tail_offset(tmp_path / "missing", 5) == 0


def test_deny_without_reason_is_a_usage_error(server: ServerThread) -> None:
    result = agentctl(server, "deny", "ap-1")
    assert result.exit_code == 2
    assert "Missing option '--reason'" in result.output
    assert "Traceback" not in result.output
    assert isinstance(result.exception, SystemExit)


def _commands(group: click.Group, prefix: tuple[str, ...] = ()
              ) -> list[tuple[tuple[str, ...], click.Command]]:
    found: list[tuple[tuple[str, ...], click.Command]] = []
    for name, command in sorted(group.commands.items()):
        found.append(((*prefix, name), command))
        if isinstance(command, click.Group):
            found.extend(_commands(command, (*prefix, name)))
    return found


# Commands that serve until interrupted (their own tests drive them).
LONG_RUNNING = {"console"}


def test_fuzzed_command_lines_never_trace_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                              ) -> None:
    """Every command with random mixes of its own options, junk and missing values: each ends
    in a usage error or a structured error, never an unhandled exception. The socket path is a
    regular file, so every request fails as daemon_unavailable without a daemon."""
    monkeypatch.chdir(tmp_path)
    not_a_socket = tmp_path / "control.sock"
    not_a_socket.write_text("")
    rng = random.Random(16)
    junk = ["", "-", "--", "x", "0", "-1", "1e309", "nan", "ghost", "--bogus", "a" * 600,
            "\u00e9\u0000", "10s", "soon", "--json", "-h"]
    runner = CliRunner()
    commands = _commands(cli)
    assert len(commands) > 15
    for path, command in commands:
        if path[0] in LONG_RUNNING:
            continue
        # --embedded would exec the one-shot supervisor; its own tests cover it.
        options = [opt for param in command.params if isinstance(param, click.Option)
                   for opt in param.opts if opt != "--embedded"]
        for _ in range(25):
            words = [rng.choice(options + junk) for _ in range(rng.randint(0, 5))]
            if path[0] == "top":
                words.append("--once")  # without it, top redraws until interrupted
            argv = ["--socket", str(not_a_socket), *path, *words]
            result = runner.invoke(cli, argv, catch_exceptions=True)
            assert isinstance(result.exception, SystemExit | None), (argv[3:], result.exc_info)
            assert "Traceback" not in result.output, argv
            assert result.exit_code in {0, 1, 2, 3, 6, 7, 12}, (argv, result.output)


def test_progress_counts_down_on_a_terminal() -> None:
    out = io.StringIO()
    value = progress.run_with_progress(lambda: time.sleep(0.8) or 42, "stopping a1", 2.0,
                                       stream=out, tty=True)
    assert value == 42
    text = out.getvalue()
    assert "\r" in text and "left of 2s grace" in text
    assert text.endswith("\r"), "the progress line is cleared before the result prints"


def test_progress_is_one_plain_line_otherwise() -> None:
    out = io.StringIO()
    assert progress.run_with_progress(lambda: 7, "stopping a1", 10.0, stream=out) == 7
    assert out.getvalue() == "stopping a1 (up to 10s) ...\n"
    quiet = io.StringIO()
    progress.run_with_progress(lambda: 7, "x", None, stream=quiet, quiet=True)
    assert quiet.getvalue() == ""


def test_stop_shows_progress_on_stderr(server: ServerThread) -> None:
    launch(server, "a1")
    result = agentctl(server, "stop", "a1", "--grace", "1s")
    assert result.exit_code == 0, result.stderr
    assert "stopping a1: SIGTERM sent (up to 1s) ..." in result.stderr


def test_every_error_code_says_what_to_do_next() -> None:
    classes = [cls for cls in errors.error_classes() if cls.__module__ == errors.__name__]
    codes = [cls.code for cls in classes]
    assert len(codes) == len(set(codes)), "codes are stable and unique"
    assert len(classes) > 40
    for cls in classes:
        # Its own hint, not one inherited from a broader error that may not fit.
        assert "default_hint" in vars(cls), f"{cls.__name__} ({cls.code}) has no hint"
        assert cls.default_hint and len(cls.default_hint) > 20, cls.code
        assert cls("x").hint == cls.default_hint
        assert cls("x", hint="given").hint == "given"


def test_profile_not_found_lists_the_profiles(tmp_path: Path) -> None:
    (tmp_path / "team.toml").write_text("")
    with pytest.raises(ProfileNotFound) as caught:
        load_profile("defualt", [tmp_path])
    detail = caught.value.detail
    assert {"default", "strict", "team"} <= set(detail["profiles"])
    assert detail["did_you_mean"] == ["default"]
    assert "default" in detail["hint"] and str(tmp_path) in detail["hint"]


def test_forbidden_and_runtime_unsupported_hints_say_where() -> None:
    assert "[roles]" in (errors.Forbidden("x").hint or "")
    assert "daemon.toml" in (errors.Forbidden("x").hint or "")
    assert "[docker] enabled" in (errors.RuntimeUnsupported("x").hint or "")


def test_rm_forgets_an_idle_agent_and_audits_it(server: ServerThread) -> None:
    launch(server, "a1")
    assert agentctl(server, "stop", "a1", "--grace", "1s").exit_code == 0
    server.settle()
    before = server.snapshot()
    result = agentctl(server, "rm", "a1", "--reason", "retired", "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout) == {
        "forgotten": [{"agent": "a1", "previous_state": "idle", "reason": "retired"}]}
    after = server.snapshot()
    assert after.agents == [] and after.runs == before.runs, "runs stay in the history"
    [row] = server.call(lambda: server.audit.list())[-1:]
    assert (row.verb, row.target, row.reason, row.previous_state) == (
        "forget", "a1", "retired", "idle")
    assert agentctl(server, "inspect", "a1").exit_code == 3


@pytest.mark.parametrize(("state", "code", "status"), [
    ("active", "agent_busy", 4), ("paused", "agent_busy", 4), ("killed", "agent_killed", 4)])
def test_rm_refuses_an_agent_that_is_not_idle(server: ServerThread, state: str, code: str,
                                              status: int) -> None:
    launch(server, "a1")
    if state == "paused":
        assert agentctl(server, "pause", "a1").exit_code == 0
    if state == "killed":
        assert agentctl(server, "kill", "a1", "--reason", "x").exit_code == 0
        server.settle()  # the kill's cleanup row is written after its answer
    before = server.snapshot()
    result = agentctl(server, "rm", "a1", "--json")
    assert result.exit_code == status
    error = error_of(result)
    assert error["code"] == code and error["detail"]["hint"]
    assert server.snapshot() == before


def test_rm_of_an_unknown_agent_suggests(server: ServerThread) -> None:
    launch(server, "worker")
    result = agentctl(server, "rm", "wroker", "--json")
    assert (result.exit_code, error_of(result)["detail"]["did_you_mean"]) == (3, ["worker"])


def _complete(server: ServerThread, words: list[str], incomplete: str) -> list[str]:
    from click.shell_completion import BashComplete

    comp = BashComplete(cli, {}, "agentctl", "_AGENTCTL_COMPLETE")
    return [item.value for item in comp.get_completions(
        ["--socket", str(server.socket_path), *words], incomplete)]


def test_completion_offers_agent_and_class_names(server: ServerThread) -> None:
    launch(server, "alpha", "coders")
    launch(server, "alps", "batch")
    launch(server, "beta", "batch")
    assert _complete(server, ["kill"], "al") == ["alpha", "alps"]
    assert _complete(server, ["logs"], "b") == ["beta"]
    assert _complete(server, ["rm", "alpha"], "") == ["alpha", "alps", "beta"]
    assert _complete(server, ["pause", "--class"], "") == ["batch", "coders"]
    assert _complete(server, ["ls", "--class"], "c") == ["coders"]
    assert "kill" in _complete(server, [], "ki")


def test_completion_without_a_daemon_completes_nothing(tmp_path: Path) -> None:
    from click.shell_completion import BashComplete

    comp = BashComplete(cli, {}, "agentctl", "_AGENTCTL_COMPLETE")
    assert comp.get_completions(["--socket", str(tmp_path / "none"), "kill"], "a") == []


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_completion_scripts_name_agentctl(shell: str) -> None:
    result = CliRunner().invoke(cli, ["completion", shell])
    assert result.exit_code == 0
    assert "_AGENTCTL_COMPLETE" in result.stdout and "agentctl" in result.stdout


def _completion_shell(server: ServerThread, tmp_path: Path,
                      shell: str) -> tuple[Path, dict[str, str]]:
    """Two agents on the server, an `agentctl` on PATH that runs this checkout (the shell calls
    it back as it would the installed one), and the completion script for SHELL in a file."""
    import os
    import sys

    launch(server, "alpha")
    launch(server, "alps")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    wrapper = bin_dir / "agentctl"
    wrapper.write_text(f"#!/bin/sh\nexec {sys.executable} -m supervisor.cli \"$@\"\n")
    wrapper.chmod(0o755)
    script = tmp_path / f"agentctl.{shell}"
    script.write_text(CliRunner().invoke(cli, ["completion", shell]).stdout)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}",
           "PYTHONPATH": str(Path(__file__).resolve().parents[2]),
           "AGENT_SUPERVISOR_SOCKET": str(server.socket_path)}
    return script, env


def test_bash_completes_agent_names_for_real(server: ServerThread, tmp_path: Path) -> None:
    """The printed script in a real bash, calling agentctl back as the shell would."""
    import subprocess

    script, env = _completion_shell(server, tmp_path, "bash")
    shell = (f"source {script}; COMP_WORDS=(agentctl inspect al); "
             "COMP_CWORD=2; _agentctl_completion agentctl; printf '%s\\n' \"${COMPREPLY[@]}\"")
    done = subprocess.run(["bash", "--norc", "-c", shell], env=env, capture_output=True,
                          text=True, timeout=60, check=True)
    assert done.stdout.split() == ["alpha", "alps"], done.stderr


def test_fish_completes_agent_names_for_real(server: ServerThread, tmp_path: Path) -> None:
    """The printed script in a real fish (Debian's, from scripts/install-deps.sh): `complete -C`
    asks fish for what it would offer on a command line, and fish runs agentctl for it."""
    import subprocess

    script, env = _completion_shell(server, tmp_path, "fish")
    done = subprocess.run(["fish", "--no-config", "-c",
                           f"source {script}; complete -C 'agentctl inspect al'"],
                          env=env, capture_output=True, text=True, timeout=60, check=True)
    assert [line.split("\t")[0] for line in done.stdout.splitlines()] == ["alpha", "alps"], (
        done.stdout, done.stderr)


def test_zsh_completes_agent_names_for_real(server: ServerThread, tmp_path: Path) -> None:
    """The printed script in a real zsh, autoloaded from fpath as zsh's completion system loads
    it; only the completion system's output builtins (`compadd`, `_describe`, which exist
    inside a completion widget) are replaced by functions printing what they are given."""
    import subprocess

    script, env = _completion_shell(server, tmp_path, "zsh")
    functions = tmp_path / "zfunc"
    functions.mkdir()
    (functions / "_agentctl").write_text(script.read_text())
    shell = (f"fpath=({functions} $fpath); autoload -Uz _agentctl; "
             "compadd() { print -l -- ${(P)${@[-1]}} }; "
             "_describe() { print -l -- ${${(P)3}%%:*} }; "
             "words=(agentctl inspect al); CURRENT=3; _agentctl")
    done = subprocess.run(["zsh", "-f", "-c", shell], env=env, capture_output=True, text=True,
                          timeout=60, check=True)
    assert done.stdout.split() == ["alpha", "alps"], (done.stdout, done.stderr)


def test_the_man_page_matches_the_cli() -> None:
    """docs/agentctl.1 is generated; a command or option added without regenerating it fails
    here. Regenerate: python -m supervisor.cli.manpage > docs/agentctl.1"""
    from supervisor.cli.manpage import render

    assert isinstance(cli, click.Group)
    page = Path(__file__).resolve().parents[2] / "docs" / "agentctl.1"
    rendered = render(cli)
    assert page.read_text() == rendered, (
        "docs/agentctl.1 is stale: python -m supervisor.cli.manpage > docs/agentctl.1")
    for name in cli.commands:
        assert f".SS {name}\n" in rendered
    assert "\\fB--reason TEXT\\fR" in rendered and ".SH EXIT STATUS" in rendered


def test_a_fleet_action_some_hosts_did_not_confirm_says_what_to_do(
        capsys: pytest.CaptureFixture[str]) -> None:
    """agentctl fleet kill/pause/...: hosts that did not confirm exit 13 with the code, and the
    hint (the action stays in the store; where to look) like every other error."""
    from supervisor.cli.fleet import _report
    from supervisor.errors import FleetUnconfirmed

    result = {"hosts": [{"host": "h1", "status": "ok", "agents_affected": 2},
                        {"host": "h2", "status": "unconfirmed"}],
              "actions": ["fa-1"], "elapsed_ms": 10_000.0, "unconfirmed": ["h2"]}
    with pytest.raises(SystemExit) as exit_:
        _report(result, False, "kill")
    assert exit_.value.code == FleetUnconfirmed.exit_status == 13
    err = capsys.readouterr().err
    assert "agentctl: fleet_unconfirmed: not confirmed by: h2" in err
    assert f"hint: {FleetUnconfirmed.default_hint}" in err
