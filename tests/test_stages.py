"""The stage loop (iared.stages) and the protocol pieces it rests on: records, budget selection,
checkpoint settings, compute accounting."""

import pytest
import torch

from iared.compare import Candidate, _floor_ratios, best_speedup_at_loss, pareto_front
from iared.models.vit import BlockRecord, VisionTransformer, ViTConfig
from iared.pruning import IARed, InferenceSettings, load_pruned, save_pruned
from iared.reducers.base import Reducer, StageSettings
from iared.reducers.policy import budget_count, budget_counts, keep_from_scores
from iared.stages import ReducedModel
from iared.tokens import Decision, DenseTokens


def tiny_backbone(seed=0, depth=3):
    torch.manual_seed(seed)
    return VisionTransformer(ViTConfig(img_size=32, patch_size=8, in_chans=3, num_classes=7, embed_dim=48,
                                       depth=depth, num_heads=3)).eval()


def test_loop_without_reducers_is_the_backbone():
    backbone = tiny_backbone()
    x = torch.randn(4, 3, 32, 32)
    out = ReducedModel(backbone, [None, None], [0, 2])(x)
    assert torch.allclose(out.logits, backbone(x), atol=1e-6)
    assert torch.allclose(out.macs.float(), torch.full((4,), ReducedModel(backbone, [None], [0]).full_macs()).float())
    assert all(k.all() for k in out.keep) and out.scores == [None, None]


class RecordSpy(Reducer):
    """Keeps everything, remembers the record it was given."""

    needs_record = True
    uses_policy = False

    def forward(self, x):
        self.seen = x.record
        return Decision()


@pytest.mark.parametrize("layout", ["packed", "padded"])
def test_record_class_attention_matches_explicit_attention(layout):
    backbone = tiny_backbone()
    x = torch.randn(3, 3, 32, 32)
    weights = []
    backbone(x, attention_out=weights)
    spy = RecordSpy()
    model = ReducedModel(backbone, [None, spy], [0, 2]).eval()
    model(x, layout=layout)
    expected = weights[1][:, :, 0, :].mean(1)  # block 1 (last before stage 2): class row, mean over heads
    assert torch.allclose(spy.seen.cls_attention, expected, atol=1e-5)
    assert spy.seen.keys.shape == (3, 17, 48)


def test_record_on_packed_tokens_matches_each_image_alone():
    backbone = tiny_backbone()
    x = torch.randn(3, 3, 32, 32)
    tokens = backbone.embed(x)
    keep = torch.rand(3, 17) > 0.4
    packed = tokens.select(keep)
    rec = BlockRecord()
    backbone.blocks[0](packed, record=rec)
    for b in range(3):
        alone = DenseTokens.from_embeddings(tokens.data[b:b + 1][:, (keep[b] | (torch.arange(17) == 0))], 1)
        rec1 = BlockRecord()
        backbone.blocks[0](alone, record=rec1)
        rows = packed.image == b
        assert torch.allclose(rec.cls_attention[rows], rec1.cls_attention[0], atol=1e-6)
        assert abs(float(rec.cls_attention[rows].sum()) - 1) < 1e-5


def test_budget_policy_counts_and_static_selection():
    assert budget_count(16, 0.7) == 11 and budget_count(16, 0.01) == 1 and budget_count(0, 0.5) == 0
    assert budget_counts(16, [0.5, 0.5, 0.5]) == [8, 4, 2]
    tokens = DenseTokens.from_embeddings(torch.randn(2, 6, 4), 1)
    scores = torch.tensor([[1.0, 0.1, 0.9, 0.3, 0.8, 0.2], [1.0, 0.7, 0.1, 0.6, 0.2, 0.9]])
    d = keep_from_scores(tokens, scores, StageSettings("budget", keep_ratio=0.6))
    assert d.kept_count == 4  # 3 of 5 patches + the class token
    kept = tokens.apply(d)
    assert kept.index.tolist() == [[0, 2, 3, 4], [0, 1, 3, 5]]  # original order kept
    assert torch.equal(kept.data, tokens.select(d.keep).data)


def test_budget_mode_via_loop_equals_export_module():
    from iared.export import BudgetModel

    model = IARed(tiny_backbone(depth=3), num_stages=3, interpreter_heads=3).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        a = model(x, "budget", keep_ratio=0.5)
        b = BudgetModel(model, 0.5)(x)
    assert torch.equal(a.logits, b)
    assert [int(k[:, 1:].sum(1)[0]) for k in a.keep] == [8, 4, 2]


def test_pruned_checkpoint_records_inference_settings(tmp_path):
    model = IARed(tiny_backbone(), num_stages=3, interpreter_heads=3)
    model.inference = InferenceSettings(threshold=[0.4, 0.5, 0.6], keep_ratio=0.7)
    save_pruned(model, tmp_path / "p.pt")
    loaded = load_pruned(tmp_path / "p.pt")
    assert loaded.inference == InferenceSettings(threshold=[0.4, 0.5, 0.6], keep_ratio=0.7)
    obj = torch.load(tmp_path / "p.pt", weights_only=True)
    assert obj["config"]["reducer"]["method"] == "iared"


def test_shipped_checkpoint_of_the_first_format_still_loads():
    from importlib import resources

    path = resources.files("iared") / "assets" / "digits_pruned.pt"
    model = load_pruned(path)
    assert model.inference.threshold == 0.5
    assert model.interpreters[0].qk.weight.abs().sum() > 0  # weights really came from the file


def test_compare_summaries():
    assert _floor_ratios([0.5, 0.25, 0.2]) == [0.5, 0.5, 0.8]
    pts = [(100, 97.0), (200, 96.5), (150, 96.0), (300, 90.0)]
    assert pareto_front(pts) == [0, 1, 3]
    run = lambda x: None  # noqa: E731
    cands = [Candidate("a", 1, run, top1=0.968, speedup={"64": 2.0}), Candidate("a", 2, run, top1=0.95,
             speedup={"64": 3.0}), Candidate("b", 1, run, top1=0.962, speedup={"64": 2.5})]
    best = best_speedup_at_loss(cands, 0.97, "64")
    assert best["0.5"] == {"a": 2.0} and best["1.0"] == {"b": 2.5, "a": 2.0}


def test_flops_target_is_reached_with_a_leading_stage_without_reducer():
    from iared.reducers.floors import RandomReducer

    backbone = tiny_backbone(depth=4)
    model = ReducedModel(backbone, [None, RandomReducer(), RandomReducer()], [0, 1, 2]).eval()
    ratio = model.ratio_for_flops(0.6)
    out = model(torch.randn(2, 3, 32, 32), "budget", keep_ratio=ratio)
    assert abs(float(out.macs[0]) / model.full_macs() - 0.6) < 0.05
    assert abs(model.macs_for_ratios(ratio) - float(out.macs[0])) < 1.0  # the prediction is the real count


def test_trained_threshold_is_recorded_for_every_command(tmp_path):
    from iared.train.interpreters import InterpreterTrainConfig, train_from_config

    cfg = InterpreterTrainConfig(out=str(tmp_path / "run"), steps_per_stage=1, batch_size=4, eval_every=100,
                                 eval_samples=4, threshold=0.7)
    train_from_config(cfg, progress=False)
    assert load_pruned(tmp_path / "run" / "pruned.pt").inference.threshold == 0.7


@pytest.mark.parametrize("layout", ["packed", "padded"])
def test_accounting_is_deferred_and_holds_no_features(layout):
    """The loop records layouts and decisions only; keeps, scores, counts and MACs are worked out when
    read, and equal what the pass did: per-image alive counts before every block, MACs by formula."""
    backbone = tiny_backbone(depth=4)
    model = IARed(backbone, stage_starts=[0, 2])
    for interpreter in model.interpreters:  # scores spread: counts differ from image to image
        torch.nn.init.normal_(interpreter.qk.weight, std=0.5)
    x = torch.randn(5, 3, 32, 32)
    with torch.inference_mode():
        out = model(x, threshold=0.5, layout=layout)
        assert not {"macs", "keep", "scores", "tokens_per_block"} & set(vars(out))  # nothing computed yet
        # the trace keeps token positions, never features (a pass's activations are not held alive)
        layouts = [t for t, _ in out.trace.alive_layouts] + list(out.trace.block_layouts)
        assert all(t.data.shape[-1] == 0 and t.grid is None for t in layouts)
        # blocks do not change the layout: one recorded layout per stage, shared by its blocks
        assert len({id(t) for t in out.trace.block_layouts}) == 2
        alive = [k.sum(1) for k in out.keep]  # class token included
        assert alive[0].unique().numel() > 1 and (alive[1] <= alive[0]).all()
        counts = [n.tolist() for n in out.tokens_per_block]
        assert counts == [alive[0].tolist()] * 2 + [alive[1].tolist()] * 2
        from iared import flops

        n0, n1 = (a.double() for a in alive)
        expected = (backbone.fixed_macs() + flops.interpreter_macs(17, 48) + 2 * flops.block_macs(n0, 48, 4.0)
                    + flops.interpreter_macs(n0, 48) + 2 * flops.block_macs(n1, 48, 4.0))
        assert torch.allclose(out.macs, expected)
        assert out.macs is out.macs  # computed once
