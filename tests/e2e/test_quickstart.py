"""`ldmscale quickstart --size tiny`: every stage runs for real (shards, autoencoder, cached latents,
text-conditioned LDM, judge, samples, PDAE heads and their evaluation), leaves its artifacts, and every
figure of the report clears its threshold for that size (the command exits 1 otherwise)."""

from __future__ import annotations

import json

from PIL import Image

from ldmscale.pipelines.quickstart import SIZES
from tests.e2e.harness import run

PNGS = ("autoencoder_reconstructions.png", "ldm_samples.png", "pdae_reconstructions.png", "pdae_interpolations.png",
        "loss_autoencoder.png", "loss_ldm.png", "loss_pdae.png")


def test_quickstart_tiny(tmp_path):
    out = tmp_path / "quickstart"
    # One process alone: both of CI's cores (the thresholds were measured with two threads).
    result = run(["quickstart", "--out", str(out), "--size", "tiny"], check=False, threads=2)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert "every check passed" in result.stdout
    for stage in ("[1/8] shards", "[4/8] latent diffusion", "[8/8] pdae evaluation"):
        assert stage in result.stdout
    for name in PNGS:
        assert Image.open(out / name).size[0] > 64, name
    for name in ("autoencoder/export/autoencoder.safetensors", "latents/manifest.json", "ldm/export/ldm.safetensors",
                 "pdae/export/pdae.safetensors", "ldm/config.yaml", "report.md"):
        assert (out / name).is_file(), name
    assert list((out / "ldm" / "wandb").glob("offline-run-*")), "wandb wrote no offline run"

    report = json.loads((out / "report.json").read_text())
    assert set(report["checks"]) == set(SIZES["tiny"].thresholds)
    for name, check in report["checks"].items():
        assert check["passed"] and check["value"] > check["threshold"], (name, check)
    # The judge must read clean images before its verdict on samples means anything.
    judge = report["prompt_adherence"]["judge"]["rendered"]
    assert judge["color"] > 0.9 and judge["position"] > 0.9, judge
    markdown = (out / "report.md").read_text()
    for heading in ("## Checks", "## Autoencoder", "## Text-conditioned latent diffusion", "## PDAE heads",
                    "## Time per stage"):
        assert heading in markdown
    assert set(report["seconds"]) == {"shards", "autoencoder", "cache latents", "latent diffusion", "judge",
                                      "samples", "pdae", "pdae evaluation"}
