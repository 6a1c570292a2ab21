"""The interpreter, the policy modes and the pruned forward pass."""

import math

import pytest
import torch

from iared import IARed, IARedConfig, flops
from iared.interpreter import MultiHeadInterpreter
from iared.models import VisionTransformer, ViTConfig, create_model
from iared.tokens import DenseTokens
from tests.helpers import spread_interpreters


def tiny_vit(**kw):
    cfg = dict(img_size=32, patch_size=8, in_chans=3, num_classes=5, embed_dim=24, depth=6, num_heads=2)
    cfg.update(kw)
    torch.manual_seed(0)
    return VisionTransformer(ViTConfig(**cfg)).eval()


def test_interpreter_matches_hand_computation():
    interp = MultiHeadInterpreter(dim=4, num_heads=2)
    w = torch.tensor([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1],  # q
                      [2, 0, 0, 0], [0, 0, 1, 0], [0, 1, 0, 1], [1, 1, 1, 1]], dtype=torch.float32)  # k
    b = torch.tensor([0, 0, 0.5, 0, 0, 0.1, 0, 0])
    interp.qk.weight.data.copy_(w)
    interp.qk.bias.data.copy_(b)
    x = torch.tensor([[[1.0, 2.0, 3.0, 4.0], [0.0, 1.0, 0.0, -1.0], [2.0, -2.0, 1.0, 1.0]]])
    scores = interp.score(DenseTokens.from_embeddings(x, num_prefix=1))

    def layer_norm(v):
        m = sum(v) / len(v)
        var = sum((t - m) ** 2 for t in v) / len(v)
        return [(t - m) / math.sqrt(var + 1e-6) for t in v]

    def linear(rows, bias, v):
        return [sum(r * t for r, t in zip(row, v)) + bb for row, bb in zip(rows, bias)]

    wl, bl = w.tolist(), b.tolist()
    q = linear(wl[:4], bl[:4], layer_norm(x[0, 0].tolist()))
    expected = [1.0]  # the class token is always kept
    for j in (1, 2):
        k = linear(wl[4:], bl[4:], layer_norm(x[0, j].tolist()))
        heads = [sum(q[h * 2 + d] * k[h * 2 + d] for d in range(2)) / math.sqrt(2) for h in range(2)]
        expected.append(sum(1 / (1 + math.exp(-a)) for a in heads) / 2)
    assert torch.allclose(scores[0], torch.tensor(expected), atol=1e-5)


def test_threshold_zero_reproduces_the_unpruned_logits_exactly():
    backbone = tiny_vit()
    model = spread_interpreters(IARed(backbone))
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        out = model(x, threshold=0.0)
        assert torch.equal(out.logits, backbone(x))
    assert all(k.all() for k in out.keep)
    interp = sum(flops.interpreter_macs(17, 24) for _ in range(3))
    assert torch.allclose(out.macs, torch.tensor(flops.full_macs(backbone.cfg) + interp, dtype=torch.float64))


@pytest.mark.parametrize("layout", ["packed", "padded"])
def test_a_dropped_token_never_comes_back(layout):
    model = spread_interpreters(IARed(tiny_vit()))
    x = torch.randn(6, 3, 32, 32)
    with torch.no_grad():
        out = model(x, threshold=0.5, layout=layout)
    for earlier, later in zip(out.keep, out.keep[1:]):
        assert not (later & ~earlier).any()
    for stage in range(1, 3):  # scores of tokens dropped earlier are 0: they were never scored
        assert (out.scores[stage][~out.keep[stage - 1]] == 0).all()
    counts = torch.stack([k.sum(1) for k in out.keep])
    assert (counts[0] < 17).any() and len(set(counts[-1].tolist())) > 1  # it did prune, unevenly
    assert out.keep[-1][:, 0].all()  # the class token survives


def test_sample_mode_prefix_is_kept_and_log_prob_has_gradient():
    model = IARed(tiny_vit(distilled=True))
    out = model(torch.randn(3, 3, 32, 32), mode="sample")
    assert all(k[:, :2].all() for k in out.keep)  # class and distillation tokens
    out.log_prob.sum().backward()
    assert all(i.qk.weight.grad is not None and i.qk.weight.grad.abs().sum() > 0 for i in model.interpreters)


def test_budget_mode_keeps_exactly_k_per_image():
    model = spread_interpreters(IARed(tiny_vit()))
    with torch.no_grad():
        out = model(torch.randn(5, 3, 32, 32), mode="budget", keep_ratio=[0.5, 0.5, 0.5])
    assert [set(k[:, 1:].sum(1).tolist()) for k in out.keep] == [{8}, {4}, {2}]
    # the kept tokens are the top-scored ones
    top = out.scores[0][:, 1:].topk(8, dim=1).indices
    assert out.keep[0][:, 1:].gather(1, top).all()


def test_budget_from_flops_target_reaches_the_target():
    model = IARed(create_model("deit_small_patch16_224"))
    ratio = model.ratio_for_flops(0.5)
    assert abs(model.macs_for_ratios(ratio) / flops.full_macs(model.backbone.cfg) - 0.5) < 0.01
    with pytest.raises(ValueError, match="out of reach"):
        model.ratio_for_flops(0.01)


def test_deit_small_flops_match_the_published_figure():
    cfg = create_model("deit_small_patch16_224").cfg
    assert abs(flops.full_macs(cfg) / 1e9 - 4.6) < 0.1  # DeiT paper: 4.6 GFLOPs
    # three interpreters cost under 3 % of the backbone
    assert 3 * flops.interpreter_macs(197, 384) / flops.full_macs(cfg) < 0.03


def test_packed_padded_and_per_image_agree():
    model = spread_interpreters(IARed(tiny_vit()))
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        packed = model(x, threshold=0.5).logits
        padded = model(x, threshold=0.5, layout="padded").logits
        alone = torch.cat([model(x[i: i + 1], threshold=0.5).logits for i in range(5)])
    assert (packed - alone).abs().max() <= 1e-5
    assert (padded - alone).abs().max() <= 1e-5


def test_bad_modes_and_configs_are_refused():
    model = IARed(tiny_vit())
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(ValueError, match="mode"):
        model(x, mode="fast")
    with pytest.raises(ValueError, match="keep_ratio"):
        model(x, mode="budget")
    with pytest.raises(ValueError, match="stage_starts"):
        IARed(tiny_vit(), IARedConfig(stage_starts=(0, 3, 3)))
    assert IARed(tiny_vit(embed_dim=20, num_heads=2)).interpreters[0].num_heads == 5  # 6 does not divide 20


def test_initial_score_biases_every_token_to_the_target():
    interp = MultiHeadInterpreter(dim=24, num_heads=6)
    interp.qk.weight.data.zero_()  # no weight: the score is the bias term alone
    interp.set_initial_score(0.9)
    tokens = DenseTokens.from_embeddings(torch.randn(3, 17, 24), 1)
    scores = interp.score(tokens)
    assert torch.allclose(scores[:, 1:], torch.full((3, 16), 0.9), atol=1e-6)
    interp.set_initial_score(0.5)
    assert torch.allclose(interp.score(tokens)[:, 1:], torch.full((3, 16), 0.5), atol=1e-6)
    with pytest.raises(ValueError, match="initial score"):
        interp.set_initial_score(0.3)
