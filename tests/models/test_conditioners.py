"""Conditioners: class tables, the frozen OpenCLIP text tower (against open_clip itself), CFG dropout."""

import dataclasses
from pathlib import Path

import pytest
import torch

from ldmscale.config.load import ConfigError, config_from_dict
from ldmscale.models.conditioners import (CONDITIONERS, ClassConditionerConfig, OpenCLIPConditionerConfig,
                                          build_conditioner, unet_compatibility)
from ldmscale.models.unet import UNetConfig

TINY_TEXT = {"width": 32, "heads": 2, "layers": 3, "context_length": 16}
PROMPTS = ["a red square", "a blue circle on grass", "", "two cats"]


@pytest.fixture(scope="module")
def text_conditioner():
    pytest.importorskip("open_clip")
    torch.manual_seed(0)
    return build_conditioner(OpenCLIPConditionerConfig(custom=TINY_TEXT, max_length=16, ucg_rate=0.5))


def test_registry_and_config_errors():
    assert CONDITIONERS.kinds == ["class", "none", "openclip"]
    cfg = config_from_dict(OpenCLIPConditionerConfig, {"layer": "last", "custom": {"width": 32}})
    assert cfg.custom == {"width": 32} and cfg.arch == "ViT-H-14"
    with pytest.raises(ConfigError, match="layer: invalid value 'middle'; valid values: last, penultimate"):
        config_from_dict(OpenCLIPConditionerConfig, {"layer": "middle"})
    with pytest.raises(ConfigError) as e:  # cross-field rules, all reported at once
        config_from_dict(OpenCLIPConditionerConfig, {"custom": {"depth": 2, "layers": 1}, "ucg_rate": 2.0})
    message = str(e.value)
    assert "custom.depth: unknown key" in message and "ucg_rate: must be in [0, 1]" in message
    assert "layer: 'penultimate' needs custom.layers >= 2" in message
    with pytest.raises(ConfigError, match="output: invalid value"):
        config_from_dict(ClassConditionerConfig, {"output": "both"})


def test_class_conditioner_context_mode():
    torch.manual_seed(0)
    cond = build_conditioner(ClassConditionerConfig(num_classes=5, embed_dim=16, ucg_rate=0.0))
    out = cond(torch.tensor([0, 4, 2]))["context"]
    assert out.shape == (3, 1, 16)
    torch.testing.assert_close(out[:, 0], cond.embedding.weight[[0, 4, 2]])
    null = cond.unconditional(2, "cpu")["context"]
    torch.testing.assert_close(null, cond.embedding.weight[5].expand(2, 1, 16))  # the extra null row
    assert cond.embedding.num_embeddings == 6 and cond.context_dim == 16 and cond.num_labels is None
    unet = UNetConfig(context_dim=16)
    assert unet_compatibility(cond, unet) == []
    assert unet_compatibility(cond, dataclasses.replace(unet, context_dim=768)) == [
        "unet.context_dim: must be 16 for this conditioner, got 768"]


def test_class_dropout_replaces_labels_with_the_null_class():
    cond = build_conditioner(ClassConditionerConfig(num_classes=10, output="y", ucg_rate=0.3))
    labels = torch.arange(10).repeat(100)  # 1000 samples
    dropped = cond.drop(cond(labels), torch.Generator().manual_seed(0))["y"]
    again = cond.drop(cond(labels), torch.Generator().manual_seed(0))["y"]
    assert torch.equal(dropped, again)  # the generator alone decides
    is_null = dropped == 10
    assert torch.equal(dropped[~is_null], labels[~is_null])
    assert 0.25 < is_null.float().mean().item() < 0.35
    cond.ucg_rate = 0.0
    assert torch.equal(cond.drop({"y": labels})["y"], labels)


def test_none_conditioner_gives_nothing():
    cond = build_conditioner(CONDITIONERS.config_class("none")())
    assert cond(None) == {} and cond.unconditional(3, "cpu") == {} and cond.drop({}) == {}
    assert unet_compatibility(cond, UNetConfig(context_dim=None)) == []


def test_openclip_last_layer_matches_open_clip(text_conditioner):
    """layer: last reproduces open_clip's own token outputs (tokens after ln_final) for the same weights."""
    import open_clip

    model_cfg = open_clip.get_model_config("ViT-H-14")
    reference = open_clip.model._build_text_tower(model_cfg["embed_dim"], dict(TINY_TEXT)).eval()
    reference.load_state_dict(text_conditioner.model.state_dict(), strict=False)
    reference.output_tokens = True
    tokens = open_clip.get_tokenizer("ViT-H-14", context_length=16)(PROMPTS)
    last = build_conditioner(dataclasses.replace(text_conditioner.cfg, layer="last"))
    last.model.load_state_dict(text_conditioner.model.state_dict())
    with torch.no_grad():
        _, expected = reference(tokens)
    out = last(PROMPTS)["context"]
    assert out.shape == (4, 16, 32) and last.context_dim == 32
    torch.testing.assert_close(out, expected)

    # penultimate (SD2): ln_final applied to the output of all but the last block
    pen = text_conditioner(PROMPTS)["context"]
    blocks = text_conditioner.model.transformer.resblocks
    with torch.no_grad():
        x = reference.token_embedding(tokens) + reference.positional_embedding
        for block in blocks[:-1]:
            x = block(x, attn_mask=reference.attn_mask)
        torch.testing.assert_close(pen, reference.ln_final(x))
    assert (pen - out).abs().max() > 1e-3


def test_openclip_is_frozen_and_uncond_is_the_empty_prompt(text_conditioner):
    text_conditioner.train()
    assert not text_conditioner.model.training
    assert not any(p.requires_grad for p in text_conditioner.parameters())
    cond = text_conditioner(PROMPTS)
    assert not cond["context"].requires_grad
    uncond = text_conditioner.unconditional(4, "cpu")["context"]
    torch.testing.assert_close(uncond[2], cond["context"][2])  # PROMPTS[2] is the empty prompt
    dropped = text_conditioner.drop(cond, torch.Generator().manual_seed(1))["context"]
    rows = [bool(torch.equal(dropped[i], uncond[i])) for i in range(4)]
    kept = [bool(torch.equal(dropped[i], cond["context"][i])) for i in range(4)]
    assert all(r or k for r, k in zip(rows, kept)) and any(r for i, r in enumerate(rows) if i != 2)


def test_openclip_weights_round_trip(text_conditioner, tmp_path: Path):
    """A local open_clip-layout file (with unrelated visual / projection keys) loads strictly."""
    from safetensors.torch import save_file

    state = {k: v.clone() for k, v in text_conditioner.model.state_dict().items()}
    state["visual.proj"] = torch.zeros(2, 2)
    state["text_projection"] = torch.zeros(32, 16)
    save_file(state, tmp_path / "tower.safetensors")
    torch.save({"state_dict": {"cond_stage_model.model." + k: v for k, v in state.items()}}, tmp_path / "sd2.ckpt")
    for name in ("tower.safetensors", "sd2.ckpt"):
        torch.manual_seed(99)  # a different random init, overwritten by the file
        loaded = build_conditioner(dataclasses.replace(text_conditioner.cfg, weights=str(tmp_path / name)))
        torch.testing.assert_close(loaded(PROMPTS)["context"], text_conditioner(PROMPTS)["context"])
    with pytest.raises(ValueError, match="max_length: must equal the text tower's context_length 16"):
        build_conditioner(dataclasses.replace(text_conditioner.cfg, max_length=77))
    save_file({k: v for k, v in state.items() if not k.startswith("ln_final")}, tmp_path / "partial.safetensors")
    with pytest.raises(ValueError, match="does not fit the ViT-H-14 text tower"):
        build_conditioner(dataclasses.replace(text_conditioner.cfg, weights=str(tmp_path / "partial.safetensors")))
    with pytest.raises(ValueError, match="weights: file"):
        build_conditioner(dataclasses.replace(text_conditioner.cfg, weights=str(tmp_path / "missing.pt")))
