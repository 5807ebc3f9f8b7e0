"""agentctl's own launcher, written over the console script pip generates (the install scripts
run `python -m supervisor.cli.launcher VENV` after pip): pip's script, started through
`/usr/bin/env -S --block-signal=INT`, so SIGINT is blocked from the exec on.

Why: between the exec and the first line of agentctl's entry point (cli/fast.py's main) the
interpreter starts (`site`, the launcher's and agentctl's first imports, ~10 ms), and CPython
has installed its own SIGINT handler by then: a Ctrl-C there ended in a KeyboardInterrupt
traceback, and no code of agentctl's can run sooner. Blocked, it stays pending until main()
takes it (main unblocks SIGINT once its own handler is set; an embedded run hands it on to
the runner, which cancels the run, every other path answers "Aborted!"). A Ctrl-C before env
has blocked it ends env by the signal's default action, which prints nothing. The cost is one
exec of env (measured in docs/benchmarks.md).

Where the launcher cannot be written as is, pip's stays (with the window): an env without
--block-signal (GNU coreutils before 8.31), an interpreter path env -S would split or expand
(whitespace, quotes, backslashes, `$`), a shebang over the 127 bytes old kernels read, or a
console script pip wrote in its /bin/sh form. pip writes its own script again on every
install, so the install scripts write the launcher after each. Needs no privilege beyond
writing the venv."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ENV = "/usr/bin/env"
# Bytes of the shebang line every kernel reads (BINPRM_BUF_SIZE was 128 before Linux 5.1).
SHEBANG_MAX = 127
# What pip (23.1 and later) writes for `agentctl = "supervisor.cli.fast:main"` (pyproject.toml)
# after its shebang; the launcher's body whatever pip's version wrote.
ENTRY = ("import sys\nfrom supervisor.cli.fast import main\nif __name__ == '__main__':\n"
         "    sys.argv[0] = sys.argv[0].removesuffix('.exe')\n    sys.exit(main())\n")
_PLAIN_PATH = re.compile(r"/[A-Za-z0-9._+/@:,=-]+")
MARK = "# agentctl's launcher (supervisor/cli/launcher.py): SIGINT blocked from the exec on\n"


def env_blocks_signals(env: str = ENV) -> bool:
    """Whether `env` has --block-signal (GNU coreutils 8.31 and later)."""
    try:
        return subprocess.run([env, "--block-signal=INT", "true"], capture_output=True,
                              timeout=10, check=False).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def launcher_text(console_script: str, env: str = ENV) -> str | None:
    """The launcher for pip's `console_script` text, or None where it cannot be written."""
    first, _, rest = console_script.partition("\n")
    if MARK in rest:
        return console_script  # already the launcher (an install run again)
    if not first.startswith("#!") or "from supervisor.cli.fast import main\n" not in rest:
        return None  # pip's /bin/sh form for long paths, or not agentctl's console script
    python = first[2:].strip()
    if not _PLAIN_PATH.fullmatch(python) or not Path(python).name.startswith("python"):
        return None
    shebang = f"#!{env} -S --block-signal=INT {python}"
    if len(shebang.encode()) > SHEBANG_MAX:
        return None
    return f"{shebang}\n{MARK}{ENTRY}"


def install(bin_dir: Path, env: str = ENV) -> str:
    """Put the launcher in place of `bin_dir`/agentctl (atomically, the same mode); what was
    done, for the install's log."""
    script = bin_dir / "agentctl"
    current = script.read_text()
    text = launcher_text(current, env)
    if text is None:
        return f"{script}: left as pip wrote it (not a console script this launcher can replace)"
    if text == current:
        return f"{script}: the launcher is in place"
    if not env_blocks_signals(env):
        return f"{script}: left as pip wrote it ({env} has no --block-signal)"
    staged = script.with_name(".agentctl.launcher")
    staged.write_text(text)
    os.chmod(staged, script.stat().st_mode & 0o7777)
    os.replace(staged, script)
    return f"{script}: launcher written (SIGINT blocked until agentctl takes it)"


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m supervisor.cli.launcher VENV", file=sys.stderr)
        return 2
    print(f"launcher: {install(Path(argv[0]) / 'bin')}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
