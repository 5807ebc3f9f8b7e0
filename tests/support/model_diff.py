"""Where two pydantic model instances differ, recursively: type, fields marked as set, extra
and every value, for tests that hold an instance made without validating (model_construct,
model_copy) equal to the validated one. No I/O."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel


def differences(made: Any, validated: Any, where: str = "") -> list[str]:
    """Where `made` and `validated` differ: type, fields set, or any value, recursively."""
    if type(made) is not type(validated):
        return [f"{where or '.'}: {type(made).__name__} != {type(validated).__name__}"]
    if isinstance(made, BaseModel):
        found = []
        if made.model_fields_set != validated.model_fields_set:
            found.append(f"{where or '.'}: fields set {made.model_fields_set} != "
                         f"{validated.model_fields_set}")
        if made.__pydantic_extra__ != validated.__pydantic_extra__:
            found.append(f"{where or '.'}: extra")
        names = set(vars(made)) | set(vars(validated))
        for name in sorted(names):
            found += differences(vars(made).get(name, "<missing>"),
                                 vars(validated).get(name, "<missing>"), f"{where}.{name}")
        return found
    if isinstance(made, dict):
        if made.keys() != validated.keys():
            return [f"{where}: keys {sorted(made)} != {sorted(validated)}"]
        return [d for key in made for d in differences(made[key], validated[key],
                                                       f"{where}[{key!r}]")]
    if isinstance(made, list | tuple):
        if len(made) != len(validated):
            return [f"{where}: {len(made)} items != {len(validated)}"]
        return [d for i, (a, b) in enumerate(zip(made, validated, strict=True))
                for d in differences(a, b, f"{where}[{i}]")]
    return [] if made == validated else [f"{where}: {made!r} != {validated!r}"]
