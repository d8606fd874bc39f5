"""The project-wide config system: YAML + dotted overrides → frozen, validated dataclasses."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from surgery.config import diff, from_dict, load_config, parse_overrides, to_dict, to_yaml
from surgery.config_flags import describe
from surgery.errors import ConfigError, SurgeryError

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Inner:
    rate: float = field(default=0.5, metadata={"help": "a rate"})
    names: tuple[str, ...] = field(default=("a",), metadata={"help": "some names"})

    def validate(self):
        return [] if 0 <= self.rate <= 1 else [f"rate must be in [0, 1], got {self.rate}"]


@dataclass(frozen=True)
class Item:
    name: str = field(metadata={"help": "required name"})
    weight: float = 1.0


@dataclass(frozen=True)
class Top:
    path: str = field(metadata={"help": "where"})
    steps: int = field(default=10, metadata={"help": "how many"})
    flag: bool = False
    mode: Literal["a", "b"] = "a"
    maybe: int | None = None
    inner: Inner = field(default_factory=Inner)
    items: tuple[Item, ...] = ()
    extra: dict[str, int] = field(default_factory=dict)

    def validate(self):
        return [] if self.steps >= len(self.items) else ["steps must be >= the number of items"]


def test_yaml_plus_overrides_with_coercion(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("path: x\nsteps: 3\ninner:\n  rate: 1e-1\nitems:\n  - name: one\n")
    c = load_config(Top, p, ["steps=7", "flag=yes", "maybe=null", "inner.names=[p, q]", "items.0.weight=2",
                             "items.1.name=two", "mode=b", "extra={k: 3}", "inner.rate=0.25"])
    assert c == Top(path="x", steps=7, flag=True, mode="b", maybe=None, inner=Inner(0.25, ("p", "q")),
                    items=(Item("one", 2.0), Item("two")), extra={"k": 3})
    assert dataclasses.is_dataclass(c)
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.steps = 1  # frozen


def test_yaml_floats_without_dot_and_ints_for_floats():
    c = from_dict(Top, {"path": "x", "inner": {"rate": "1e-1"}})  # PyYAML reads 1e-1 as a string
    assert c.inner.rate == 0.1
    c = from_dict(Top, {"path": "x", "inner": {"rate": 1}})
    assert isinstance(c.inner.rate, float)
    c = from_dict(Top, {"path": "123"}, ["path=456"])  # a string field keeps the typed text
    assert c.path == "456"


def test_all_problems_reported_at_once():
    with pytest.raises(ConfigError) as e:
        from_dict(Top, {"stpes": 3, "flag": "maybe", "mode": "c", "inner": {"rate": 5, "nmes": []},
                        "items": [{"weight": "x"}]}, ["steps=abc", "maybe=1.5"])
    probs = e.value.problems
    text = "\n".join(probs)
    assert "unknown key 'stpes'" in text and "did you mean 'steps'" in text
    assert "valid keys: path, steps, flag, mode, maybe, inner, items, extra" in text
    assert "unknown key 'inner.nmes'" in text
    assert "missing required key 'path'" in text and "where" in text  # help text shown
    assert "flag: expected true or false" in text
    assert "mode: 'c' is not one of 'a', 'b'" in text
    assert "steps: expected an integer, got 'abc'" in text
    assert "maybe: expected an integer" in text
    assert "missing required key 'items.0.name'" in text
    assert "items.0.weight: expected a number" in text
    assert len(probs) >= 10
    assert isinstance(e.value, SurgeryError)  # the CLI prints it as one line, exit 2


def test_cross_field_validation_with_paths():
    with pytest.raises(ConfigError) as e:
        from_dict(Top, {"path": "x", "steps": 0, "items": [{"name": "a"}], "inner": {"rate": 2.0}})
    assert "inner.rate must be in [0, 1], got 2.0" in e.value.problems
    with pytest.raises(ConfigError, match="steps must be >= the number of items"):
        from_dict(Top, {"path": "x", "steps": 0, "items": [{"name": "a"}]})


def test_bad_overrides_and_yaml(tmp_path):
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["steps"])
    with pytest.raises(ConfigError, match="plain value"):
        from_dict(Top, {"path": "x"}, ["path.sub=1"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1,\n")
    with pytest.raises(SurgeryError, match="not valid YAML"):
        load_config(Top, bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n")
    with pytest.raises(SurgeryError, match="mapping at the top"):
        load_config(Top, lst)
    with pytest.raises(SurgeryError, match="does not exist"):
        load_config(Top, tmp_path / "missing.yaml")


def test_round_trip_describe_and_diff():
    c = from_dict(Top, {"path": "x", "items": [{"name": "a"}]})
    again = from_dict(Top, __import__("yaml").safe_load(to_yaml(c)))
    assert again == c
    assert to_dict(c)["items"] == [{"name": "a", "weight": 1.0}]
    lines = describe(Top)
    assert "steps (int, 10): how many" in lines
    assert "inner.rate (float, 0.5): a rate" in lines
    assert any(l.startswith("items.N.name (str, required)") for l in lines)
    d = diff(c, from_dict(Top, {"path": "y", "items": [{"name": "a"}]}))
    assert d == {"path": ("x", "y")}


def test_every_recipe_yaml_is_a_valid_config():
    """Each YAML under recipes/ names the config it belongs to by its file name prefix."""
    from distill.config import DistillConfig
    from surgery.transplant.config import HealConfig

    known = {"distill_": DistillConfig, "heal_": HealConfig}
    found = 0
    for p in sorted((ROOT / "recipes").glob("*.yaml")):
        for prefix, cls in known.items():
            if p.name.startswith(prefix):
                cfg = load_config(cls, p)
                assert (cfg.train.steps if cls is DistillConfig else cfg.steps) >= 1
                found += 1
    assert found >= 5


def test_distill_config_rules():
    from distill.config import DistillConfig

    base = {"output_dir": "o", "student": {"model": "s"}, "data": {"train": "t.txt"}}
    with pytest.raises(ConfigError, match="needs at least one entry in `teachers`"):
        from_dict(DistillConfig, base)
    c = from_dict(DistillConfig, base, ["loss.name=ce"])
    assert c.loss.name == "ce"
    with pytest.raises(ConfigError) as e:
        from_dict(DistillConfig, {**base, "teachers": [{"model": "t"}]},
                  ["train.batch_size=3", "train.micro_batch_size=2", "loss.name=nope", "train.warmup_steps=1000"])
    text = "\n".join(e.value.problems)
    assert "multiple of micro_batch_size" in text and "not a registered loss" in text and "warmup_steps" in text


def test_flags_generated_from_fields_yaml_then_flags(tmp_path):
    """Flags carry the field's type, choices, help and default; a flag given wins over the YAML, others don't."""
    import argparse

    from surgery.config_flags import add_config_arguments, config_from_args
    from surgery.transplant.config import HealConfig

    p = argparse.ArgumentParser()
    add_config_arguments(p, HealConfig, fields=("steps", "lr", "params", "seq_len", "minutes"))
    help_text = p.format_help()
    assert "--seq-len SEQ_LEN" in help_text and "tokens per training sequence (default 256)" in help_text
    assert "{new-rows,head,lora,all}" in help_text
    with pytest.raises(SystemExit):
        p.parse_args(["--params", "most"])
    y = tmp_path / "h.yaml"
    y.write_text("steps: 7\nlr: 1.0e-3\nseq_len: 64\n")
    cfg = config_from_args(HealConfig, p.parse_args(["--lr", "0.5", "--params", "all"]), path=str(y))
    assert (cfg.steps, cfg.lr, cfg.seq_len, cfg.params, cfg.batch_size) == (7, 0.5, 64, "all", 4)


def test_numeric_options_all_reported_before_work():
    """Every bad number of a heal or distill config is one problem of one ConfigError (exit 2, one line)."""
    from surgery.transplant.config import HealConfig, TransplantConfig

    with pytest.raises(ConfigError) as e:
        HealConfig(steps=0, lr=float("nan"), batch_size=0, seq_len=2, negatives=-1, all_lr=-1.0)
    text = "; ".join(e.value.problems)
    for part in ("steps must be >= 1", "lr must be a finite number > 0", "batch_size must be >= 1",
                 "seq_len must be >= 8", "negatives must be >= 0", "all_lr must be a finite number > 0"):
        assert part in text, part
    assert "\n" not in str(e.value)
    inf = float("inf")  # an infinite learning rate, budget or temperature is refused too, not run
    with pytest.raises(ConfigError) as e:
        HealConfig(minutes=inf, lr=inf, lora_lr=inf)
    assert [p.split(" must")[0] for p in e.value.problems] == ["minutes", "lr", "lora_lr"]
    with pytest.raises(ConfigError, match="temperature must be a finite number > 0, got inf"):
        TransplantConfig(temperature=inf)
    with pytest.raises(ConfigError, match="unknown key 'methd'"):
        TransplantConfig.from_dict({"methd": "mean"})
    assert HealConfig.from_dict({"steps": "3"}).steps == 3  # typed like YAML
    from distill.config import DistillConfig

    base = {"output_dir": "o", "student": {"model": "s"}, "data": {"train": "t.txt"}, "teachers": [{"model": "t"}]}
    with pytest.raises(ConfigError) as e:
        from_dict(DistillConfig, base, ["train.lr=inf", "loss.temperature=0", "loss.top_k=0", "loss.kd_weight=-1",
                                        "teachers.0.weight=nan", "train.eval_max_length=1", "train.betas=[0.9, 1.5]"])
    text = "; ".join(e.value.problems)
    for part in ("lr must be a finite number > 0", "temperature must be a finite number > 0", "top_k must be >= 1",
                 "kd_weight must be a finite number >= 0", "weight must be a finite number >= 0",
                 "eval_max_length must be >= 2", "betas must lie in [0, 1)"):
        assert part in text, part


def test_validate_must_return_a_list():
    from surgery.config import check

    @dataclass(frozen=True)
    class Old:
        x: int = 1

        def validate(self):
            return self

    with pytest.raises(TypeError, match="must return a list"):
        check(Old())
