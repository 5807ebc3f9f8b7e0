"""The defaults made without validating: Config's and Profile's nested sections are default
instances built by `model_construct()`, and a run without a configuration file gets
`Config.model_construct()` (config.py), so a process that defers building its models
(buildmode.py: the embedded runner) builds none of them. Each must equal what validating gives,
field by field, recursively, with the same types and the same fields marked as set, so they
cannot drift apart. No privilege."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import BaseModel

from supervisor import config as config_module
from supervisor.config import Config, load_config
from supervisor.models.network import NetworkPolicy
from supervisor.profiles import Profile
from tests.support.model_diff import differences

REPO = Path(__file__).resolve().parents[2]


def nested_models(model: type[BaseModel]) -> list[tuple[str, BaseModel]]:
    """(field, default instance) of each field whose default is a model."""
    return [(name, field.default) for name, field in model.model_fields.items()
            if isinstance(field.default, BaseModel)]


def test_the_configuration_made_without_validating_is_what_validating_gives() -> None:
    made = Config.model_construct()
    assert differences(made, Config.model_validate({})) == []
    assert differences(made, Config()) == []
    assert made == Config()


@pytest.mark.parametrize("model", [Config, Profile])
def test_every_section_default_is_what_validating_it_gives(model: type[BaseModel]) -> None:
    defaults = nested_models(model)
    # Config: every section but the list of webhooks and the optional fleet; Profile: every
    # policy (the rest are plain values).
    assert len(defaults) == {Config: 17, Profile: 7}[model]
    for name, default in defaults:
        assert differences(default, type(default).model_validate({}), name) == []


def test_a_profile_made_of_defaults_is_what_validating_gives() -> None:
    made = Profile.model_construct(name="p")
    assert differences(made, Profile.model_validate({"name": "p"})) == []
    assert differences(Profile.model_construct(), Profile()) == []


def test_the_comparison_sees_a_drift() -> None:
    """It would catch a default that validating changes (a normalised value, another type,
    other fields marked as set), not only a missing field."""
    made = Config.model_construct()
    drifted = made.model_copy(update={"sandbox": made.sandbox.model_copy(
        update={"cgroup_parent": "/agent-supervisor/"})})
    assert ".sandbox.cgroup_parent: '/agent-supervisor/' != '/agent-supervisor'" in \
        differences(drifted, Config())
    assert differences(made, Config.model_validate({"kill": {}})) == [
        ".: fields set set() != {'kill'}"]
    assert differences(made.daemon.model_copy(update={"log_retention": 604800}),
                       made.daemon) == [
        ".: fields set {'log_retention'} != set()", ".log_retention: int != float"]


def test_without_a_file_the_configuration_is_every_default(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(config_module, "DEFAULT_CONFIG_PATH", tmp_path / "absent.toml")
    loaded = load_config(None)
    assert differences(loaded, Config()) == []


_DEFERRED_PROBE = """
import json, sys
from supervisor import buildmode
buildmode.DEFER_BUILD = True
from pathlib import Path
from pydantic import BaseModel
from supervisor import config
config.DEFAULT_CONFIG_PATH = Path(sys.argv[1])
from supervisor.ci.runner import embedded_config
from supervisor.profiles import Profile
from tests.support.model_diff import differences
narrowed = embedded_config(config.load_config(None), Path("/run/x"), 3)
models = [m for m in vars(config).values() if isinstance(m, type) and issubclass(m, BaseModel)
          and m is not BaseModel]
policies = [type(f.default) for f in Profile.model_fields.values()
            if isinstance(f.default, BaseModel)]
Profile.model_validate({"name": "p", "limits": {"pids": 100}})
print(json.dumps({"narrowed": narrowed.sandbox.name_prefix, "models": len(models),
                  "built": sorted(m.__name__ for m in [*models, Profile, *policies]
                                  if m.__pydantic_complete__)}))
"""


def test_a_process_that_defers_builds_no_configuration_model_without_a_file(
        tmp_path: Path) -> None:
    """With building deferred (the embedded runner), the defaults and their narrowing to a
    slot build none of the configuration's 21 models; making a Profile of defaults builds only
    Profile itself (here, by validating), not its policies on their own."""
    done = subprocess.run([sys.executable, "-c", _DEFERRED_PROBE, str(tmp_path / "absent")],
                          capture_output=True, text=True, cwd=REPO, check=True)
    seen = json.loads(done.stdout)
    assert seen["narrowed"] == "asci3"
    assert seen["models"] == 21
    assert seen["built"] == ["Profile"]


def test_eager_processes_build_every_model_as_it_is_defined() -> None:
    """The daemon, the tests and every other process (buildmode.DEFER_BUILD unset): nothing
    waits for a first use."""
    assert Config.__pydantic_complete__ and NetworkPolicy.__pydantic_complete__
    assert all(type(d).__pydantic_complete__ for _, d in nested_models(Profile))
