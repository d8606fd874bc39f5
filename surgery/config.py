"""The one config system of the project: frozen dataclasses loaded from YAML plus ``key=value`` overrides.

A config is a tree of frozen dataclasses. Each field's type annotation says
what a value may be (``int``, ``float``, ``bool``, ``str``, ``Literal[...]``,
``X | None``, ``tuple[X, ...]``, ``dict[str, X]`` or a nested dataclass) and
``field(metadata={"help": ...})`` documents it. Loading:

1. read the YAML file (a mapping at the top);
2. apply command-line overrides ``a.b.c=value`` with dotted keys; list items are
   addressed by index (``teachers.0.weight=0.5``); the value is parsed for the
   type of the field it lands on (``train.lr=1e-4`` is a float, ``x=null`` is None,
   ``x=[a, b]`` a list);
3. build the dataclasses, coercing values (an int where a float is expected,
   a numeric string such as YAML's ``1e-4``) and checking the rest;
4. run each dataclass's ``validate(self) -> list[str]`` for cross-field rules.

Every problem found on the way (unknown key with the list of valid keys and a
close match, missing required key, wrong type, bad choice, cross-field rule) is
collected and raised at once as :class:`surgery.errors.ConfigError`.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Iterable, Literal, Union

import yaml

from surgery.errors import ConfigError, SurgeryError

_MISSING = dataclasses.MISSING
_NONE_WORDS = ("null", "none", "~", "")
_TRUE_WORDS = ("true", "yes", "on", "1")
_FALSE_WORDS = ("false", "no", "off", "0")


class _Raw(str):
    """A value typed on the command line: parsed according to the target field's type."""


# -- reading ------------------------------------------------------------------------------------

def read_yaml(path: str | Path) -> dict:
    """Read a YAML config file whose top level is a mapping.

    Raises:
        SurgeryError: missing file, invalid YAML, or a top level that is not a mapping.
    """
    p = Path(path)
    if not p.exists():
        raise SurgeryError(f"config file {str(p)!r} does not exist", "check the path passed to --config")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise SurgeryError(f"config file {str(p)!r} is not valid YAML: {str(e).splitlines()[0]}",
                           "fix the YAML syntax (indentation, quotes)") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SurgeryError(f"config file {str(p)!r} must hold a mapping at the top, got {type(data).__name__}",
                           "write `key: value` lines")
    return data


def parse_overrides(items: Iterable[str]) -> list[tuple[str, _Raw]]:
    """Split ``key=value`` strings.

    Raises:
        ConfigError: an item without ``=`` or with an empty key (all such items listed).
    """
    out, problems = [], []
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            problems.append(f"override {item!r} is not of the form key=value")
            continue
        out.append((key, _Raw(value.strip())))
    if problems:
        raise ConfigError(problems, "write overrides as dotted.key=value, e.g. train.lr=1e-4")
    return out


def apply_overrides(data: dict, overrides: Iterable[tuple[str, Any]], problems: list[str]) -> dict:
    """Set dotted keys in a nested dict/list structure (copied); list items by integer index."""
    import copy

    data = copy.deepcopy(data)
    for key, value in overrides:
        parts = key.split(".")
        node: Any = data
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            if isinstance(node, list):
                if not part.isdigit():
                    problems.append(f"{'.'.join(parts[:i]) or key}: expected a list index, got {part!r} in {key!r}")
                    break
                idx = int(part)
                while len(node) <= idx:  # extending a list item by item (teachers.1.model=...)
                    node.append({})
                if last:
                    node[idx] = value
                else:
                    if not isinstance(node[idx], (dict, list)):
                        node[idx] = {}
                    node = node[idx]
            elif isinstance(node, dict):
                if last:
                    node[part] = value
                else:
                    nxt = node.get(part)
                    if nxt is not None and not isinstance(nxt, (dict, list)):
                        problems.append(f"{'.'.join(parts[:i + 1])}: is a plain value ({nxt!r}), cannot set {key!r}")
                        break
                    if nxt is None:
                        nxt = [] if parts[i + 1].isdigit() else {}
                        node[part] = nxt
                    node = nxt
            else:
                problems.append(f"{'.'.join(parts[:i])}: is a plain value, cannot set {key!r}")
                break
    return data


# -- building -----------------------------------------------------------------------------------

def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (tuple, list):
        args = typing.get_args(tp)
        return f"list of {_type_name(args[0])}" if args else "list"
    if origin is dict:
        return f"mapping to {_type_name(typing.get_args(tp)[1])}"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _parse_raw_scalar(raw: str) -> Any:
    """A command-line value for a field of non-scalar type: YAML syntax (``[a, b]``, ``{k: v}``)."""
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def _coerce(tp, value: Any, path: str, problems: list[str]) -> Any:
    """Check/convert ``value`` for type ``tp``; on failure append a problem and return a sentinel."""
    bad = _Bad()
    origin = typing.get_origin(tp)
    raw = isinstance(value, _Raw)

    if tp is Any:
        return _parse_raw_scalar(value) if raw else value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if type(None) in args:
            if value is None or (raw and value.strip().lower() in _NONE_WORDS):
                return None
            rest = [a for a in args if a is not type(None)]
            inner = rest[0] if len(rest) == 1 else Union[tuple(rest)]
            return _coerce(inner, value, path, problems)
        sub: list[str] = []
        for a in args:
            trial: list[str] = []
            v = _coerce(a, value, path, trial)
            if not trial:
                return v
            sub.extend(trial)
        problems.append(f"{path}: expected {_type_name(tp)}, got {value!r}")
        return bad
    if origin is Literal:
        choices = typing.get_args(tp)
        for c in choices:
            if value == c or (raw or isinstance(value, str)) and str(c) == str(value):
                return c
            if isinstance(c, bool) and raw and str(value).lower() in (_TRUE_WORDS if c else _FALSE_WORDS):
                return c
        problems.append(f"{path}: {value!r} is not one of {', '.join(repr(c) for c in choices)}")
        return bad
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str):
            low = value.strip().lower()
            if low in _TRUE_WORDS:
                return True
            if low in _FALSE_WORDS:
                return False
        problems.append(f"{path}: expected true or false, got {value!r}")
        return bad
    if tp is int:
        if isinstance(value, bool):
            problems.append(f"{path}: expected an integer, got {value!r}")
            return bad
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip().replace("_", ""))
            except ValueError:
                try:
                    f = float(value)
                    if f.is_integer():
                        return int(f)
                except ValueError:
                    pass
        problems.append(f"{path}: expected an integer, got {value!r}")
        return bad
    if tp is float:
        if isinstance(value, bool):
            problems.append(f"{path}: expected a number, got {value!r}")
            return bad
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                pass
        problems.append(f"{path}: expected a number, got {value!r}")
        return bad
    if tp is str:
        if isinstance(value, str):
            return str(value)
        quote = " (quote it in YAML)" if isinstance(value, (int, float, bool)) else ""
        problems.append(f"{path}: expected a string, got {type(value).__name__} {value!r}{quote}")
        return bad
    if origin in (tuple, list):
        if raw:
            parsed = _parse_raw_scalar(value)
            value = parsed if isinstance(parsed, list) else [s.strip() for s in str(value).split(",") if s.strip()]
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            problems.append(f"{path}: expected a list, got {value!r}")
            return bad
        args = typing.get_args(tp)
        if origin is tuple and args and (len(args) != 2 or args[1] is not Ellipsis):
            if len(value) != len(args):
                problems.append(f"{path}: expected {len(args)} items, got {len(value)}")
                return bad
            items = [_coerce(a, v, f"{path}.{i}", problems) for i, (a, v) in enumerate(zip(args, value))]
        else:
            elem = args[0] if args else Any
            items = [_coerce(elem, v, f"{path}.{i}", problems) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if raw:
            value = _parse_raw_scalar(value)
        if not isinstance(value, dict):
            problems.append(f"{path}: expected a mapping, got {value!r}")
            return bad
        _, vt = typing.get_args(tp) or (str, Any)
        return {str(k): _coerce(vt, v, f"{path}.{k}", problems) for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if raw:
            value = _parse_raw_scalar(value)
        if dataclasses.is_dataclass(value) and isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            problems.append(f"{path}: expected a mapping with keys {', '.join(field_names(tp))}, got {value!r}")
            return bad
        return _build(tp, value, path, problems)
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    problems.append(f"{path}: unsupported value {value!r} for type {_type_name(tp)}")
    return bad


class _Bad:
    """Placeholder for a value that failed checks (its problem is already recorded)."""


def field_names(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.init and not f.name.startswith("_")]


def _build(cls, data: dict, path: str, problems: list[str]):
    hints = _hints(cls)
    names = field_names(cls)
    prefix = f"{path}." if path else ""
    for key in data:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean {prefix + close[0]!r}?" if close else ""
            problems.append(f"unknown key {prefix + str(key)!r} (valid keys{' of ' + path if path else ''}: "
                            f"{', '.join(names)}){hint}")
    kwargs = {}
    n_before = len(problems)
    for f in dataclasses.fields(cls):
        if not f.init or f.name.startswith("_"):
            continue
        if f.name in data:
            kwargs[f.name] = _coerce(hints[f.name], data[f.name], prefix + f.name, problems)
        elif f.default is _MISSING and f.default_factory is _MISSING:
            problems.append(f"missing required key {prefix + f.name!r} ({_type_name(hints[f.name])}"
                            f"{': ' + f.metadata['help'] if f.metadata.get('help') else ''})")
            kwargs[f.name] = _Bad()
    if len(problems) > n_before or any(isinstance(v, _Bad) for v in kwargs.values()):
        return _Bad()
    try:
        obj = cls(**kwargs)
    except ConfigError as e:  # a dataclass that validates in __post_init__
        problems.extend(f"{path}: {p}" if path else p for p in e.problems)
        return _Bad()
    except (TypeError, ValueError) as e:
        problems.append(f"{path or cls.__name__}: {e}")
        return _Bad()
    validate = getattr(obj, "validate", None)
    if callable(validate):
        problems.extend(f"{prefix}{p}" if path and not p.startswith(prefix) else p for p in validate() or [])
    return obj


def from_dict(cls, data: dict, overrides: Iterable[str | tuple[str, Any]] = ()):
    """Build config ``cls`` from a plain dict plus overrides.

    Args:
        cls: a (frozen) dataclass type.
        data: nested mapping, e.g. from YAML.
        overrides: ``"a.b=value"`` strings or ``(key, value)`` pairs.

    Raises:
        ConfigError: listing every problem found.
    """
    problems: list[str] = []
    pairs: list[tuple[str, Any]] = []
    strs = [o for o in overrides if isinstance(o, str)]
    pairs.extend(parse_overrides(strs))
    pairs.extend(o for o in overrides if not isinstance(o, str))
    merged = apply_overrides(data, pairs, problems)
    obj = _build(cls, merged, "", problems)
    if problems or isinstance(obj, _Bad):
        raise ConfigError(problems or ["invalid config"], "see `--help-config` for every key, its type and meaning")
    return obj


def load_config(cls, path: str | Path | None = None, overrides: Iterable[str] = ()):
    """Load config ``cls`` from a YAML file (optional) plus ``key=value`` overrides.

    Raises:
        SurgeryError: unreadable YAML file.
        ConfigError: every invalid, unknown or missing key at once.
    """
    data = read_yaml(path) if path is not None else {}
    return from_dict(cls, data, overrides)


# -- writing and describing ---------------------------------------------------------------------

def to_dict(obj) -> Any:
    """A config as plain YAML/JSON-able data (tuples become lists)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)
                if f.init and not f.name.startswith("_")}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def to_yaml(obj) -> str:
    return yaml.safe_dump(to_dict(obj), sort_keys=False, allow_unicode=True)


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` → ``{"a.b": 1}`` (lists by index)."""
    out: dict[str, Any] = {}
    if isinstance(data, dict):
        for k, v in data.items():
            out.update(flatten(v, f"{prefix}{k}."))
    elif isinstance(data, list) and data and all(isinstance(v, (dict, list)) for v in data):
        for i, v in enumerate(data):
            out.update(flatten(v, f"{prefix}{i}."))
    else:
        out[prefix[:-1]] = data
    return out


def diff(a, b) -> dict[str, tuple[Any, Any]]:
    """Keys whose values differ between two configs (or their dicts): ``key → (a, b)``."""
    fa, fb = flatten(to_dict(a)), flatten(to_dict(b))
    return {k: (fa.get(k), fb.get(k)) for k in sorted(set(fa) | set(fb)) if fa.get(k) != fb.get(k)}


def describe(cls, prefix: str = "") -> list[str]:
    """One line per key: ``dotted.key (type, default): help`` (nested dataclasses expanded)."""
    lines = []
    hints = _hints(cls)
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
        lines.append(f"{key} ({_type_name(tp)}, {default}): {help_}")
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
