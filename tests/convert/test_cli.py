"""`ldmscale convert` on a real (tiny) trained latent diffusion run: DeepSpeed checkpoint + EMA -> original
single file with model_ema.* -> back into an ldmscale folder that samples and that PDAE heads train on;
export -> diffusers -> back."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from ldmscale.checkpoint.export import load_export
from ldmscale.launch.cli import main
from ldmscale.pipelines.sample import load_pipeline
from tests.convert import tiny
from tests.e2e.harness import DEBUG_AE, ROOT, process_env, run

DEBUG_LDM = str(ROOT / "configs" / "debug" / "ldm.yaml")


@pytest.fixture(scope="module")
def ldm_run(tmp_path_factory, convert_shards):
    """An autoencoder run and a text-conditioned LDM run on it, 2 steps each, one process, EMA on."""
    root = tmp_path_factory.mktemp("ldm-run")
    common = [f"data.shards={convert_shards}", "train.progress=false", "train.image_every=0", "train.validate_every=0",
              "train.max_steps=2", "checkpoint.every_steps=2"]
    run(["train", DEBUG_AE, f"run.dir={root / 'ae'}", *common])
    run(["train", DEBUG_LDM, f"run.dir={root / 'ldm'}",
         f"task.autoencoder={root / 'ae' / 'export' / 'autoencoder.safetensors'}", *common])
    return root / "ldm"


def _convert(*args) -> None:
    assert main(["convert", *map(str, args)]) == 0


def test_checkpoint_to_original_and_back_keeps_live_and_ema_weights(ldm_run, tmp_path):
    original = tmp_path / "model.safetensors"
    _convert("to-original", ldm_run, original, "--weights", "raw", "--with-ema")
    assert original.with_suffix(".yaml").is_file()  # the CompVis inference config beside it
    for weights in ("main", "ema"):  # the configs come back from the file's metadata
        _convert("from-original", original, tmp_path / weights, "--weights", weights)
    exported, _ = load_export(ldm_run / "export" / "ldm.safetensors")  # the trainer's EMA export
    imported, meta = load_export(tmp_path / "ema" / "export" / "ldm.safetensors")
    tiny.assert_same(imported, exported, "EMA through model_ema.*")
    live, _ = load_export(tmp_path / "main" / "export" / "ldm.safetensors")
    assert not all(torch.equal(live[k], exported[k]) for k in exported)  # the live weights, not the average
    pipeline = load_pipeline(tmp_path / "ema")  # refuses a different autoencoder or text tower
    images = pipeline.generate(["a red circle"], 1, steps=2, generator=torch.Generator().manual_seed(0))
    assert images.shape == (1, 3, 32, 32) and meta["ema"] is True


def test_pdae_heads_train_on_an_imported_original_checkpoint(ldm_run, convert_shards, tmp_path):
    """An original single-file checkpoint, imported, is a pre-trained LDM the PDAE stage trains on; the
    heads' export names it, and `pdae reconstruct` loads both (checking the frozen UNet's content hash)."""
    original = tmp_path / "model.safetensors"
    _convert("to-original", ldm_run, original, "--weights", "ema")
    _convert("from-original", original, tmp_path / "imported")
    imported = tmp_path / "imported" / "export" / "ldm.safetensors"
    run(["train", str(ROOT / "configs" / "debug" / "pdae.yaml"), f"run.dir={tmp_path / 'pdae'}",
         f"task.ldm={tmp_path / 'imported'}", f"data.shards={convert_shards}", "train.progress=false",
         "train.image_every=0", "train.max_steps=2", "checkpoint.every_steps=2", "train.micro_batch_size=4"])
    _, meta = load_export(tmp_path / "pdae" / "export" / "pdae.safetensors")
    assert meta["stage"] == "pdae" and meta["ldm"] == str(imported)
    assert main(["pdae", "reconstruct", str(tmp_path / "pdae"), "--input", str(convert_shards), "--num", "2",
                 "--encode-steps", "2", "--decode-steps", "2", "--out", str(tmp_path / "recon.png")]) == 0
    assert (tmp_path / "recon.png").is_file()


def test_export_to_diffusers_and_back_and_ema_consolidation(ldm_run, tmp_path):
    export = ldm_run / "export" / "ldm.safetensors"
    _convert("to-diffusers", export, tmp_path / "diffusers")
    assert {p.name for p in (tmp_path / "diffusers").iterdir()} >= {"unet", "vae", "scheduler", "text_encoder"}
    _convert("from-diffusers", tmp_path / "diffusers", tmp_path / "back")
    exported, _ = load_export(export)
    tiny.assert_same(load_export(tmp_path / "back" / "export" / "ldm.safetensors")[0], exported, "diffusers round trip")
    ae_before = load_export(ldm_run.parent / "ae" / "export" / "autoencoder.safetensors")[0]
    tiny.assert_same(load_export(tmp_path / "back" / "export" / "autoencoder.safetensors")[0], ae_before, "autoencoder")
    # The thin script: the EMA of the newest checkpoint is the exported model.
    ema = tmp_path / "ema.safetensors"
    subprocess.run([sys.executable, str(ROOT / "tools" / "convert_checkpoint.py"), "zero-to-safetensors",
                    str(ldm_run), str(ema), "--ema"], env=process_env(), check=True, capture_output=True)
    tiny.assert_same(load_export(ema)[0], exported, "--ema")


def test_user_errors_name_the_option(ldm_run, tmp_path, capsys):
    assert main(["convert", "to-original", str(ldm_run / "export" / "ldm.safetensors"), str(tmp_path / "x.safetensors"),
                 "--weights", "raw"]) == 2
    assert "--weights raw: " in capsys.readouterr().err
    assert main(["convert", "from-original", str(tmp_path / "missing.ckpt"), str(tmp_path / "out")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["convert", "zero-to-safetensors", str(ldm_run), str(tmp_path / "x.bin")]) == 2
    assert "must end in .safetensors" in capsys.readouterr().err
