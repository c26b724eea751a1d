"""The config reference (`docs/configs.md`), generated from the config dataclasses themselves.

Every key is listed with its type, its default and the comment written beside the field in the
source, so the reference cannot drift from the code: `tests/config/test_reference.py` fails when
the committed file differs from `render_reference()` (regenerate with `python -m ldmscale.config.reference`).
A polymorphic node (`kind:` or the run's `stage`) gets one table per kind.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import sys
import typing
from pathlib import Path
from typing import Any


OUTPUT = Path(__file__).resolve().parents[2] / "docs" / "configs.md"


def _field_comments(cls: type) -> dict[str, str]:
    """`name: type = default  # comment` lines of the class body -> {name: comment}."""
    comments: dict[str, str] = {}
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return comments
    for line in source.splitlines():
        match = re.match(r"\s+(\w+)\s*:[^#]*#\s*(.+)$", line)
        if match and not match.group(1).startswith("_"):
            comments.setdefault(match.group(1), match.group(2).strip().replace("|", "\\|"))
    return comments


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return " \\| ".join(str(a) for a in typing.get_args(tp))
    if origin is typing.Union or type(tp).__name__ == "UnionType":
        return " \\| ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is not None:
        args = ", ".join(_type_name(a) for a in typing.get_args(tp))
        return f"{getattr(origin, '__name__', str(origin))}[{args}]"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _default(field: dataclasses.Field) -> str:
    if field.default is not dataclasses.MISSING:
        value = field.default
    elif field.default_factory is not dataclasses.MISSING:
        value = field.default_factory()
    else:
        return "required"
    if dataclasses.is_dataclass(value):
        return "(section)"
    return f"`{value}`" if value is not None else "`null`"


def _tables(cls: type, prefix: str, out: list[str], seen: set[tuple[type, str]], kind: str | None = None) -> None:
    if (cls, prefix) in seen:
        return
    seen.add((cls, prefix))
    hints = typing.get_type_hints(cls)
    comments = _field_comments(cls)
    rows, nested = [], []
    for field in dataclasses.fields(cls):
        key = f"{prefix}.{field.name}" if prefix else field.name
        registry = field.metadata.get("registry")
        if registry is not None:
            how = f"by `{field.metadata['kind_from']}`" if field.metadata.get("kind_from") else "by `kind`"
            rows.append(f"| `{key}` | one of {', '.join(registry.kinds)} ({how}) | | {comments.get(field.name, '')} |")
            nested += [(registry.config_class(kind), key, kind) for kind in registry.kinds]
            continue
        tp = hints[field.name]
        inner = [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)] or \
            ([tp] if dataclasses.is_dataclass(tp) else [])
        if inner:
            rows.append(f"| `{key}` | section | | {comments.get(field.name, '')} |")
            nested.append((inner[0], key, None))
            continue
        rows.append(f"| `{key}` | {_type_name(tp)} | {_default(field)} | {comments.get(field.name, '')} |")
    if rows:
        title = f"### `{prefix}` = {kind} ({cls.__name__})" if kind else \
            f"### `{prefix}` ({cls.__name__})" if prefix else "### Top level"
        out += [title, "",
                "| key | type | default | notes |", "|---|---|---|---|", *rows, ""]
    for sub, key, sub_kind in nested:
        _tables(sub, key, out, seen, sub_kind)


def render_reference() -> str:
    from ldmscale.config.schema import RunConfig
    from ldmscale.pipelines.cache_latents import CacheLatentsConfig

    out = ["# Config reference", "",
           "Generated from the config dataclasses by `python -m ldmscale.config.reference`; do not edit by hand.",
           "Any key can be overridden on the command line as `key.sub=value`; an unknown key or an invalid",
           "value fails before any work, naming the key and the valid choices. `kind` (or, for `task`, the",
           "run's `stage`) selects which table applies to a node.", "",
           "## Training runs (`ldmscale train`, `ldmscale submit`)", ""]
    _tables(RunConfig, "", out, set())
    out += ["## Latent caches (`ldmscale cache-latents`)", ""]
    _tables(CacheLatentsConfig, "", out, set())
    return "\n".join(out).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    OUTPUT.write_text(render_reference())
    print(f"wrote {OUTPUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
