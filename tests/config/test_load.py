"""Strict config loading: YAML + dotted overrides -> dataclasses, every problem named at once."""

from __future__ import annotations

import dataclasses
from typing import Literal

import pytest

from ldmscale.config.load import ConfigError, config_from_dict, config_to_dict, load_config
from ldmscale.config.registry import Registry, polymorphic

SHAPES = Registry("shape")


@dataclasses.dataclass
class CircleConfig:
    kind: str = "circle"
    radius: float = 1.0


@dataclasses.dataclass
class BoxConfig:
    kind: str = "box"
    sides: list[int] = dataclasses.field(default_factory=lambda: [1, 1])


SHAPES.register("circle", CircleConfig)
SHAPES.register("box", BoxConfig)


@dataclasses.dataclass
class Inner:
    steps: int = 10
    mode: Literal["a", "b"] = "a"
    note: str | None = None

    def validate(self) -> list[str]:
        return [f"steps: must be >= 1, got {self.steps}"] if self.steps < 1 else []


@dataclasses.dataclass
class Outer:
    name: str
    inner: Inner = dataclasses.field(default_factory=Inner)
    shape: CircleConfig = polymorphic(SHAPES, "circle")
    weight: float = 0.5


def test_defaults_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: x\ninner:\n  steps: 3\nshape:\n  kind: box\n")
    cfg = load_config(Outer, path, ["inner.mode=b", "shape.sides=[2,3]", "weight=2"])
    assert cfg == Outer(name="x", inner=Inner(steps=3, mode="b"), shape=BoxConfig(sides=[2, 3]), weight=2.0)
    assert isinstance(cfg.weight, float)


def test_round_trip_through_plain_data():
    cfg = Outer(name="y", shape=BoxConfig(sides=[4]))
    assert config_from_dict(Outer, config_to_dict(cfg)) == cfg


def test_unknown_key_names_full_key_and_valid_keys():
    with pytest.raises(ValueError) as e:
        config_from_dict(Outer, {"name": "x", "inner": {"stpes": 3}})
    assert "inner.stpes: unknown key" in str(e.value)
    assert "steps, mode, note" in str(e.value)


def test_bad_kind_lists_valid_kinds():
    with pytest.raises(ValueError, match=r"shape.kind: unknown shape kind 'triangle'; valid kinds: box, circle"):
        config_from_dict(Outer, {"name": "x", "shape": {"kind": "triangle"}})


def test_bad_type_and_bad_choice_and_missing_reported_together():
    with pytest.raises(ConfigError) as e:
        config_from_dict(Outer, {"inner": {"steps": "many", "mode": "c"}, "weight": True})
    problems = e.value.problems
    assert "name: required key is missing" in problems
    assert "inner.steps: expected int, got str 'many'" in problems
    assert "inner.mode: invalid value 'c'; valid values: a, b" in problems
    assert "weight: expected float, got bool True" in problems
    assert len(problems) == 4


def test_kind_specific_keys_checked_against_chosen_kind():
    with pytest.raises(ValueError, match=r"shape.radius: unknown key; valid keys of shape: kind, sides"):
        config_from_dict(Outer, {"name": "x", "shape": {"kind": "box", "radius": 2}})


def test_validate_rules_carry_the_key_prefix():
    with pytest.raises(ValueError, match=r"inner.steps: must be >= 1, got 0"):
        config_from_dict(Outer, {"name": "x", "inner": {"steps": 0}})


def test_malformed_override_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="expected key.sub=value"):
        load_config(Outer, None, ["name"])


def test_override_switching_kind_replaces_the_node(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: x\nshape:\n  kind: circle\n  radius: 3.0\n")
    cfg = load_config(Outer, path, ["shape.kind=box", "shape.sides=[5]"])
    assert cfg.shape == BoxConfig(sides=[5])
    # The same kind merges as usual, and a typo under it is still reported.
    assert load_config(Outer, path, ["shape.kind=circle"]).shape == CircleConfig(radius=3.0)
    with pytest.raises(ValueError, match="shape.radius: unknown key"):
        load_config(Outer, path, ["shape.kind=box", "shape.radius=2"])
