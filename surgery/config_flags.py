"""Command-line flags generated from config dataclass fields (the other face of :mod:`surgery.config`).

A command declares which fields of its config become flags; type, choices and help text come from
the field's annotation and ``metadata["help"]``, and the default shown is the field's own, so no
default is restated in a command::

    add_config_arguments(parser, HealConfig, fields=("lr", "seq_len", "batch_size"))
    ...
    cfg = config_from_args(HealConfig, args, path=args.config)

A flag that is not given does not override anything: the value comes from the ``--config`` YAML
(when given) or from the dataclass default. ``add_help_config(parser)`` adds ``--help-config``,
which :func:`config_from_args` callers answer with :func:`surgery.config.describe`.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any, Iterable, Literal, Union

from surgery.config import load_config, type_name

_MISSING = dataclasses.MISSING

_DEST_PREFIX = "cfg__"


def flag_name(field_name: str) -> str:
    """``seq_len`` → ``--seq-len``."""
    return "--" + field_name.replace("_", "-")


def _scalar_type(tp):
    """``(python type for argparse, choices or None)`` of a flag's annotation; ``None`` when not a scalar."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        rest = [a for a in typing.get_args(tp) if a is not type(None)]
        return _scalar_type(rest[0]) if len(rest) == 1 else (None, None)
    if origin is Literal:
        choices = typing.get_args(tp)
        return type(choices[0]), list(choices)
    if tp in (int, float, str, bool):
        return tp, None
    return None, None


def _default_text(f: dataclasses.Field) -> str:
    if f.default is not _MISSING:
        return "" if f.default is None else f" (default {f.default})"
    if f.default_factory is not _MISSING:
        return f" (default {f.default_factory()!r})"
    return " (required)"


def add_config_arguments(parser: argparse.ArgumentParser | Any, cls, fields: Iterable[str] | None = None,
                         rename: dict[str, str] | None = None, required: Iterable[str] = (),
                         choices: dict[str, Iterable] | None = None) -> None:
    """Add one ``--flag`` per scalar field of dataclass ``cls``.

    Args:
        parser: an argparse parser or argument group.
        cls: the config dataclass.
        fields: names of the fields to expose (default: every scalar field).
        rename: field name → flag (e.g. ``{"train_rows": "--train-rows"}``) where the flag is not the field name.
        required: fields whose flag must be given.
        choices: field name → allowed values, for fields typed ``str`` whose values live in a registry.
    """
    hints = typing.get_type_hints(cls)
    rename = rename or {}
    by_name = {f.name: f for f in dataclasses.fields(cls)}
    names = list(fields) if fields is not None else [n for n in by_name if _scalar_type(hints[n])[0] is not None]
    required = set(required)
    for name in names:
        f = by_name[name]
        tp, options = _scalar_type(hints[name])
        options = sorted((choices or {}).get(name, [])) or options
        if tp is None:
            raise TypeError(f"field {name!r} of {cls.__name__} is not a scalar and cannot be a flag")
        help_ = f.metadata.get("help", "") + ("" if name in required else _default_text(f))
        kw: dict[str, Any] = {"dest": _DEST_PREFIX + name, "default": None, "help": help_.replace("%", "%%")}
        if tp is bool:
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw["type"] = tp
            if options:
                kw["choices"] = options
            else:
                kw["metavar"] = name.upper()
        if name in required:
            kw["required"] = True
        parser.add_argument(rename.get(name, flag_name(name)), **kw)


def add_help_config(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--help-config", action="store_true",
                        help="list every config key with its type, default and help, and exit")


def given_fields(args: argparse.Namespace) -> dict[str, Any]:
    """Field name → value of every config flag that was given on the command line."""
    return {k[len(_DEST_PREFIX):]: v for k, v in vars(args).items() if k.startswith(_DEST_PREFIX) and v is not None}


def config_from_args(cls, args: argparse.Namespace, path: str | None = None, overrides: Iterable[str] = (),
                     extra: dict[str, Any] | None = None):
    """Build ``cls`` from an optional YAML file, then ``key=value`` overrides, then the given flags and ``extra``.

    Raises:
        SurgeryError: unreadable YAML.
        ConfigError: every invalid value at once.
    """
    pairs: list = list(overrides)
    pairs.extend(given_fields(args).items())
    pairs.extend((extra or {}).items())
    return load_config(cls, path, pairs)


def describe(cls, prefix: str = "") -> list[str]:
    """One line per key: ``dotted.key (type, default): help`` (nested dataclasses expanded)."""
    lines = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init or f.name.startswith("_"):
            continue
        tp = hints[f.name]
        key = prefix + f.name
        inner = _dataclass_in(tp)
        help_ = f.metadata.get("help", "")
        if inner is not None and typing.get_origin(tp) in (tuple, list):
            lines.append(f"{key} (list of mappings): {help_}")
            lines.extend(describe(inner, f"{key}.N."))
            continue
        if inner is not None:
            lines.extend(describe(inner, key + "."))
            continue
        if f.default is not _MISSING:
            default = repr(f.default)
        elif f.default_factory is not _MISSING:
            default = repr(f.default_factory())
        else:
            default = "required"
        lines.append(f"{key} ({type_name(tp)}, {default}): {help_}")
    return lines


def _dataclass_in(tp):
    if dataclasses.is_dataclass(tp):
        return tp
    origin = typing.get_origin(tp)
    if origin in (tuple, list, Union, types.UnionType):
        for a in typing.get_args(tp):
            if dataclasses.is_dataclass(a):
                return a
    return None


def help_config_text(cls) -> str:
    return "\n".join(describe(cls))
