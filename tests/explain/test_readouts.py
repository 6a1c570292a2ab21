"""The interpreter's heatmap readouts, the validation choice of one and the intervals beside it."""

import json
from pathlib import Path

import pytest
import torch

from iared import cli
from iared.explain.evaluate import choose_by_rank, paired_differences
from iared.explain.methods import (DEFAULT_READOUT, InterpreterMap, interpreter_attention, make_method,
                                   read_interpreters)
from iared.explain.metrics import pooled_miou
from iared.tokens import DenseTokens
from tests.helpers import spread_interpreters

THRESHOLDS = (0.4, 0.3, 0.3)  # per stage: the spread tiny interpreters drop some tokens at 0 and 1, not all

READOUTS_JSON = Path(__file__).parents[2] / "docs" / "explain-digits-natural-readouts.json"


def run(argv, capsys):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def pruning_model(model):
    """The tiny model with interpreters that really drop tokens at :data:`THRESHOLDS`."""
    return spread_interpreters(model)


def test_product_is_exactly_zero_on_tokens_dropped_at_an_earlier_stage(pruning_model):
    images = torch.rand(4, 1, 64, 64)
    readings = read_interpreters(pruning_model, images, THRESHOLDS)
    out = readings.out
    dropped_before_last = ~out.keep[-2][:, 1:]  # gone at stage 0 or 1
    assert dropped_before_last.any() and (~dropped_before_last).any()  # the test needs both kinds
    product = InterpreterMap("product").patch_values(readings)
    assert (product[dropped_before_last] == 0).all()
    survivors = ~dropped_before_last
    expected = (out.scores[0] * out.scores[1] * out.scores[2])[:, 1:]
    assert torch.equal(product, expected) and (product[survivors] > 0).all()
    # the mean of scores, the old combined map, does not give them 0: the reason for the product
    assert (InterpreterMap("score").patch_values(readings)[dropped_before_last] > 0).any()


def test_attention_readout_is_the_interpreters_softmax_over_alive_patches(pruning_model):
    images = torch.rand(3, 1, 64, 64)
    backbone, interp = pruning_model.backbone, pruning_model.interpreters[0]
    readings = read_interpreters(pruning_model, images, THRESHOLDS, temperature=2.0)
    # by hand from the stage-0 interpreter's q, k on the embedding
    x = interp.norm(backbone.embed(images).data)
    q, k = interp.qk(x).chunk(2, dim=-1)
    heads = interp.num_heads
    q = q[:, :1].unflatten(-1, (heads, -1))
    k = k.unflatten(-1, (heads, -1))
    logits = (q * k).sum(-1) / (k.shape[-1] ** 0.5 * 2.0)  # (B, N0, H), temperature 2
    expected = logits[:, 1:].softmax(1)  # over the patches: every patch is alive at stage 0
    got = readings.attention[0]
    assert got.shape == (3, 65, heads) and (got[:, 0] == 0).all()  # the class token is no candidate
    assert torch.allclose(got[:, 1:], expected, atol=1e-6)
    # later stages: a distribution over the tokens still alive, 0 on those gone
    alive = readings.out.keep[0]
    later = readings.attention[1]
    assert torch.allclose(later.sum(1), torch.ones(3, heads), atol=1e-6)
    assert (later[~alive] == 0).all()
    head_mean = InterpreterMap("attention", stage=1).patch_values(readings)
    assert torch.allclose(head_mean, later.mean(-1)[:, 1:])


def test_interpreter_attention_sums_to_one_per_head_in_every_layout(pruning_model):
    interp = pruning_model.interpreters[0]
    data = torch.randn(2, 9, 24)
    dense = DenseTokens.from_embeddings(data, num_prefix=1)
    keep = torch.rand(2, 9) > 0.4
    for tokens in (dense, dense.select(keep, "packed"), dense.select(keep, "padded")):
        probs = interpreter_attention(interp, tokens)
        patches = tokens.patch_mask()
        assert (probs[~patches] == 0).all()
        per_image = torch.stack([tokens.sum_per_image(probs[..., h] * patches) for h in range(probs.shape[-1])], -1)
        assert torch.allclose(per_image, torch.ones_like(per_image), atol=1e-6)


def test_attention_product_multiplies_the_stage_attention_and_the_product(pruning_model):
    images = torch.rand(2, 1, 64, 64)
    readings = read_interpreters(pruning_model, images, THRESHOLDS, temperature=1.0)
    attention = InterpreterMap("attention", stage=0).patch_values(readings)
    product = InterpreterMap("product").patch_values(readings)
    mixed = InterpreterMap("attention-product", exponents=(1.0, 0.5)).patch_values(readings)
    assert torch.allclose(mixed, attention * product.sqrt())


def test_interpreter_method_draws_the_stored_default_readout(pruning_model):
    images = torch.rand(2, 1, 64, 64)
    assert torch.equal(make_method("interpreter")(pruning_model, images),
                       make_method(f"interpreter-{DEFAULT_READOUT}")(pruning_model, images))


def test_the_default_readout_is_the_one_chosen_on_validation():
    if not READOUTS_JSON.exists():
        pytest.skip(f"{READOUTS_JSON.name} not written yet")
    selection = json.loads(READOUTS_JSON.read_text())["selection"]
    assert selection["split"].endswith(" val")
    assert selection["chosen"] == f"interpreter-{DEFAULT_READOUT}"
    assert selection["chosen"] == choose_by_rank(selection["candidates"])[0]


def test_choice_is_the_best_mean_rank_not_the_best_single_metric():
    methods = {"peaky": {"miou": 0.9, "map": 0.80, "deletion": 0.30},  # best mIoU only
               "steady": {"miou": 0.8, "map": 0.95, "deletion": 0.10},
               "poor": {"miou": 0.7, "map": 0.90, "deletion": 0.20}}
    chosen, ranks = choose_by_rank(methods)
    assert chosen == "steady" and ranks["steady"] < ranks["peaky"]


def test_paired_differences_give_the_observed_difference_and_an_interval_around_it():
    torch.manual_seed(0)
    n = 40
    union = torch.full((n, 2), 10.0)
    a = {"intersection": torch.full((n, 2), 8.0), "union": union, "ap": torch.rand(n) * 0.1 + 0.9,
         "ap_foreground": torch.rand(n), "deletion": torch.rand(n) * 0.1, "insertion": torch.rand(n)}
    b = {**a, "intersection": torch.full((n, 2), 5.0) + torch.rand(n, 2), "deletion": a["deletion"] + 0.05}
    diff = paired_differences({"a": a, "b": b}, "a", ["b"], resamples=200)["b"]
    assert diff["miou"]["mean"] == pytest.approx(float(pooled_miou(a["intersection"], union)
                                                       - pooled_miou(b["intersection"], union)))
    assert diff["miou"]["lo"] <= diff["miou"]["mean"] <= diff["miou"]["hi"] and diff["miou"]["lo"] > 0
    assert diff["deletion"]["mean"] == pytest.approx(-0.05) and diff["deletion"]["hi"] == pytest.approx(-0.05)
    assert diff["map"] == {"mean": 0.0, "lo": 0.0, "hi": 0.0}


def test_explain_eval_chooses_on_val_and_reports_test_with_intervals(tmp_path, tiny_checkpoint, capsys):
    report = tmp_path / "r.json"
    code, out, err = run(["explain-eval", "--checkpoint", tiny_checkpoint, "--task", "digits-clutter",
                          "--readouts", "interpreter-attention:0,interpreter-product", "--val-limit", 3, "--limit", 3,
                          "--methods", "raw-attention,random", "--steps", 2, "--bootstrap", 20, "--quiet",
                          "--json", report], capsys)
    assert code == 0, err
    results = json.loads(report.read_text())
    selection = results["selection"]
    assert selection["split"] == "digits-clutter val" and selection["n"] == 3
    assert set(selection["candidates"]) == {"interpreter-attention:0", "interpreter-product"}
    chosen = selection["chosen"]
    assert list(results["methods"]) == [chosen, "raw-attention", "random"] and results["data"] == "digits-clutter test"
    assert set(results["differences"]["against"]) == {"raw-attention", "random"}
    assert "unpruned backbone" in results["deletion_model"]
    assert "readout chosen on digits-clutter val" in out


@pytest.mark.parametrize("argv, words", [
    (["explain", "x.png", "--out", "o", "--methods", "interpreter-nope"], "interpreter-nope"),
    (["explain", "x.png", "--out", "o", "--methods", "interpreter-product:1"], "takes no stage"),
    (["explain-eval", "--readouts", "chefer"], "--readouts takes interpreter readouts"),
    (["explain-eval", "--readouts", "interpreter-nope"], "interpreter-nope"),
])
def test_cli_refuses_bad_readout_names_in_one_line(argv, words, tmp_path, tiny_checkpoint, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = run([*argv, "--checkpoint", tiny_checkpoint], capsys)
    assert code == 2 and words in err and len(err.strip().splitlines()) == 1, err


def test_cli_accepts_every_readout_name(tmp_path, tiny_checkpoint, capsys):
    image = tmp_path / "in.png"
    from PIL import Image

    Image.new("L", (64, 64), 128).save(image)
    code, out, err = run(["explain", image, "--checkpoint", tiny_checkpoint, "--out", tmp_path / "o", "--methods",
                          "interpreter,interpreter-score:1,interpreter-attention,interpreter-product,"
                          "interpreter-attention-product"], capsys)
    assert code == 0, err
    assert (tmp_path / "o" / "in.png").exists()
