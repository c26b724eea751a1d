"""The LDM UNet: exact SD parameter counts, one-to-one structure with diffusers, checkpointing, overfitting."""

import dataclasses
from pathlib import Path

import pytest
import torch

from ldmscale.config.load import ConfigError, config_from_dict, load_yaml_with_overrides
from ldmscale.models.conditioners import (ClassConditioner, ClassConditionerConfig, OpenCLIPConditionerConfig,
                                          build_conditioner, unet_compatibility)
from ldmscale.models.unet import UNet, UNetConfig

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def yaml_unet(path: Path) -> UNetConfig:
    data = load_yaml_with_overrides(path)
    assert data["stage"] == "latent_diffusion" and "unet" in data["task"]
    return config_from_dict(UNetConfig, data["task"]["unet"])


def tiny(**overrides) -> UNetConfig:
    return dataclasses.replace(yaml_unet(CONFIGS / "debug" / "ldm_model.yaml"), **overrides)


@pytest.mark.parametrize("name,params", [("sd15.yaml", 859_520_964), ("sd2-base.yaml", 865_910_724)])
def test_sd_parameter_counts(name, params):
    cfg = yaml_unet(CONFIGS / "ldm" / name)
    with torch.device("meta"):
        model = UNet(cfg)
    tensors = list(model.parameters())
    assert (sum(p.numel() for p in tensors), len(tensors)) == (params, 686)
    keys = set(model.state_dict())
    # original checkpoint names (peers.md §4.1), minus the `model.diffusion_model.` prefix
    assert {"time_embed.0.weight", "time_embed.2.bias", "input_blocks.0.0.weight", "input_blocks.3.0.op.weight",
            "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight", "middle_block.1.proj_in.weight",
            "middle_block.2.out_layers.3.weight", "output_blocks.2.1.conv.weight", "output_blocks.5.2.conv.weight",
            "output_blocks.11.0.skip_connection.weight", "out.0.weight", "out.2.bias"} <= keys
    proj = dict(model.named_parameters())["input_blocks.1.1.proj_in.weight"]
    assert proj.ndim == (2 if cfg.use_linear_in_transformer else 4)  # SD2 Linear, SD1 1x1 conv


def test_debug_config_forward_shapes():
    cfg = tiny()
    model = UNet(cfg)
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([3, 700]), torch.randn(2, 5, 32)
    assert model(x, t, ctx).shape == (2, 4, 8, 8)
    h, skips, emb = model.encode_features(x, t, ctx)
    assert h.shape == (2, 64, 4, 4) and len(skips) == len(model.input_blocks) and skips[-1] is h
    assert emb.shape == (2, 4 * cfg.model_channels)
    torch.nn.init.normal_(model.out[2].weight)  # out conv starts at zero; make the comparison non-trivial
    out = model(x, t, ctx)
    torch.testing.assert_close(model.decode_features(h, skips, emb, ctx), out)
    assert len(skips) == len(model.input_blocks)  # decode_features leaves the caller's skips intact
    assert out.abs().max() > 0


def test_config_validation_names_keys():
    with pytest.raises(ConfigError) as e:
        config_from_dict(UNetConfig, {"model_channels": 48, "attention_resolutions": [16], "num_heads": -1})
    message = str(e.value)
    assert "attention_resolutions: 16" in message and "valid values: 1, 2, 4, 8" in message
    assert "num_heads: exactly one of" in message
    with pytest.raises(ConfigError, match="model_channels: every level width"):
        config_from_dict(UNetConfig, {"model_channels": 48})
    with pytest.raises(ValueError, match="context"):
        UNet(tiny())(torch.randn(1, 4, 8, 8), torch.tensor([1]))


def _randomise(model: torch.nn.Module, seed: int = 0) -> None:
    """Perturbs every parameter (zero-initialised output convs included) so outputs are non-trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


def _original_unet_params(cfg: UNetConfig) -> dict:
    """The `unet_config.params` of an original LDM yaml for this config (-1 head settings omitted)."""
    params = {k: v for k, v in dataclasses.asdict(cfg).items()
              if k not in ("gradient_checkpointing", "dropout") and v != -1}
    if cfg.num_classes is None:
        params.pop("num_classes")
    return params


@pytest.mark.parametrize("style", ["sd1", "sd2"])
def test_matches_diffusers_after_original_checkpoint_conversion(style):
    """Our state dict, prefixed as an original checkpoint, converts with diffusers' own converter with
    every tensor used exactly once, and diffusers' UNet then computes the same function."""
    single_file = pytest.importorskip("diffusers.loaders.single_file_utils")
    from diffusers import UNet2DConditionModel

    if style == "sd1":  # 1x1-conv projections, a head count, and a class-embedding table
        cfg = tiny(num_heads=2, num_head_channels=-1, use_linear_in_transformer=False, num_classes=10)
    else:  # Linear projections and a head width, as SD2
        cfg = tiny(transformer_depth=2)
    torch.manual_seed(0)
    ours = UNet(cfg).eval()
    _randomise(ours)
    checkpoint = {"model.diffusion_model." + k: v for k, v in ours.state_dict().items()}
    original_config = {"model": {"params": {
        "unet_config": {"params": _original_unet_params(cfg)},
        "first_stage_config": {"params": {"ddconfig": {"ch_mult": [1, 2, 4, 4]}}},
    }}}
    config = single_file.create_unet_diffusers_config_from_ldm(original_config, checkpoint)
    converted = single_file.convert_ldm_unet_checkpoint(checkpoint, config)

    # diffusers ignores keys it does not know: check that each of our tensors was used exactly once
    assert len(converted) == len(checkpoint)
    assert {v.data_ptr() for v in converted.values()} == {v.data_ptr() for v in checkpoint.values()}

    theirs = UNet2DConditionModel(**config).eval()
    theirs.load_state_dict(converted, strict=True)
    g = torch.Generator().manual_seed(1)
    x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 7, cfg.context_dim, generator=g)
    t = torch.tensor([17, 802])
    y = torch.tensor([3, 9]) if cfg.num_classes else None
    with torch.no_grad():
        expected = theirs(x, t, encoder_hidden_states=ctx, class_labels=y).sample
        out = ours(x, t, ctx, y)
    assert expected.abs().mean() > 0.1
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


def test_gradient_checkpointing_gives_identical_gradients():
    torch.manual_seed(0)
    plain = UNet(tiny(dropout=0.1, transformer_depth=2)).train()
    _randomise(plain)
    ckpt = UNet(tiny(dropout=0.1, transformer_depth=2, gradient_checkpointing=True)).train()
    ckpt.load_state_dict(plain.state_dict())
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([5, 500]), torch.randn(2, 3, 32)
    grads = []
    for model in (plain, ckpt):
        torch.manual_seed(123)  # same dropout masks; checkpoint replays the RNG state on recomputation
        model(x, t, ctx).square().mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-6, atol=1e-7, msg=name)


def overfit(model: torch.nn.Module, cond: dict, steps: int = 25, lr: float = 3e-3) -> tuple[float, float]:
    """Plain Adam on a fixed batch of 4 random latents with fixed noise and timesteps (eps target)."""
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 4, 8, 8, generator=g)
    noise = torch.randn(4, 4, 8, 8, generator=g)
    t = torch.tensor([50, 250, 500, 900])
    ab = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000).double().pow(2).neg().add(1).cumprod(0)[t].float()
    x_t = ab.sqrt().view(4, 1, 1, 1) * x0 + (1 - ab).sqrt().view(4, 1, 1, 1) * noise
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss = (model(x_t, t, **cond) - noise).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses[0], min(losses[-3:])


def test_tiny_class_conditioned_unet_overfits():
    torch.manual_seed(0)
    conditioner = ClassConditioner(ClassConditionerConfig(num_classes=3, output="y"))
    cfg = tiny(context_dim=None, num_classes=4)  # label_emb path, no cross-attention
    assert unet_compatibility(conditioner, cfg) == []
    first, last = overfit(UNet(cfg), conditioner(torch.tensor([0, 1, 2, 1])))
    assert last < first / 10, (first, last)


def test_tiny_text_conditioned_unet_overfits():
    """Cross-attention on the context of a frozen tiny OpenCLIP tower (random weights)."""
    pytest.importorskip("open_clip")
    torch.manual_seed(0)
    conditioner = build_conditioner(OpenCLIPConditionerConfig(custom={"width": 32, "heads": 2, "layers": 2,
                                                                      "context_length": 16}, max_length=16))
    cfg = tiny()
    assert unet_compatibility(conditioner, cfg) == []
    cond = conditioner(["a red square", "a blue circle", "", "two cats"])  # frozen: encoded once
    first, last = overfit(UNet(cfg), cond)
    assert last < first / 10, (first, last)


def test_guided_ddim_sampling_through_the_unet():
    """The UNet as a sampler denoiser with batched CFG over both conditioning keys (context and y)."""
    from ldmscale.diffusion.guidance import CFGDenoiser
    from ldmscale.diffusion.objectives import build_prediction
    from ldmscale.diffusion.samplers import ddim_sample, model_denoiser
    from ldmscale.diffusion.schedule import NoiseSchedule, ScheduleConfig

    torch.manual_seed(0)
    model = UNet(tiny(num_classes=4)).eval()
    _randomise(model)
    cond = {"context": torch.randn(2, 5, 32), "y": torch.tensor([1, 2])}
    uncond = {"context": torch.zeros(1, 5, 32), "y": torch.tensor([3])}
    schedule, pred = NoiseSchedule.from_config(ScheduleConfig()), build_prediction("v")
    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    plain = ddim_sample(model_denoiser(model), x_T, schedule, prediction=pred, cond=cond, steps=3)
    guided_1 = ddim_sample(CFGDenoiser(model_denoiser(model), uncond, 1.0), x_T, schedule, prediction=pred,
                           cond=cond, steps=3)
    guided_4 = ddim_sample(CFGDenoiser(model_denoiser(model), uncond, 4.0), x_T, schedule, prediction=pred,
                           cond=cond, steps=3)
    assert plain.shape == x_T.shape and torch.isfinite(guided_4).all()
    torch.testing.assert_close(guided_1, plain, rtol=1e-4, atol=1e-5)
    assert (guided_4 - plain).abs().max() > 1e-3
