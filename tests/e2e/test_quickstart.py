"""`ldmscale quickstart --size tiny`: every stage that exists runs for real and leaves its artifacts."""

from __future__ import annotations

import json

from PIL import Image

from tests.e2e.harness import run


def test_quickstart_tiny(tmp_path):
    out = tmp_path / "quickstart"
    run(["quickstart", "--out", str(out), "--size", "tiny"])
    report = json.loads((out / "report.json").read_text())
    for name in ("report.md", "autoencoder_reconstructions.png", "autoencoder_loss.png",
                 "autoencoder/export/autoencoder.safetensors", "autoencoder/config.yaml"):
        assert (out / name).is_file(), name
    assert Image.open(out / "autoencoder_reconstructions.png").size[0] > 32
    ae = report["autoencoder"]
    # 40 steps are enough to beat the best constant image on held-out data.
    assert ae["psnr"] > ae["baseline_psnr"] + 0.3, ae
    assert "held-out PSNR" in (out / "report.md").read_text()
