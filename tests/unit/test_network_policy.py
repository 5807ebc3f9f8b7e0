"""A profile's `[network]` (supervisor/models/network.py): the gateway policy's models load only
for a profile that states `[network.gateway]` or code that reads `.gateway`, and what a stated
table accepts, and every error it gets, is what a plain `gateway: GatewayPolicy` field gave
(the shape NetworkPolicy had before, rebuilt here as the reference). Pure; no privilege."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any, Literal

import pytest
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from supervisor.models.egress import GatewayPolicy
from supervisor.models.network import NetworkPolicy, default_gateway_policy

REPO = Path(__file__).resolve().parents[2]


class _PlainNetwork(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: Literal["none", "gateway"] = "none"
    gateway: GatewayPolicy = GatewayPolicy()

    @model_validator(mode="after")
    def _consistent(self) -> _PlainNetwork:
        if self.mode == "none" and (self.gateway.allow or self.gateway.routes
                                    or self.gateway.mcp.servers):
            raise ValueError("gateway allow-list, routes or MCP servers are set but mode is "
                             "'none'; set mode = \"gateway\"")
        return self


_ROUTE = {"name": "llm", "host": "llm.gateway", "upstream": "https://api.example.com/v1",
          "secret": "env:KEY"}
_SERVER = {"name": "docs", "url": "https://mcp.example.com/mcp"}

CASES: list[Any] = [
    {},
    {"mode": "none"},
    {"mode": "gateway"},
    {"mode": "gateway", "gateway": {}},
    {"mode": "none", "gateway": {"token_ttl": "5m"}},
    {"mode": "gateway", "gateway": {"allow": ["pypi.org:443", "*.example.com"],
                                    "routes": [_ROUTE], "approvals": ["POST /v1/x*"],
                                    "mcp": {"servers": [_SERVER]}}},
    {"mode": "none", "gateway": {"allow": ["pypi.org:443"]}},
    {"mode": "none", "gateway": {"mcp": {"servers": [_SERVER]}}},
    {"mode": "gateway", "gateway": {"bogus": 1}},
    {"mode": "gateway", "gateway": {"token_ttl": "soon", "max_pending_approvals": 0}},
    {"mode": "gateway", "gateway": {"routes": [{"name": "llm"}]}},
    {"mode": "gateway", "gateway": {"routes": [_ROUTE, _ROUTE]}},
    {"mode": "gateway", "gateway": {"allow": ["10.0.0.1:443"]}},
    {"mode": "gateway", "gateway": {"mcp": {"servers": [{"name": "x"}], "methods": ["nope"]}}},
    {"mode": "gateway", "gateway": {"budget": {"run": {"bytes": "12Q"}}}},
    {"mode": "gateway", "gateway": "everything"},
    {"mode": "gateway", "gateway": ["a"]},
    {"mode": "bridge", "gateway": {"bogus": 1}},
    {"mode": "gateway", "gateway": {"bogus": 1}, "extra": True},
]


def _outcome(model: type[BaseModel], data: Any) -> Any:
    try:
        policy: Any = model.model_validate(data)
    except ValidationError as exc:
        return [(e["type"], e["loc"], e["msg"]) for e in exc.errors()]
    return (policy.mode, policy.gateway)


@pytest.mark.parametrize("data", CASES)
def test_a_stated_gateway_validates_as_a_plain_field_did(data: Any) -> None:
    assert _outcome(NetworkPolicy, data) == _outcome(_PlainNetwork, data)


def test_an_unstated_gateway_is_every_default_and_dumps_back() -> None:
    policy = NetworkPolicy(mode="gateway")
    assert policy.stated_gateway is None
    assert policy.gateway == GatewayPolicy() and policy.gateway is default_gateway_policy()
    stated = NetworkPolicy.model_validate({"mode": "gateway", "gateway": {"routes": [_ROUTE]}})
    dumped = json.loads(stated.model_dump_json())
    assert set(dumped) == {"mode", "gateway"}  # read and written under the same names
    assert NetworkPolicy.model_validate(dumped) == stated
    assert NetworkPolicy(gateway=stated.gateway, mode="gateway").gateway is stated.gateway


_PROBE = """
import json, sys
from pathlib import Path
from supervisor.profiles import load_profile, validate_profile
seen = {}
profile = load_profile("default", [])
seen["default"] = "supervisor.models.egress" in sys.modules
seen["mode"] = profile.network.mode
validate_profile("gw", {"network": {"mode": "gateway", "gateway": {"allow": ["pypi.org:443"]}}},
                 "test")
seen["stated"] = "supervisor.models.egress" in sys.modules
print(json.dumps(seen))
"""


def test_a_profile_without_a_gateway_table_builds_none_of_the_policys_models() -> None:
    done = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True,
                          cwd=REPO, check=True)
    assert json.loads(done.stdout) == {"default": False, "mode": "none", "stated": True}
