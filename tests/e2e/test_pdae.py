"""PDAE as real processes: on top of the debug autoencoder and an unconditional debug LDM, 2-rank ZeRO-2
training of the heads resumes exactly after kill -9 (frozen LDM outside the engine), ZeRO-3 trains as
ZeRO-2 does; the export feeds `ldmscale pdae {reconstruct,interpolate,edit,probe}`."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from ldmscale.checkpoint.export import read_export_metadata
from ldmscale.checkpoint.io import load_safetensors
from ldmscale.config.load import load_yaml_with_overrides
from tests.e2e.harness import ROOT, kill_after_checkpoint_then_rerun, metrics, run

DEBUG_LDM = ROOT / "configs" / "debug" / "ldm.yaml"
DEBUG_PDAE = str(ROOT / "configs" / "debug" / "pdae.yaml")


@pytest.fixture(scope="module")
def ldm_export(tmp_path_factory, synth_shards, kl_autoencoder) -> Path:
    """An unconditional debug LDM (6 steps) on the debug autoencoder (4 steps), both through the CLI."""
    root = tmp_path_factory.mktemp("pdae-prereq")
    common = [f"data.shards={synth_shards / 'train'}", "train.progress=false", "train.image_every=0",
              "train.validate_every=0"]
    data = load_yaml_with_overrides(DEBUG_LDM)
    data["task"]["conditioner"] = {"kind": "none"}
    data["task"]["unet"]["context_dim"] = None
    data["task"]["sample"]["prompts"] = []
    config = root / "ldm_uncond.yaml"
    config.write_text(yaml.safe_dump(data))
    run(["train", str(config), f"run.dir={root / 'ldm'}", f"task.autoencoder={kl_autoencoder}",
         "train.max_steps=6", "checkpoint.every_steps=6", *common])
    return root / "ldm" / "export" / "ldm.safetensors"


RUN = ("distributed.zero_stage=2", "train.max_steps=6", "checkpoint.every_steps=3", "train.image_every=3",
       "task.sample.encode_steps=4", "task.sample.decode_steps=4", "train.micro_batch_size=4")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, synth_shards, ldm_export) -> tuple[Path, list[str]]:
    run_dir = tmp_path_factory.mktemp("pdae") / "reference"
    args = ["train", DEBUG_PDAE, f"run.dir={run_dir}", f"data.shards={synth_shards / 'train'}",
            f"task.ldm={ldm_export}", "train.progress=false", *RUN]
    run(args, nproc=2)
    return run_dir, args


def test_zero2_pdae_resumes_exactly_after_sigkill(tmp_path, reference, ldm_export):
    """kill -9 after the step-3 checkpoint, rerun: steps 4-6 (loss, z_std, data) and the final EMA equal the
    uninterrupted run's. Only the heads are in the engine, the EMA and the export."""
    reference_dir, reference_args = reference
    resumed_dir = tmp_path / "resumed"
    args = [f"run.dir={resumed_dir}" if a.startswith("run.dir=") else a for a in reference_args]
    kill_after_checkpoint_then_rerun(args, resumed_dir, 3, 6, tmp_path / "killed.log")

    ref, res = metrics(reference_dir), metrics(resumed_dir)
    assert sorted(res) == list(range(1, 7))
    for step in range(4, 7):
        for key in ("loss", "z_std", "data_crc"):
            assert res[step][key] == ref[step][key], (step, key)
    final = "checkpoints/step-00000006/ema-pdae.safetensors"
    ema_ref, ema_res = load_safetensors(reference_dir / final), load_safetensors(resumed_dir / final)
    assert {k.split(".")[0] for k in ema_ref} == {"encoder", "decoder"}
    assert all((ema_ref[k] == ema_res[k]).all() for k in ema_ref)
    meta = read_export_metadata(reference_dir / "export" / "pdae.safetensors")
    assert meta["stage"] == "pdae" and meta["ema"] and meta["ldm"] == str(ldm_export)
    assert meta["ldm_unet_content_hash"] and meta["latent_shape"] == [4, 8, 8]
    with Image.open(reference_dir / "images" / "reconstructions-00000003.png") as grid:
        assert grid.size[1] == 2 * 34 + 2  # inputs over reconstructions


def test_zero3_pdae_trains_like_zero2(tmp_path, reference):
    """2 ranks, ZeRO-3: the heads are partitioned (the frozen LDM is not: it sits outside the engine), and
    steps 1-3 give the ZeRO-2 run's losses; the step-3 EMA, gathered in full, equals ZeRO-2's."""
    reference_dir, reference_args = reference
    run_dir = tmp_path / "zero3"
    args = [f"run.dir={run_dir}" if a.startswith("run.dir=") else a for a in reference_args]
    run([*args, "distributed.zero_stage=3", "train.max_steps=3", "train.image_every=0"], nproc=2)
    ref, got = metrics(reference_dir), metrics(run_dir)
    assert [got[s]["loss"] for s in (1, 2, 3)] == pytest.approx([ref[s]["loss"] for s in (1, 2, 3)], rel=1e-5)
    ema = "checkpoints/step-00000003/ema-pdae.safetensors"
    ema_ref, ema_got = load_safetensors(reference_dir / ema), load_safetensors(run_dir / ema)
    assert ema_got.keys() == ema_ref.keys()
    for name, tensor in ema_ref.items():
        torch.testing.assert_close(ema_got[name], tensor, rtol=1e-3, atol=3e-4, msg=name)


def cli(capsys, *args: str) -> tuple[int, str, str]:
    """`ldmscale ARGS` in this process (the tools are single-process; a process each would cost ~30 s here)."""
    from ldmscale.launch.cli import main

    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_pdae_tools_write_grids_and_probe(tmp_path, reference, synth_shards, capsys):
    run_dir, val, train = str(reference[0]), str(synth_shards / "val"), str(synth_shards / "train")
    steps = ("--encode-steps", "4", "--decode-steps", "4")
    code, out, err = cli(capsys, "pdae", "reconstruct", run_dir, "--input", val, "--num", "4",
                         "--out", str(tmp_path / "recon.png"), *steps)
    assert code == 0 and "pixel MSE" in out, err
    with Image.open(tmp_path / "recon.png") as grid:
        assert grid.size == (4 * 34 + 2, 2 * 34 + 2) and len(set(grid.getdata())) > 100
    code, _, err = cli(capsys, "pdae", "interpolate", run_dir, "--input", val, "--pairs", "1", "--num", "3",
                       "--out", str(tmp_path / "interp.png"), *steps)
    assert code == 0, err
    with Image.open(tmp_path / "interp.png") as grid:
        assert grid.size == (3 * 34 + 2, 34 + 2)
    code, _, err = cli(capsys, "pdae", "edit", run_dir, "--input", train, "--attribute", "is_red", "--num", "2",
                       "--scales", "-0.3", "0", "0.3", "--out", str(tmp_path / "edit.png"), *steps)
    assert code == 0, err
    with Image.open(tmp_path / "edit.png") as grid:
        assert grid.size == (3 * 34 + 2, 2 * 34 + 2)
    code, out, err = cli(capsys, "pdae", "probe", run_dir, "--input", train)
    lines = {line.split()[0]: line.split() for line in out.splitlines() if "accuracy" in line}
    assert code == 0 and {"is_circle", "is_red", "dark_background", "shape", "color"} <= set(lines), err
    assert all(0.0 <= float(v[2]) <= 1.0 and 0.0 <= float(v[5]) <= 1.0 for v in lines.values())
    code, _, err = cli(capsys, "pdae", "edit", run_dir, "--input", train, "--attribute", "is_purple",
                       "--out", str(tmp_path / "x.png"))
    assert code == 2 and "--attribute" in err and "is_red" in err
