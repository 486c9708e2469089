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
from collections.abc import Callable
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


# Settings several stages share: declared once here, so their help texts cannot drift apart.
def model_field() -> Any:
    return field(help="MODEL_DIR written by `llava-lora build`")


def split_field() -> Any:
    return field(None, help="split file in a DATA folder, e.g. test for test.json (default: chat.json)")


def image_dir_field() -> Any:
    return field(None, help="image root, a folder or a .zip (default: DATA's images_dl/, else images/, else images.zip, "
                            "else DATA's folder)")


def device_field() -> Any:
    return field(None, help="cpu or cuda (default: cuda when available)")


def _base_type(tp: Any) -> tuple[Any, bool]:
    """(inner type, is_optional) of ``X | None``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


@dataclasses.dataclass(frozen=True)
class Alias:
    """Another spelling of a config key (the HF ``TrainingArguments`` name of the same setting).

    ``convert`` maps the alias's value to the key's; ``type`` is the alias's own value type (default: the key's).
    """

    key: str
    type: Any = None
    convert: Callable[[Any], Any] | None = None
    help: str = ""


def aliases(cls: type) -> dict[str, Alias]:
    """``{alias: Alias}`` declared by a config class in its ``ALIASES`` class attribute."""
    return dict(getattr(cls, "ALIASES", {}))


def _members(tp: Any) -> list[Any]:
    """The plain types a ``X | Y`` annotation admits (``list[...]`` counted as ``list``)."""
    return [typing.get_origin(a) or a for a in typing.get_args(tp)] if typing.get_origin(tp) in (
        typing.Union, types.UnionType) else [typing.get_origin(tp) or tp]


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def dashed_argv(argv: list[str], valid: list[str]) -> list[str]:
    """``--max_steps`` (HF scripts' spelling) read as ``--max-steps`` wherever the dashed flag exists."""
    out = []
    for arg in argv:
        name, eq, value = arg.partition("=")
        if name.startswith("--") and "_" in name and name.replace("_", "-") in valid:
            arg = name.replace("_", "-") + eq + value
        out.append(arg)
    return out


def _add_flag(parser, name: str, tp: Any, dest: str, help_text: str) -> None:
    # argparse %-formats help strings: a literal % must reach it doubled
    kwargs: dict[str, Any] = {"dest": dest, "default": argparse.SUPPRESS, "help": help_text.replace("%", "%%")}
    flags = [_flag(name)]
    if tp is bool:
        parser.add_argument(*flags, action=argparse.BooleanOptionalAction, **kwargs)
    elif typing.get_origin(tp) is list:
        (inner,) = typing.get_args(tp)
        # extend: `--image A --image B` and `--image A B` both give [A, B]
        parser.add_argument(*flags, nargs="+", type=inner, action="extend", **kwargs)
    elif typing.get_origin(tp) is typing.Literal:
        choices = typing.get_args(tp)
        parser.add_argument(*flags, choices=choices, type=type(choices[0]), **kwargs)
    else:
        parser.add_argument(*flags, type=tp, **kwargs)


ALIAS_DEST = "alias:"  # argparse dest prefix of alias flags, so that both spellings can be told apart


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one flag per dataclass field (and per alias); defaults stay unset so that YAML values show through. A class
    may list its fields under ``--help`` headings in ``GROUPS`` (``{title: (field, ...)}``); the names do not change."""
    hints = typing.get_type_hints(cls)
    where: dict[str, Any] = {}  # field -> the argument group --help lists it under (``GROUPS``), else the parser
    for title, names in getattr(cls, "GROUPS", {}).items():
        where.update(dict.fromkeys(names, parser.add_argument_group(title)))
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
        if f.metadata.get("positional"):
            # optional for argparse, so that a --config file can give it; build() names it when nothing does
            parser.add_argument(f.name, type=tp, metavar=f.name.upper(), nargs="?", default=argparse.SUPPRESS,
                                help=f.metadata.get("help", "").replace("%", "%%"))
        else:
            _add_flag(where.get(f.name, parser), f.name, tp, f.name, help_text)
    if aliases(cls):
        group = parser.add_argument_group("HF TrainingArguments spellings (each means exactly the flag it names; "
                                          "--max_steps-style underscores work for every flag)")
        for name, alias in aliases(cls).items():
            tp = alias.type or _base_type(hints[alias.key])[0]
            _add_flag(group, name, tp, ALIAS_DEST + name, alias.help or f"the same as {_flag(alias.key)}")


def flag_names(parser: argparse.ArgumentParser) -> list[str]:
    """Every option string a parser accepts."""
    return [s for action in parser._actions for s in action.option_strings]


def closest_flags(given: str, valid: list[str], n: int = 3) -> list[str]:
    """Valid flags a mistyped one may have meant: close spellings, longer flags it begins, and multi-word flags
    whose initials it spells (``--lr`` -> ``--learning-rate``)."""
    word = given.split("=", 1)[0].lstrip("-").replace("_", "-")
    names = list(dict.fromkeys(v.lstrip("-").replace("_", "-") for v in valid))  # one per setting, dashed
    initials = [c for c in names if "-" in c and "".join(p[0] for p in c.split("-")) == word]
    longer = [c for c in names if c.startswith(word) and len(word) >= 2]
    close = difflib.get_close_matches(word, names, n=n, cutoff=0.6)
    return ["--" + c for c in dict.fromkeys(initials + longer + close)][:n]


def _coerce(name: str, value: Any, tp: Any, source: str) -> Any:
    inner, optional = _base_type(tp)
    if isinstance(value, list) and list in _members(tp):  # `str | list`: a YAML list (a data mixture)
        return value
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


RECIPES = Path(__file__).parent / "recipes"


def recipe_names() -> list[str]:
    return sorted(p.stem for p in RECIPES.glob("*.yaml"))


def load_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML file of config keys; a bare name such as ``seed`` is the packaged recipe of that name."""
    p = Path(path)
    if not p.is_file() and p.suffix == "" and (RECIPES / f"{p.name}.yaml").is_file():
        p = RECIPES / f"{p.name}.yaml"
    if not p.is_file():
        raise UsageError(f"config file not found: {p} (packaged recipes: {', '.join(recipe_names())})")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise UsageError(f"{p}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise UsageError(f"{p}: expected a mapping of config keys at the top level")
    return data


def canonical(cls: type, values: dict[str, Any], source: str) -> dict[str, Any]:
    """``values`` (from one source: a YAML file or the command line) with every alias replaced by its key.

    Unknown keys are refused, naming the closest valid ones; two spellings of one setting are refused.
    """
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    alias_map = aliases(cls)
    given: dict[str, list[tuple[str, Any, bool]]] = {}  # target -> [(spelling, value, a switch turned off)]
    for key, value in values.items():
        norm = key.replace("-", "_")
        if norm in alias_map:
            alias = alias_map[norm]
            value = _coerce(norm, value, alias.type or hints[alias.key], source)
            off = alias.type is bool and value is False
            given.setdefault(alias.key, []).append((key, alias.convert(value) if alias.convert else value, off))
        elif norm in names:
            given.setdefault(norm, []).append((key, value, False))
        else:
            close = difflib.get_close_matches(norm, names + list(alias_map), n=3, cutoff=0.6)
            hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
            raise UsageError(f"{source}: unknown key '{key}'{hint}")
    out = {}
    for target, entries in given.items():
        # HF configs often say `bf16: true` beside `fp16: false`: a switch turned off yields to the other spelling
        on = [e for e in entries if not e[2]] or entries
        if len(on) > 1 and not (all(e[2] for e in on) and len({e[1] for e in on}) == 1):
            shown = [_flag(e[0]) if source == "command line" else repr(e[0]) for e in on]
            raise UsageError(f"{source}: {' and '.join(shown)} set the same thing ({target}); give one")
        out[target] = on[0][1]
    return out


def build(cls: type[T], values: dict[str, Any], source: str = "config") -> T:
    """Construct ``cls`` from a mapping (aliases allowed), naming unknown keys and the closest valid ones."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in canonical(cls, values, source).items():
        kwargs[key] = _coerce(key, value, hints[key], source)
    missing = [f.name for f in dataclasses.fields(cls) if f.name not in kwargs
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise UsageError("missing required " + ", ".join(
            f.upper() if _is_positional(cls, f) else _flag(f) for f in missing))
    return cls(**kwargs)


def _is_positional(cls: type, name: str) -> bool:
    return any(f.name == name and f.metadata.get("positional") for f in dataclasses.fields(cls))


def resolve(cls: type[T], args: argparse.Namespace) -> T:
    """YAML (``args.config``) overlaid by the flags that were given (each source's aliases resolved first)."""
    values: dict[str, Any] = {}
    source = "command line"
    if getattr(args, "config", None):
        values.update(canonical(cls, load_yaml(args.config), str(args.config)))
        source = f"{args.config} + command line"
    names = {f.name for f in dataclasses.fields(cls)}
    flags = {k.removeprefix(ALIAS_DEST): v for k, v in vars(args).items()
             if k in names or k.startswith(ALIAS_DEST)}
    values.update(canonical(cls, flags, "command line"))
    return build(cls, values, source)


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def save(cfg: Any, path: str | Path) -> None:
    """Write the resolved config as YAML (readable, and loadable again with ``--config``)."""
    Path(path).write_text(yaml.safe_dump(json.loads(json.dumps(to_dict(cfg), default=str)), sort_keys=False))
