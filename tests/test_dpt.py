"""DPT head: equal to transformers' DPTForSemanticSegmentation; dropped tokens restored from their last features."""

import pytest
import torch

from iared.dense import DenseModel, confusion_matrix, image_miou, scores_from_confusion, segmentation_target
from iared.heads.dpt import DPTConfig, default_depths, from_hf_dpt, head_macs
from iared.models.vit import VisionTransformer, ViTConfig
from iared.pruning import IARed
from iared.stages import ReducedModel
from iared.tokens import Decision


def _tiny_vit(**kw):
    torch.manual_seed(0)
    cfg = ViTConfig(img_size=32, patch_size=8, in_chans=1, num_classes=10, embed_dim=32, depth=4, num_heads=2,
                    mean=(0.0,), std=(1.0,), **kw)
    return VisionTransformer(cfg).eval()


TINY_DPT = DPTConfig(num_classes=5, neck_hidden_sizes=(8, 16, 16, 24), fusion_hidden_size=16,
                     reassemble_factors=(2, 1, 0.5, 0.25))


@pytest.mark.parametrize("readout,batch_norm", [("project", False), ("add", True), ("ignore", False)])
def test_matches_transformers(readout, batch_norm):
    transformers = pytest.importorskip("transformers")
    hf_cfg = transformers.DPTConfig(
        image_size=64, patch_size=8, num_channels=3, hidden_size=48, num_hidden_layers=4, num_attention_heads=4,
        intermediate_size=192, hidden_act="gelu", layer_norm_eps=1e-6, backbone_out_indices=[0, 1, 2, 3],
        neck_hidden_sizes=[16, 24, 32, 48], fusion_hidden_size=32, readout_type=readout,
        use_batch_norm_in_fusion_residual=batch_norm, use_auxiliary_head=False, num_labels=7,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, semantic_classifier_dropout=0.1)
    torch.manual_seed(0)
    hf = transformers.DPTForSemanticSegmentation(hf_cfg).eval()
    with torch.no_grad():  # random BatchNorm statistics and biases, so the test sees them
        for name, t in hf.state_dict().items():
            if name.endswith(("running_mean", "bias")) and t.is_floating_point():
                t.copy_(torch.randn_like(t) * 0.1)
            elif name.endswith("running_var"):
                t.copy_(torch.rand_like(t) + 0.5)
    vit = VisionTransformer(ViTConfig(img_size=64, patch_size=8, in_chans=3, num_classes=3, embed_dim=48, depth=4,
                                      num_heads=4)).eval()
    cfg = DPTConfig(num_classes=7, depths=(0, 1, 2, 3), neck_hidden_sizes=(16, 24, 32, 48), fusion_hidden_size=32,
                    readout=readout, batch_norm_in_fusion=batch_norm)
    vit_sd, head_sd = from_hf_dpt(hf.state_dict())
    assert not any(k.startswith("head.") for k in vit_sd)  # DPT has no classifier
    vit.load_state_dict({**vit.state_dict(), **vit_sd}, strict=True)
    model = DenseModel(ReducedModel(vit, [None], [0]), cfg).eval()
    model.dpt.load_state_dict(head_sd, strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = hf(pixel_values=x).logits  # (2, 7, 128, 128): DPT's x2 upsampling at patch 8
        ours = model.dpt(model.reduced(x, "all", features_at=model.depths).features, (8, 8), 1)
    assert ours.shape == ref.shape == (2, 7, 128, 128)
    assert ref.abs().max() > 0.1 and ref.std() > 0.01  # not a degenerate comparison
    assert (ours - ref).abs().max() <= 1e-4


def test_default_depths():
    assert default_depths(12) == (2, 5, 8, 11)  # DPT's ViT-B/16
    assert default_depths(6) == (0, 2, 3, 5)
    with pytest.raises(ValueError, match="reads 4 blocks"):
        default_depths(3)


def _drop_reducer(keep_fn):
    """A reducer that keeps the tokens ``keep_fn(tokens)`` says (token-aligned bool)."""

    class Dropper(torch.nn.Module):
        needs_record = False

        def forward(self, inp):
            return Decision(keep=keep_fn(inp.tokens))

    return Dropper()


def _pattern_keep(tokens, every: int):
    # drop patch tokens whose original position is divisible by `every`, differently per image
    shift = tokens.image_ids()
    return ((tokens.index + shift) % every) != 0


@pytest.mark.parametrize("layout", ["packed", "padded"])
def test_never_dropped_tokens_get_exactly_the_unpruned_features(layout):
    vit = _tiny_vit()
    reducers = [None, _drop_reducer(lambda t: _pattern_keep(t, 3)), _drop_reducer(lambda t: _pattern_keep(t, 4))]
    model = ReducedModel(vit, reducers, [0, 1, 3])
    x = torch.randn(3, 1, 32, 32)
    depths = (0, 1, 2, 3)
    with torch.no_grad():
        full = model(x, "all", features_at=depths).features
        pruned = model(x, "threshold", features_at=depths, layout=layout).features
        # reference: the plain backbone's block outputs
        tokens = vit.embed(x)
        plain = []
        for block in vit.blocks:
            tokens = block(tokens)
            plain.append(tokens.data)
    assert len(full) == len(pruned) == 4
    for a, b in zip(full, plain):
        assert torch.equal(a, b)  # the unpruned path hands the head the blocks' own outputs
    # block 0 runs before any drop: bit-identical to the unpruned features
    assert torch.equal(pruned[0], full[0])
    # reducers that drop nothing (in this layout): every depth is exactly the unpruned one
    keep_all = ReducedModel(vit, [None, _drop_reducer(lambda t: t.index >= 0), None], [0, 1, 3])
    with torch.no_grad():
        same = keep_all(x, "threshold", features_at=depths, layout=layout).features
    for a, b in zip(same, full):
        assert torch.equal(a, b)


@pytest.mark.parametrize("layout", ["packed", "padded"])
def test_dropped_tokens_carry_their_last_alive_features(layout):
    vit = _tiny_vit()
    drop1 = _drop_reducer(lambda t: _pattern_keep(t, 3))   # before block 1
    drop2 = _drop_reducer(lambda t: _pattern_keep(t, 2))   # before block 3
    model = ReducedModel(vit, [None, drop1, drop2], [0, 1, 3])
    x = torch.randn(3, 1, 32, 32)
    with torch.no_grad():
        out = model(x, "threshold", features_at=(0, 1, 2, 3), layout=layout)
    f0, f1, f2, f3 = out.features
    keep1, keep2 = out.keep[1], out.keep[2]  # (B, N0) alive after each reduction
    assert (~keep1).any() and (keep1 & ~keep2).any()
    gone1 = ~keep1
    # dropped before block 1: their features at every later depth are those after block 0
    assert torch.equal(f1[gone1], f0[gone1]) and torch.equal(f3[gone1], f0[gone1])
    # dropped before block 3: after block 3 they hold their features after block 2
    gone2 = keep1 & ~keep2
    assert torch.equal(f3[gone2], f2[gone2])
    # alive tokens do change
    assert not torch.allclose(f3[keep2], f2[keep2])
    # packed and padded restore the same grid (up to attention rounding)
    other = "padded" if layout == "packed" else "packed"
    with torch.no_grad():
        again = model(x, "threshold", features_at=(0, 1, 2, 3), layout=other).features
    for a, b in zip(out.features, again):
        assert torch.allclose(a, b, atol=1e-5)


def test_dense_model_runs_pruned_and_counts_the_head():
    vit = _tiny_vit()
    model = DenseModel(IARed(vit, num_stages=2, interpreter_heads=2), TINY_DPT).eval()
    x = torch.randn(4, 1, 32, 32)
    with torch.no_grad():
        full = model(x, "all")
        pruned = model(x, "threshold", threshold=0.6)
    assert full.logits.shape == pruned.logits.shape == (4, 5, 32, 32)
    assert model.head_macs == head_macs(model.dpt, 32, (4, 4))
    assert torch.allclose(full.macs, torch.full((4,), model.full_macs(), dtype=full.macs.dtype))
    # head MACs: hand count of the largest layers is below the total, which includes them
    assert model.head_macs > 16 * 16 * 16 * 16 * 9  # the head's 3x3 conv at 16x16


def test_segmentation_metrics():
    assert torch.equal(segmentation_target(3, torch.tensor([[True, False]])), torch.tensor([[4, 0]]))
    target = torch.tensor([[[0, 0, 2, 2]]])
    pred = torch.tensor([[[0, 2, 2, 2]]])
    s = scores_from_confusion(confusion_matrix(pred, target, 3))
    # class 0: 1/2, class 2: 2/3, class 1 absent
    assert s["miou"] == pytest.approx((0.5 + 2 / 3) / 2)
    assert s["pixel_accuracy"] == pytest.approx(0.75)
    assert image_miou(pred, target, 3).item() == pytest.approx((0.5 + 2 / 3) / 2)


def test_pixel_refinement_is_counted_and_off_by_default():
    from dataclasses import replace

    vit = _tiny_vit()
    plain = DenseModel(ReducedModel(vit, [None], [0]), TINY_DPT)
    refined = DenseModel(ReducedModel(vit, [None], [0]), replace(TINY_DPT, pixel_refinement=4, in_chans=1)).eval()
    assert plain.dpt.refine is None and not any(k.startswith("refine") for k in plain.dpt.state_dict())
    # two 3x3 convs at 32x32: (5 classes + 1 channel) -> 4 -> 5 classes
    assert refined.head_macs - plain.head_macs == 32 * 32 * 9 * ((5 + 1) * 4 + 4 * 5)
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        out = refined(x, "all").logits
        base = refined.dpt(refined.reduced(x, "all", features_at=refined.depths).features, (4, 4), 1)
    assert out.shape == (2, 5, 32, 32)
    # the refinement is a residual on the upsampled DPT logits
    with torch.no_grad():
        up = torch.nn.functional.interpolate(base, size=(32, 32), mode="bilinear", align_corners=False)
        assert torch.allclose(out, refined.dpt.refine(up, x))
