"""iared.operating_point: the cheapest threshold within a loss, chosen on labelled validation inputs."""

import pytest
import torch

from iared.models.vit import VisionTransformer, ViTConfig
from iared.operating_point import choose_threshold
from iared.pruning import IARed

TINY = {"img_size": 32, "patch_size": 8, "in_chans": 3, "num_classes": 10, "embed_dim": 24, "depth": 3,
        "num_heads": 2}


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = IARed(VisionTransformer(ViTConfig(**TINY)), interpreter_heads=2).eval()
    with torch.no_grad():
        for p in model.interpreters.parameters():
            p.normal_(0, 0.5)
        x = torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(1))
        labels = model.backbone(x).argmax(-1)  # the unpruned model is right on every input
    return model, x, labels


def test_the_cheapest_threshold_within_the_loss_is_chosen(setup):
    model, x, labels = setup
    loose = choose_threshold(model, x, labels, 99.0)
    assert loose["accuracy_full"] == 1.0 and loose["within"]
    gflops = [p["gflops"] for p in loose["points"]]
    assert loose["threshold"] == loose["points"][gflops.index(min(gflops))]["threshold"]
    strict = choose_threshold(model, x, labels, 0.0)
    exact = [p for p in strict["points"] if p["top1"] == 1.0]
    assert strict["threshold"] == min(exact, key=lambda p: p["gflops"])["threshold"]
    assert strict["points"][0]["threshold"] == 0.0
    for p in strict["points"]:
        assert p["loss_pt"] == pytest.approx(100 * (1.0 - p["top1"]))
    # losses in points: a 5 pt window admits what a 0 pt one does, and is never dearer
    mid = choose_threshold(model, x, labels, 5.0)
    chosen = {r["threshold"]: r for r in mid["points"]}
    assert chosen[mid["threshold"]]["gflops"] <= chosen[strict["threshold"]]["gflops"]


def test_no_threshold_within_the_loss_takes_the_most_accurate_with_a_warning(setup, capsys):
    model, x, labels = setup
    r = choose_threshold(model, x, labels, 0.0, thresholds=(0.8, 0.9))
    assert not r["within"]  # spread random interpreters drop most tokens there: predictions change
    best = max(r["points"], key=lambda p: p["top1"])
    assert r["threshold"] == best["threshold"] and "no threshold of 0.8, 0.9" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--max-loss"):
        choose_threshold(model, x, labels, -1.0)
