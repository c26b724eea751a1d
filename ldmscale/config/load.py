"""YAML + `key.sub=value` overrides -> typed dataclasses, strictly.

OmegaConf parses the YAML, the dotted overrides and `${...}` interpolations; the conversion into
dataclasses is done here so that every problem (unknown key, bad kind, bad type, bad choice) is
collected with its full dotted key and reported at once in a single `ValueError`.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

from omegaconf import OmegaConf

T = TypeVar("T")
_MISSING = object()


class ConfigError(ValueError):
    """All problems found in one config, one per line, each naming its full key."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid config:\n  " + "\n  ".join(problems))


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(tp: Any, value: Any, key: str, problems: list[str]) -> Any:
    """Converts one YAML value to `tp`, appending problems instead of raising."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            problems.append(f"{key}: expected a mapping for {tp.__name__}, got {value!r}")
            return _MISSING
        return _build(tp, value, key, problems, base=None)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices or type(value) is not type(choices[choices.index(value)]):
            problems.append(f"{key}: invalid value {value!r}; valid values: {', '.join(map(str, choices))}")
            return _MISSING
        return value
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            if len(args) == len(typing.get_args(tp)):
                problems.append(f"{key}: must not be null (expected {_type_name(tp)})")
                return _MISSING
            return None
        sub: list[str] = []
        for arg in args:
            sub.clear()
            out = _convert(arg, value, key, sub)
            if not sub:
                return out
        problems.extend(sub if len(args) == 1 else [f"{key}: expected {_type_name(tp)}, got {value!r}"])
        return _MISSING
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            problems.append(f"{key}: expected a list, got {value!r}")
            return _MISSING
        args = typing.get_args(tp)
        item_tp = args[0] if args else Any
        items = [_convert(item_tp, v, f"{key}[{i}]", problems) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            problems.append(f"{key}: expected a mapping, got {value!r}")
            return _MISSING
        return dict(value)
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool):
        if isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
            return value
        problems.append(f"{key}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
        return _MISSING
    raise TypeError(f"{key}: unsupported config field type {tp!r}")


def _build(cls: type, data: dict, prefix: str, problems: list[str], base: Any) -> Any:
    """Builds `cls` from `data` on top of `base` (an instance of `cls`) or the class defaults."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in data if k not in fields]
    for k in unknown:
        valid = ", ".join(fields)
        problems.append(f"{_join(prefix, str(k))}: unknown key; valid keys of {prefix or 'the config'}: {valid}")
    hints = _hints(cls)
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        key = _join(prefix, name)
        registry = f.metadata.get("registry")
        current = getattr(base, name) if base is not None else _MISSING
        if registry is not None:
            kwargs[name] = _build_polymorphic(f, data, key, problems, current, kwargs)
        elif name in data:
            kwargs[name] = _convert(hints[name], data[name], key, problems)
        elif current is not _MISSING:
            kwargs[name] = current
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            problems.append(f"{key}: required key is missing")
            kwargs[name] = _MISSING
    if any(v is _MISSING for v in kwargs.values()):
        return _MISSING
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if callable(validate):
        problems.extend(_join(prefix, p) if prefix else p for p in validate())
    return obj


def _build_polymorphic(f: dataclasses.Field, data: dict, key: str, problems: list[str], current: Any,
                       siblings: dict[str, Any]) -> Any:
    registry = f.metadata["registry"]
    node = data.get(f.name, {})
    if node is None or not isinstance(node, dict):
        problems.append(f"{key}: expected a mapping, got {node!r}")
        return _MISSING
    node = dict(node)
    kind_from = f.metadata.get("kind_from")
    if kind_from is not None:
        kind, kind_key = siblings.get(kind_from), kind_from
        if kind is _MISSING:
            return _MISSING
    else:
        default_kind = current.kind if current is not _MISSING else f.default_factory().kind
        kind, kind_key = node.pop("kind", default_kind), _join(key, "kind")
    try:
        cls = registry.config_class(kind, kind_key)
    except ValueError as e:
        problems.append(str(e))
        return _MISSING
    same_kind = current is not _MISSING and type(current) is cls
    if kind_from is None:
        node["kind"] = kind
    return _build(cls, node, key, problems, base=current if same_kind else None)


def config_from_dict(cls: type[T], data: dict, base: T | None = None) -> T:
    """Converts a plain mapping into `cls`; raises `ConfigError` listing every problem."""
    problems: list[str] = []
    obj = _build(cls, data, "", problems, base)
    if problems:
        raise ConfigError(problems)
    return obj


def config_to_dict(obj: Any) -> Any:
    """The plain-data form of a config (what `config_from_dict` reads back)."""
    if dataclasses.is_dataclass(obj):
        out = {}
        for f in dataclasses.fields(obj):
            if f.metadata.get("kind_from"):
                value = {k: v for k, v in config_to_dict(getattr(obj, f.name)).items() if k != "kind"}
            else:
                value = config_to_dict(getattr(obj, f.name))
            out[f.name] = value
        return out
    if isinstance(obj, (list, tuple)):
        return [config_to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: config_to_dict(v) for k, v in obj.items()}
    return obj


def load_yaml_with_overrides(path: str | os.PathLike | None, overrides: list[str] = ()) -> dict:
    """Reads YAML (optional) and applies `a.b=value` overrides; interpolations resolved."""
    base = OmegaConf.load(path) if path is not None else OmegaConf.create({})
    bad = [o for o in overrides if "=" not in o or not o.split("=", 1)[0]]
    if bad:
        raise ConfigError([f"override {o!r}: expected key.sub=value" for o in bad])
    updates = OmegaConf.from_dotlist(list(overrides))
    base = OmegaConf.to_container(base, resolve=False)
    _drop_nodes_whose_kind_changes(base, OmegaConf.to_container(updates, resolve=False))
    merged = OmegaConf.merge(OmegaConf.create(base), updates)
    return OmegaConf.to_container(merged, resolve=True)


def _drop_nodes_whose_kind_changes(base: Any, updates: Any) -> None:
    """An override that switches a node's `kind` replaces that node instead of merging into it:
    the old kind's keys would otherwise be rejected as unknown keys of the new kind."""
    if not isinstance(base, dict) or not isinstance(updates, dict):
        return
    for key, value in updates.items():
        node = base.get(key)
        if isinstance(node, dict) and isinstance(value, dict):
            if "kind" in value and node.get("kind", value["kind"]) != value["kind"]:
                base[key] = {}
            else:
                _drop_nodes_whose_kind_changes(node, value)


def load_config(cls: type[T], path: str | os.PathLike | None, overrides: list[str] = ()) -> T:
    return config_from_dict(cls, load_yaml_with_overrides(path, overrides))


def dump_config(obj: Any) -> str:
    return OmegaConf.to_yaml(OmegaConf.create(config_to_dict(obj)))


def save_config(obj: Any, path: str | os.PathLike) -> None:
    """Writes the resolved config as YAML, atomically (temp file then rename)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(dump_config(obj))
    os.replace(tmp, path)
