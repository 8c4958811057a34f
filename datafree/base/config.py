"""Typed-config helpers shared by every job's config: strict fields with one-sentence descriptions,
YAML in (``yaml.safe_load``) and out, durations, and validation errors as one sentence.

Example:
    >>> parse_duration("1h30m"), step_cap(None, "10m", 1000)
    (5400.0, None)
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import yaml
from pydantic import ConfigDict, Field, ValidationError

from datafree.base.errors import UserError

STRICT = ConfigDict(strict=True, extra="forbid")  # YAML, JSON and flags are checked alike: no silent "5" -> 5


def describe(text: str, default=None, **kwargs):
    """A config field with its one-sentence description (shown by ``--help`` and ``/openapi.json``)."""
    if "default_factory" in kwargs:
        return Field(description=text, **kwargs)
    return Field(default, description=text, **kwargs)


def step_cap(steps: int | None, time_budget, default: int) -> int | None:
    """How many steps a run may make: ``steps`` when given; none when only a time budget is (the
    budget ends the run); else ``default``. Distillation's rounds and condensation's iterations alike.

    Example:
        >>> step_cap(None, "10m", 1000), step_cap(None, None, 1000), step_cap(50, "10m", 1000)
        (None, 1000, 50)
    """
    if steps is not None:
        return steps
    return None if parse_duration(time_budget) else default


def parse_duration(text: str | None) -> float | None:
    """``'90s'``, ``'10m'``, ``'1.5h'``, ``'1h30m'`` or plain seconds -> seconds.

    Example:
        >>> parse_duration("1h30m")
        5400.0
    """
    if text is None or text == "":
        return None
    s = str(text).strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", s):
        seconds = float(s)
    else:
        parts = re.findall(r"(\d+(?:\.\d+)?)\s*([hms])", s)
        if not parts or "".join(f"{n}{u}" for n, u in parts) != s.replace(" ", ""):
            raise UserError(f"cannot read the time budget {text!r}: use e.g. 90s, 10m, 1.5h or 1h30m")
        seconds = sum(float(n) * {"h": 3600, "m": 60, "s": 1}[u] for n, u in parts)
    if seconds <= 0:
        raise UserError(f"the time budget {text!r} must be positive")
    return seconds


def load_yaml(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no config file at {str(path)!r}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"{str(path)!r} is not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise UserError(f"{str(path)!r} must hold a mapping of config fields")
    return data


def build_config(cls, values: dict):
    """Construct the typed config ``cls`` from a dict; a mistake becomes one sentence naming the field.

    Example:
        >>> from datafree.distill.config import DistillConfig
        >>> build_config(DistillConfig, {"steps": "ten"})
        Traceback (most recent call last):
        datafree.base.errors.UserError: config field 'steps' must be an integer, got 'ten'
    """
    try:
        cfg = cls(**values)
    except ValidationError as e:
        raise UserError(field_error(e)) from None
    except TypeError as e:  # a keyword the dataclass does not have
        raise UserError(f"unknown config field: {e}") from None
    check = getattr(cfg, "check", None)  # a config's checks that span fields, e.g. DistillConfig.check
    if check is not None:
        check()
    return cfg


KIND_WORDS = {"int_type": "an integer", "float_type": "a number", "string_type": "a string", "bool_type": "true or false",
              "dict_type": "a mapping", "int_from_float": "an integer"}


BOUND_WORDS = {"greater_than_equal": "at least {ge}", "greater_than": "more than {gt}", "less_than": "less than {lt}",
               "less_than_equal": "at most {le}"}


def field_error(error: ValidationError) -> str:
    """The first error of a pydantic validation as one sentence that names the field."""
    first = error.errors()[0]
    name, kind, value, ctx = ".".join(str(x) for x in first["loc"]), first["type"], first.get("input"), first.get("ctx", {})
    if kind == "unexpected_keyword_argument":
        return f"unknown config field {name!r}"
    if kind == "literal_error":
        return f"unknown {name.replace('_', ' ')} {value!r}; use {ctx.get('expected', '').replace(chr(39), '')}"
    if kind in BOUND_WORDS:
        return f"config field {name!r} must be {BOUND_WORDS[kind].format(**ctx)}, got {value!r}"
    if kind in KIND_WORDS:
        return f"config field {name!r} must be {KIND_WORDS[kind]}, got {value!r}"
    if first["loc"] == () or kind == "missing_argument":
        return f"config field {name!r} is required"
    return f"config field {name!r}: {first['msg']}, got {value!r}"


def to_yaml(cfg) -> str:
    return yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False)
