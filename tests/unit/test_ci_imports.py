"""What an embedded CI run imports before it knows it needs it. The runner (`python -I -m
supervisor.ci`) loads the supervisor's core for one run; modules only the daemon's other
surfaces or a gateway run use stay out: pyroute2 (a gateway run's veth only), the gateway's
own process code and aiohttp, the gateway worker's handle and the MCP servers' launcher,
the audit verifier's process (and cryptography, loaded only to sign a report), pyprctl, the
webhook outbox, metrics, the fleet, the API server, importlib.metadata, a workspace's
modules, importlib.resources and, until the sampler first walks a run's processes, psutil
(the lists: tests/support/ci_imports.py). Checked in a subprocess with a clean interpreter; no
privilege."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from supervisor.ci import ENV_VAR
from tests.support.ci_imports import (
    BUILT_AT_THE_RUNNERS_START,
    NOT_AT_THE_RUNNERS_START,
    models_built,
    runner_modules,
    unwanted,
)

REPO = Path(__file__).resolve().parents[2]

def test_the_ci_runner_imports_only_what_a_run_uses() -> None:
    """The runner's real entry point, refusing at once (no spec): every module it loads to
    start, none of those a plain run does not use (tests/e2e/test_ci_run_imports.py checks a
    whole run of `true`)."""
    env = {k: v for k, v in os.environ.items() if k != ENV_VAR}
    done, modules = runner_modules(env, REPO)
    assert "invalid_request" in done.stderr  # it started, read no spec and refused
    assert "supervisor.daemon.core" in modules and "supervisor.ci.runner" in modules
    assert unwanted(modules, NOT_AT_THE_RUNNERS_START) == []


def test_the_runners_hashes_without_openssl_give_openssls_digests() -> None:
    """The runner loads hashlib and hmac with `_hashlib` unimportable (ci/__main__.py), then
    makes it importable again: the audit chain's sha256, a gateway link's blake2b and an
    HMAC come out as OpenSSL's do here, and a later import of `_hashlib` by name works."""
    code = (
        "import sys\n"
        "sys.modules['_hashlib'] = None\n"
        "import hashlib, hmac, json, secrets\n"
        "del sys.modules['_hashlib']\n"
        "import _hashlib\n"
        "assert hashlib.sha256 is not _hashlib.openssl_sha256\n"
        "print(json.dumps([hashlib.sha256(b'row').hexdigest(),\n"
        "                  hashlib.blake2b(b'id', digest_size=6).hexdigest(),\n"
        "                  hmac.new(b'k', b'm', hashlib.sha256).hexdigest(),\n"
        "                  hmac.compare_digest(b'a', b'a'), len(secrets.token_hex(4))]))\n")
    done = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True,
                          check=True)
    import hashlib
    import hmac
    assert json.loads(done.stdout) == [
        hashlib.sha256(b"row").hexdigest(), hashlib.blake2b(b"id", digest_size=6).hexdigest(),
        hmac.new(b"k", b"m", hashlib.sha256).hexdigest(), True, 8]


def test_the_ci_runner_builds_only_the_models_that_cannot_wait() -> None:
    """The runner defers building every model that can wait for its first use (buildmode.py):
    as it starts it has built the kill path's models (a kill never waits for one), the records
    every run makes and its spec's, and none of the configuration's, the profile's or the
    API's other views."""
    env = {k: v for k, v in os.environ.items() if k != ENV_VAR}
    done, _ = runner_modules(env, REPO)
    assert "invalid_request" in done.stderr
    assert models_built(done) == sorted(BUILT_AT_THE_RUNNERS_START)


def test_the_stand_in_plugin_loader_answers_as_pydantic_does(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """ci/no_plugins.py replaces pydantic's loader only in the runner, which sets
    PYDANTIC_DISABLE_PLUGINS=__all__: with that setting pydantic's own answer is no plugins,
    and the stand-in's is the same; pydantic still asks the loader under that name."""
    import inspect

    from pydantic.plugin import _loader, _schema_validator

    from supervisor.ci import no_plugins

    monkeypatch.setenv("PYDANTIC_DISABLE_PLUGINS", "__all__")
    assert list(_loader.get_plugins()) == list(no_plugins.get_plugins()) == []
    assert _loader.__name__ == no_plugins.MODULE
    assert "from ._loader import get_plugins" in inspect.getsource(_schema_validator)
    assert inspect.signature(_loader.get_plugins).parameters.keys() == \
        inspect.signature(no_plugins.get_plugins).parameters.keys()


# agentctl's side of an embedded run, up to the exec into the runner: the fast path reads argv
# (cli/fast.py, cli/embedded.py) and builds the runner's spec without click, pydantic, the API
# client or any of the daemon's code, and without the standard library's modules that build
# enums or compile regular expressions as they load (signal, json, re, enum; collections):
# each a millisecond or more of every embedded run's start.
NOT_IN_AGENTCTL_BEFORE_THE_EXEC = (
    "click", "pydantic", "pathlib", "asyncio", "typing", "supervisor.cli.main",
    "supervisor.cli.verbs", "supervisor.api", "supervisor.models", "supervisor.daemon",
    "supervisor.ci.runner", "supervisor.ci.spec", "supervisor.config", "supervisor.profiles",
    "signal", "json", "re", "enum", "collections", "functools",
)

# agentctl's entry point as the console script runs it, up to its exec into the runner, where
# it prints the modules it has loaded instead.
_AGENTCTL_PROBE = """
import os, sys
sys.argv = ["agentctl", "run", "--embedded", "--workspace", "/tmp", "--env", "A=1",
            "--report", "/tmp/r.json", "--", "true"]
def _exec(path, argv, env):
    assert argv[1] == "-I" and "supervisor.ci" in argv[-1]
    assert "AGENT_SUPERVISOR_EMBEDDED_RUN" in env
    os.write(1, "\\n".join(sorted(sys.modules)).encode())
    os._exit(0)
os.execve = _exec
from supervisor.cli import fast
fast.main()
"""


def test_agentctl_reaches_the_runner_without_click_or_pydantic() -> None:
    result = subprocess.run([sys.executable, "-c", _AGENTCTL_PROBE], capture_output=True,
                            text=True, cwd=REPO, check=True,
                            env={**os.environ, "PYTHONIOENCODING": "utf-8"})
    modules = result.stdout.split("\n")
    assert "supervisor.cli.embedded" in modules and "supervisor.cli.fast" in modules
    unwanted = sorted(m for m in modules for heavy in NOT_IN_AGENTCTL_BEFORE_THE_EXEC
                      if m == heavy or m.startswith(heavy + "."))
    assert unwanted == []


_MODELS_PROBE = """
import json, sys
import supervisor.models as models
LAZY = ("supervisor.models.api", "supervisor.models.views")
seen = {"at_import": any(m in sys.modules for m in LAZY),
        "unknown": hasattr(models, "NoSuchModel"), "private": hasattr(models, "_Nothing")}
seen["after_misses"] = any(m in sys.modules for m in LAZY)
from supervisor.models import api, views
seen["unresolved"] = [n for n in models.__all__ if not hasattr(models, n)]
seen["from_api"] = sorted(n for n in models.__all__ if n not in vars(models)
                          and getattr(models, n) is not getattr(
                              views if n in views.__all__ else api, n))
seen["lazy"] = sorted(n for n in models.__all__ if n not in vars(models))
print(json.dumps(seen))
"""


def test_the_api_models_load_by_name_at_their_first_use() -> None:
    """supervisor.models names the control API's own shapes and the core's on-request views in
    __all__ and loads supervisor/models/api.py or views.py only when one of them is asked for:
    not at its import, not for a name it does not have; every name it exports resolves."""
    result = subprocess.run([sys.executable, "-c", _MODELS_PROBE], capture_output=True,
                            text=True, cwd=REPO, check=True)
    seen = json.loads(result.stdout)
    assert seen["at_import"] is False and seen["after_misses"] is False
    assert seen["unknown"] is False and seen["private"] is False
    assert seen["unresolved"] == [] and seen["from_api"] == []
    assert {"Health", "AgentList", "DrillResult", "ReloadResult"} <= set(seen["lazy"])
    assert {"AgentView", "Approval", "AuditVerifyResult"} <= set(seen["lazy"])
