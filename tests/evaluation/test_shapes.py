"""The prompt-adherence judge: labels match the renderer, and a short training reads colour and position."""

from __future__ import annotations

import torch

from ldmscale.data.synthetic import COLORS, POSITIONS, SHAPES, render_sample
from ldmscale.evaluation.shapes import (PROPERTIES, ClassifierTraining, accuracy, chance, render_labelled,
                                        train_shapes_classifier)


def test_render_labelled_matches_the_renderer():
    images, labels = render_labelled(6, seed=3)
    assert images.shape == (6, 3, 32, 32) and images.min() >= -1 and images.max() <= 1
    for i in range(6):
        sample = render_sample(i, seed=3, resolution=32)
        assert SHAPES[labels["shape"][i]] == sample["shape"]
        assert COLORS[labels["color"][i]] == sample["color"]
        assert POSITIONS[labels["position"][i]] == sample["position"]


def test_short_training_reads_unseen_images_and_is_deterministic():
    torch.set_num_threads(1)
    images, labels = render_labelled(512, seed=0)
    test, test_labels = render_labelled(128, seed=1)
    cfg = ClassifierTraining(steps=120, batch_size=32)
    judge = train_shapes_classifier(images, labels, cfg)
    scores = accuracy(judge, test, test_labels)
    assert scores["color"] > 0.9 and scores["position"] > 0.9, scores
    assert scores["shape"] > chance("shape") + 0.1, scores
    short = ClassifierTraining(steps=5, batch_size=32)
    first, second = (train_shapes_classifier(images, labels, short) for _ in range(2))
    assert all(torch.equal(first(test)[k], second(test)[k]) for k in PROPERTIES)  # deterministic for a seed
    # 64 px inputs are resized to the judge's 32 px
    upscaled = torch.nn.functional.interpolate(test, scale_factor=2, mode="nearest")
    assert accuracy(judge, upscaled, test_labels)["color"] > 0.9
    assert chance("shape") == 1 / 3 and chance("color") == 1 / 4 and chance("position") == 1 / 5
