"""docs/configs.md is generated from the config dataclasses and must match them."""

from __future__ import annotations

from ldmscale.config.reference import OUTPUT, render_reference


def test_committed_reference_matches_the_dataclasses():
    assert OUTPUT.read_text() == render_reference(), \
        "docs/configs.md is stale: regenerate it with `python -m ldmscale.config.reference`"


def test_reference_lists_keys_types_defaults_and_comments():
    text = render_reference()
    assert "| `distributed.zero_stage` | 0 \\| 1 \\| 2 \\| 3 | `0` |" in text
    assert "| `task.unet.attention_resolutions` | list[int] | `[4, 2, 1]` | downsampling factors |" in text
    for heading in ("### `data` = latents (LatentDataConfig)", "### `task` = pdae (PDAETaskConfig)",
                    "### `task.model.regularizer` = vq (VQConfig)", "### `cache` (CacheConfig)"):
        assert heading in text
