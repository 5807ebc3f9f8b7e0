"""When this process builds the validators of the pydantic models that can wait: as each class
is defined (the default: the daemon, the egress worker and the tests have every model ready
before its first use, so no request waits for one to be built), or at each one's first use
(DEFER_BUILD, which the embedded runner's entry point, ci/__main__.py, sets before it imports
any model: a plain run validates its spec and its profile and never the configuration's
twenty sections, the API's views or the policies nested in a profile on their own).

Read by those models' `defer_build` as their classes are defined, so it must be set before
their modules are imported. The models of the kill path (ActionRequest, Scope, ActionResult,
AgentResult) never wait: they are built as they are defined in every process. No imports."""

DEFER_BUILD = False
