"""Heatmap methods: shapes and ranges on a random model, and a crafted model whose maps must follow
the object."""

import pytest
import torch
import torch.nn.functional as F

from iared.explain import METHODS, default_methods, explain, make_method
from iared.explain.methods import READOUTS, InterpreterMap
from iared.explain.metrics import pointing_game
from iared.models.vit import VisionTransformer, ViTConfig
from iared.pruning import IARed


def test_every_method_gives_unit_range_maps_of_image_size(model):
    images = torch.rand(3, 1, 64, 64)
    names = default_methods(model)
    assert names[:4] == ["interpreter", "interpreter:0", "interpreter:1", "interpreter:2"]
    readouts = [f"interpreter-{r}" for r in READOUTS]
    assert {n.partition(":")[0] for n in names} == set(METHODS) - set(readouts)  # readouts: on request
    grads_before = [p.grad for p in model.parameters()]
    for name in [*names, *readouts, "interpreter-attention:1", "raw-attention:0", "gradcam:1"]:
        for target in (None, [1, 2, 3]):
            maps = explain(model, images, name, target=target)
            assert maps.shape == (3, 64, 64), name
            assert maps.dtype == torch.float32, name
            assert float(maps.min()) >= 0 and float(maps.max()) <= 1, name
            assert torch.isfinite(maps).all(), name
    assert not model.training  # grad-cam switches to eval and back; nothing flips the mode
    assert all(g is None for g in grads_before) and all(p.grad is None for p in model.parameters())


def test_backbone_methods_accept_a_plain_vit_and_interpreter_refuses_it(model):
    backbone = model.backbone
    images = torch.rand(2, 1, 64, 64)
    model.inference = type(model.inference)(threshold=-1.0)  # nothing dropped: the pruned run is the backbone
    for name in default_methods(backbone):
        assert explain(backbone, images, name).shape == (2, 64, 64)
        # explaining an IARed that drops nothing explains its backbone: same maps (random excepted)
        if name != "random":
            assert torch.allclose(explain(backbone, images, name), explain(model, images, name), atol=1e-5)
    assert "interpreter" not in default_methods(backbone)
    with pytest.raises(TypeError, match="IARed"):
        explain(backbone, images, "interpreter")


def test_stages_combined_is_the_mean_over_stages_with_dropped_tokens_zero(model):
    images = torch.rand(2, 1, 64, 64)
    out = model(images, "threshold", threshold=0.5)
    combined = InterpreterMap().patch_scores(out)
    expected = torch.stack(out.scores).mean(0)[:, 1:]
    assert torch.allclose(combined, expected)
    dropped_at_0 = ~out.keep[0][:, 1:]
    assert (out.scores[1][:, 1:][dropped_at_0] == 0).all()  # a dropped token scores 0 later on


def test_bad_method_specs_are_one_line_value_errors(model):
    for spec, match in [("nope", "unknown"), ("interpreter:x", "integer"), ("rollout:1", "takes no")]:
        with pytest.raises(ValueError, match=match):
            make_method(spec)
    with pytest.raises(ValueError, match="stage 5 out of range"):
        explain(model, torch.rand(1, 1, 64, 64), "interpreter:5")
    with pytest.raises(ValueError, match="block 9 out of range"):
        explain(model, torch.rand(1, 1, 64, 64), "raw-attention:9")


def test_gradcam_matches_a_direct_token_gradcam(model):
    """pytorch-grad-cam with our reshape transform == Grad-CAM written out on the token grid."""
    torch.manual_seed(1)
    images = torch.rand(2, 1, 64, 64)
    target = torch.tensor([3, 7])
    backbone = model.backbone
    acts = []
    handle = backbone.blocks[-1].norm1.register_forward_hook(lambda m, i, o: acts.append(o))
    x = images.clone().requires_grad_(True)
    logits = backbone(x)
    handle.remove()
    (grad,) = torch.autograd.grad(logits.gather(1, target[:, None]).sum(), acts[0])
    a, g = acts[0][:, 1:].detach(), grad[:, 1:]  # (B, 64 patches, C)
    cam = F.relu((a * g.mean(1, keepdim=True)).sum(-1)).view(2, 1, 8, 8)
    up = F.interpolate(cam, size=(64, 64), mode="bilinear", align_corners=False)[:, 0]
    lo, hi = up.flatten(1).min(1).values, up.flatten(1).max(1).values
    expected = (up - lo[:, None, None]) / (hi - lo)[:, None, None]
    assert torch.allclose(explain(model, images, "gradcam", target=target), expected, atol=2e-3)


# -- a model whose maps must follow the object -----------------------------------------------------

D = 8  # embedding width


def crafted_iared() -> IARed:
    """Every weight set by hand so that ink patches, and only they, are what the class token looks for.

    Patch embedding: channel 0 = sum of the patch's pixels (nothing else; no position embedding), so
    after a LayerNorm every patch with ink is the same vector u = (sqrt 7, -1/sqrt 7, ...) and an
    empty patch is 0. The class token is channel 1, normalised to (-1/sqrt 7, sqrt 7, ...).
    Queries read channel 1 and keys channel 0 (all-ones columns), in every attention block and in
    every interpreter: class-token query . ink key = 7 per head dimension, . empty key = 0. So the
    interpreter scores ink patches sigmoid(14) ~ 1 and empty ones sigmoid(0) = 0.5, and the class
    token's attention puts ~all its mass on ink patches. Values, projections and MLPs are zero: the
    blocks pass tokens through unchanged, so every stage sees the same tokens.
    """
    cfg = ViTConfig(img_size=64, patch_size=8, in_chans=1, num_classes=2, embed_dim=D, depth=3, num_heads=2,
                    mean=(0.0,), std=(1.0,))
    vit = VisionTransformer(cfg)
    model = IARed(vit, interpreter_heads=2)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        vit.patch_embed.proj.weight[0] = 1.0
        vit.cls_token[0, 0, 1] = 1.0
        vit.norm.weight.fill_(1.0)
        for block in vit.blocks:
            block.norm1.weight.fill_(1.0)
            block.norm2.weight.fill_(1.0)
            block.attn.qkv.weight[:D, 1] = 1.0  # q
            block.attn.qkv.weight[D: 2 * D, 0] = 1.0  # k
        for interpreter in model.interpreters:
            interpreter.qk.weight[:D, 1] = 1.0  # q
            interpreter.qk.weight[D:, 0] = 1.0  # k
    return model.eval()


def blob_image(top: int, left: int, size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    image = torch.zeros(1, 1, 64, 64)
    image[..., top: top + size, left: left + size] = torch.rand(size, size) * 0.5 + 0.5
    mask = torch.zeros(1, 64, 64, dtype=torch.bool)
    mask[:, top: top + size, left: left + size] = True
    return image, mask


@pytest.mark.parametrize("name", ["interpreter", "interpreter:0", "interpreter:2", "raw-attention",
                                  "raw-attention:0", "rollout"])
def test_heatmap_follows_the_object_when_it_moves(name):
    torch.manual_seed(0)
    model = crafted_iared()
    # top-right, then bottom-left: a transposed or flipped token grid would swap them
    (img_a, mask_a), (img_b, mask_b) = blob_image(0, 40), blob_image(40, 8)
    for model_or_backbone in (model, model.backbone) if not name.startswith("interpreter") else (model,):
        map_a = explain(model_or_backbone, img_a, name)
        map_b = explain(model_or_backbone, img_b, name)
        for heat, mask, other in ((map_a, mask_a, mask_b), (map_b, mask_b, mask_a)):
            assert pointing_game(heat, mask)[0], name  # the peak lies on the object
            inside, elsewhere = heat[mask].mean(), heat[~mask].mean()
            assert inside > 0.75 and elsewhere < 0.1, (name, float(inside), float(elsewhere))
            assert heat[other].mean() < 0.1, name  # nothing left where the object was / will be


def test_crafted_model_really_prunes_the_background():
    model = crafted_iared()
    image, _ = blob_image(24, 16)
    out = model(image, "threshold", threshold=0.5)
    kept = out.keep[-1][0, 1:].view(8, 8)
    expected = torch.zeros(8, 8, dtype=torch.bool)
    expected[3:5, 2:4] = True  # the 2x2 patches under the 16x16 blob at (24, 16)
    assert torch.equal(kept, expected)


def _spread(model):
    with torch.no_grad():  # scores spread around 0.5, so threshold mode drops a share of the tokens
        for interp in model.interpreters:
            interp.qk.weight.normal_(0, 0.6)
    return model


@pytest.mark.parametrize("name", ["raw-attention", "rollout", "chefer"])
def test_attention_methods_explain_the_pruned_model_that_ran(model, name):
    from iared.explain.methods import make_method

    model = _spread(model)
    images = torch.rand(3, 1, 64, 64)
    with torch.no_grad():
        out = model(images, "threshold", threshold=model.inference.threshold)
    last_keep = out.keep[-1][:, 1:]  # patches alive in the last stage
    assert (~last_keep).any() and last_keep.any()
    pruned_maps = make_method(name)(model, images)
    dense_maps = make_method(name)(model.backbone, images)
    assert not torch.allclose(pruned_maps, dense_maps)  # not the unpruned backbone's explanation
    if name == "raw-attention":  # the last block never attended to a dropped patch: those score 0
        from iared.explain.methods import _attentions

        attn = _attentions(model, images)[-1].mean(1)[:, 0, 1:]
        assert (attn[~last_keep] == 0).all() and (attn[last_keep] > 0).all()


def test_pruned_attention_with_nothing_dropped_equals_the_backbone(model):
    from iared.explain.methods import _attentions

    model.inference = type(model.inference)(threshold=-1.0)
    images = torch.rand(2, 1, 64, 64)
    for a, b in zip(_attentions(model, images), _attentions(model.backbone, images)):
        assert torch.allclose(a, b, atol=1e-6)


def test_explain_eval_uses_one_threshold_for_every_method(model):
    from iared.explain.cli import _use_threshold

    assert _use_threshold(model, None) == model.inference.threshold  # default: the checkpoint's
    assert _use_threshold(model, 0.7) == 0.7 and model.inference.threshold == 0.7  # the attention pass follows


def test_attention_maps_without_a_class_token_ask_with_the_mean_patch_row():
    """A pooled model without a class token: raw attention and rollout read the mean of the patch
    tokens' rows (row 0 would be a register here); with a class token, row 0."""
    from iared.explain.methods import _cls_row_patches

    torch.manual_seed(0)
    pooled = VisionTransformer(ViTConfig(img_size=32, patch_size=8, in_chans=1, num_classes=4, embed_dim=24,
                                         depth=2, num_heads=2, class_token=False, reg_tokens=1,
                                         global_pool="avg", fc_norm=True)).eval()
    matrix = torch.rand(2, 17, 17)  # 1 register + 16 patches
    assert torch.equal(_cls_row_patches(matrix, pooled), matrix[:, 1:, 1:].mean(1))
    model = IARed(pooled, stage_starts=[0, 1]).eval()
    images = torch.rand(2, 1, 32, 32)
    for name in ("raw-attention", "rollout", "chefer", "interpreter"):
        maps = explain(model, images, name)
        assert maps.shape == (2, 32, 32) and torch.isfinite(maps).all(), name
    classic = VisionTransformer(ViTConfig(img_size=32, patch_size=8, in_chans=1, num_classes=4, embed_dim=24,
                                          depth=2, num_heads=2))
    assert torch.equal(_cls_row_patches(matrix, classic), matrix[:, 0, 1:])
