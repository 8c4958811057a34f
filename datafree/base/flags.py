"""Command-line flags made from a typed config: one flag per field, with the field's type, choices,
sentence and default, so the flags, YAML files and the service's requests cannot drift apart.

Example:
    >>> import argparse
    >>> from datafree.condense.config import CondenseJob
    >>> parser = argparse.ArgumentParser()
    >>> add_config_flags(parser, CondenseJob, ["ipc", "init"])
    >>> parser.parse_args(["--ipc", "5", "--init", "noise"])
    Namespace(ipc=5, init='noise')
"""
from __future__ import annotations

import argparse
import json
import types
import typing


def _plain(annotation) -> tuple[type | None, tuple | None]:
    """``(python type or None, choices or None)`` of a field's annotation (``None`` dropped from unions;
    ``list`` when a union allows a list: the flag may then be repeated)."""
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return str, typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        kinds = [a for a in typing.get_args(annotation) if a is not type(None)]
        if any(typing.get_origin(k) is list for k in kinds):
            return list, None
        if len(kinds) == 1 and typing.get_origin(kinds[0]) is typing.Literal:  # an optional choice keeps its choices
            return str, typing.get_args(kinds[0])
        return (kinds[0] if len(kinds) == 1 or str in kinds and kinds[0] is str else str), None
    return annotation, None


def add_config_flags(parser: argparse.ArgumentParser, cls, names: list[str], preset: tuple[str, dict] | None = None,
                     flag_names: dict | None = None, notes: dict | None = None, required: tuple[str, ...] = ()) -> None:
    """Add ``--field-name`` for each of ``names`` (fields of the pydantic dataclass ``cls``).

    Every flag defaults to ``None`` (not given: the preset, the YAML file or the field's default
    decides); its help is the field's sentence, then its default: the ``preset``'s value (``(name,
    values)``) where the preset sets the field, else the field's own. Booleans get ``--x/--no-x``;
    mappings read JSON; ``Literal`` fields list their choices. ``notes`` add a sentence to a flag's
    help; ``required`` flags must be given.
    """
    fields = cls.__pydantic_fields__
    preset_name, preset_values = preset or ("", {})
    for name in names:
        info = fields[name]
        kind, choices = _plain(info.annotation)
        by_preset = name in preset_values
        default = preset_values[name] if by_preset else info.get_default(call_default_factory=True)
        text = info.description or ""
        if default not in (None, "", {}, False) and "default" not in text and name not in required:
            shown = json.dumps(default) if isinstance(default, dict) else default
            text += f" (default with the {preset_name} preset: {shown})" if by_preset else f" (default: {shown})"
        text += f" ({notes[name]})" if notes and name in notes else ""
        flag = "--" + (flag_names or {}).get(name, name.replace("_", "-"))
        if kind is bool and default is False and not by_preset:  # a switch
            parser.add_argument(flag, dest=name, action="store_true", default=None, help=text)
        elif kind is bool:
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=text)
        elif kind is list:  # repeat the flag for several values; one value stays a plain value
            parser.add_argument(flag, dest=name, action="append", default=None, help=text + " (repeat the flag for several)")
        elif kind is dict:
            parser.add_argument(flag, dest=name, type=_json_mapping, default=None, metavar="JSON", help=text)
        else:
            parser.add_argument(flag, dest=name, type=kind if kind in (int, float) else str, choices=choices, default=None,
                                help=text, required=name in required)


def _json_mapping(text: str) -> dict:
    try:
        value = json.loads(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not JSON: {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object such as '{{\"width\": 32}}', got {text!r}")
    return value


def given(args: argparse.Namespace, names: list[str]) -> dict:
    """The flags among ``names`` the user gave (a ``None`` means not given); a repeated flag given once is one value."""
    values = {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}
    return {k: v[0] if isinstance(v, list) and len(v) == 1 else v for k, v in values.items()}
