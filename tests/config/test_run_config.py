"""The real run schema: the errors users see, the resolved config written back, `ldmscale info`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ldmscale.config.load import ConfigError, config_from_dict, config_to_dict, dump_config
from ldmscale.config.schema import RunConfig, load_run_config

ROOT = Path(__file__).resolve().parents[2]
DEBUG_AE = ROOT / "configs" / "debug" / "autoencoder.yaml"


def _problems(*overrides: str) -> list[str]:
    with pytest.raises(ConfigError) as e:
        load_run_config(str(DEBUG_AE), list(overrides))
    return e.value.problems


def test_typo_in_key_names_full_key_and_valid_keys():
    [problem] = _problems("train.max_stpes=10")
    assert problem.startswith("train.max_stpes: unknown key; valid keys of train: max_steps, micro_batch_size")


def test_bad_zero_stage_names_valid_values():
    assert _problems("distributed.zero_stage=5") == [
        "distributed.zero_stage: invalid value 5; valid values: 0, 1, 2, 3"]


def test_bad_kinds_list_valid_kinds():
    problems = _problems("task.model.regularizer.kind=gumbel", "data.kind=video")
    assert "task.model.regularizer.kind: unknown regularizer kind 'gumbel'; valid kinds: kl, vq" in problems
    assert any(p.startswith("data.kind: unknown data kind 'video'; valid kinds: images") for p in problems)
    # An unknown stage leaves the task section's schema unknown: that one problem is reported.
    assert any(p.startswith("stage: unknown stage kind 'gan'; valid kinds: autoencoder")
               for p in _problems("stage=gan"))


def test_bad_type_and_all_problems_at_once():
    problems = _problems("train.micro_batch_size=big", "distributed.precision=fp8", "optim.lr=-1")
    assert "train.micro_batch_size: expected int, got str 'big'" in problems
    assert "distributed.precision: invalid value 'fp8'; valid values: fp32, bf16, fp16" in problems
    assert "optim.lr: must be positive, got -1.0" in problems


def test_cli_reports_config_errors_before_any_work(tmp_path):
    result = subprocess.run([sys.executable, "-m", "ldmscale", "train", str(DEBUG_AE), "train.max_stpes=10",
                             "distributed.zero_stage=5", f"run.dir={tmp_path / 'run'}"],
                            capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 2
    assert "train.max_stpes: unknown key" in result.stderr
    assert "distributed.zero_stage: invalid value 5" in result.stderr
    assert not (tmp_path / "run").exists()


def test_resolved_config_round_trips():
    cfg = load_run_config(str(DEBUG_AE), ["train.max_steps=7", "task.model.regularizer.kind=vq"])
    assert cfg.train.max_steps == 7 and cfg.task.model.regularizer.kind == "vq"
    assert config_from_dict(RunConfig, config_to_dict(cfg)) == cfg
    assert "max_steps: 7" in dump_config(cfg)


@pytest.mark.parametrize("name", ["kl-f4", "kl-f8", "kl-f16", "vq-f4"])
def test_shipped_autoencoder_configs_load(name):
    cfg = load_run_config(str(ROOT / "configs" / "autoencoder" / f"{name}.yaml"))
    assert cfg.stage == "autoencoder"


def test_info_counts_kl_f8_and_zero_memory():
    result = subprocess.run([sys.executable, "-m", "ldmscale", "info", str(ROOT / "configs/autoencoder/kl-f8.yaml"),
                             "--gpus", "4", "--json"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["components"]["autoencoder"]["parameters"] == 83_653_863
    assert info["components"]["autoencoder"]["tensors"] == 248
    assert info["components"]["lpips"]["trainable"] is False
    trainable = info["trainable"]
    gib = 2**30
    z0, z3 = info["memory_gib_per_gpu"]["zero0"], info["memory_gib_per_gpu"]["zero3"]
    bytes_per_param = {"fp32": (4, 4, 8), "bf16": (2, 2, 12), "fp16": (2, 2, 12)}[info["precision"]]
    assert z0["optimizer"] * gib == pytest.approx(trainable * bytes_per_param[2])
    assert z3["optimizer"] * gib == pytest.approx(trainable * bytes_per_param[2] / 4)
    assert z3["params"] * gib == pytest.approx(trainable * bytes_per_param[0] / 4)


@pytest.mark.parametrize("frozen_precision, bytes_per_frozen", [("fp32", 4), ("training", 2)])
def test_info_counts_the_frozen_networks_at_their_precision(frozen_precision, bytes_per_frozen):
    """bf16 training: the LDM's frozen autoencoder and text encoder take 4 bytes a parameter unless
    `task.frozen_precision: training` casts them to bf16."""
    from ldmscale.launch.info import describe

    cfg = load_run_config(str(ROOT / "configs/debug/ldm.yaml"), ["distributed.precision=bf16",
                                                                  f"task.frozen_precision={frozen_precision}"])
    info = describe(cfg, num_gpus=2)
    assert info["frozen"] > 0
    assert info["memory_gib_per_gpu"]["zero2"]["frozen"] * 2**30 == pytest.approx(info["frozen"] * bytes_per_frozen)
