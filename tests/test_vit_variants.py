"""The ViT variants of timm's vision_transformer.py that share its block, against timm itself.

Each variant is built by timm with a small random configuration, perturbed (so a swapped or
ignored tensor shows in the logits), converted or loaded from files timm wrote, and run under the
stage loop: unpruned equality, pruning in every layout, register tokens never dropped, models
without a class token (average pooling) under IA-RED², EViT and ATS, and checkpoints loaded at
another image size, compared with timm's own resampled model.
"""

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.models.vision_transformer import VisionTransformer as TimmViT

from iared.interpreter import MultiHeadInterpreter
from iared.loading import infer_vit_config, load_backbone
from iared.models import MODEL_CONFIGS, create_model, from_timm, load_model
from iared.models.vit import (
    BlockRecord,
    VisionTransformer,
    ViTConfig,
    rename_official_keys,
    resample_pos_embed,
)
from iared.pruning import IARed
from iared.reducers.registry import build_reduced
from iared.tokens import DenseTokens
from tests.helpers import perturbed, spread_interpreters

TOL = 1e-5
SMALL = dict(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=3, num_classes=5)
VARIANTS = {
    "deit3": dict(no_embed_class=True, init_values=1e-6),
    "registers": dict(reg_tokens=4),
    "avg_pool": dict(global_pool="avg"),
    "avg_pool_norm_before": dict(global_pool="avg", fc_norm=False),
    "pre_norm": dict(pre_norm=True),
    "layer_scale": dict(init_values=0.1),
    "no_class_token": dict(class_token=False, global_pool="avg"),
    "no_class_registers_deit3_pre_norm": dict(class_token=False, global_pool="avg", reg_tokens=2,
                                              no_embed_class=True, pre_norm=True, init_values=1e-6),
    "no_final_norm": dict(final_norm=False),
}
# What each variant must set in our config (beyond the shared geometry).
EXPECTED_CONFIG = {
    "deit3": dict(no_embed_class=True, init_values=1e-6),
    "registers": dict(reg_tokens=4),
    "avg_pool": dict(global_pool="avg", use_fc_norm=True),
    "avg_pool_norm_before": dict(global_pool="avg", fc_norm=False),
    "pre_norm": dict(pre_norm=True),
    "layer_scale": dict(init_values=0.1),
    "no_class_token": dict(class_token=False, global_pool="avg"),
    "no_class_registers_deit3_pre_norm": dict(class_token=False, reg_tokens=2, no_embed_class=True, pre_norm=True),
    "no_final_norm": dict(final_norm=False),
}


def timm_variant(name: str, seed: int = 0, **extra) -> TimmViT:
    torch.manual_seed(seed)
    return perturbed(TimmViT(**{**SMALL, **VARIANTS[name], **extra}), seed)


def images(n: int = 4, size: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return float((a - b).abs().max())


# -- timm equality and files ---------------------------------------------------------------------

@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_variant_matches_timm_and_loads_from_timm_files(variant, tmp_path):
    ref = timm_variant(variant)
    x = images()
    with torch.no_grad():
        expected, features = ref(x), ref.forward_features(x)
    assert float(expected.std()) > 0.05  # a signal worth comparing

    ours = from_timm(ref).eval()
    for field, value in EXPECTED_CONFIG[variant].items():
        assert getattr(ours.cfg, field) == pytest.approx(value), field
    assert ours.num_prefix_tokens == ref.num_prefix_tokens
    assert max_diff(ours(x), expected) <= TOL
    with torch.no_grad():
        assert max_diff(ours.forward_features(x), features) <= TOL
    assert ours.state_dict().keys() == ref.state_dict().keys()

    sd = ref.state_dict()
    geometry = {k: v for k, v in ours.cfg.to_dict().items() if k not in ("mean", "std")}
    for filename in ("plain.pt", "weights.safetensors"):
        path = tmp_path / filename
        save_file(sd, path) if filename.endswith(".safetensors") else torch.save(sd, path)
        by_name = create_model("vit_small_patch16_224", checkpoint=path, **geometry).eval()
        assert max_diff(by_name(x), expected) <= TOL, filename
        # No name: the geometry read off the weights (the head count, which weights do not show, given;
        # average pooling without fc_norm has the keys of token pooling, so it is given too).
        unseen = {"num_heads": 3, **(VARIANTS[variant] if variant == "avg_pool_norm_before" else {})}
        inferred = infer_vit_config(sd)
        for k in EXPECTED_CONFIG[variant].keys() - unseen.keys():
            if k == "init_values":  # only its presence shows: the weights hold the values
                assert (inferred.init_values is None) == (ours.cfg.init_values is None)
            else:
                assert getattr(inferred, k) == getattr(ours.cfg, k), k
        by_file = load_backbone(checkpoint=path, overrides=unseen).eval()
        assert max_diff(by_file(x), expected) <= TOL, filename
    # An iared checkpoint carries its config: load_model needs nothing else.
    torch.save({"model": sd, "config": {"model": ours.cfg.to_dict()}}, tmp_path / "iared.pt")
    assert max_diff(load_model(tmp_path / "iared.pt").eval()(x), expected) <= TOL


def test_deit3_registry_names_match_timm():
    """Every deit3 name is timm's geometry (built on the meta device: no weights, no time)."""
    from iared.models import _config_from_timm

    names = [n for n in MODEL_CONFIGS if n.startswith("deit3")]
    assert sorted(names) == sorted(timm.list_models("deit3*"))
    for name in names:
        expected = _config_from_timm(timm.create_model(name, device="meta")).to_dict()
        assert ViTConfig(**MODEL_CONFIGS[name]).to_dict() == expected, name


def test_deit3_small_matches_timm_full_size(tmp_path):
    torch.manual_seed(0)
    ref = perturbed(timm.create_model("deit3_small_patch16_224"))
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ref(x)
    ours = from_timm(ref)
    assert ours.cfg.to_dict() == ViTConfig(**MODEL_CONFIGS["deit3_small_patch16_224"]).to_dict()
    assert max_diff(ours(x), expected) <= TOL
    # The official DeiT-III release names layer scale gamma_1 / gamma_2 and wraps the weights in "model".
    official = {k.replace("ls1.gamma", "gamma_1").replace("ls2.gamma", "gamma_2"): v
                for k, v in ref.state_dict().items()}
    assert "blocks.0.gamma_1" in official
    torch.save({"model": official}, tmp_path / "deit_3_small_224_1k.pth")
    loaded = create_model("deit3_small_patch16_224", checkpoint=tmp_path / "deit_3_small_224_1k.pth")
    assert max_diff(loaded.eval()(x), expected) <= TOL
    assert rename_official_keys({"blocks.3.gamma_2": 1})["blocks.3.ls2.gamma"] == 1


# -- another image size --------------------------------------------------------------------------

@pytest.mark.parametrize("timm_name, extra", [
    ("deit3_small_patch16_224", {}),  # no_embed_class: every row of the table is a patch
    ("vit_small_patch16_224", {"reg_tokens": 2}),  # class + register rows stay, patches resample
])
def test_checkpoint_at_another_size_matches_timms_resampled_model(timm_name, extra, tmp_path):
    kw = dict(patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=5, **extra)
    torch.manual_seed(0)
    small = perturbed(timm.create_model(timm_name, img_size=32, **kw))
    path = tmp_path / "small.pt"
    torch.save(small.state_dict(), path)
    big = timm.create_model(timm_name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path), num_classes=5),
                            img_size=56, **kw).eval()
    assert big.pos_embed.shape[1] != small.pos_embed.shape[1]

    ours = create_model(timm_name, checkpoint=path, img_size=56, **kw).eval()
    assert ours.cfg.grid_size == 7
    assert max_diff(ours.pos_embed, big.pos_embed) <= 1e-6
    x = images(2, 56)
    with torch.no_grad():
        assert max_diff(ours(x), big(x)) <= TOL


def test_resample_pos_embed_keeps_prefix_rows_and_is_identity_at_the_same_grid():
    pos = torch.randn(1, 2 + 16, 8)
    assert resample_pos_embed(pos, (4, 4), 2) is pos
    out = resample_pos_embed(pos, (6, 6), 2)
    assert out.shape == (1, 2 + 36, 8) and torch.equal(out[:, :2], pos[:, :2])
    # A constant table stays constant (bicubic interpolation reproduces constants).
    flat = torch.ones(1, 16, 3)
    assert torch.allclose(resample_pos_embed(flat, (7, 7), 0), torch.ones(1, 49, 3), atol=1e-6)


# -- under the stage loop ------------------------------------------------------------------------

@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_threshold_zero_reproduces_the_unpruned_logits(variant):
    backbone = from_timm(timm_variant(variant)).eval()
    model = spread_interpreters(IARed(backbone)).eval()
    x = images()
    with torch.no_grad():
        out = model(x, threshold=0.0)
        assert torch.equal(out.logits, backbone(x))
    assert all(k.all() for k in out.keep)


@pytest.mark.parametrize("variant", ["registers", "no_class_token", "no_class_registers_deit3_pre_norm", "deit3",
                                     "avg_pool"])
def test_pruning_runs_in_every_layout_and_never_drops_prefix_tokens(variant):
    backbone = from_timm(timm_variant(variant)).eval()
    prefix = backbone.num_prefix_tokens
    model = spread_interpreters(IARed(backbone), std=2.0).eval()
    x = images(6)
    with torch.no_grad():
        packed = model(x, threshold=0.5, layout="packed")
        padded = model(x, threshold=0.5, layout="padded")
        dense = model(x, mode="budget", keep_ratio=0.5)
    counts = torch.stack([k.sum(1) for k in packed.keep])
    assert (counts[-1] < backbone.num_tokens).all() and len(set(counts[-1].tolist())) > 1  # pruned, unevenly
    assert max_diff(packed.logits, padded.logits) <= TOL
    assert all(torch.equal(a, b) for a, b in zip(packed.keep, padded.keep))
    assert torch.isfinite(dense.logits).all()
    assert [int(k.sum(1)[0]) for k in dense.keep] == [prefix + 8, prefix + 4, prefix + 2]
    for out in (packed, padded, dense):
        for keep in out.keep:
            assert keep[:, :prefix].all()  # class / register tokens are always kept
            assert keep.any(1).all()  # no image is ever empty
    # The packed pass is the model run on each image's surviving tokens alone.
    with torch.no_grad():
        for i in range(2):
            alone = model(x[i:i + 1], threshold=0.5)
            assert all(torch.equal(a[0], b[i]) for a, b in zip(alone.keep, packed.keep))
            assert max_diff(alone.logits[0], packed.logits[i]) <= TOL


def test_average_pooling_reads_only_the_alive_patch_tokens():
    backbone = from_timm(timm_variant("no_class_registers_deit3_pre_norm")).eval()
    tokens = backbone.embed(images(3))
    keep = torch.rand(3, tokens.data.shape[1], generator=torch.Generator().manual_seed(0)) > 0.5
    with torch.no_grad():
        for layout in ("packed", "padded"):
            logits = backbone.forward_head(tokens.select(keep, ragged=layout))
            for i in range(3):
                alive = keep[i] & (torch.arange(keep.shape[1]) >= 2)  # registers are never pooled
                pooled = backbone.fc_norm(tokens.data[i, alive].mean(0))
                assert max_diff(logits[i], backbone.head(pooled)) <= TOL, layout


def test_without_class_token_the_interpreter_asks_with_the_mean_patch_query():
    torch.manual_seed(0)
    interp = MultiHeadInterpreter(dim=8, num_heads=2)
    torch.nn.init.normal_(interp.qk.weight)
    x = torch.randn(2, 1 + 5, 8)  # one register token, five patches
    tokens = DenseTokens.from_embeddings(x, num_prefix=1, has_class_token=False)
    keep = torch.tensor([[1, 1, 0, 1, 1, 0], [1, 0, 1, 1, 1, 1]], dtype=torch.bool)
    packed = tokens.select(keep)
    scores = interp.score(packed)
    normed = torch.nn.functional.layer_norm(x, (8,), eps=1e-6)
    q_all, k_all = (normed @ interp.qk.weight.T + interp.qk.bias).split(8, dim=-1)
    for i in range(2):
        patches = keep[i].clone()
        patches[0] = False
        q = q_all[i, patches].mean(0).view(2, 4)  # linear, so = the query of the mean normalised patch
        k = k_all[i, keep[i]].view(-1, 2, 4)
        expected = torch.sigmoid((q * k).sum(-1) / 2).mean(-1)
        expected[0] = 1.0  # the register token is always kept
        assert torch.allclose(scores[packed.image == i], expected, atol=1e-5)


def test_without_class_token_class_attention_is_the_mean_query_attention():
    backbone = from_timm(timm_variant("no_class_token")).eval()
    tokens = backbone.embed(images(2))
    block = backbone.blocks[0]
    record = BlockRecord()
    with torch.no_grad():
        block(tokens, record=record)
        q, k, _ = block.attn.qkv(block.norm1(tokens.data)).unflatten(-1, (3, 3, 16)).unbind(-3)
    logits = torch.einsum("bhd,bnhd->bnh", q.mean(1), k) / 4
    assert torch.allclose(record.cls_attention, logits.softmax(1).mean(-1), atol=1e-6)


@pytest.mark.parametrize("method, knob", [("evit", 0.5), ("ats", 0.5), ("tome", 2)])
def test_peers_run_on_a_backbone_without_class_token(method, knob):
    backbone = from_timm(timm_variant("no_class_token", depth=4)).eval()
    model = build_reduced(method, backbone, knob).eval()
    x = images(3)
    with torch.no_grad():
        out = model(x, layout="packed")
        padded = model(x, layout="padded")
    assert torch.isfinite(out.logits).all() and max_diff(out.logits, padded.logits) <= TOL
    assert int(out.keep[-1].sum(1).max()) < backbone.num_tokens  # it did reduce


def test_without_prefix_tokens_no_image_loses_every_token():
    """Threshold 1 drops every scored token; with no class / register token the best one stays."""
    backbone = from_timm(timm_variant("no_class_token")).eval()
    assert backbone.num_prefix_tokens == 0
    model = spread_interpreters(IARed(backbone)).eval()
    x = images(3)
    with torch.no_grad():
        out = model(x, threshold=1.0)
        first = model.interpreters[0].score(backbone.embed(x))
    assert [k.sum(1).tolist() for k in out.keep] == [[1, 1, 1]] * 3
    assert torch.equal(out.keep[0], first == first.amax(1, keepdim=True))
    assert torch.isfinite(out.logits).all()


def test_config_refuses_inconsistent_variants():
    with pytest.raises(ValueError, match="needs the class token"):
        ViTConfig(class_token=False)
    with pytest.raises(ValueError, match="global_pool 'map' not supported"):
        ViTConfig(global_pool="map")
    with pytest.raises(ValueError, match="distilled"):
        ViTConfig(distilled=True, reg_tokens=1)
    # The default config is unchanged: class token, token pooling, one prefix token.
    assert VisionTransformer(ViTConfig(**{**SMALL, "num_heads": 3})).num_prefix_tokens == 1


def test_conv_stem_matches_timms_hybrid_embed_and_prunes_exactly(tmp_path):
    """A hybrid ViT (``conv_stem``): timm's ``HybridEmbed`` around the same stages gives the same logits
    from the same state dict (keys ``patch_embed.backbone.*``, 1x1 ``patch_embed.proj``); MACs count
    the stem; IA-RED² at threshold 0 reproduces the unpruned logits and packed equals padded."""
    from functools import partial

    from timm.models.vision_transformer_hybrid import HybridEmbed

    from iared import flops
    from iared.models.vit import conv_stem_stages

    torch.manual_seed(0)
    ours = create_model("digits_natural_vit", depth=3).eval()
    perturbed(ours)  # biases and norms away from 0 / 1
    stem = torch.nn.Sequential(*conv_stem_stages(3, (16, 32, 64)))
    stem.num_features = 64  # what HybridEmbed reads when told the feature size
    ref = TimmViT(img_size=64, patch_size=1, in_chans=3, num_classes=10, embed_dim=144, depth=3, num_heads=4,
                  embed_layer=partial(HybridEmbed, backbone=stem, feature_size=8)).eval()
    ref.load_state_dict(ours.state_dict())
    x = torch.rand(3, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=0)
    stem_macs = 64 * 64 * 3 * 16 * 9 + 32 * 32 * 16 * 32 * 9 + 16 * 16 * 32 * 64 * 9 + 64 * 144 * 64
    assert flops.embed_macs(ours.cfg) == stem_macs
    model = spread_interpreters(IARed(ours), std=2.0).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x, threshold=0.0).logits, ours(x), atol=1e-5, rtol=0)
        packed, padded = model(x, threshold=0.5, layout="packed"), model(x, threshold=0.5, layout="padded")
    assert (packed.keep[-1].sum(1) < ours.num_tokens).all()
    torch.testing.assert_close(packed.logits, padded.logits, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="log2\\(patch_size\\) = 3"):
        create_model("digits_natural_vit", conv_stem=(16, 32))


def test_student_stem_starts_from_the_teachers_first_stages():
    from iared.models import ConvNet, ConvNetConfig
    from iared.train.distill import init_stem_from_teacher

    torch.manual_seed(0)
    teacher = ConvNet(ConvNetConfig(widths=(16, 32, 64, 128, 128)))
    perturbed(teacher)
    student = create_model("digits_natural_vit", depth=1).eval()
    assert init_stem_from_teacher(student, teacher.eval())
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(student.patch_embed.backbone(x), teacher.feature_maps(x)[2])
    other = ConvNet(ConvNetConfig(widths=(8, 32, 64, 128, 128)))
    assert not init_stem_from_teacher(student, other)  # widths differ: nothing copied
