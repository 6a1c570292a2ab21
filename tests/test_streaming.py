"""Streaming reuse (iared.streaming): exactness with every gate open, what the gates recompute, the
MAC count, key frames, batches of independent streams, and the digit-streams task."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from iared import flops
from iared.models import VisionTransformer, ViTConfig
from iared.pruning import IARed
from iared.stages import ReducedModel
from iared.stats import paired_bootstrap
from iared.streaming import GatePolicy, Stream, run_stream


def tiny_vit(seed: int = 0, **kw) -> VisionTransformer:
    torch.manual_seed(seed)
    cfg = {"img_size": 32, "patch_size": 8, "in_chans": 3, "num_classes": 5, "embed_dim": 32, "depth": 4,
           "num_heads": 2}
    return VisionTransformer(ViTConfig(**{**cfg, **kw})).eval()


def tiny_iared(seed: int = 0) -> IARed:
    model = IARed(tiny_vit(seed), num_stages=2, interpreter_heads=2).eval()
    torch.manual_seed(seed + 1)
    for r in model.reducers:  # random interpreters that drop a good share of the tokens at threshold 0.5
        torch.nn.init.normal_(r.qk.weight, std=0.5)
    return model


def frames(B: int = 3, T: int = 5, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(B, 1, 3, 32, 32, generator=g)
    return base + 0.3 * torch.rand(B, T, 3, 32, 32, generator=g)


def per_frame(model, x, **kw):
    with torch.no_grad():
        return torch.stack([model(x[:, t], **kw).logits if isinstance(model, ReducedModel) else model(x[:, t])
                            for t in range(x.shape[1])], 1)


def test_every_gate_open_is_the_per_frame_model():
    vit, x = tiny_vit(), frames()
    r = run_stream(Stream(vit, GatePolicy("all")), x)
    assert torch.allclose(r["logits"], per_frame(vit, x), atol=1e-5)
    assert torch.allclose(r["macs"], torch.full_like(r["macs"], ReducedModel(vit, [None], [0]).full_macs()))


def test_every_gate_open_with_iared_is_per_frame_iared():
    model, x = tiny_iared(), frames()
    r = run_stream(Stream(model, GatePolicy("all"), mode="threshold", threshold=0.5), x)
    ref = per_frame(model, x, mode="threshold", threshold=0.5)
    assert torch.allclose(r["logits"], ref, atol=1e-5)
    with torch.no_grad():
        macs = torch.stack([model(x[:, t], mode="threshold", threshold=0.5).macs for t in range(x.shape[1])], 1)
    assert torch.allclose(r["macs"], macs.double())
    alive = r["alive"].float().mean()
    assert alive < 17 * 0.9, "the random interpreters should drop tokens, or this test checks nothing"


def test_a_still_stream_recomputes_nothing_after_its_first_frame():
    vit = tiny_vit()
    x = frames(B=2, T=1).repeat(1, 4, 1, 1, 1)
    stream = Stream(vit, GatePolicy("threshold", 0.05))
    r = run_stream(stream, x)
    assert (r["recomputed"][:, 0] == vit.num_tokens).all()
    assert (r["recomputed"][:, 1:] == 0).all()
    assert torch.equal(r["logits"][:, 1:], r["logits"][:, :1].expand(-1, 3, -1))
    cfg = vit.cfg
    attention_only = vit.fixed_macs() + cfg.depth * 2 * vit.num_tokens ** 2 * cfg.embed_dim
    assert torch.allclose(r["macs"][:, 1:], torch.full_like(r["macs"][:, 1:], attention_only))


def test_the_first_gate_recomputes_exactly_the_changed_patch():
    vit = tiny_vit()
    x = frames(B=1, T=1).repeat(1, 3, 1, 1, 1)
    x[0, 2, :, 8:16, 16:24] += 0.5  # patch (row 1, col 2): token 1 + 1 * 4 + 2
    r = run_stream(Stream(vit, GatePolicy("threshold", 1e-4)), x)
    assert r["recomputed"][0, 2, 0, 0] == 1  # block 0, qkv gate: that one token
    assert r["recomputed"][0, 1].sum() == 0


def test_gated_macs_formula_matches_the_block_formula_when_all_rows_run():
    for n in (5, 17, 65):
        assert flops.gated_block_macs(n, n, n, n, 144, 4.0) == flops.block_macs(n, 144, 4.0)
    assert flops.gated_block_macs(10, 0, 0, 0, 8, 4.0) == 2 * 10 * 10 * 8


def test_top_rule_recomputes_its_fraction_of_each_stream():
    vit, x = tiny_vit(), frames(B=2, T=3)
    r = run_stream(Stream(vit, GatePolicy("top", 0.25)), x)
    assert (r["recomputed"][:, 1:] == math.ceil(0.25 * vit.num_tokens)).all()


def test_top_rule_always_computes_tokens_it_never_computed():
    # With a fraction of 0, top recomputes only tokens with no reference yet (kept for the first time),
    # exactly what a threshold no change can pass does: both must agree, tokens and logits.
    model, x = tiny_iared(), frames(B=3, T=6)
    kw = {"mode": "threshold", "threshold": 0.5}
    top = run_stream(Stream(model, GatePolicy("top", 0.0), **kw), x)
    never = run_stream(Stream(model, GatePolicy("threshold", 1e9), **kw), x)
    assert torch.equal(top["recomputed"], never["recomputed"])
    assert top["recomputed"][:, 1:].sum() > 0, "the interpreters should keep new tokens, or this checks nothing"
    assert torch.allclose(top["logits"], never["logits"], atol=1e-6)


def test_pixel_rule_recomputes_the_changed_patch_and_the_class_token():
    vit = tiny_vit()
    x = frames(B=1, T=1).repeat(1, 3, 1, 1, 1)
    x[0, 2, :, 0:8, 8:16] += 0.5  # patch 1 -> token 2
    r = run_stream(Stream(vit, GatePolicy("pixel", 0.01)), x)
    assert (r["recomputed"][0, 1] == 1).all()  # the class token only, at every gate of every block
    assert (r["recomputed"][0, 2] == 2).all()  # and the changed patch


def test_pixel_references_move_only_where_a_block_computed_the_token():
    # Block 0 reads each token's own patch embedding (no conv stem here), so where the first qkv gate
    # holds a reference input, the block's pixel reference must be the pixels that input was made from.
    # A reference moved for a token the interpreter dropped (not computed) would break that.
    model = tiny_iared()
    x = frames(B=2, T=6, seed=2)
    x[:, 3:] += 0.2 * torch.rand(2, 3, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    stream = Stream(model, GatePolicy("pixel", 0.02), mode="threshold", threshold=0.5)
    state = stream.init(2)
    for t in range(6):
        _, state = stream.step(x[:, t], state)
    vit = model.backbone
    n0 = vit.num_tokens
    cache = state.gates[(0, 0)]
    ref_x = cache.buffer[:, :cache.c_in].view(2, n0, -1)[:, 1:]
    ref_px = state.pixel_ref[0].view(2, n0, -1)[:, 1:]
    w = vit.patch_embed.proj
    embedded = ref_px @ w.weight.flatten(1).T + w.bias + vit.pos_embed[0, 1:]
    held = cache.buffer[:, cache.c_in].view(2, n0)[:, 1:] > 0
    assert held.sum() > 0 and not held.all(), "some tokens should have been dropped, or this checks nothing"
    assert torch.allclose(ref_x[held], embedded[held], atol=1e-5)


def test_random_rule_recomputes_about_its_fraction():
    vit, x = tiny_vit(), frames(B=4, T=12)
    r = run_stream(Stream(vit, GatePolicy("random", 0.25, seed=3)), x)
    share = (r["recomputed"][:, 1:].double() / vit.num_tokens).mean()
    assert 0.2 < share < 0.35  # 0.25 of the patches, plus the class token that is always recomputed


def test_streams_in_a_batch_are_independent():
    model, x = tiny_iared(), frames(B=3, T=4)
    policy = GatePolicy("threshold", 0.05)
    batch = run_stream(Stream(model, policy, mode="threshold", threshold=0.5), x)
    for b in range(3):
        alone = run_stream(Stream(model, policy, mode="threshold", threshold=0.5), x[b:b + 1])
        assert torch.allclose(batch["logits"][b], alone["logits"][0], atol=1e-5)
        assert torch.equal(batch["recomputed"][b], alone["recomputed"][0])


def test_hold_repeats_the_key_frame_and_computes_nothing_between():
    vit, x = tiny_vit(), frames(B=2, T=5)
    r = run_stream(Stream(vit, GatePolicy("hold", keyframe_every=2)), x)
    assert r["key"][:, ::2].all() and not r["key"][:, 1::2].any()
    assert torch.equal(r["logits"][:, 1], r["logits"][:, 0])
    assert (r["macs"][:, 1::2] == 0).all()
    assert torch.allclose(r["logits"][:, 2], per_frame(vit, x[:, 2:3])[:, 0], atol=1e-5)
    recorded = Stream(vit, GatePolicy("hold", keyframe_every=2), record_tokens=True)
    state = recorded.init(2)
    for t in range(2):
        _, state = recorded.step(x[:, t], state)
    assert state.last.tokens.shape == (2, vit.num_tokens) and (state.last.tokens == 0).all()  # nothing computed


def test_drift_gives_a_key_frame_to_the_stream_that_changed_only():
    vit = tiny_vit()
    x = frames(B=2, T=1).repeat(1, 3, 1, 1, 1)
    x[1, 2] = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(5))
    r = run_stream(Stream(vit, GatePolicy("threshold", 10.0, drift=0.2)), x)
    assert r["key"][:, 0].all()
    assert r["key"][:, 2].tolist() == [False, True]
    assert (r["recomputed"][1, 2] == vit.num_tokens).all()
    assert torch.allclose(r["logits"][1, 2], per_frame(vit, x[1:, 2:3])[0, 0], atol=1e-5)


def test_drift_with_iared_sees_no_change_in_a_still_stream():
    model = tiny_iared()
    x = frames(B=3, T=1).repeat(1, 5, 1, 1, 1)
    r = run_stream(Stream(model, GatePolicy("threshold", 0.05, drift=0.5), mode="threshold", threshold=0.5), x)
    assert r["key"][:, 0].all() and not r["key"][:, 1:].any()


def test_periodic_key_frames_count_from_each_streams_last_one():
    vit = tiny_vit()
    x = frames(B=2, T=1).repeat(1, 6, 1, 1, 1)
    x[1, 1] = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(9))  # stream 1 drifts at frame 1
    r = run_stream(Stream(vit, GatePolicy("threshold", 10.0, keyframe_every=3, drift=0.2)), x)
    assert r["key"][0].tolist() == [True, False, False, True, False, False]
    assert r["key"][1].tolist()[:5] == [True, True, True, False, False]  # frame 2 changes back: drift again


def test_a_threshold_trades_compute_for_error():
    vit, x = tiny_vit(), frames(B=2, T=6)
    exact = per_frame(vit, x)
    small = run_stream(Stream(vit, GatePolicy("threshold", 0.01)), x)
    large = run_stream(Stream(vit, GatePolicy("threshold", 0.5)), x)
    assert small["macs"].sum() > large["macs"].sum()
    assert (small["logits"] - exact).abs().max() < (large["logits"] - exact).abs().max()


def test_bad_policies_and_models_are_refused():
    with pytest.raises(ValueError, match="unknown gate rule"):
        GatePolicy("sometimes")
    with pytest.raises(ValueError, match="fraction"):
        GatePolicy("top", 1.5)
    with pytest.raises(ValueError, match="keyframe_every"):
        GatePolicy("hold")
    with pytest.raises(ValueError, match="cannot see drift"):
        GatePolicy("hold", keyframe_every=2, drift=0.1)
    with pytest.raises(ValueError, match="drift must be"):
        GatePolicy(drift=float("nan"))
    from iared.models.timesformer import TimeSformer, TimeSformerConfig

    tsf = TimeSformer(TimeSformerConfig(img_size=16, patch_size=8, num_frames=2, depth=1, embed_dim=8, num_heads=1,
                                        num_classes=2))
    with pytest.raises(ValueError, match="ViT-family blocks"):
        Stream(tsf)
    with pytest.raises(ValueError, match="augmented shortcuts"):
        Stream(tiny_vit(aug_shortcuts=1))
    stream = Stream(tiny_vit())
    with pytest.raises(ValueError, match="2 frames for a state of 3"):
        stream.step(torch.zeros(2, 3, 32, 32), stream.init(3))


def test_token_codes_say_dropped_reused_recomputed():
    model = tiny_iared()
    x = frames(B=1, T=1).repeat(1, 2, 1, 1, 1)
    stream = Stream(model, GatePolicy("threshold", 0.05), record_tokens=True, mode="threshold", threshold=0.5)
    state = stream.init(1)
    _, state = stream.step(x[:, 0], state)
    first = state.last.tokens[0]
    assert set(first.tolist()) <= {0, 2} and (first == 2).sum() == state.last.alive[0, 0]
    _, state = stream.step(x[:, 1], state)
    assert (state.last.tokens[0] == 2).sum() == 0  # the same frame: everything alive was reused


def test_paired_bootstrap_resamples_whole_streams():
    a = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 1], [0, 0, 0, 0], [1, 1, 1, 1]])
    b = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1]])
    r = paired_bootstrap(a, b, resamples=4000, seed=1)
    assert r["mean"] == pytest.approx(-0.25)
    assert r["lo"] <= -0.5 + 1e-9 and r["hi"] == pytest.approx(0.0)  # a cluster: steps of 1/4, not 1/16
    assert paired_bootstrap(b, b)["lo"] == paired_bootstrap(b, b)["hi"] == 0
    with pytest.raises(ValueError, match="same items"):
        paired_bootstrap(a, b[:2])


def test_digit_streams_task():
    from iared.data.streams import DigitStreams

    data = DigitStreams("val", length=2, frames=40)
    s = data.render(1)
    again = DigitStreams("val", length=2, frames=40).render(1)
    assert torch.equal(torch.from_numpy(s["frames"]), torch.from_numpy(again["frames"]))
    x, labels, masks = data[0]
    assert x.shape == (40, 3, 64, 64) and labels.shape == (40,) and masks.shape == (40, 64, 64)
    assert x.min() >= 0 and x.max() <= 1 and torch.allclose(x * 255, (x * 255).round(), atol=1e-3)
    assert masks.flatten(1).any(1).all(), "every frame shows its digit"
    segs = s["segments"]
    assert segs[0][0] == 0 and segs[-1][1] == 40 and all(a[1] == b[0] for a, b in itertools.pairwise(segs))
    assert len(segs) >= 2
    assert all(len(set(s["labels"][a:b].tolist())) == 1 for a, b in segs)
    step = (x[1:] - x[:-1]).abs().mean()
    assert 0 < step < 0.05, "consecutive frames differ, a little"
    with pytest.raises(ValueError, match="split"):
        DigitStreams("dev")


def test_the_shipped_backbone_reads_digit_streams():
    from iared.data.streams import DigitStreams
    from iared.models import create_model

    vit = create_model("digits_natural_vit", pretrained=True).eval()
    data = DigitStreams("val", length=3, frames=16)
    x = torch.stack([data[i][0] for i in range(3)]).flatten(0, 1)
    y = torch.stack([data[i][1] for i in range(3)]).flatten()
    with torch.no_grad():
        acc = (vit(x).argmax(-1) == y).float().mean()
    assert acc >= 0.9
