"""DynamicViT as a reducer: the prediction module, its inference (budget) and training (gated) paths,
and its trainer."""

import pytest
import torch
import torch.nn.functional as F

from iared.models import VisionTransformer, ViTConfig
from iared.reducers.base import Reducer, StageInput, StageSettings
from iared.reducers.dynamicvit import (
    DynamicViTPredictor,
    build_dynamicvit,
    dynamicvit_locations,
    dynamicvit_predictors,
)
from iared.reducers.policy import budget_count, budget_counts
from iared.stages import ReducedModel
from iared.tokens import Decision, DenseTokens
from iared.train.dynamicvit import train_dynamicvit


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: with the cores shared, worker threads cost far more than they give."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_backbone(seed: int = 0, depth: int = 4) -> VisionTransformer:
    torch.manual_seed(seed)
    return VisionTransformer(ViTConfig(img_size=32, patch_size=8, in_chans=3, num_classes=7, embed_dim=48,
                                       depth=depth, num_heads=3)).eval()


def spread(model):
    """Larger predictor weights, so keep probabilities differ from token to token."""
    with torch.no_grad():
        for _, p in dynamicvit_predictors(model):
            for lin in (p.local[1], *p.head[::2]):
                lin.weight.normal_(0, 0.5)
    return model


def test_locations_follow_the_paper_and_scale_with_depth():
    assert dynamicvit_locations(12) == (3, 6, 9)
    assert dynamicvit_locations(6) == (2, 3, 4)
    assert dynamicvit_locations(3) == (1, 2)
    assert build_dynamicvit(tiny_backbone(depth=6), 0.7).stage_starts == (0, 2, 3, 4)


def test_predictor_by_hand():
    """Logits follow the formula: LN -> Linear -> GELU, split, policy-weighted global mean over
    patch tokens only, MLP; a token of policy 0 does not enter the global feature."""
    torch.manual_seed(0)
    dim, B, N, P = 8, 2, 6, 1
    pred = DynamicViTPredictor(dim, keep_ratio=0.5)
    with torch.no_grad():
        for p in pred.parameters():
            p.normal_(0, 0.5)
    x = torch.randn(B, N, dim)
    policy = torch.tensor([[1.0, 1, 0, 1, 1, 1], [1.0, 1, 1, 1, 0, 0]])  # prefix weight 1, unused
    tokens = DenseTokens(x, torch.arange(N).expand(B, N), P, weights=policy)

    norm, lin = pred.local[0], pred.local[1]
    z = F.gelu(F.linear(F.layer_norm(x, (dim,), norm.weight, norm.bias), lin.weight, lin.bias))
    expected = []
    for b in range(B):
        w = policy[b].clone()
        w[:P] = 0
        glob = (z[b, :, dim // 2:] * w[:, None]).sum(0) / w.sum()
        feats = torch.cat([z[b, :, : dim // 2], glob.expand(N, -1)], dim=-1)
        expected.append(pred.head(feats))
    torch.testing.assert_close(pred.logits(tokens), torch.stack(expected), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.8])
def test_inference_keeps_the_budget_count_and_the_prefix(ratio):
    torch.manual_seed(1)
    pred = DynamicViTPredictor(48, keep_ratio=ratio)
    with torch.no_grad():
        pred.head[-1].weight.normal_(0, 1.0)
    backbone = tiny_backbone()
    tokens = backbone.embed(torch.randn(3, 3, 32, 32))  # (3, 17, 48): class token + 16 patches
    d = pred(StageInput(tokens, 1, StageSettings("threshold"), None, backbone))
    k = budget_count(16, ratio)
    assert d.keep.shape == (3, 17) and d.kept_count == k + 1
    assert (d.keep[:, 1:].sum(1) == k).all()
    out = tokens.apply(d)
    assert out.data.shape == (3, k + 1, 48)
    assert (out.index[:, 0] == 0).all()  # the class token stays, in front
    # the kept patches are the k most probable ones; scores are keep probabilities, prefix 1
    probs = pred.keep_probability(tokens)
    torch.testing.assert_close(d.scores, probs)
    assert (d.scores[:, 0] == 1).all()
    top = probs[:, 1:].topk(k, dim=1).indices + 1
    assert (d.keep.gather(1, top)).all()
    # an explicit budget overrides the predictor's own ratio
    d2 = pred(StageInput(tokens, 1, StageSettings("budget", keep_ratio=0.5), None, backbone))
    assert d2.kept_count == budget_count(16, 0.5) + 1


def test_keep_ratio_one_reproduces_the_backbone():
    backbone = tiny_backbone()
    model = spread(build_dynamicvit(backbone, keep_ratio=1.0)).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        out = model(x)
        ref = backbone(x)
    assert (out.logits - ref).abs().max() <= 1e-5
    assert out.kept_fraction().min() == 1


def test_inference_macs_match_the_analytic_budget():
    model = spread(build_dynamicvit(tiny_backbone(), keep_ratio=0.5)).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert torch.allclose(out.kept_fraction()[:, 1:], torch.tensor([0.5, 0.25, 0.125]).expand(2, 3))
    assert out.macs[0].item() == pytest.approx(model.macs_for_ratios([1.0, 0.5, 0.5, 0.5]), rel=1e-9)
    assert out.macs[0].item() < model.full_macs()


class FixedGates(Reducer):
    """Gates ``(B, N0)`` in original positions: as gates in sample mode, as keeps otherwise."""

    uses_policy = False

    def __init__(self, gates, requires_grad=False):
        super().__init__()
        self.gates, self.requires_grad = gates, requires_grad

    def forward(self, x: StageInput) -> Decision:
        g = self.gates[x.tokens.image_ids(), x.tokens.index]  # token-aligned, any layout
        if x.settings.mode == "sample":
            return Decision(gate=g.clone().requires_grad_(self.requires_grad))
        return Decision(keep=g > 0.5)


@pytest.mark.parametrize("requires_grad", [True, False])
def test_a_hard_gate_of_zero_equals_dropping_the_token(requires_grad):
    """Gated dense (training) vs dropped packed (inference) on two stages: equal logits, and a
    token gated out at stage 1 stays out at stage 2 even where the stage-2 gate is 1."""
    backbone = tiny_backbone(depth=4)
    g = torch.Generator().manual_seed(3)
    g1 = (torch.rand(3, 17, generator=g) > 0.4).float()
    g2 = (torch.rand(3, 17, generator=g) > 0.3).float()
    g1[:, 0] = g2[:, 0] = 1
    g1[0, 5], g2[0, 5] = 0, 1  # gone at stage 1, "kept" at stage 2
    model = ReducedModel(backbone, [None, FixedGates(g1, requires_grad), FixedGates(g2 * g1, requires_grad)],
                         [0, 1, 3])
    x = torch.randn(3, 3, 32, 32)
    gated = model(x, "sample")
    with torch.no_grad():
        dropped = model(x, "threshold", layout="packed")
    assert (gated.logits - dropped.logits).abs().max() <= 1e-5
    # stage-1 gates were different per image: the inference batch really was ragged
    assert len(set(dropped.tokens_per_block[1].tolist())) > 1


def test_training_path_reaches_every_predictor():
    torch.manual_seed(0)
    model = spread(build_dynamicvit(tiny_backbone(depth=4), keep_ratio=0.5))
    out = model(torch.randn(4, 3, 32, 32), "sample")
    # every token is still in the batch; scores are cumulative 0 / 1 gates with the prefix at 1
    assert all(len(set(n.tolist())) == 1 and int(n[0]) == 17 for n in out.tokens_per_block)
    gates = [out.scores[g] for g, _ in dynamicvit_predictors(model)]
    assert all(set(s.unique().tolist()) <= {0.0, 1.0} and (s[:, 0] == 1).all() for s in gates)
    assert all((later <= earlier).all() for earlier, later in zip(gates, gates[1:]))  # dropped stays dropped
    # the logits alone (no ratio loss) send gradient to every predictor through the masked attention
    out.logits.square().sum().backward()
    for _, p in dynamicvit_predictors(model):
        assert p.head[-1].weight.grad is not None and p.head[-1].weight.grad.abs().sum() > 0
        assert p.local[1].weight.grad.abs().sum() > 0


def test_training_moves_the_kept_fraction_to_the_target():
    backbone = tiny_backbone(depth=4)
    g = torch.Generator().manual_seed(0)
    images, labels = torch.randn(256, 3, 32, 32, generator=g), torch.randint(0, 7, (256,), generator=g)
    data = list(zip(images, labels.tolist()))
    history: list = []
    ratio = 0.85
    model = train_dynamicvit(backbone, data, keep_ratio=ratio, steps=30, batch_size=16, lr=1e-2, seed=0,
                             progress=False, history=history)
    targets = [ratio, ratio ** 2, ratio ** 3]
    first = history[0]["kept"]
    last = torch.tensor([h["kept"] for h in history[-5:]]).mean(0).tolist()
    for f, l, t in zip(first, last, targets):
        assert abs(l - t) < 0.5 * abs(f - t), (first, last, targets)
    assert history[-1]["ratio"] < history[0]["ratio"]
    assert not model.training and all(not p.requires_grad for p in backbone.parameters())
    # the trained model prunes at inference with its own ratio
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    expected = [n / 16 for n in budget_counts(16, [ratio] * 3)]
    assert out.kept_fraction()[0, 1:].tolist() == pytest.approx(expected)


def test_training_with_a_frozen_backbone_leaves_it_exactly_as_it_was():
    """A hybrid stem's BatchNorm statistics must not drift during predictor training: the backbone is
    shared with every other method in ``iared compare``."""
    from iared.models import create_model

    torch.manual_seed(0)
    backbone = create_model("digits_natural_vit", depth=2, img_size=32).eval()
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    data = list(zip(torch.randn(32, 3, 32, 32, generator=g), torch.randint(0, 10, (32,), generator=g).tolist()))
    train_dynamicvit(backbone, data, keep_ratio=0.7, steps=3, batch_size=8, lr=1e-2, progress=False,
                     locations=(1,))
    for k, v in backbone.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_training_is_deterministic():
    def run():
        backbone = tiny_backbone(depth=4)
        g = torch.Generator().manual_seed(0)
        images, labels = torch.randn(64, 3, 32, 32, generator=g), torch.randint(0, 7, (64,), generator=g)
        data = list(zip(images, labels.tolist()))
        return train_dynamicvit(backbone, data, keep_ratio=0.7, steps=3, batch_size=8, lr=1e-2, seed=5,
                                backbone_lr=1e-4, progress=False)

    a, b = run(), run()
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name
