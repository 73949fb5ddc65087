"""Typed config dataclasses, generically: the type checker every config section runs before its own rules,
the JSON reading they share, and `--set section.field=value` parsing. Nothing here knows a field's meaning
(the model's fields: `dsv3_jax.config`; a run's sections: `dsv3_jax.train.config`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from typing import Any, Mapping


class ConfigError(ValueError):
    """A configuration value is impossible; the message starts with the offending field's name."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message

    def within(self, section: str) -> "ConfigError":
        """The same error, with the field named from an enclosing section (`section.field`)."""
        return type(self)(f"{section}.{self.field}", self.message)


def check_field_types(obj: Any, prefix: str = "") -> None:
    """ConfigError unless every field of the dataclass `obj` holds a value of its annotated type.

    int means int (not bool), float means a finite int or float, `X | None` also takes None, and a nested
    dataclass is checked field by field; `prefix` ("train.", "model.", ...) makes the names dotted.
    """
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        _check_value(getattr(obj, f.name), hints[f.name], prefix + f.name)


def _check_value(value: Any, hint: Any, name: str) -> None:
    if is_optional(hint):
        if value is not None:
            _check_value(value, base_type(hint), name)
    elif dataclasses.is_dataclass(hint):
        if not isinstance(value, hint):
            raise ConfigError(name, f"must be an object of {hint.__name__} fields, got {value!r:.80}")
        check_field_types(value, name + ".")
    elif hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(name, f"must be true or false, got {value!r}")
    elif hint is int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(name, f"must be an integer, got {value!r}")
    elif hint is float:
        if not is_number(value):
            raise ConfigError(name, f"must be a number, got {value!r}")
        if not is_finite(value):
            raise ConfigError(name, f"must be a finite number, got {value!r}")
    elif hint is str:
        if not isinstance(value, str):
            raise ConfigError(name, f"must be a string, got {value!r}")
    else:  # a new kind of field must teach this checker its type rather than pass unchecked
        raise TypeError(f"{name}: check_field_types does not know the type {hint!r}")


def is_optional(hint: Any) -> bool:
    """Whether a field typed `hint` takes None (`X | None`)."""
    return typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in typing.get_args(hint)


def base_type(hint: Any) -> Any:
    """`X` of `X | None`, else `hint` itself (a union of several non-None types stays a union)."""
    if not is_optional(hint):
        return hint
    rest = tuple(arg for arg in typing.get_args(hint) if arg is not type(None))
    return rest[0] if len(rest) == 1 else typing.Union[rest]


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_finite(value: int | float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an int beyond float range: no float field can hold it
        return False


def coerce_float(value: Any, hint: Any) -> Any:
    """An int given to a float field becomes a float (JSON writes 1.0 as 1); anything else is unchanged."""
    if base_type(hint) is float and is_number(value) and isinstance(value, int):
        try:
            return float(value)
        except OverflowError:  # left as is: check_field_types names the field
            return value
    return value


def read_json_object(path: str, what: str) -> dict[str, Any]:
    """The JSON object in file `path`; otherwise a ConfigError naming the file (and where its JSON breaks)."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as err:
        raise ConfigError(path, f"invalid JSON: {err.msg} at line {err.lineno} column {err.colno}") from None
    except UnicodeDecodeError as err:
        raise ConfigError(path, f"not UTF-8 text: {err.reason} at byte {err.start}") from None
    if not isinstance(data, dict):
        raise ConfigError(path, f"must hold a JSON object ({what}), got {type(data).__name__} {data!r:.80}")
    return data


# ---- building and overriding (nested) dataclasses -----------------------------------------------------------
def build_dataclass(cls: type, values: Any, path: str) -> Any:
    """Rebuild a (nested) frozen dataclass from `dataclasses.asdict` output; `path` is its dotted name."""
    if not isinstance(values, Mapping):
        raise ConfigError(path.rstrip(".") or "config", f"must be an object of {cls.__name__} fields, "
                          f"got {values!r:.80}")
    hints = typing.get_type_hints(cls)
    unknown = [key for key in values if key not in hints]
    if unknown:
        raise ConfigError(f"{path}{unknown[0]}", f"unknown field {unknown[0]!r} in {cls.__name__}; "
                          f"known: {sorted(hints)}")
    return cls(**{name: _field_value(values[name], hints[name], f"{path}{name}") for name in values})


def _field_value(value: Any, hint: Any, name: str) -> Any:
    """`value` for a field typed `hint`: a dict for a dataclass field is built into one, ints become floats
    for float fields; all else is left to `check_field_types`, which names what is wrong."""
    target = _dataclass_in(hint)
    if target is not None and value is not None:
        return build_dataclass(target, value, name + ".")
    return coerce_float(value, hint)


def _dataclass_in(hint: Any) -> type | None:
    """The dataclass a field typed `hint` (`Section` or `Section | None`) holds, if any."""
    target = base_type(hint)
    return target if dataclasses.is_dataclass(target) else None


def apply_overrides(config: Any, overrides: list[str]) -> Any:
    """Apply `section.field=value` strings, then validate.

    A value is read as JSON when the field wants a number, bool or section (so `Infinity` and `NaN` parse, and
    are then rejected as not finite); text that is not JSON stays a string, which validation names as the wrong
    type. A string field takes the text as is (`data.corpus=files:*.txt`), or a JSON string literal decoded.
    """
    for item in overrides:
        if "=" not in item:
            raise ConfigError(item, "an override must look like section.field=value, e.g. train.steps=2000")
        key, raw = item.split("=", 1)
        key = key.strip()
        config = _replace_path(config, key.split("."), raw, key)
    return config.validate()


def _replace_path(obj: Any, parts: list[str], raw: str, key: str) -> Any:
    hints = typing.get_type_hints(type(obj))
    head = parts[0]
    if head not in hints:
        raise ConfigError(key, f"unknown field {head!r} in {type(obj).__name__}; known: {sorted(hints)}")
    if len(parts) == 1:
        return dataclasses.replace(obj, **{head: _parse_override(raw, hints[head], key)})
    child = getattr(obj, head)
    target = _dataclass_in(hints[head])
    if child is None and target is not None:  # e.g. model.rope_scaling.factor=4 when rope_scaling is None
        child = target()
    if not dataclasses.is_dataclass(child):
        raise ConfigError(key, f"{head!r} has no sub-fields")
    return dataclasses.replace(obj, **{head: _replace_path(child, parts[1:], raw, key)})


def _parse_override(raw: str, hint: Any, key: str) -> Any:
    """The value of `--set key=raw` for a field typed `hint`."""
    text = raw.strip()
    section = _dataclass_in(hint)
    if section is not None:
        try:
            value = json.loads(text)
        except json.JSONDecodeError as err:
            none = " or null" if is_optional(hint) else ""
            raise ConfigError(key, f"not valid JSON: {err.msg} at column {err.colno} of {text!r}; give a JSON "
                              f"object of {section.__name__} fields{none}") from None
        return _field_value(value, hint, key)
    if base_type(hint) is str:
        if text == "null" and is_optional(hint):
            return None
        return _json_string(text) if text.startswith('"') else raw
    try:
        return coerce_float(json.loads(text), hint)
    except json.JSONDecodeError:
        return raw  # validation says "must be a number, got '1e-3,'" (or integer / true or false)


def _json_string(text: str) -> str:
    """A quoted value decoded as a JSON string (escapes and all); quoted text that is not one stays as is."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return text
    return value if isinstance(value, str) else text
