"""[multi-rank] DeepSpeed checkpoints of ZeRO stages 0, 2 and 3 -> one safetensors file on one CPU process.

The tiny autoencoder stage trains 2 steps without EMA, so the trainer's export holds the live weights,
gathered from every rank; the consolidated file must equal them (the fp32 master copies rounded to
the training dtype, for bf16) and compute the same reconstructions in a single-process model.
"""

from __future__ import annotations

import pytest
import torch

from ldmscale.checkpoint.export import load_export
from ldmscale.config.load import config_from_dict
from ldmscale.config.schema import RunConfig
from ldmscale.models.autoencoder import Autoencoder
from tests.e2e.harness import DEBUG_AE, run


@pytest.mark.parametrize("stage,precision,nproc", [(3, "fp32", 2), (2, "bf16", 2), (0, "bf16", 1)])
def test_zero_checkpoint_consolidates_to_the_trained_weights(tmp_path, convert_shards, stage, precision, nproc):
    run_dir = tmp_path / "run"
    run(["train", DEBUG_AE, f"run.dir={run_dir}", f"data.shards={convert_shards}", "train.progress=false",
         "train.image_every=0", "train.validate_every=0", "train.max_steps=2", "checkpoint.every_steps=2",
         f"distributed.zero_stage={stage}", f"distributed.precision={precision}", "ema.enabled=false"], nproc=nproc)
    out = tmp_path / "autoencoder.safetensors"
    run(["convert", "zero-to-safetensors", str(run_dir), str(out)])  # one process, whatever the training world size
    state, meta = load_export(out)
    trained, trained_meta = load_export(run_dir / "export" / "autoencoder.safetensors")
    assert (meta["zero_stage"], meta["world_size"], meta["step"], meta["ema"]) == (stage, nproc, 2, False)
    assert meta["config"] == trained_meta["config"] and meta["scale_factor"] == trained_meta["scale_factor"]
    assert sorted(state) == sorted(trained) and all(v.dtype == torch.float32 for v in state.values())
    for name, tensor in trained.items():
        assert torch.equal(state[name].to(tensor.dtype), tensor), name

    # At the training precision (fp32 masters rounded to bf16 where it trained in bf16), the single-process
    # model computes exactly what the trained one does.
    cfg = config_from_dict(RunConfig, meta["config"]).task.model
    single, reference = Autoencoder(cfg).eval(), Autoencoder(cfg).eval()
    single.load_state_dict({k: v.to(trained[k].dtype).float() for k, v in state.items()}, strict=True)
    reference.load_state_dict({k: v.float() for k, v in trained.items()}, strict=True)
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        reconstruction = single(images, sample=False)[0]
        assert reconstruction.abs().mean() > 0.01
        assert torch.equal(reconstruction, reference(images, sample=False)[0])

    half = tmp_path / "autoencoder-bf16.safetensors"
    run(["convert", "zero-to-safetensors", str(run_dir / "checkpoints" / "step-00000002"), str(half),
         "--engine", "discriminator", "--dtype", "bf16"])
    discriminator, meta = load_export(half)
    assert meta["network"] == "discriminator" and all(v.dtype == torch.bfloat16 for v in discriminator.values()
                                                      if v.is_floating_point())
