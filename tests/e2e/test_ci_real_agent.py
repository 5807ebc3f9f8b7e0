"""CI mode with a real coding agent: Claude Code, installed from npm, runs under
`agentctl run --embedded --profile claude-code` against a local fake of the Anthropic Messages
API behind the egress gateway. The fake scripts a short session (read a file, edit it, run the
tests); the run must pass its scope guard, the report must count the model calls, and the real
key must never be seen inside the sandbox (its environment, its files, the transcript).
Real npm package, runc, namespaces, gateway and nftables; needs root and npm."""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import require, require_root_and_runc
from tests.support.anthropic_fake import FakeMessagesAPI
from tests.support.embedded import (
    WORKSPACE_UID,
    agentctl_command,
    agentctl_env,
    chown_tree,
    git,
    host_residue,
)
from tests.support.upstream import make_ca

pytestmark = pytest.mark.e2e

# npm installs are cached here, so a machine pays for the download once.
CACHE = Path("/var/cache/agent-supervisor-test/claude-code")
PACKAGE = "@anthropic-ai/claude-code"
REAL_KEY = "sk-ant-real-key-only-the-gateway-holds-0123456789"
FAKE_HOST = "api.anthropic.test"
PROFILE = Path(__file__).resolve().parents[2] / "sandbox_profiles" / "claude-code.toml"


def claude_binary() -> Path:
    """The CLI's native executable, from the platform package npm picked (the wrapper's
    postinstall, which would copy it into place, is not run by npm 11 without approval)."""
    arch = {"x86_64": "x64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())
    return CACHE / "node_modules" / "@anthropic-ai" / f"claude-code-linux-{arch}" / "claude"


@pytest.fixture(scope="module")
def claude() -> Path:
    require_root_and_runc()
    require(shutil.which("npm") is not None, "needs npm (scripts/install-deps.sh installs it)")
    binary = claude_binary()
    if not binary.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--prefix", str(CACHE),
                        PACKAGE], check=True, capture_output=True, timeout=240)
    require(binary.exists(), f"npm install {PACKAGE} gave no {binary}")
    # The sandbox's uid reads it through a read-only bind of the cache.
    for path in (CACHE, *binary.parents):
        if path == CACHE.parent:
            break
        path.chmod(path.stat().st_mode | 0o755)
    return binary


@pytest.fixture
def fake_api(tmp_root: Path) -> Iterator[FakeMessagesAPI]:
    ca = make_ca(tmp_root / "ca", names=(FAKE_HOST,))
    api = FakeMessagesAPI(ca, script=[
        ("Read", {"file_path": "/workspace/src/calc.py"}),
        ("Edit", {"file_path": "/workspace/src/calc.py", "old_string": "return a - b",
                  "new_string": "return a + b"}),
        ("Bash", {"command": "python3 -m unittest discover -s tests -v",
                  "description": "Run the unit tests"}),
    ]).start()
    yield api
    api.stop()


@pytest.fixture
def repo(tmp_root: Path) -> Path:
    repo = tmp_root / "repo"
    (repo / "src").mkdir(parents=True)
    (repo / "tests").mkdir()
    (repo / "src" / "calc.py").write_text("def add(a, b):\n    return a - b\n")
    (repo / "tests" / "test_calc.py").write_text(
        "import sys\nimport unittest\n\nsys.path.insert(0, 'src')\nimport calc  # noqa\n\n\n"
        "class AddTest(unittest.TestCase):\n    def test_add(self):\n"
        "        self.assertEqual(calc.add(2, 3), 5)\n")
    git(repo, "init", "-q", "-b", "main")
    git(repo, "add", "-A")
    git(repo, "-c", "user.name=t", "-c", "user.email=t@example.invalid", "commit", "-q", "-m",
        "initial")
    chown_tree(repo, WORKSPACE_UID)
    return repo


def configure(tmp_root: Path, api: FakeMessagesAPI) -> Path:
    """The shipped claude-code profile, its model route sent to the fake (trusted through the
    test CA) and the npm cache bound read-only; the config that finds both."""
    profiles = tmp_root / "profiles"
    profiles.mkdir()
    text = PROFILE.read_text()
    assert 'upstream = "https://api.anthropic.com"' in text
    text = text.replace('upstream = "https://api.anthropic.com"',
                        f'upstream = "https://{FAKE_HOST}:{api.port}"')
    text = text.replace('host_binds = ["/usr", "/etc"]',
                        f'host_binds = ["/usr", "/etc", "{CACHE}"]')
    (profiles / "claude-code.toml").write_text(text)
    config = tmp_root / "supervisor.toml"
    config.write_text(f'[daemon]\nprofile_dirs = ["{profiles}"]\n\n[egress]\n'
                      f'ca_file = "{api.ca.ca_pem}"\nhosts = {{ "{FAKE_HOST}" = "127.0.0.1" }}\n')
    return config


# After the agent: what the sandbox holds, printed into the transcript for the test to search.
DUMP = r"""
"$@"; status=$?
echo "== agent exited $status"
echo "== environ"; cat /proc/[0-9]*/environ 2>/dev/null | tr '\0' '\n'
echo "== files"; find /tmp /workspace -type f -size -4M -exec cat {} + 2>/dev/null
exit $status
"""


def test_claude_code_fixes_a_test_through_the_gateway_and_never_sees_the_key(
        claude: Path, fake_api: FakeMessagesAPI, repo: Path, tmp_root: Path) -> None:
    state_root = tmp_root / "ci-state"
    config = configure(tmp_root, fake_api)
    report_path = tmp_root / "report.json"
    # Bytes: the dump holds the sandbox's binary files too.
    result = subprocess.run(agentctl_command(
        "run", "--embedded", "--config", str(config), "--profile", "claude-code",
        "--workspace", str(repo), "--allow-changes", "src/**", "--allow-changes", "tests/**",
        "--report", str(report_path), "--timeout", "3m",
        "--", "sh", "-c", DUMP, "agent", str(claude), "-p", "Fix the failing test.",
        "--dangerously-skip-permissions", "--output-format", "text"),
        env=agentctl_env(state_root, MODEL_API_KEY=REAL_KEY), capture_output=True,
        timeout=240, cwd="/")
    transcript = result.stdout + result.stderr
    stdout = result.stdout.decode(errors="replace")
    assert result.returncode == 0, transcript[-6000:].decode(errors="replace")
    assert "== agent exited 0" in stdout and "All tests pass." in stdout
    # The session ran: each scripted tool call came back with its result, the tests passed.
    session = fake_api.session_requests()
    assert len(session) >= 4, [s["path"] for s in fake_api.seen]
    last = json.loads(session[-1]["raw"])
    results = [b for m in last["messages"] if m["role"] == "user" and isinstance(
        m["content"], list) for b in m["content"] if b.get("type") == "tool_result"]
    assert len(results) == 3
    assert "Ran 1 test" in json.dumps(results[2]) and "OK" in json.dumps(results[2])
    assert (repo / "src" / "calc.py").read_text() == "def add(a, b):\n    return a + b\n"
    # The key: only the gateway's requests to the upstream carry it.
    assert all(s["headers"].get("x-api-key") == REAL_KEY for s in fake_api.seen)
    assert "ANTHROPIC_API_KEY=placeholder-the-gateway-adds-the-key" in stdout
    assert "HTTP_PROXY=http://" in stdout  # the session token: all the sandbox can use
    assert "/tmp/.claude" in stdout  # the dump reached the CLI's own files
    assert REAL_KEY.encode() not in transcript
    assert b"Traceback" not in result.stderr
    for dirpath, _, files in os.walk(repo):
        for name in files:
            assert REAL_KEY.encode() not in (Path(dirpath) / name).read_bytes()
    report_text = report_path.read_text()
    assert REAL_KEY not in report_text
    report = json.loads(report_text)
    assert report["ending"] == "exited" and report["exit_status"] == 0
    assert report["scope"]["violations"] == []
    changes = {c["path"] for c in report["manifest"]["changes"]}
    assert "src/calc.py" in changes
    assert report["egress"]["calls"] == len(fake_api.seen)
    assert report["teardown"]["clean"]
    assert host_residue(state_root) == {}
