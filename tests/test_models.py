"""Our ViT / DeiT against timm itself: same weights in, same logits out (float32, eval mode).

Every timm model here is random-initialised and then perturbed (LayerNorm affine parameters,
biases and tokens included), so a swapped, transposed or ignored tensor changes the logits.
Weights reach our model four ways: ``from_timm`` and three file formats read by
``create_model(name, checkpoint=...)``.
"""

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from iared.models import MODEL_CONFIGS, create_model, from_timm
from iared.models.vit import VisionTransformer, ViTConfig
from tests.helpers import perturbed

DEIT = ["deit_tiny_patch16_224", "deit_small_patch16_224", "deit_base_patch16_224"]
NAMES = DEIT + [n.replace("_patch16", "_distilled_patch16") for n in DEIT]
TOL = 1e-5


@torch.no_grad()
def max_diff(model: torch.nn.Module, x: torch.Tensor, expected: torch.Tensor) -> float:
    out = model.eval()(x)
    assert out.shape == expected.shape
    return float((out - expected).abs().max())


@pytest.mark.parametrize("name", NAMES)
def test_deit_matches_timm_all_weight_sources(name, tmp_path):
    torch.manual_seed(0)
    ref = perturbed(timm.create_model(name, pretrained=False))
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ref(x)
    assert expected.shape == (2, 1000) and float(expected.std()) > 0.1  # a signal worth comparing

    ours = from_timm(ref).eval()
    assert ours.cfg.distilled == ("distilled" in name)
    assert ours.cfg.to_dict() == {**ViTConfig(**MODEL_CONFIGS[name]).to_dict(), "mean": ours.cfg.mean,
                                  "std": ours.cfg.std}
    assert max_diff(ours, x, expected) <= TOL
    reference_sd = ours.state_dict()

    sd = ref.state_dict()
    files = {
        "deit.pth": {"model": sd},  # the official DeiT release layout
        "plain.pt": sd,
        "weights.safetensors": sd,
    }
    for filename, obj in files.items():
        path = tmp_path / filename
        save_file(obj, path) if filename.endswith(".safetensors") else torch.save(obj, path)
        loaded = create_model(name, checkpoint=path).eval()
        loaded_sd = loaded.state_dict()
        assert loaded_sd.keys() == reference_sd.keys()
        assert all(torch.equal(loaded_sd[k], reference_sd[k]) for k in reference_sd), filename
        if "base" not in name:  # base: identical weights (above) imply identical logits; spare the CPU
            assert max_diff(loaded, x, expected) <= TOL, filename
        path.unlink()


@pytest.mark.parametrize("distilled", [False, True])
def test_non_default_geometry_matches_timm(distilled):
    """64 px, 8 px patches, one channel, 2 blocks, layer scale, no qkv bias, mlp ratio 2."""
    from timm.models.deit import VisionTransformerDistilled
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    kw = dict(img_size=64, patch_size=8, in_chans=1, num_classes=7, embed_dim=48, depth=2, num_heads=3,
              mlp_ratio=2.0, qkv_bias=False, init_values=0.1)
    torch.manual_seed(0)
    ref = perturbed((VisionTransformerDistilled if distilled else TimmViT)(**kw))
    x = torch.randn(3, 1, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = ref(x)

    ours = from_timm(ref)
    c = ours.cfg
    assert (c.img_size, c.patch_size, c.in_chans, c.num_classes, c.embed_dim, c.depth, c.num_heads) == \
        (64, 8, 1, 7, 48, 2, 3)
    assert (c.mlp_ratio, c.qkv_bias, c.distilled, c.num_patches) == (2.0, False, distilled, 64)
    assert c.init_values is not None
    assert max_diff(ours, x, expected) <= TOL

    # The same geometry built from our config and loaded from timm's state dict.
    direct = VisionTransformer(ViTConfig(**{k: v for k, v in kw.items()}, distilled=distilled))
    direct.load_state_dict(ref.state_dict())
    assert max_diff(direct, x, expected) <= TOL
    # timm's forward_features (all tokens, final norm) too.
    with torch.no_grad():
        assert float((direct.forward_features(x) - ref.forward_features(x)).abs().max()) <= TOL


def test_from_timm_refuses_unsupported_variants():
    """The variants our forward does not implement are named (the supported ones: test_vit_variants.py)."""
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    small = dict(img_size=32, patch_size=8, embed_dim=24, depth=1, num_heads=2, num_classes=3)
    refused = {
        "dynamic_img_size": dict(dynamic_img_size=True),
        "attention pooling global_pool='map'": dict(global_pool="map"),
        "global_pool='max'": dict(global_pool="max"),
        "qk_norm": dict(qk_norm=True),
        "no position embedding": dict(pos_embed="none"),
        "pool_include_prefix": dict(global_pool="avg", pool_include_prefix=True),
    }
    for message, kw in refused.items():
        with pytest.raises(ValueError, match=f"variant not supported: .*{message}".replace("(", r"\(")):
            from_timm(TimmViT(**small, **kw))
    with pytest.raises(TypeError, match="timm VisionTransformer"):
        from_timm(torch.nn.Linear(2, 2))


def test_create_model_overrides_and_unknown_name():
    model = create_model("digits_vit", depth=2, embed_dim=32, num_heads=2)
    assert (model.cfg.depth, model.cfg.embed_dim, model.cfg.in_chans, model.cfg.img_size) == (2, 32, 1, 64)
    assert model(torch.zeros(2, 1, 64, 64)).shape == (2, 10)
    with pytest.raises(ValueError, match="unknown model 'deit_huge'"):
        create_model("deit_huge")
    with pytest.raises(ValueError, match="expected 64x64 images"):
        model(torch.zeros(1, 1, 32, 32))


def test_forward_on_a_subset_of_patches_equals_running_each_image_alone():
    from iared.train.backbone import random_patch_keep

    torch.manual_seed(0)
    model = VisionTransformer(ViTConfig(img_size=32, patch_size=8, in_chans=1, num_classes=3, embed_dim=16,
                                        depth=2, num_heads=2)).eval()
    images = torch.rand(5, 1, 32, 32)
    keep = random_patch_keep(5, 16, 0.8, "cpu")
    counts = keep.sum(1)
    assert ((counts >= 3) & (counts <= 16)).all() and len(set(counts.tolist())) > 1
    assert torch.equal(model(images, keep=torch.ones(5, 16, dtype=torch.bool)), model(images))
    batched = model(images, keep=keep)
    for i in range(5):
        patches = model.patch_embed(images[i: i + 1])[:, keep[i]]
        x = torch.cat([model.cls_token, patches + model.pos_embed[:, 1:][:, keep[i]]], 1)
        x[:, 0] += model.pos_embed[0, 0]
        for block in model.blocks:  # timm-style reference on a plain tensor
            x = x + block.attn.proj(torch.nn.functional.scaled_dot_product_attention(
                *block.attn.qkv(block.norm1(x)).reshape(1, -1, 3, 2, 8).permute(2, 0, 3, 1, 4)
            ).transpose(1, 2).reshape(1, -1, 16))
            x = x + block.mlp.fc2(block.mlp.act(block.mlp.fc1(block.norm2(x))))
        assert torch.allclose(model.head(model.norm(x)[:, 0]), batched[i], atol=1e-5)


@pytest.mark.parametrize("task", ["digits-natural", "digits-clutter", "moving-digits"])
def test_each_embedded_task_has_its_shipped_backbone_and_it_is_trained(task):
    """``TASK_BACKBONES``: the shipped weights load by name (``pretrained=True``) and classify the task's
    test images far above chance (10 %); the 200 images are a quick check, the README has the full figures."""
    from iared.loading import task_dataset
    from iared.models import TASK_BACKBONES
    from iared.train.interpreters import stack_batch

    model = create_model(TASK_BACKBONES[task], pretrained=True).eval()
    images, labels = stack_batch(task_dataset(task, "test", model.cfg), torch.arange(100 if task == "moving-digits"
                                                                                    else 200))
    with torch.no_grad():
        top1 = (model(images).argmax(1) == labels).float().mean().item()
    assert top1 >= 0.9, (task, top1)


def test_the_conv_stem_runs_channels_last_with_the_same_values():
    """``run_stem`` (hybrid ViT and TimeSformer embeddings) holds the images channels-last for oneDNN:
    the values of the plain NCHW stem within float rounding, and the patch features come out
    ``(B, N, C)``-contiguous, so nothing downstream copies them."""
    from iared.models.vit import run_stem

    torch.manual_seed(0)
    model = perturbed(create_model("digits_natural_vit", depth=1, img_size=32), 0).eval()
    x = torch.rand(4, 3, 32, 32)
    stem = model.patch_embed.backbone
    with torch.no_grad():
        fast, plain = run_stem(stem, x), stem(x)
        assert fast.is_contiguous(memory_format=torch.channels_last)
        assert float((fast - plain).abs().max()) <= 1e-5 * max(1.0, float(plain.abs().max()))
        patches = model.patch_embed(x)
        assert patches.is_contiguous()
        reference = model.patch_embed.proj(plain).flatten(2).transpose(1, 2)
        assert float((patches - reference).abs().max()) <= 1e-4
    assert run_stem(torch.nn.Identity(), x) is x  # a plain patch embedding is untouched


def test_stem_max_pool_is_torchs_to_the_bit():
    """The stem's 2x2 pool (two element-wise maxima of strided views, no argmax indices) gives
    ``F.max_pool2d``'s values exactly, NaN included; other pools and odd maps keep torch's module."""
    from iared.models.vit import _is_plain_2x2_pool, _max_pool_2x2

    x = torch.randn(3, 5, 8, 6)
    x[0, 1, 2, 3] = float("nan")
    for layout in (torch.contiguous_format, torch.channels_last):
        y = x.contiguous(memory_format=layout)
        got, expected = _max_pool_2x2(y), F.max_pool2d(y, 2)
        assert torch.equal(got.isnan(), expected.isnan()) and torch.equal(got.nan_to_num(), expected.nan_to_num())
    assert _is_plain_2x2_pool(torch.nn.MaxPool2d(2), x)
    assert not _is_plain_2x2_pool(torch.nn.MaxPool2d(2), torch.randn(1, 1, 7, 6))
    assert not _is_plain_2x2_pool(torch.nn.MaxPool2d(3, 2), x)
    assert not _is_plain_2x2_pool(torch.nn.MaxPool2d(2, padding=1), x)


def test_stem_batchnorm_folded_in_inference_follows_every_weight_change():
    """In inference ``run_stem`` folds each BatchNorm into its convolution (one cached copy per
    weight version): changed weights, changed running statistics and a dtype round trip are all
    seen at the next call, and training / autograd run the modules themselves."""
    from iared.models.vit import run_stem

    model = perturbed(create_model("digits_natural_vit", depth=1, img_size=32), 0).eval()
    stem = model.patch_embed.backbone
    x = torch.rand(2, 3, 32, 32)

    def gap():
        with torch.no_grad():
            return float((run_stem(stem, x) - stem(x)).abs().max())

    assert gap() <= 1e-5
    with torch.no_grad():
        stem[0][0].weight.mul_(2.0)  # an optimiser step
        stem[0][1].running_var.mul_(3.0)  # BatchNorm statistics moved
    assert gap() <= 1e-5
    stem.half().float()  # new storage for every tensor
    assert gap() <= 1e-5
    new_bn = stem[1][1].state_dict()
    new_bn["running_mean"] = new_bn["running_mean"] + 0.5
    stem[1][1].load_state_dict(new_bn)
    assert gap() <= 1e-5
    with torch.no_grad():  # and the fold really is what ran: the stale weights would differ
        before = run_stem(stem, x)
        stem[1][0].weight.mul_(0.5)
        assert float((run_stem(stem, x) - before).abs().max()) > 1e-3
    out = run_stem(stem, x.requires_grad_())  # autograd: the modules, gradients reach the BatchNorm
    out.sum().backward()
    assert stem[0][1].weight.grad is not None


def test_stem_folding_is_never_stale_and_steps_aside_when_it_must():
    """Swapped parameter storage (``param.data = ...``, twice, so a freed address could come back),
    a stem made inside ``inference_mode`` (tensors without version counters), and a BatchNorm put
    back in training mode for recalibration: each gives what the modules give."""
    from iared.models.vit import run_stem

    model = perturbed(create_model("digits_natural_vit", depth=1, img_size=32), 0).eval()
    stem = model.patch_embed.backbone
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        for seed in range(4):
            run_stem(stem, x)
            stem[0][0].weight.data = torch.randn(stem[0][0].weight.shape, generator=torch.Generator().manual_seed(seed))
            assert float((run_stem(stem, x) - stem(x)).abs().max()) <= 1e-5
    with torch.inference_mode():
        made_here = perturbed(create_model("digits_natural_vit", depth=1, img_size=32), 1).eval().patch_embed.backbone
        assert float((run_stem(made_here, x) - made_here(x)).abs().max()) <= 1e-5
    bn = stem[1][1]
    bn.train()  # recalibrating one BatchNorm: batch statistics, running statistics updated
    before = bn.running_mean.clone()
    with torch.no_grad():
        run_stem(stem, x)
    assert not torch.equal(bn.running_mean, before)
