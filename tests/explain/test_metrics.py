"""Metrics against cases small enough to compute by hand."""

import math

import numpy as np
import pytest
import torch

from iared.explain.metrics import (
    SegmentationMeter,
    auc,
    average_precision,
    binarize,
    blur,
    causal_curves,
    deletion_insertion,
    pointing_game,
    protocol_ap,
)


def test_binarize_thresholds_at_the_maps_own_mean():
    h = torch.tensor([[[0.9, 0.1], [0.6, 0.2]]])  # mean 0.45
    assert binarize(h).tolist() == [[[True, False], [True, False]]]


def test_pixel_accuracy_and_miou_are_set_totals():
    # image 1: map mean 0.45 -> pred [[1,0],[1,0]], mask [[1,1],[0,0]]: 2 of 4 right,
    #   fg inter 1 / union 3, bg inter 1 / union 3.
    # image 2: map mean 0.25 -> pred [[1,0],[0,0]] == mask: 4 of 4, fg 1/1, bg 3/3.
    maps = torch.tensor([[[0.9, 0.1], [0.6, 0.2]], [[1.0, 0.0], [0.0, 0.0]]])
    masks = torch.tensor([[[1, 1], [0, 0]], [[1, 0], [0, 0]]]).bool()
    meter = SegmentationMeter()
    meter.update(maps[:1], masks[:1])
    meter.update(maps[1:], masks[1:])
    r = meter.compute()
    assert r["pixel_accuracy"] == pytest.approx(6 / 8)
    assert r["iou_foreground"] == pytest.approx(2 / 4)  # (1 + 1) / (3 + 1), not the mean of 1/3 and 1
    assert r["iou_background"] == pytest.approx(4 / 6)  # (1 + 3) / (3 + 3)
    assert r["miou"] == pytest.approx((2 / 4 + 4 / 6) / 2)
    assert r["n"] == 2


def test_average_precision_by_hand_and_against_sklearn():
    # ranks 1..4 hold labels 1,0,1,0: precision at the hits 1/1 and 2/3
    assert average_precision([0.9, 0.8, 0.7, 0.6], [1, 0, 1, 0]) == pytest.approx((1 + 2 / 3) / 2)
    # tied scores form one threshold: 0.9 -> P 1, R 1/2; 0.5 (two items) -> P 2/3, R 1
    assert average_precision([0.9, 0.5, 0.5, 0.1], [1, 1, 0, 0]) == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    assert math.isnan(average_precision([0.3, 0.2], [0, 0]))
    from sklearn.metrics import average_precision_score

    rng = np.random.default_rng(0)
    scores = rng.integers(0, 5, 200) / 4  # many ties
    labels = rng.random(200) < 0.3
    assert average_precision(scores, labels) == pytest.approx(average_precision_score(labels, scores))


def test_protocol_ap_pools_foreground_and_background_channels():
    # scores [1-h, h] = [0.8, 0.4, 0.2, 0.6], labels [~m, m] = [0, 1, 1, 0]
    # ranking 0.8(-) 0.6(-) 0.4(+) 0.2(+): precision at the hits 1/3 and 2/4
    assert protocol_ap([0.2, 0.6], [True, False]) == pytest.approx((1 / 3 + 2 / 4) / 2)
    assert protocol_ap([1.0, 0.0], [True, False]) == pytest.approx(1.0)
    # defined without foreground: scores [0.8, 0.4, 0.2, 0.6], labels [1, 1, 0, 0] -> hits at ranks 1, 3
    assert protocol_ap([0.2, 0.6], [False, False]) == pytest.approx((1 + 2 / 3) / 2)
    meter = SegmentationMeter()
    meter.update(torch.tensor([[[0.2, 0.6]], [[1.0, 0.0]]]), torch.tensor([[[1, 0]], [[1, 0]]]).bool())
    r = meter.compute()
    assert r["map"] == pytest.approx(((1 / 3 + 2 / 4) / 2 + 1.0) / 2)
    assert r["ap_foreground"] == pytest.approx((0.5 + 1.0) / 2)  # 0.6(-) then 0.2(+): 1/2


def test_pointing_game_tolerance_and_ties():
    h = torch.zeros(1, 5, 5)
    h[0, 0, 0] = 1.0
    mask = torch.zeros(1, 5, 5, dtype=torch.bool)
    mask[0, 0, 2] = True  # 2 px right of the peak
    assert not pointing_game(h, mask)[0]
    assert not pointing_game(h, mask, tolerance=1.9)[0]
    assert pointing_game(h, mask, tolerance=2.0)[0]
    h[0, 0, 2] = 1.0  # a tie: the first maximum in raster order, (0, 0), is the point
    assert not pointing_game(h, mask)[0]
    h[0, 0, 0] = 0.5
    assert pointing_game(h, mask)[0]
    # images without foreground do not count in the rate
    meter = SegmentationMeter()
    meter.update(torch.stack([h[0], h[0]]), torch.stack([mask[0], torch.zeros_like(mask[0])]))
    assert meter.compute()["pointing"] == 1.0


def mean_classifier(x):
    """Two classes; P(class 0) = mean pixel value (clamped away from 0 and 1)."""
    m = x.mean(dim=(1, 2, 3)).clamp(1e-6, 1 - 1e-6)
    return torch.stack([m.log(), (1 - m).log()], dim=1)


def test_deletion_and_insertion_auc_on_a_toy_classifier():
    image = torch.tensor([[[[1.0, 0.5], [0.25, 0.0]]]])
    # heatmap ranks pixels 1, .5, .25, 0 (= the image); 4 steps delete/insert one pixel each.
    # deletion curve  (mean of what is left):   .4375 .1875 .0625 0 0      -> AUC .1171875
    # insertion curve (mean of what is there):  0 .25 .375 .4375 .4375    -> AUC .3203125
    out = deletion_insertion(mean_classifier, image, image[:, 0], torch.tensor([0]), steps=4, baseline="zero")
    assert out["deletion"].item() == pytest.approx(0.1171875, abs=1e-5)
    assert out["insertion"].item() == pytest.approx(0.3203125, abs=1e-5)
    # the reversed ranking deletes the useless pixels first: worse (higher) deletion, worse insertion
    rev = deletion_insertion(mean_classifier, image, 1 - image[:, 0], torch.tensor([0]), steps=4, baseline="zero")
    assert rev["deletion"].item() == pytest.approx(0.3203125, abs=1e-5)
    assert rev["insertion"].item() == pytest.approx(0.1171875, abs=1e-5)
    curves = causal_curves(mean_classifier, image, image[:, 0], 0, steps=4, baseline="zero")
    assert curves["deletion"][0].tolist() == pytest.approx([0.4375, 0.1875, 0.0625, 0, 0], abs=1e-5)
    assert auc(torch.full((1, 5), 0.3)).item() == pytest.approx(0.3)


def test_rise_baselines_zero_for_deletion_blur_for_insertion():
    torch.manual_seed(0)
    images = torch.rand(2, 1, 16, 16)
    heat = torch.rand(2, 16, 16)
    seen = []

    def spy(x):
        seen.append(x.clone())
        return mean_classifier(x)

    causal_curves(spy, images, heat, torch.tensor([0, 1]), steps=2, baseline="rise")
    # calls: image, deletion baseline, deletion midpoint, insertion baseline, insertion midpoint
    assert torch.equal(seen[1], torch.zeros_like(images))
    assert torch.allclose(seen[3], blur(images))
    with pytest.raises(ValueError, match="baseline"):
        causal_curves(mean_classifier, images, heat, torch.tensor([0, 1]), baseline="grey")
