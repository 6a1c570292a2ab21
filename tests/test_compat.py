"""Models users already have, loaded through their state-dict layout and checked against the real library.

timm: headless models (``num_classes=0``), CLIP-style towers (LayerNorm eps 1e-5, pre-norm), MViTv2
instances. Hugging Face ``transformers``: ViT / DeiT classifiers and the headless ``ViTModel``, from
the live object or from the directory ``save_pretrained`` wrote. Every model is random and perturbed
(tests.helpers.perturbed), so a wrong mapping shows in the outputs, compared within 1e-5 in eval mode.
"""

import importlib.util
import warnings
from contextlib import nullcontext
from functools import partial

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.models.vision_transformer import VisionTransformer as TimmViT
from torch import nn

from iared.loading import infer_vit_config, load_backbone
from iared.models import from_timm, load_model
from iared.models.vit import VisionTransformer, ViTConfig
from tests.helpers import perturbed

TOL = 1e-5
SMALL = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3)


def images(n: int = 3, size: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a - b).abs().max())


# -- timm: headless models -----------------------------------------------------------------------

HEADLESS = {"token": {}, "avg": dict(global_pool="avg"), "registers": dict(reg_tokens=2),
            "no_class_token": dict(class_token=False, global_pool="avg")}


@pytest.mark.parametrize("variant", sorted(HEADLESS))
def test_headless_timm_model_returns_its_pooled_features(variant, tmp_path):
    torch.manual_seed(0)
    ref = perturbed(TimmViT(**SMALL, num_classes=0, **HEADLESS[variant]))
    assert isinstance(ref.head, nn.Identity)
    x = images()
    with torch.no_grad():
        expected = ref(x)
    assert expected.shape == (3, 48)
    ours = from_timm(ref).eval()
    assert ours.cfg.num_classes == 0 and isinstance(ours.head, nn.Identity)
    assert max_diff(ours(x), expected) <= TOL
    assert ours.state_dict().keys() == ref.state_dict().keys()
    # Its files: the geometry read off weights without head.* is headless; iared files round-trip.
    save_file(ref.state_dict(), tmp_path / "w.safetensors")
    assert infer_vit_config(ref.state_dict()).num_classes == 0
    unseen = {"num_heads": 3}
    assert max_diff(load_backbone(checkpoint=tmp_path / "w.safetensors", overrides=unseen).eval()(x), expected) <= TOL
    torch.save({"model": ref.state_dict(), "config": {"model": ours.cfg.to_dict()}}, tmp_path / "iared.pt")
    assert max_diff(load_model(tmp_path / "iared.pt").eval()(x), expected) <= TOL


def test_headless_distilled_timm_model_averages_the_two_tokens():
    torch.manual_seed(0)
    ref = perturbed(timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, num_classes=0, **SMALL))
    x = images()
    with torch.no_grad():
        expected = ref(x)
    ours = from_timm(ref).eval()
    assert ours.cfg.distilled and ours.cfg.num_classes == 0
    assert max_diff(ours(x), expected) <= TOL


# -- timm: LayerNorm eps, CLIP-style pre-norm ------------------------------------------------------

@pytest.mark.parametrize("eps", [1e-5, 0.1])
def test_layer_norm_eps_and_pre_norm_match_timm(eps):
    torch.manual_seed(0)
    ref = perturbed(TimmViT(**SMALL, num_classes=5, norm_layer=partial(nn.LayerNorm, eps=eps), pre_norm=True))
    x = images()
    with torch.no_grad():
        expected = ref(x)
    ours = from_timm(ref).eval()
    assert ours.cfg.norm_eps == eps and ours.cfg.pre_norm
    assert all(m.eps == eps for m in ours.modules() if isinstance(m, nn.LayerNorm))
    assert max_diff(ours(x), expected) <= TOL
    if eps == 0.1:  # the eps matters: the same weights at timm's ViT default are off
        wrong = VisionTransformer(ViTConfig(**{**ours.cfg.to_dict(), "norm_eps": 1e-6})).eval()
        wrong.load_state_dict(ref.state_dict())
        assert max_diff(wrong(x), expected) > 100 * TOL


def test_timm_clip_tower_matches_timm():
    """timm's own CLIP image tower (nn.LayerNorm: eps 1e-5, pre_norm=True, no patch bias), shrunk."""
    torch.manual_seed(0)
    ref = perturbed(timm.create_model("vit_base_patch16_clip_224", pretrained=False, num_classes=5, **SMALL))
    assert ref.norm_pre.eps == 1e-5 and ref.patch_embed.proj.bias is None
    x = images()
    with torch.no_grad():
        expected = ref(x)
    ours = from_timm(ref).eval()
    assert (ours.cfg.norm_eps, ours.cfg.pre_norm) == (1e-5, True)
    assert max_diff(ours(x), expected) <= TOL


def test_timm_refuses_quick_gelu_and_mixed_eps():
    with pytest.raises(ValueError, match="QuickGELU"):
        from_timm(timm.create_model("vit_base_patch16_clip_quickgelu_224", pretrained=False, **SMALL))
    ref = TimmViT(**SMALL, num_classes=5)
    ref.norm = nn.LayerNorm(48, eps=1e-5)
    with pytest.raises(ValueError, match="different eps"):
        from_timm(ref)


def test_checkpoint_without_new_config_fields_still_loads(tmp_path):
    """Files written before norm_eps / dist_head existed: the defaults (timm's 1e-6, both heads)."""
    torch.manual_seed(0)
    ref = perturbed(TimmViT(**SMALL, num_classes=5))
    cfg = from_timm(ref).cfg.to_dict()
    del cfg["norm_eps"], cfg["dist_head"]
    torch.save({"model": ref.state_dict(), "config": {"model": cfg}}, tmp_path / "old.pt")
    model = load_model(tmp_path / "old.pt").eval()
    assert model.cfg.norm_eps == 1e-6
    x = images()
    with torch.no_grad():
        assert max_diff(model(x), ref(x)) <= TOL


# -- timm: MViTv2 instances -----------------------------------------------------------------------

MVIT = {"two_stages": dict(depths=(1, 2), embed_dim=(16, 24), num_heads=(2, 3), stride_q=((1, 1), (2, 2))),
        "plain": dict(depths=(1, 1, 1), embed_dim=8, num_heads=1, stride_q=((1, 1), (2, 2), (2, 2)),
                      residual_pooling=False, mlp_ratio=2.0, qkv_bias=False)}


@pytest.mark.parametrize("variant", sorted(MVIT))
@pytest.mark.parametrize("num_classes", [5, 0])
def test_from_timm_takes_mvitv2_instances(variant, num_classes):
    from timm.models.mvitv2 import MultiScaleVit, MultiScaleVitCfg

    from iared.models.mvit import MultiScaleViT

    torch.manual_seed(0)
    ref = perturbed(MultiScaleVit(MultiScaleVitCfg(**MVIT[variant]), img_size=64, num_classes=num_classes))
    x = images(2, 64)
    with torch.no_grad():
        expected = ref(x)
    assert float(expected.std()) > 0.05
    ours = from_timm(ref).eval()
    assert isinstance(ours, MultiScaleViT) and ours.cfg.img_size == 64
    assert max_diff(ours(x), expected) <= TOL


def test_from_timm_refuses_mvit_variants_it_does_not_implement():
    from timm.models.mvitv2 import MultiScaleVit, MultiScaleVitCfg

    small = dict(depths=(1, 1), embed_dim=8, num_heads=1, stride_q=((1, 1), (2, 2)))
    for message, kw in {"class token": dict(use_cls_token=True), "absolute position": dict(use_abs_pos=True),
                        "pool_first": dict(pool_first=True), "expand_attn=False": dict(expand_attn=False)}.items():
        with pytest.raises(ValueError, match=f"MViTv2 variant not supported: .*{message}"):
            from_timm(MultiScaleVit(MultiScaleVitCfg(**small, **kw), img_size=64, num_classes=3))


# -- Hugging Face transformers: ViT / DeiT ------------------------------------------------------------

HF_SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, image_size=32,
                patch_size=8)


def hf_model(architecture: str, **extra):
    import transformers

    config_cls = transformers.DeiTConfig if architecture.startswith("DeiT") else transformers.ViTConfig
    torch.manual_seed(0)
    kw = {} if architecture.endswith("Model") else dict(num_labels=5)
    model = getattr(transformers, architecture)(config_cls(**{**HF_SMALL, **kw, **extra}))
    return perturbed(model)


def hf_output(model, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(pixel_values=x)
    return out.last_hidden_state[:, 0] if hasattr(out, "last_hidden_state") else out.logits


HF_ARCHS = ["ViTForImageClassification", "DeiTForImageClassification", "DeiTForImageClassificationWithTeacher",
            "ViTModel", "DeiTModel"]


@pytest.mark.parametrize("architecture", HF_ARCHS)
def test_huggingface_models_match_transformers(architecture, tmp_path):
    pytest.importorskip("transformers")
    from iared.models import create_model, from_huggingface

    ref = hf_model(architecture).eval()
    x = images()
    expected = hf_output(ref, x)
    assert float(expected.std()) > 0.05
    with pytest.warns(UserWarning, match="pooler") if architecture.endswith("Model") else nullcontext():
        ours = from_huggingface(ref).eval()
    assert ours.cfg.norm_eps == 1e-12 and ours.cfg.distilled == architecture.startswith("DeiT")
    assert max_diff(ours(x), expected) <= TOL
    # save_pretrained's directory (the Hub's key names, not the live modules'), its weights file, and
    # load_backbone / create_model recognising either by its keys.
    ref.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for source in (tmp_path, tmp_path / "model.safetensors"):
            assert max_diff(from_huggingface(source)(x), expected) <= TOL, source
            assert max_diff(load_backbone(checkpoint=source).eval()(x), expected) <= TOL, source
        # The weights file alone (no config.json): the geometry read off the mapped keys, heads given.
        alone = tmp_path / "alone"
        alone.mkdir()
        (tmp_path / "model.safetensors").rename(alone / "model.safetensors")
        by_keys = load_backbone(checkpoint=alone / "model.safetensors", overrides={"num_heads": 4}).eval()
        assert (by_keys.cfg.norm_eps, by_keys.cfg.distilled, by_keys.cfg.num_classifier_heads) == \
            (1e-12, ours.cfg.distilled, ours.cfg.num_classifier_heads)
        assert max_diff(by_keys(x), expected) <= TOL
        (alone / "model.safetensors").rename(tmp_path / "model.safetensors")
        geometry = {k: v for k, v in ours.cfg.to_dict().items() if k not in ("mean", "std")}
        by_name = create_model("vit_small_patch16_224", checkpoint=tmp_path / "model.safetensors", **geometry)
        assert max_diff(by_name.eval()(x), expected) <= TOL
    # Our own file of it carries norm_eps (1e-12) and dist_head in its config.
    torch.save({"model": ours.state_dict(), "config": {"model": ours.cfg.to_dict()}}, tmp_path / "iared.pt")
    again = load_model(tmp_path / "iared.pt").eval()
    assert again.cfg == ours.cfg and max_diff(again(x), expected) <= TOL


def test_huggingface_eps_gelu_and_refusals():
    pytest.importorskip("transformers")
    from iared.models import from_huggingface

    ref = hf_model("ViTForImageClassification", layer_norm_eps=0.1).eval()
    x = images()
    ours = from_huggingface(ref).eval()
    assert ours.cfg.norm_eps == 0.1 and max_diff(ours(x), hf_output(ref, x)) <= TOL
    for message, extra in {"hidden_act='gelu_new'": dict(hidden_act="gelu_new"),
                           "non-square": dict(image_size=(32, 40))}.items():
        with pytest.raises(ValueError, match=f"not supported: .*{message}"):
            from_huggingface(hf_model("ViTForImageClassification", **extra))


# -- one table: what a model or a file is --------------------------------------------------------------

def test_families_recognise_and_convert_every_source(tmp_path):
    pytest.importorskip("transformers")
    from timm.models.mvitv2 import MultiScaleVit, MultiScaleVitCfg

    from iared.checkpoint import read_checkpoint
    from iared.models.families import as_backbone, checkpoint_kind, source_of
    from iared.models.mvit import MultiScaleViT

    x = images()
    timm_vit = perturbed(TimmViT(**SMALL, num_classes=5))
    timm_mvit = perturbed(MultiScaleVit(MultiScaleVitCfg(**MVIT["plain"]), img_size=32, num_classes=5))
    hf = hf_model("DeiTForImageClassificationWithTeacher").eval()
    ours = VisionTransformer(ViTConfig(**SMALL, num_classes=5))
    assert [source_of(m) for m in (ours, timm_vit, timm_mvit, hf, nn.Linear(2, 2))] == \
        ["iared:vit", "timm", "timm", "transformers", None]
    assert as_backbone(ours) is ours
    assert isinstance(as_backbone(timm_mvit), MultiScaleViT)
    for ref, expected in ((timm_vit, timm_vit(x)), (timm_mvit, timm_mvit(x)), (hf, hf_output(hf, x))):
        assert max_diff(as_backbone(ref).eval()(x), expected) <= TOL
    with pytest.raises(TypeError, match="not a backbone this version reads"):
        as_backbone(nn.Linear(2, 2))
    hf.save_pretrained(tmp_path / "hf")
    save_file(timm_vit.state_dict(), tmp_path / "timm.safetensors")
    torch.save({"model": ours.state_dict(), "config": {"model": ours.cfg.to_dict()}}, tmp_path / "iared.pt")
    kinds = {name: checkpoint_kind(read_checkpoint(tmp_path / name))
             for name in ("hf/model.safetensors", "timm.safetensors", "iared.pt")}
    assert kinds == {"hf/model.safetensors": "transformers", "timm.safetensors": "timm", "iared.pt": "iared"}


# -- the converted models under the stage loop, and refusals --------------------------------------------

def converted_models() -> dict:
    torch.manual_seed(0)
    deep = {**SMALL, "depth": 3}  # one block per stage of IA-RED²'s three
    models = {"timm_headless": from_timm(perturbed(TimmViT(**deep, num_classes=0))),
              "timm_clip_eps": from_timm(perturbed(TimmViT(**deep, num_classes=5, pre_norm=True,
                                                           norm_layer=partial(nn.LayerNorm, eps=1e-5))))}
    if importlib.util.find_spec("transformers") is not None:
        from iared.models import from_huggingface

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for arch in ("DeiTForImageClassification", "ViTModel"):
                models[f"hf_{arch}"] = from_huggingface(hf_model(arch, num_hidden_layers=3))
    return models


def test_converted_models_run_under_the_stage_loop():
    from iared.pruning import IARed
    from tests.helpers import spread_interpreters

    x = images(4)
    for name, backbone in converted_models().items():
        backbone.eval()
        with torch.no_grad():
            assert max_diff(IARed(backbone).eval()(x, threshold=0.0).logits, backbone(x)) <= TOL, name
        model = spread_interpreters(IARed(backbone), std=2.0).eval()
        with torch.no_grad():
            packed = model(x, threshold=0.5, layout="packed")
            padded = model(x, threshold=0.5, layout="padded")
        assert max_diff(packed.logits, padded.logits) <= TOL, name
        assert (packed.keep[-1].sum(1) < backbone.num_tokens).all(), name  # tokens really left


def test_huggingface_refuses_what_it_does_not_map(tmp_path):
    transformers = pytest.importorskip("transformers")
    from iared.checkpoint import CheckpointError
    from iared.models import from_huggingface

    masked = transformers.ViTForMaskedImageModeling(transformers.ViTConfig(**HF_SMALL))
    with pytest.raises(ValueError, match="architecture 'ViTForMaskedImageModeling' not supported"):
        from_huggingface(masked)
    with_mask = transformers.ViTModel(transformers.ViTConfig(**HF_SMALL), add_pooling_layer=False, use_mask_token=True)
    with pytest.raises(ValueError, match="embeddings.mask_token' has no counterpart"):
        from_huggingface(with_mask)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_backbone(checkpoint=tmp_path)
