"""The one config system of the project: frozen dataclasses loaded from YAML plus ``key=value`` overrides.

A config is a tree of frozen dataclasses. Each field's type annotation says what a value may be (``int``,
``float``, ``bool``, ``str``, ``Literal[...]``, ``X | None``, ``tuple[X, ...]``, ``dict[str, X]`` or a nested
dataclass) and ``field(metadata={"help": ...})`` documents it (``--help-config`` prints it; command-line
flags are generated from it by :mod:`surgery.config_flags`). Loading:

1. read the YAML file (a mapping at the top);
2. apply overrides ``a.b.c=value`` with dotted keys (list items by index: ``teachers.0.weight=0.5``); the
   value is parsed for the type of the field it lands on (``x=null`` is None, ``x=[a, b]`` a list);
3. build the dataclasses, coercing values (an int where a float is expected, YAML's string ``1e-4``);
4. run each dataclass's ``validate(self) -> list[str]`` for the rules (ranges, cross-field).

Every problem found on the way (unknown key with the valid keys and a close match, missing required key,
wrong type, bad choice, a rule) is collected and raised at once as :class:`surgery.errors.ConfigError`.
A :class:`Config` subclass is also checked whenever it is built directly.
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

def type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(type_name(a) for a in typing.get_args(tp))
    if origin in (tuple, list):
        args = typing.get_args(tp)
        return f"list of {type_name(args[0])}" if args else "list"
    if origin is dict:
        return f"mapping to {type_name(typing.get_args(tp)[1])}"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _parse_raw_scalar(raw: str) -> Any:
    """A command-line value for a field of non-scalar type: YAML syntax (``[a, b]``, ``{k: v}``)."""
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def _coerce(tp, value: Any, path: str, problems: list[str]) -> Any:
    """Check/convert ``value`` for type ``tp``; on failure append a problem and return a sentinel."""
    origin = typing.get_origin(tp)
    raw = isinstance(value, _Raw)
    if tp is Any:
        return _parse_raw_scalar(value) if raw else value
    if origin in (Union, types.UnionType):
        return _coerce_union(tp, value, path, problems)
    if origin is Literal:
        return _coerce_literal(tp, value, path, problems)
    if tp in _SCALARS:
        return _SCALARS[tp](value, path, problems)
    if origin in (tuple, list):
        return _coerce_sequence(tp, value, path, problems)
    if origin is dict:
        value = _parse_raw_scalar(value) if raw else value
        if not isinstance(value, dict):
            problems.append(f"{path}: expected a mapping, got {value!r}")
            return _Bad()
        _, vt = typing.get_args(tp) or (str, Any)
        return {str(k): _coerce(vt, v, f"{path}.{k}", problems) for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        value = _parse_raw_scalar(value) if raw else value
        if dataclasses.is_dataclass(value) and isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            problems.append(f"{path}: expected a mapping with keys {', '.join(field_names(tp))}, got {value!r}")
            return _Bad()
        return _build(tp, value, path, problems)
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    problems.append(f"{path}: unsupported value {value!r} for type {type_name(tp)}")
    return _Bad()


def _coerce_union(tp, value, path, problems):
    args = typing.get_args(tp)
    if type(None) in args:
        if value is None or (isinstance(value, _Raw) and value.strip().lower() in _NONE_WORDS):
            return None
        rest = [a for a in args if a is not type(None)]
        inner = rest[0] if len(rest) == 1 else Union[tuple(rest)]
        return _coerce(inner, value, path, problems)
    for a in args:
        trial: list[str] = []
        v = _coerce(a, value, path, trial)
        if not trial:
            return v
    problems.append(f"{path}: expected {type_name(tp)}, got {value!r}")
    return _Bad()


def _coerce_literal(tp, value, path, problems):
    choices = typing.get_args(tp)
    raw = isinstance(value, _Raw)
    for c in choices:
        if value == c or (raw or isinstance(value, str)) and str(c) == str(value):
            return c
        if isinstance(c, bool) and raw and str(value).lower() in (_TRUE_WORDS if c else _FALSE_WORDS):
            return c
    problems.append(f"{path}: {value!r} is not one of {', '.join(repr(c) for c in choices)}")
    return _Bad()


def _coerce_bool(value, path, problems):
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        low = value.strip().lower()
        if low in _TRUE_WORDS:
            return True
        if low in _FALSE_WORDS:
            return False
    problems.append(f"{path}: expected true or false, got {value!r}")
    return _Bad()


def _coerce_int(value, path, problems):
    if isinstance(value, int) and not isinstance(value, bool):
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
    return _Bad()


def _coerce_float(value, path, problems):
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            pass
    problems.append(f"{path}: expected a number, got {value!r}")
    return _Bad()


def _coerce_str(value, path, problems):
    if isinstance(value, str):
        return str(value)
    quote = " (quote it in YAML)" if isinstance(value, (int, float, bool)) else ""
    problems.append(f"{path}: expected a string, got {type(value).__name__} {value!r}{quote}")
    return _Bad()


_SCALARS = {bool: _coerce_bool, int: _coerce_int, float: _coerce_float, str: _coerce_str}


def _coerce_sequence(tp, value, path, problems):
    origin = typing.get_origin(tp)
    if isinstance(value, _Raw):
        parsed = _parse_raw_scalar(value)
        value = parsed if isinstance(parsed, list) else [s.strip() for s in str(value).split(",") if s.strip()]
    if isinstance(value, tuple):
        value = list(value)
    if not isinstance(value, list):
        problems.append(f"{path}: expected a list, got {value!r}")
        return _Bad()
    args = typing.get_args(tp)
    if origin is tuple and args and (len(args) != 2 or args[1] is not Ellipsis):
        if len(value) != len(args):
            problems.append(f"{path}: expected {len(args)} items, got {len(value)}")
            return _Bad()
        items = [_coerce(a, v, f"{path}.{i}", problems) for i, (a, v) in enumerate(zip(args, value))]
    else:
        elem = args[0] if args else Any
        items = [_coerce(elem, v, f"{path}.{i}", problems) for i, v in enumerate(value)]
    return tuple(items) if origin is tuple else items


class _Bad:
    """Placeholder for a value that failed checks (its problem is already recorded)."""


def field_names(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.init and not f.name.startswith("_")]


def _build(cls, data: dict, path: str, problems: list[str]):
    hints = typing.get_type_hints(cls)
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
            problems.append(f"missing required key {prefix + f.name!r} ({type_name(hints[f.name])}"
                            f"{': ' + f.metadata['help'] if f.metadata.get('help') else ''})")
            kwargs[f.name] = _Bad()
    if len(problems) > n_before or any(isinstance(v, _Bad) for v in kwargs.values()):
        return _Bad()
    try:
        obj = cls(**kwargs)
    except ConfigError as e:  # a dataclass that validates in __post_init__
        problems.extend(f"{prefix}{p}" if path and not p.startswith(prefix) else p for p in e.problems)
        return _Bad()
    except (TypeError, ValueError) as e:
        problems.append(f"{path or cls.__name__}: {e}")
        return _Bad()
    if not getattr(cls, "_checks_on_init", False):  # a Config subclass already ran validate() when built
        problems.extend(f"{prefix}{p}" if path and not p.startswith(prefix) else p for p in own_problems(obj))
    return obj


def own_problems(obj) -> list[str]:
    """``obj.validate()`` (a list of problems; an empty list when valid or without such a method)."""
    validate = getattr(obj, "validate", None)
    out = validate() if callable(validate) else None
    if out is None or isinstance(out, list):
        return list(out or [])
    raise TypeError(f"{type(obj).__name__}.validate() must return a list of problems, got {type(out).__name__}")


def problems_of(obj, prefix: str = "") -> list[str]:
    """Every problem of a config tree: each dataclass's ``validate()``, nested ones with their dotted path."""
    out = [f"{prefix}{p}" if prefix and not p.startswith(prefix) else p for p in own_problems(obj)]
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        items = v if isinstance(v, (list, tuple)) else [v]
        for i, item in enumerate(items):
            if dataclasses.is_dataclass(item) and not isinstance(item, type):
                sub = f"{prefix}{f.name}." + (f"{i}." if isinstance(v, (list, tuple)) else "")
                if not getattr(item, "_checks_on_init", False):
                    out.extend(problems_of(item, sub))
    return out


def check(obj, hint: str | None = None):
    """Raise :class:`ConfigError` listing every problem of ``obj`` (see :func:`problems_of`); return ``obj``."""
    problems = problems_of(obj)
    if problems:
        raise ConfigError(problems, hint or "see `--help-config` for every key, its type and meaning")
    return obj


class Config:
    """Base of config dataclasses that are checked when built: ``validate() -> list[str]`` holds the rules.

    A subclass is a frozen dataclass; building it (directly, through :func:`from_dict`, or with
    ``dataclasses.replace``) runs :func:`check`, so an invalid instance never exists and every problem is
    reported at once. ``HINT`` is the hint of the raised :class:`ConfigError`.
    """

    _checks_on_init = True
    HINT: str | None = None

    def __post_init__(self):
        check(self, self.HINT)

    def validate(self) -> list[str]:
        return []

    def to_dict(self) -> dict:
        return to_dict(self)

    @classmethod
    def from_dict(cls, data: dict, overrides: Iterable[str | tuple[str, Any]] = ()):
        return from_dict(cls, data, overrides)


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
        raise ConfigError(problems or ["invalid config"],
                          getattr(cls, "HINT", None) or "see `--help-config` for every key, its type and meaning")
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
