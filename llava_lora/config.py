"""Typed stage configs shared by YAML files and command-line flags.

Each stage declares a dataclass whose fields carry a one-line ``help``; ``add_arguments`` turns it into
argparse flags of the same names (``max_steps`` -> ``--max-steps``) and ``resolve`` merges, in order of
precedence: flags given on the command line > the ``--config`` YAML file > the dataclass defaults.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from .errors import UsageError

T = TypeVar("T")


def field(default: Any = dataclasses.MISSING, help: str = "", positional: bool = False, **kw: Any) -> Any:
    """A dataclass field with its help text (shown by ``--help``); ``positional`` makes it a bare argument."""
    meta = {"help": help, "positional": positional}
    if isinstance(default, (list, dict)):
        value = default
        return dataclasses.field(default_factory=lambda: type(value)(value), metadata=meta, **kw)
    return dataclasses.field(default=default, metadata=meta, **kw)


def _base_type(tp: Any) -> tuple[Any, bool]:
    """(inner type, is_optional) of ``X | None``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one flag per dataclass field; defaults stay unset so that YAML values can show through."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.metadata.get("cli") is False:
            continue
        tp, _ = _base_type(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        help_text = f.metadata.get("help", "")
        if required:
            help_text += " (required)"
        elif "default" not in help_text:
            help_text += f" (default: {default})"
        kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_text}
        if f.metadata.get("positional"):
            parser.add_argument(f.name, type=tp, metavar=f.name.upper(), help=f.metadata.get("help", ""))
        elif tp is bool:
            parser.add_argument(_flag(f.name), action=argparse.BooleanOptionalAction, **kwargs)
        elif typing.get_origin(tp) is list:
            (inner,) = typing.get_args(tp)
            parser.add_argument(_flag(f.name), nargs="+", type=inner, **kwargs)
        elif typing.get_origin(tp) is typing.Literal:
            choices = typing.get_args(tp)
            parser.add_argument(_flag(f.name), choices=choices, type=type(choices[0]), **kwargs)
        else:
            parser.add_argument(_flag(f.name), type=tp, **kwargs)


def _coerce(name: str, value: Any, tp: Any, source: str) -> Any:
    inner, optional = _base_type(tp)
    if value is None:
        if optional:
            return None
        raise UsageError(f"{source}: '{name}' may not be null")
    try:
        if inner is bool and not isinstance(value, bool):
            raise TypeError
        if inner in (int, float, str) and not isinstance(value, inner):
            if inner is float and isinstance(value, int) and not isinstance(value, bool):
                return float(value)
            if inner is str and isinstance(value, (int, float)):
                return str(value)
            raise TypeError
        if typing.get_origin(inner) is list:
            if isinstance(value, str):
                value = [value]
            if not isinstance(value, list):
                raise TypeError
        if typing.get_origin(inner) is typing.Literal and value not in typing.get_args(inner):
            raise UsageError(f"{source}: '{name}' must be one of {list(typing.get_args(inner))}, got {value!r}")
    except TypeError:
        raise UsageError(f"{source}: '{name}' expects {getattr(inner, '__name__', inner)}, got {value!r}") from None
    return value


def load_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise UsageError(f"{p}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise UsageError(f"{p}: expected a mapping of config keys at the top level")
    return data


def build(cls: type[T], values: dict[str, Any], source: str = "config") -> T:
    """Construct ``cls`` from a mapping, naming unknown keys and the closest valid one."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        norm = key.replace("-", "_")
        if norm not in names:
            close = difflib.get_close_matches(norm, names, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise UsageError(f"{source}: unknown key '{key}'{hint}")
        kwargs[norm] = _coerce(norm, value, hints[norm], source)
    missing = [f.name for f in dataclasses.fields(cls) if f.name not in kwargs
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise UsageError("missing required " + ", ".join(
            f.upper() if _is_positional(cls, f) else _flag(f) for f in missing))
    return cls(**kwargs)


def _is_positional(cls: type, name: str) -> bool:
    return any(f.name == name and f.metadata.get("positional") for f in dataclasses.fields(cls))


def resolve(cls: type[T], args: argparse.Namespace) -> T:
    """YAML (``args.config``) overlaid by the flags that were given."""
    values: dict[str, Any] = {}
    source = "command line"
    if getattr(args, "config", None):
        values.update(load_yaml(args.config))
        source = str(args.config)
    names = {f.name for f in dataclasses.fields(cls)}
    values.update({k: v for k, v in vars(args).items() if k in names})
    return build(cls, values, source)


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def save(cfg: Any, path: str | Path) -> None:
    """Write the resolved config as YAML (readable, and loadable again with ``--config``)."""
    Path(path).write_text(yaml.safe_dump(json.loads(json.dumps(to_dict(cfg), default=str)), sort_keys=False))
