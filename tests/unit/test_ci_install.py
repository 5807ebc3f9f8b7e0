"""How CI mode and the service are installed: the GitHub Action (action.yml) and the GitLab
template (ci-templates/) both run scripts/install-ci.sh, whose Debian packages come from the one
list in scripts/lib/packages.sh, and that list holds the package of every host program the code
executes (tini's static build for every sandbox's PID 1, gosu and busybox for docker runs, runc,
nft, nsenter, git). The action declares every output supervisor/ci/action.py writes. No root; dpkg's
database is read only."""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

from supervisor.ci.action import outputs
from supervisor.config import Config
from supervisor.runtime.init import DEFAULT_INIT_BINARY
from supervisor.runtime.network_gate import DEFAULT_SHELL_BINARY
from supervisor.runtime.uid_drop import DEFAULT_DROP_BINARY

ROOT = Path(__file__).resolve().parents[2]
SEARCH = ("/usr/sbin", "/usr/bin", "/sbin", "/bin")


def packages(kind: str) -> set[str]:
    done = subprocess.run(["bash", str(ROOT / "scripts/lib/packages.sh"), kind],
                          capture_output=True, text=True, check=True)
    return set(done.stdout.split())


def program_package(program: str) -> str:
    """The Debian package that ships `program` (a name looked up as the daemon's PATH would,
    or an absolute path), from dpkg's database (usrmerge: /usr/sbin/x may be listed as /sbin/x)."""
    paths = [program] if program.startswith("/") else [f"{d}/{program}" for d in SEARCH]
    for path in paths:
        for candidate in (path, path.removeprefix("/usr")):
            found = subprocess.run(["dpkg-query", "-S", candidate], capture_output=True,
                                   text=True)
            if found.returncode == 0:
                return found.stdout.split(":")[0].split(",")[0].strip()
    raise AssertionError(f"no Debian package ships {program}")


def required_programs() -> dict[str, str]:
    """What a run executes on the host, as the code names it, and why."""
    config = Config()
    return {
        config.sandbox.init: "every sandbox's PID 1 (supervisor/runtime/init.py)",
        DEFAULT_INIT_BINARY: "the init's default",
        DEFAULT_DROP_BINARY: "a docker run's drop to the agent's uid (runtime/uid_drop.py)",
        DEFAULT_SHELL_BINARY: "a docker gateway run's network gate (runtime/network_gate.py)",
        config.sandbox.runc_path: "the sandbox runtime",
        "nft": "the egress gateway's table (supervisor/egress/nft.py)",
        "nsenter": "the run's user namespace limits (supervisor/sandbox/userns.py)",
        "ip": "scripts/uninstall.sh deletes leftover network namespaces",
    }


@pytest.mark.parametrize("kind", ["runtime", "service", "ci"])
def test_each_package_list_ships_every_program_a_run_executes(kind: str) -> None:
    listed = packages(kind)
    for program, why in required_programs().items():
        assert program_package(program) in listed, (kind, program, why)
    assert "tini" in listed and "python3-venv" in listed
    assert packages("runtime") <= listed


def test_ci_and_the_service_add_what_they_use() -> None:
    assert program_package("git") in packages("ci")  # provenance, the checkout copy
    assert "ca-certificates" in packages("ci")
    assert program_package("systemctl") in packages("service")


def _install_commands(script: str) -> list[list[str]]:
    return [shlex.split(line) for line in script.splitlines()
            if "apt-get install" in line or "install-ci.sh" in line]


def test_the_action_installs_with_install_ci_sh_and_no_list_of_its_own() -> None:
    action = yaml.safe_load((ROOT / "action.yml").read_text())
    install = action["runs"]["steps"][0]["run"]
    assert "apt-get" not in install and "pip install agent-supervisor" not in install
    commands = _install_commands(install)
    assert commands == [["sudo", "bash", "$GITHUB_ACTION_PATH/scripts/install-ci.sh",
                         "/opt/agent-supervisor/venv"]]
    assert (ROOT / "scripts/install-ci.sh").exists()


def test_the_gitlab_template_installs_with_install_ci_sh_from_its_clone() -> None:
    template = yaml.safe_load(
        (ROOT / "ci-templates/agent-supervisor.gitlab-ci.yml").read_text())
    script = "\n".join(template[".agent-supervisor"]["script"])
    commands = _install_commands(script)
    apt, install = commands
    # Only what fetching the supervisor needs comes before; the rest is install-ci.sh's list.
    bootstrap = set(apt[apt.index("--no-install-recommends") + 1:]) - {">/dev/null"}
    assert bootstrap <= packages("ci"), bootstrap
    assert install == ["bash", "/opt/agent-supervisor/src/scripts/install-ci.sh",
                       "/opt/agent-supervisor/venv"]
    assert 'git clone -q "$AGENT_SUPERVISOR_GIT" /opt/agent-supervisor/src' in script
    assert "pip install" not in script  # install-ci.sh builds the venv


@pytest.mark.parametrize("variable,globs", [
    ("src/**\ntests/**", ["src/**", "tests/**"]),  # YAML's "src/**\ntests/**": a newline
    ("src/**\\ntests/**", ["src/**", "tests/**"]),  # typed on one line: a literal \n
    ("\\!src/keep.py\n\\#notes\nsrc/\\*.py\na\\\\b\nx\\c", [
        "\\!src/keep.py", "\\#notes", "src/\\*.py", "a\\\\b", "x\\c"]),  # as written
    ("", []),
])
def test_the_gitlab_template_passes_each_glob_as_written(variable: str,
                                                        globs: list[str]) -> None:
    """The template's own line, run by sh as the job runs it: one glob a line, and a glob's
    backslashes (gitignore's escapes) untouched."""
    template = yaml.safe_load(
        (ROOT / "ci-templates/agent-supervisor.gitlab-ci.yml").read_text())
    [line] = [c for c in template[".agent-supervisor"]["script"]
              if "INPUT_ALLOW_CHANGES=" in c]
    done = subprocess.run(["sh", "-c", f'{line}\nprintf "%s" "$INPUT_ALLOW_CHANGES"'],
                          env={"PATH": "/usr/bin:/bin", "AGENT_ALLOW_CHANGES": variable,
                               "CI_PROJECT_DIR": "/builds/p"},
                          capture_output=True, text=True, check=True)
    assert done.stdout.splitlines() == globs


def test_install_ci_sh_uses_the_shared_lists() -> None:
    text = (ROOT / "scripts/install-ci.sh").read_text()
    assert 'ensure_packages install-ci "${CI_PACKAGES[@]}"' in text
    assert 'build_runtime_venv "$VENV"' in text
    service = (ROOT / "scripts/install.sh").read_text()
    assert 'ensure_packages install "${SERVICE_PACKAGES[@]}"' in service
    deps = (ROOT / "scripts/install-deps.sh").read_text()
    assert '"${SERVICE_PACKAGES[@]}" "${CI_PACKAGES[@]}"' in deps


def test_the_action_declares_exactly_the_outputs_the_script_writes() -> None:
    action = yaml.safe_load((ROOT / "action.yml").read_text())
    report = {"ending": "exited", "signature": {"key_id": "k"}}
    assert set(action["outputs"]) == set(outputs(report, 0, "r")) == set(
        outputs(None, 125, "r"))
    for name, spec in action["outputs"].items():
        assert spec["value"] == f"${{{{ steps.run.outputs.{name} }}}}"
        assert spec["description"]
