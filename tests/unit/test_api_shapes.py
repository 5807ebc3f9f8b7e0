"""The client's typed shapes (supervisor/api/shapes.py) against the server's pydantic models
(issue 16: "a typed client, models shared with the server"): every TypedDict has exactly its
model's keys (the names on the wire, aliases included), the same required and optional keys
for requests, and the same type for each key, nested shapes linked by name; the daemon's
answers through the real API server are read as the shapes say; and the client imports no
pydantic to have them. No root."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import types
import typing
from pathlib import Path
from typing import Any, ForwardRef, Literal, NotRequired, Required, Union

import pydantic
import pytest

from supervisor import models
from supervisor.api import shapes
from supervisor.api.client import Client
from supervisor.models.telemetry import Sample
from supervisor.models.tripwire import TripwireRule
from tests.unit.conftest import WAIT, ServerThread

REPO = Path(__file__).resolve().parents[2]
ANSWERS: list[type] = [
    models.Health, models.RunView, models.TelemetrySummary, Sample, models.TelemetryView,
    models.AgentView, models.AgentList, models.AgentResult, models.ActionResult,
    models.ForgetResult, models.AuditEntry, models.AuditList, models.AuditVerifyResult,
    models.DrillResult, models.DrillList, models.GatewayRunUpdate, models.ReloadResult,
    models.Approval, models.ApprovalList, models.EgressView, models.BreakerReset,
]
REQUESTS: list[type] = [models.Scope, models.ActionRequest, models.ReasonRequest,
                        models.DrillRequest, TripwireRule, models.RunRequest]
# Fields the client sends as the text an operator typed, which the daemon parses (a duration,
# a threshold, a rule's action): each with a text its model takes.
AS_TEXT: dict[tuple[str, str], str] = {
    ("ActionRequest", "grace"): "10s", ("DrillRequest", "slo"): "50ms",
    ("RunRequest", "timeout"): "10m", ("TripwireRule", "above"): "512M",
    ("TripwireRule", "action"): "kill",
}


class _JSONMark:
    """Stands for shapes.JSON while the shapes' annotations are read."""


_SCOPE = {**vars(shapes), "JSON": _JSONMark}


def _evaluate(annotation: object) -> object:
    if isinstance(annotation, ForwardRef):
        annotation = annotation.__forward_arg__
    if isinstance(annotation, str):
        return eval(annotation, _SCOPE)  # the module's own annotations, nothing else
    return annotation


def shape_keys(shape: type) -> dict[str, tuple[object, bool]]:
    """key -> (type, required) of a TypedDict, read from its annotations (on 3.11 a class
    written under `from __future__ import annotations` reports NotRequired keys as required)."""
    total = getattr(shape, "__total__", True)
    keys = {}
    for key, annotation in shape.__annotations__.items():
        value = _evaluate(annotation)
        required = total
        if typing.get_origin(value) in (NotRequired, Required):
            required = typing.get_origin(value) is Required
            (value,) = typing.get_args(value)
        keys[key] = (value, required)
    return keys


def model_keys(model: type) -> dict[str, tuple[object, bool]]:
    """wire name -> (type, required) of a pydantic model or a dataclass sent as it is."""
    if dataclasses.is_dataclass(model):
        hints = typing.get_type_hints(model)
        return {f.name: (hints[f.name], f.default is dataclasses.MISSING
                         and f.default_factory is dataclasses.MISSING)
                for f in dataclasses.fields(model)}
    assert issubclass(model, pydantic.BaseModel)
    return {(field.serialization_alias or field.alias or name): (field.annotation,
                                                                  field.is_required())
            for name, field in model.model_fields.items()}


def describe(kind: object, linked: set[str]) -> object:
    """A type in a form both sides share: a model and a TypedDict of the same name are the same
    object (their names go to `linked`, to be compared in turn), Any is JSON, a tuple is a
    list, Annotated's constraints are dropped."""
    origin = typing.get_origin(kind)
    args = typing.get_args(kind)
    if kind is None or kind is type(None):
        return "null"
    if kind is Any or kind is _JSONMark:
        return "json"
    if origin is typing.Annotated:
        return describe(args[0], linked)
    if origin in (Union, types.UnionType):
        return ("union", frozenset(describe(arg, linked) for arg in args))
    if origin in (list, tuple):
        return ("list", describe(args[0], linked))
    if origin is dict:
        assert args[0] is str
        return ("dict", describe(args[1], linked))
    if origin is Literal:
        return ("literal", frozenset(args))
    if isinstance(kind, type) and (typing.is_typeddict(kind) or dataclasses.is_dataclass(kind)
                                   or issubclass(kind, pydantic.BaseModel)):
        linked.add(kind.__name__)
        return ("object", kind.__name__)
    assert kind in (str, int, float, bool), kind
    return kind.__name__


def _without_null(described: object) -> object:
    if isinstance(described, tuple) and described[0] == "union":
        rest = described[1] - {"null"}
        return next(iter(rest)) if len(rest) == 1 else ("union", rest)
    return described


@pytest.mark.parametrize("model", ANSWERS, ids=lambda m: m.__name__)
def test_each_answer_shape_is_its_model(model: type) -> None:
    shape = getattr(shapes, model.__name__)
    theirs, ours = model_keys(model), shape_keys(shape)
    assert set(ours) == set(theirs), f"{model.__name__}: keys differ"
    linked: set[str] = set()
    for key, (kind, required) in ours.items():
        assert required, f"{model.__name__}.{key}: every field of an answer is sent"
        assert describe(kind, linked) == describe(theirs[key][0], set()), \
            f"{model.__name__}.{key}"
    names = {m.__name__ for m in ANSWERS}
    assert linked <= names, f"{model.__name__} holds a shape not compared: {linked - names}"


@pytest.mark.parametrize("model", REQUESTS, ids=lambda m: m.__name__)
def test_each_request_shape_is_its_model(model: type) -> None:
    shape = getattr(shapes, model.__name__)
    theirs, ours = model_keys(model), shape_keys(shape)
    assert set(ours) == set(theirs), f"{model.__name__}: keys differ"
    linked: set[str] = set()
    for key, (kind, required) in ours.items():
        assert required == theirs[key][1], f"{model.__name__}.{key}: required or not"
        if (model.__name__, key) in AS_TEXT:
            assert kind is str, f"{model.__name__}.{key} is sent as text"
            continue
        # What the client may leave out it sends without null.
        expected = describe(theirs[key][0], set())
        assert describe(kind, linked) == (expected if required else _without_null(expected)), \
            f"{model.__name__}.{key}"
    names = {m.__name__ for m in REQUESTS}
    assert linked <= names, f"{model.__name__} holds a shape not compared: {linked - names}"


def test_what_the_client_sends_as_text_its_model_takes() -> None:
    rule = TripwireRule.model_validate({"name": "mem", "metric": "memory_bytes",
                                        "above": AS_TEXT[("TripwireRule", "above")],
                                        "action": AS_TEXT[("TripwireRule", "action")]})
    assert rule.above == 512 * 1024 * 1024 and rule.action == "kill"
    request = models.ActionRequest.model_validate(
        {"scope": {"all": True}, "grace": AS_TEXT[("ActionRequest", "grace")]})
    assert request.grace == 10.0
    assert models.DrillRequest.model_validate(
        {"slo": AS_TEXT[("DrillRequest", "slo")]}).slo == pytest.approx(0.05)
    assert models.RunRequest.model_validate(
        {"command": ["true"], "timeout": AS_TEXT[("RunRequest", "timeout")]}).timeout == 600


def test_the_checker_sees_a_difference() -> None:
    """A shape with a key of the wrong type, a missing key or a wrong link is told apart."""
    assert describe(int | None, set()) != describe(float | None, set())
    assert describe(list[shapes.RunView], set()) != describe(list[models.AgentView], set())
    assert describe(dict[str, Any], set()) == describe(dict[str, _JSONMark], set())
    assert set(shape_keys(shapes.Health)) != set(model_keys(models.RunView))
    keys = shape_keys(shapes.ActionRequest)
    assert keys["scope"][1] and not keys["reason"][1]


def test_the_real_server_answers_as_the_shapes_say(server: ServerThread) -> None:
    """Each answer of a plain incident, read by the typed client, validates against its
    shape's model and carries exactly the shape's keys."""
    client = Client(server.socket_path, timeout=WAIT)
    run = client.run({"name": "a1", "class": "coders", "command": ["sleep", "infinity"],
                      "tripwires": [{"name": "mem", "metric": "memory_bytes", "above": "1G"}]})
    answers: list[tuple[object, type]] = [
        (run, models.RunView), (client.health(), models.Health),
        (client.agents(), models.AgentList), (client.agent("a1"), models.AgentView),
        (client.action("pause", {"class": "coders"}, "look"), models.ActionResult),
        (client.action("resume", {"agent": "a1"}), models.ActionResult),
        (client.action("kill", {"agent": "a1"}, "incident"), models.ActionResult),
        (client.get_run("a1"), models.RunView), (client.audit(limit=5), models.AuditList),
        (client.audit_verify(), models.AuditVerifyResult),
        (client.action("reactivate", {"agent": "a1"}, "clear"), models.ActionResult),
        (client.forget("a1", "done"), models.ForgetResult),
    ]
    for answer, model in answers:
        assert isinstance(answer, dict)
        model.model_validate(answer)
        assert set(answer) == set(shape_keys(getattr(shapes, model.__name__))), model


def test_the_client_has_its_shapes_without_pydantic() -> None:
    code = ("import sys, supervisor.api.client, supervisor.api.shapes; "
            "print(sorted(m for m in sys.modules if m.startswith(('pydantic', "
            "'supervisor.models'))))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, check=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert json.loads(done.stdout.replace("'", '"')) == []
