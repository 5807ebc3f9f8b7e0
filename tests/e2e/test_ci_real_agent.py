"""CI mode with real coding agents, each installed from npm and run under `agentctl run
--embedded` with its shipped profile against a local fake of its vendor's API behind the egress
gateway: Claude Code (the Anthropic Messages API) and Codex CLI (OpenAI's Responses API). Each
fake scripts a short session (read a file, edit it, run the tests); the run must pass its scope
guard, the report must list the model calls, and the real key must never be seen inside the
sandbox (its environment, its files, the transcript). Real npm packages, runc, namespaces,
gateway and nftables; needs root and npm."""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

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
from tests.support.openai_fake import INPUT_TOKENS, OUTPUT_TOKENS, FakeResponsesAPI, tool_outputs
from tests.support.upstream import make_ca

pytestmark = pytest.mark.e2e

# npm installs are cached here, so a machine pays for the download once.
CACHE = Path("/var/cache/agent-supervisor-test/claude-code")
PACKAGE = "@anthropic-ai/claude-code"
REAL_KEY = "sk-ant-real-key-only-the-gateway-holds-0123456789"
FAKE_HOST = "api.anthropic.test"
PROFILES = Path(__file__).resolve().parents[2] / "sandbox_profiles"
PROFILE = PROFILES / "claude-code.toml"
CODEX_CACHE = Path("/var/cache/agent-supervisor-test/codex")
CODEX_PACKAGE = "@openai/codex"
OPENAI_KEY = "sk-proj-real-key-only-the-gateway-holds-9876543210"
OPENAI_HOST = "api.openai.test"
ARCH = {"x86_64": "x64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())


def claude_binary() -> Path:
    """The CLI's native executable, from the platform package npm picked (the wrapper's
    postinstall, which would copy it into place, is not run by npm 11 without approval)."""
    return CACHE / "node_modules" / "@anthropic-ai" / f"claude-code-linux-{ARCH}" / "claude"


def codex_binary() -> Path:
    """Codex's native (static musl) executable, from the platform package npm picked."""
    triple = {"x64": "x86_64", "arm64": "aarch64"}.get(ARCH, ARCH) + "-unknown-linux-musl"
    return (CODEX_CACHE / "node_modules" / "@openai" / f"codex-linux-{ARCH}" / "vendor"
            / triple / "bin" / "codex")


def npm_installed(cache: Path, package: str, binary: Path) -> Path:
    require_root_and_runc()
    require(shutil.which("npm") is not None, "needs npm (scripts/install-deps.sh installs it)")
    if not binary.exists():
        cache.mkdir(parents=True, exist_ok=True)
        subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--prefix", str(cache),
                        package], check=True, capture_output=True, timeout=240)
    require(binary.exists(), f"npm install {package} gave no {binary}")
    # The sandbox's uid reads it through a read-only bind of the cache.
    for path in (cache, *binary.parents):
        if path == cache.parent:
            break
        path.chmod(path.stat().st_mode | 0o755)
    return binary


@pytest.fixture(scope="module")
def claude() -> Path:
    return npm_installed(CACHE, PACKAGE, claude_binary())


@pytest.fixture(scope="module")
def codex() -> Path:
    return npm_installed(CODEX_CACHE, CODEX_PACKAGE, codex_binary())


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


def configure(tmp_root: Path, api: FakeMessagesAPI | FakeResponsesAPI, profile: str = "claude-code",
              vendor: str = "https://api.anthropic.com", fake_host: str = FAKE_HOST,
              cache: Path = CACHE) -> Path:
    """The shipped profile, its model route sent to the fake (trusted through the test CA) and
    the npm cache bound read-only; the config that finds both."""
    profiles = tmp_root / "profiles"
    profiles.mkdir()
    text = (PROFILES / f"{profile}.toml").read_text()
    assert f'upstream = "{vendor}"' in text
    text = text.replace(f'upstream = "{vendor}"', f'upstream = "https://{fake_host}:{api.port}"')
    text = text.replace('host_binds = ["/usr", "/etc"]',
                        f'host_binds = ["/usr", "/etc", "{cache}"]')
    (profiles / f"{profile}.toml").write_text(text)
    config = tmp_root / "supervisor.toml"
    config.write_text(f'[daemon]\nprofile_dirs = ["{profiles}"]\n\n[egress]\n'
                      f'ca_file = "{api.ca.ca_pem}"\nhosts = {{ "{fake_host}" = "127.0.0.1" }}\n')
    return config


# After the agent: what the sandbox holds, printed into the transcript for the test to search.
DUMP = r"""
"$@"; status=$?
echo "== agent exited $status"
echo "== environ"; cat /proc/[0-9]*/environ 2>/dev/null | tr '\0' '\n'
echo "== files"; find /tmp /workspace -type f -size -4M -exec cat {} + 2>/dev/null
exit $status
"""


def check_the_run(result: subprocess.CompletedProcess[bytes], report_path: Path, repo: Path,
                  seen: list[dict[str, Any]], real_key: str, key_header: str,
                  tokens_per_turn: int, model_path: str) -> None:
    """What every real agent's run must show: it fixed the code and passed its scope guard,
    the report lists each model call the fake saw, and the real key reached only the fake."""
    transcript = result.stdout + result.stderr
    stdout = result.stdout.decode(errors="replace")
    assert result.returncode == 0, transcript[-6000:].decode(errors="replace")
    assert "== agent exited 0" in stdout and "All tests pass." in stdout
    assert (repo / "src" / "calc.py").read_text() == "def add(a, b):\n    return a + b\n"
    # The key: only the gateway's requests to the upstream carry it.
    assert seen and all(real_key in s["headers"].get(key_header, "") for s in seen)
    assert "HTTP_PROXY=http://" in stdout  # the session token: all the sandbox can use
    assert real_key.encode() not in transcript
    assert b"Traceback" not in result.stderr
    for dirpath, _, files in os.walk(repo):
        for name in files:
            assert real_key.encode() not in (Path(dirpath) / name).read_bytes()
    report_text = report_path.read_text()
    assert real_key not in report_text
    report = json.loads(report_text)
    assert report["ending"] == "exited" and report["exit_status"] == 0
    assert report["scope"]["violations"] == []
    changes = {c["path"] for c in report["manifest"]["changes"]}
    assert "src/calc.py" in changes
    assert report["egress"]["calls"] == len(seen)
    # Each call is listed, as the fake saw it (the order they ended in may differ).
    listed = report["egress"]["model_calls"]
    assert listed["unrecorded"] == 0
    assert sorted((c["method"], c["path"]) for c in listed["calls"]) == sorted(
        (s["method"], urlsplit(s["path"]).path) for s in seen)
    turns = [c for c in listed["calls"] if c["path"] == model_path]
    assert len(turns) >= 4
    assert all((c["status"], c["route"], c["tokens"]) == (200, "model", tokens_per_turn)
               and c["request_bytes"] > 0 and c["reply_bytes"] > 0 for c in turns)
    assert report["teardown"]["clean"]


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
    stdout = result.stdout.decode(errors="replace")
    # The session ran: each scripted tool call came back with its result, the tests passed.
    session = fake_api.session_requests()
    assert len(session) >= 4, ([s["path"] for s in fake_api.seen],
                               (result.stdout + result.stderr)[-6000:])
    last = json.loads(session[-1]["raw"])
    results = [b for m in last["messages"] if m["role"] == "user" and isinstance(
        m["content"], list) for b in m["content"] if b.get("type") == "tool_result"]
    assert len(results) == 3
    assert "Ran 1 test" in json.dumps(results[2]) and "OK" in json.dumps(results[2])
    assert "ANTHROPIC_API_KEY=placeholder-the-gateway-adds-the-key" in stdout
    assert "/tmp/.claude" in stdout  # the dump reached the CLI's own files
    # The fake's usage: 120 input tokens in message_start, 30 output in message_delta.
    check_the_run(result, report_path, repo, fake_api.seen, REAL_KEY, "x-api-key", 150,
                  "/v1/messages")
    assert host_residue(state_root) == {}


@pytest.fixture
def fake_openai(tmp_root: Path) -> Iterator[FakeResponsesAPI]:
    ca = make_ca(tmp_root / "ca-openai", names=(OPENAI_HOST,))
    api = FakeResponsesAPI(ca, script=[
        "cat src/calc.py",
        "sed -i 's/return a - b/return a + b/' src/calc.py",
        "python3 -m unittest discover -s tests -v",
    ]).start()
    yield api
    api.stop()


# Codex 0.171 takes its endpoint from its configuration, not from OPENAI_BASE_URL; a provider
# of its own with the Responses wire API also keeps it off the WebSocket transport it tries
# first against api.openai.com. CODEX_HOME (the run's /tmp) must exist before it starts.
CODEX_PROVIDER = ('model_providers.gateway={name="gateway", base_url="http://openai.gateway/v1",'
                  ' env_key="OPENAI_API_KEY", wire_api="responses"}')


def test_codex_fixes_a_test_through_the_gateway_and_never_sees_the_key(
        codex: Path, fake_openai: FakeResponsesAPI, repo: Path, tmp_root: Path) -> None:
    state_root = tmp_root / "ci-state"
    config = configure(tmp_root, fake_openai, "codex", "https://api.openai.com", OPENAI_HOST,
                       CODEX_CACHE)
    report_path = tmp_root / "report.json"
    result = subprocess.run(agentctl_command(
        "run", "--embedded", "--config", str(config), "--profile", "codex",
        "--workspace", str(repo), "--allow-changes", "src/**", "--allow-changes", "tests/**",
        "--report", str(report_path), "--timeout", "3m",
        "--", "sh", "-c", 'mkdir -p "$CODEX_HOME" && exec sh -c "$0" agent "$@" </dev/null', DUMP,
        str(codex), "exec", "-c", CODEX_PROVIDER, "-c", "model_provider=gateway",
        "-m", "gpt-fake", "--skip-git-repo-check", "--dangerously-bypass-approvals-and-sandbox",
        "Fix the failing test."),
        env=agentctl_env(state_root, MODEL_API_KEY=OPENAI_KEY), capture_output=True,
        timeout=240, cwd="/")
    stdout = result.stdout.decode(errors="replace")
    session = fake_openai.session_requests()
    assert len(session) >= 4, ([s["path"] for s in fake_openai.seen],
                               (result.stdout + result.stderr)[-6000:])
    outputs = tool_outputs(json.loads(session[-1]["raw"]))
    assert len(outputs) == 3
    assert "return a - b" in json.dumps(outputs[0])
    assert "Ran 1 test" in json.dumps(outputs[2]) and "OK" in json.dumps(outputs[2])
    assert "OPENAI_API_KEY=placeholder-the-gateway-adds-the-key" in stdout
    assert "/tmp/.codex" in stdout
    check_the_run(result, report_path, repo, fake_openai.seen, OPENAI_KEY, "authorization",
                  INPUT_TOKENS + OUTPUT_TOKENS, "/v1/responses")
    assert host_residue(state_root) == {}
