"""A profile's network: its mode, and for mode `gateway` the egress policy (models/egress.py,
with the MCP servers' models/mcp.py: 13 models). That policy's models load and build only for
a profile that states a `[network.gateway]` table or a run that reads its policy, so a run with
no network (the default profile's) never builds them; what a stated table accepts and the
errors it gets (field paths, messages) are the policy's own, as if it were a plain field.
No I/O."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PlainValidator, model_validator

from supervisor import buildmode

if TYPE_CHECKING:
    from supervisor.models.egress import GatewayPolicy


def _gateway_policy(value: Any) -> GatewayPolicy:
    """The stated `[network.gateway]` validated as a GatewayPolicy field would be: an
    instance as it is, anything else through the model (its ValidationError's errors become
    this field's, under `gateway`)."""
    from supervisor.models.egress import GatewayPolicy

    if isinstance(value, GatewayPolicy):
        return value
    return GatewayPolicy.model_validate(value)


@functools.cache
def default_gateway_policy() -> GatewayPolicy:
    """What a network with no `[network.gateway]` table has: every default (one shared
    instance, frozen as every policy is)."""
    from supervisor.models.egress import GatewayPolicy

    return GatewayPolicy()


if TYPE_CHECKING:
    StatedGateway = GatewayPolicy
else:
    StatedGateway = Annotated[Any, PlainValidator(_gateway_policy)]


class NetworkPolicy(BaseModel):
    # Dumped as it is read (`gateway`, not the attribute's name): a dump validates back.
    # Validated inside a profile (buildmode.py).
    model_config = ConfigDict(extra="forbid", frozen=True, serialize_by_alias=True,
                              defer_build=buildmode.DEFER_BUILD)

    # none: an empty network namespace (loopback only). gateway: a veth whose only reachable
    # peer is the supervisor's egress gateway.
    mode: Literal["none", "gateway"] = "none"
    # The `[network.gateway]` table as stated; None: not stated (`gateway` is then every
    # default).
    stated_gateway: StatedGateway | None = Field(default=None, alias="gateway")

    @property
    def gateway(self) -> GatewayPolicy:
        if self.stated_gateway is not None:
            return self.stated_gateway
        return default_gateway_policy()

    @model_validator(mode="after")
    def _consistent(self) -> NetworkPolicy:
        gateway = self.stated_gateway
        if self.mode == "none" and gateway is not None and (
                gateway.allow or gateway.routes or gateway.mcp.servers):
            raise ValueError("gateway allow-list, routes or MCP servers are set but mode is "
                             "'none'; set mode = \"gateway\"")
        return self
