"""agentctl's launcher (cli/launcher.py): pip's console script started with SIGINT blocked
from the exec on, so a Ctrl-C in the interpreter's own start (`site`, the console script's
imports: before any code of agentctl's can take it) is "Aborted!" instead of Python's
KeyboardInterrupt traceback. The Ctrl-C is sent by the process to itself at a fixed point of
that start: from `sitecustomize` (imported by `site`), and from an import hook as the console
script imports agentctl's entry module. Under pip's own script each prints the traceback (the
window is real); under the launcher none does. Real processes, real signals; no root."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from supervisor.cli.launcher import ENTRY, MARK, env_blocks_signals, install, launcher_text
from tests.support.embedded import SIGINT_IN_SITE, launcher_with_hook

# The console script pip (23.1 and later) writes, and the form older pips wrote.
PIP_SCRIPT = f"#!{sys.executable}\n{ENTRY}"
OLD_PIP_SCRIPT = (f"#!{sys.executable}\n# -*- coding: utf-8 -*-\nimport re\nimport sys\n"
                  "from supervisor.cli.fast import main\nif __name__ == '__main__':\n"
                  "    sys.argv[0] = re.sub(r'(-script\\.pyw|\\.exe)?$', '', sys.argv[0])\n"
                  "    sys.exit(main())\n")
# A Ctrl-C as the console script imports agentctl's entry module (SIGINT_IN_SITE: earlier,
# from `site`); both before agentctl's main() runs.
IN_IMPORTS = """
import os, signal, sys
class Interrupt:
    def find_spec(self, name, path=None, target=None):
        if name == "supervisor.cli.fast" and os.environ.pop("SIGINT_AT_START", None):
            os.kill(os.getpid(), signal.SIGINT)
        return None
sys.meta_path.insert(0, Interrupt())
"""


def test_the_launcher_blocks_sigint_and_runs_pips_entry_point() -> None:
    for pip_wrote in (PIP_SCRIPT, OLD_PIP_SCRIPT):
        text = launcher_text(pip_wrote)
        assert text == (f"#!/usr/bin/env -S --block-signal=INT {sys.executable}\n"
                        f"{MARK}{ENTRY}")
        assert launcher_text(text) == text  # an install run again keeps it


@pytest.mark.parametrize("script", [
    "#!/opt/my venv/bin/python3\n" + ENTRY,  # env -S would split it
    "#!/opt/$HOME/bin/python3\n" + ENTRY,  # ... or expand it
    f"#!/{'x' * 120}/python3\n" + ENTRY,  # over the 127 bytes old kernels read
    "#!/bin/sh\n'''exec' \"/opt/a b/python3\" \"$0\" \"$@\"\n' '''\n" + ENTRY,  # pip's sh form
    f"#!{sys.executable}\nimport sys\nfrom supervisor.cli.main import main\n",  # not agentctl's
])
def test_pips_script_stays_where_the_launcher_cannot_be_written(script: str) -> None:
    assert launcher_text(script) is None


def test_install_replaces_pips_script_in_place(tmp_path: Path) -> None:
    script = tmp_path / "agentctl"
    script.write_text(PIP_SCRIPT)
    script.chmod(0o755)
    said = install(tmp_path)
    if not env_blocks_signals():
        assert "has no --block-signal" in said and script.read_text() == PIP_SCRIPT
        return
    assert "launcher written" in said and MARK in script.read_text()
    assert script.stat().st_mode & 0o777 == 0o755
    assert sorted(p.name for p in tmp_path.iterdir()) == ["agentctl"]
    assert "in place" in install(tmp_path)
    missing = tmp_path / "other"
    missing.mkdir()
    (missing / "agentctl").write_text(PIP_SCRIPT)
    # An env that is not there (a short path: the shebang it would make must fit the kernel's
    # limit whatever this venv's path, or the script is refused for that reason instead).
    assert "no --block-signal" in install(missing, env="/nonexistent/env")
    assert (missing / "agentctl").read_text() == PIP_SCRIPT


def _start(script: Path, env: dict[str, str], tmp_path: Path
           ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(script), "--version"], capture_output=True, text=True,
                          timeout=60, env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                                           "HOME": str(tmp_path), **env})


@pytest.mark.parametrize("hook", [SIGINT_IN_SITE, IN_IMPORTS], ids=["in-site", "in-imports"])
def test_a_ctrl_c_while_the_interpreter_starts_is_aborted_without_a_traceback(
        tmp_path: Path, hook: str) -> None:
    assert env_blocks_signals(), "this host's env has no --block-signal (coreutils < 8.31)"
    ours, env = launcher_with_hook(tmp_path / "ours", hook, PIP_SCRIPT)
    # Under pip's own script the window is there: Python's KeyboardInterrupt report.
    pip_script = tmp_path / "pip" / "agentctl"
    pip_script.parent.mkdir()
    pip_script.write_text(PIP_SCRIPT)
    pip_script.chmod(0o755)
    before = _start(pip_script, env, tmp_path)
    assert "KeyboardInterrupt" in before.stderr and "Traceback" in before.stderr, before
    after = _start(ours, env, tmp_path)
    assert (after.returncode, after.stderr, after.stdout) == (1, "\nAborted!\n", "")
    # Without a Ctrl-C it is agentctl as before.
    quiet = _start(ours, {k: v for k, v in env.items() if k != "SIGINT_AT_START"}, tmp_path)
    assert quiet.returncode == 0 and quiet.stdout.startswith("agentctl, version "), quiet
