"""TimeSformer (iared.models.timesformer) against transformers and the official layout, and pruning on
its space-time grid.

transformers' model is random-initialised and then perturbed (norms and biases included), so a
swapped, transposed or ignored tensor changes the logits. The pruning tests compare every layout with
a reference written from the definition (explicit attention per segment, one clip at a time), so the
segment bookkeeping of iared.tokens is checked against something that does not use it.
"""

import pytest
import torch

from iared.checkpoint import CheckpointError
from iared.models import create_model
from iared.models.timesformer import (
    TIMESFORMER_CONFIGS,
    TimeSformer,
    TimeSformerConfig,
    from_hf_timesformer,
    hf_to_official_keys,
    load_timesformer,
)
from iared.pruning import IARed
from iared.reducers.floors import RandomReducer
from iared.stages import ReducedModel
from iared.tokens import DenseTokens, PackedTokens, PaddedTokens
from tests.helpers import perturbed, spread_interpreters

TOL = 1e-5
ATTENTION = ("divided_space_time", "joint_space_time", "space_only")


def tiny(attention="divided_space_time", seed=0, depth=3, frames=4):
    torch.manual_seed(seed)
    cfg = TimeSformerConfig(img_size=32, patch_size=8, num_frames=frames, num_classes=5, embed_dim=32, depth=depth,
                            num_heads=4, attention_type=attention)
    return perturbed(TimeSformer(cfg), seed)


def clips(batch=3, frames=4, seed=1):
    return torch.randn(batch, frames, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


# -- transformers ------------------------------------------------------------------------------

@pytest.mark.parametrize("attention", ATTENTION)
def test_matches_transformers(attention):
    from transformers import TimesformerConfig, TimesformerForVideoClassification

    torch.manual_seed(0)
    cfg = TimesformerConfig(image_size=32, patch_size=8, num_frames=4, num_hidden_layers=2, hidden_size=64,
                            num_attention_heads=4, intermediate_size=256, num_labels=7, attention_type=attention)
    ref = perturbed(TimesformerForVideoClassification(cfg))
    x = clips(3)
    with torch.no_grad():
        if attention == "space_only":
            # transformers classifies every frame alone; the official code (and ours) averages the frames'
            # class tokens before the final norm: compose that from transformers' own encoder.
            hidden = ref.timesformer.encoder(ref.timesformer.embeddings(x)).last_hidden_state
            hidden = hidden.reshape(3, 4, *hidden.shape[1:]).mean(1)
            expected = ref.classifier(ref.timesformer.layernorm(hidden)[:, 0])
        else:
            expected = ref(pixel_values=x).logits
        ours = from_hf_timesformer(ref).eval()
        assert float(expected.std()) > 0.05
        assert float((ours(x) - expected).abs().max()) <= TOL
    # every transformers tensor lands on one of ours, shapes equal
    mapped = hf_to_official_keys(ref.state_dict())
    assert mapped.keys() == ours.state_dict().keys()


def test_unknown_transformers_key_is_refused():
    with pytest.raises(KeyError, match="no TimeSformer counterpart"):
        hf_to_official_keys({"timesformer.encoder.layer.0.new_thing.weight": torch.zeros(1)})


# -- pruning: every layout against the definition ----------------------------------------------

def explicit_attention(module, rows):
    """One sequence ``(n, C)``, softmax written out."""
    n, C = rows.shape
    H = module.num_heads
    q, k, v = module.qkv(rows).reshape(n, 3, H, C // H).permute(1, 2, 0, 3)
    weights = (q @ k.transpose(-1, -2) * (C // H) ** -0.5).softmax(-1)
    return module.proj((weights @ v).transpose(0, 1).reshape(n, C))


def reference_block(block, x, index, model):
    """One clip's alive tokens ``x`` ``(n, C)`` at original positions ``index``, the documented rule."""
    T, H, W = model.token_grid
    S, P = H * W, model.num_prefix_tokens
    patch = index >= P
    frame, position = (index - P) // S, (index - P) % S
    out = x.clone()
    if block.attention_type == "joint_space_time":
        out = x + explicit_attention(block.attn, block.norm1(x))
    elif block.attention_type == "divided_space_time":
        for s in range(S):  # temporal: the alive tokens of one position
            sel = patch & (position == s)
            if sel.any():
                res = explicit_attention(block.temporal_attn, block.temporal_norm1(x[sel]))
                out[sel] = x[sel] + block.temporal_fc(res)
        xt, cls_updates = out.clone(), []
        for t in range(T):  # spatial: the class token with the alive tokens of one frame
            sel = patch & (frame == t)
            res = explicit_attention(block.attn, block.norm1(torch.cat([xt[~patch], xt[sel]])))
            out[sel] = xt[sel] + res[1:]
            cls_updates.append(res[0])
        out[~patch] = xt[~patch] + torch.stack(cls_updates).mean(0)
    else:  # space_only: frame t's class token is prefix token t
        for t in range(T):
            sel, own = patch & (frame == t), index == t
            res = explicit_attention(block.attn, block.norm1(torch.cat([x[own], x[sel]])))
            out[own], out[sel] = x[own] + res[:1], x[sel] + res[1:]
    return out + block.mlp(block.norm2(out))


def reference_logits(model, x, stage_starts, stage_keeps):
    """Each clip alone: before stage g keep the tokens ``stage_keeps[g]`` (``(B, N0)``) says, run its blocks."""
    logits = []
    embedded = model.embed(x).data
    ends = list(stage_starts[1:]) + [len(model.blocks)]
    for b in range(x.shape[0]):
        rows, index = embedded[b], torch.arange(model.num_tokens)
        for start, end, keep in zip(stage_starts, ends, stage_keeps):
            alive = keep[b, index]
            rows, index = rows[alive], index[alive]
            for block in model.blocks[start:end]:
                rows = reference_block(block, rows, index, model)
        prefix = rows[index < model.num_prefix_tokens]
        logits.append(model.head(model.norm(prefix.mean(0))))
    return torch.stack(logits)


def random_keep(model, batch, seed=3, p=0.5):
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(batch, model.num_tokens, generator=g) > p
    keep[:, : model.num_prefix_tokens] = True
    _, H, W = model.token_grid
    P = model.num_prefix_tokens
    keep[0, P: P + H * W] = False  # clip 0 loses its whole first frame: the class token attends alone there
    keep[1, P + 5:: H * W] = False  # clip 1 loses position 5 in every frame
    keep[1, P + 6:: H * W] = False
    keep[1, P + 6] = True  # and keeps position 6 in one frame only: temporal attention of one token
    return keep


@pytest.mark.parametrize("attention", ATTENTION)
@pytest.mark.parametrize("layout", ["packed", "padded", "dense-uniform"])
def test_dropped_tokens_match_each_clip_alone(attention, layout):
    model = tiny(attention)
    x = clips(3)
    keep = random_keep(model, 3)
    if layout == "dense-uniform":  # budget mode: the same count per clip, different tokens, stays dense
        P = model.num_prefix_tokens
        keep = torch.zeros_like(keep)
        keep[:, :P] = True
        for b in range(3):
            keep[b, P + torch.randperm(model.num_tokens - P, generator=torch.Generator().manual_seed(b))[:40]] = True
    with torch.no_grad():
        tokens = model.embed(x)
        tokens = tokens.select(keep, ragged="padded" if layout == "padded" else "packed")
        expected_type = {"packed": PackedTokens, "dense-uniform": DenseTokens}.get(layout)
        if expected_type is not None:
            assert isinstance(tokens, expected_type)
        for block in model.blocks:
            tokens = block(tokens)
        logits = model.forward_head(tokens)
        expected = reference_logits(model, x, [0], [keep])
    assert float((logits - expected).abs().max()) <= TOL


@pytest.mark.parametrize("attention", ATTENTION)
def test_nothing_dropped_packed_and_padded_equal_the_dense_path(attention):
    model = tiny(attention)
    x = clips(2)
    with torch.no_grad():
        dense = model(x)
        # the dense path of the whole grid (official reshapes) against the reference, too
        all_kept = torch.ones(2, model.num_tokens, dtype=torch.bool)
        assert float((dense - reference_logits(model, x, [0], [all_kept])).abs().max()) <= TOL
        embedded = model.embed(x)
        P = model.num_prefix_tokens
        for tokens in (PackedTokens.from_dense(embedded.data, embedded.index, all_kept, P),
                       PaddedTokens(embedded.data, embedded.index, P, mask=all_kept)):
            for block in model.blocks:
                tokens = block(tokens)
            assert float((model.forward_head(tokens) - dense).abs().max()) <= TOL


@pytest.mark.parametrize("layout", ["packed", "padded"])
def test_stage_loop_with_random_reducer(layout):
    """The stage loop, unchanged, on a TimeSformer: random dropping in threshold mode (ragged), the
    result equal to each clip alone with the loop's own keep masks; MACs fall with the alive counts."""
    model = tiny(depth=4)
    loop = ReducedModel(model, [None, RandomReducer(seed=0), RandomReducer(seed=1)], [0, 2, 3]).eval()
    x = clips(3)
    with torch.no_grad():
        out = loop(x, "threshold", threshold=0.4, layout=layout)
        expected = reference_logits(model, x, loop.stage_starts, out.keep)
    assert len(set(out.keep[1].sum(1).tolist())) > 1  # clips kept different counts: a ragged layout ran
    assert float((out.logits - expected).abs().max()) <= TOL
    assert (out.macs < loop.full_macs()).all()
    with torch.no_grad():  # nothing dropped: the loop is the backbone
        full = loop(x, "threshold", threshold=0.0, layout=layout)
    assert float((full.logits - model(x)).abs().max()) <= TOL
    assert torch.allclose(full.macs, torch.full((3,), loop.full_macs(), dtype=full.macs.dtype))


@pytest.mark.parametrize("mode", ["threshold", "budget"])
def test_iared_interpreters_run_on_video(mode):
    model = tiny(depth=3)
    iared = IARed(model).eval()
    for interpreter in iared.interpreters:
        torch.nn.init.normal_(interpreter.qk.weight, std=0.5)
    x = clips(3)
    with torch.no_grad():
        out = iared(x, mode, threshold=0.5, keep_ratio=0.6)
        expected = reference_logits(model, x, iared.stage_starts, out.keep)
    assert out.keep[0].shape == (3, model.num_tokens) and out.scores[0].shape == (3, model.num_tokens)
    kept = [float(k[:, 1:].float().mean()) for k in out.keep]
    assert all(0.1 < k < 0.95 for k in kept), kept
    assert float((out.logits - expected).abs().max()) <= TOL
    if mode == "budget":
        assert abs(iared.macs_for_ratios(0.6) - float(out.macs[0])) < 1.0


def test_record_and_explicit_attention_requests():
    """A block before EViT / ATS records class attention in every layout; attention maps exist for joint
    attention only (divided attention has no single N x N map)."""
    from iared.models.vit import BlockRecord

    model = tiny()
    x = clips(2)
    tokens = model.embed(x)
    records = [BlockRecord(), BlockRecord()]
    with torch.no_grad():
        model.blocks[0](tokens, record=records[0])
        everything = torch.ones(2, model.num_tokens, dtype=torch.bool)
        packed = PackedTokens.from_dense(tokens.data, tokens.index, everything, 1)
        model.blocks[0](packed, record=records[1])
    a, b = records[0].cls_attention, records[1].cls_attention
    assert a.shape == (2, model.num_tokens)
    assert torch.allclose(a.sum(1), torch.ones(2)) and torch.allclose(a.reshape(-1), b, atol=1e-6)
    with pytest.raises(NotImplementedError, match="no single"):
        model.blocks[0](tokens, weights_out=[])
    joint = tiny("joint_space_time")
    maps: list = []
    joint.blocks[0](joint.embed(x), weights_out=maps)
    assert maps[0].shape == (2, 4, joint.num_tokens, joint.num_tokens)


def test_key_weights_reach_both_attentions():
    """Merged sizes / soft gates (Tokens.weights) weigh the keys of temporal and spatial attention: all
    ones change nothing, a gate of 0 on a token equals dropping it (as a key; it still runs as a row)."""
    from dataclasses import replace

    model = tiny()
    x = clips(2)
    keep = random_keep(model, 2)
    with torch.no_grad():
        tokens = model.embed(x).select(keep)
        plain = model.forward_head(model.blocks[0](tokens))
        ones = replace(tokens, weights=torch.ones(tokens.data.shape[0]))
        assert float((model.forward_head(model.blocks[0](ones)) - plain).abs().max()) <= TOL
        gate = torch.ones(tokens.data.shape[0])
        gate[tokens.index == 7] = 0.0  # token 7 (frame 0, position 6) of every clip: gated out as a key
        gated = model.blocks[0](replace(tokens, weights=gate))
        dropped = model.blocks[0](tokens.select(tokens.index != 7))
        rows = gated.data[tokens.index != 7]
        assert float((rows - dropped.data).abs().max()) <= TOL


# -- compute ------------------------------------------------------------------------------------

def test_macs_even_spread_is_exact_when_full_and_a_lower_bound_otherwise():
    for attention in ATTENTION:
        model = tiny(attention)
        tokens = model.embed(clips(3))
        full = model.layout_block_macs(tokens)
        assert torch.allclose(full, torch.full((3,), float(model.block_macs(model.num_tokens)), dtype=full.dtype))
        dropped = tokens.select(random_keep(model, 3))
        exact = model.layout_block_macs(dropped)
        even = model.block_macs(dropped.lengths().double())
        if attention == "joint_space_time":
            assert torch.allclose(exact, even)
        else:
            assert (exact >= even - 1e-6).all() and (exact > even).any()
    # A hand count: divided attention, d = 32, mlp 128, T = 4, 16 positions; one clip keeping the class
    # token and 3 tokens, two in frame 0 at positions 0 and 1, one in frame 2 at position 0.
    model = tiny()
    keep = torch.zeros(1, model.num_tokens, dtype=torch.bool)
    keep[0, [0, 1, 2, 1 + 2 * 16]] = True
    tokens = model.embed(clips(1)).select(keep)
    d, m = 32, 128
    linear = 3 * 5 * d * d + (3 + 4) * 4 * d * d + 4 * 2 * d * m  # temporal (+fc), spatial (+4 cls copies), MLP
    attention = 2 * d * (2**2 + 1**2) + 2 * d * ((2 + 1) ** 2 + 1 + (1 + 1) ** 2 + 1)
    assert float(model.layout_block_macs(tokens)[0]) == pytest.approx(linear + attention)


def test_timesformer_base_geometry_and_macs():
    """TimeSformer 8 x 224: 1 + 8 * 196 tokens, about 196 GMACs a view (the paper: 0.59 TFLOPs for 3 views)."""
    cfg = TimeSformerConfig(**TIMESFORMER_CONFIGS["timesformer_base_patch16_224"])
    model = TimeSformer(TimeSformerConfig(**{**cfg.to_dict(), "depth": 1}))  # one block: the rest are alike
    assert model.num_tokens == 1 + 8 * 196 and model.token_grid == (8, 14, 14)
    total = model.fixed_macs() + 12 * float(model.block_macs(model.num_tokens))
    assert 190 < total / 1e9 < 200


def test_create_model_names():
    expected = {
        "timesformer_base_patch16_224": (8, 224, 400), "timesformer_hr_patch16_448": (16, 448, 400),
        "timesformer_l_patch16_224": (96, 224, 400), "timesformer_base_patch16_224_k600": (8, 224, 600),
        "timesformer_hr_patch16_448_k600": (16, 448, 600), "timesformer_l_patch16_224_k600": (96, 224, 600),
        "timesformer_base_patch16_224_ssv2": (8, 224, 174), "timesformer_hr_patch16_448_ssv2": (16, 448, 174),
        "timesformer_l_patch16_224_ssv2": (64, 224, 174),
    }
    assert set(TIMESFORMER_CONFIGS) == set(expected) | {"moving_digits_tsf"}  # the embedded video task's
    for name, (frames, size, classes) in expected.items():
        cfg = TimeSformerConfig(**TIMESFORMER_CONFIGS[name])
        geometry = (cfg.num_frames, cfg.img_size, cfg.num_classes, cfg.embed_dim, cfg.depth)
        assert geometry == (frames, size, classes, 768, 12), name
    small = create_model("timesformer_base_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=1,
                         num_heads=2, num_frames=2)
    assert isinstance(small, TimeSformer) and small(torch.zeros(1, 2, 3, 32, 32)).shape == (1, 400)
    with pytest.raises(ValueError, match="no download"):
        create_model("timesformer_base_patch16_224", pretrained=True)
    with pytest.raises(ValueError, match=r"expected clips \(B, T, C, H, W\) = \(B, 2, 3, 32, 32\)"):
        small(torch.zeros(1, 3, 2, 32, 32))  # the official (B, C, T, H, W) order


def test_patch_pixels_follow_token_order():
    model = tiny()
    x = clips(2)
    cells = model.patch_pixels(x)
    assert cells.shape == (2, 4 * 16, 3 * 64)
    t, row, col = 2, 1, 3  # token 1 + (t * 16 + row * 4 + col)
    expected = x[1, t, :, row * 8:(row + 1) * 8, col * 8:(col + 1) * 8].reshape(-1)
    assert torch.equal(cells[1, t * 16 + row * 4 + col], expected)


# -- official checkpoints ---------------------------------------------------------------------------

def official_file(model, path, **extra):
    """What facebookresearch/TimeSformer's checkpoint code writes: model_state under ``model.``, with the
    epoch, optimizer state and the config dump beside it."""
    state = {f"model.{k}": v.clone() for k, v in model.state_dict().items()}
    torch.save({"epoch": 15, "model_state": state, "optimizer_state": {"state": {}, "param_groups": [{"lr": 0.005}]},
                "cfg": "MODEL:\n  NUM_CLASSES: 5\n", **extra}, path)
    return path


def test_official_pyth_loads_through_create_model_and_by_file(tmp_path):
    source = tiny()
    path = official_file(source, tmp_path / "TimeSformer_divST_4x32_32_K400.pyth")
    x = clips(2)
    overrides = dict(img_size=32, patch_size=8, num_frames=4, num_classes=5, embed_dim=32, depth=3, num_heads=4)
    by_name = create_model("timesformer_base_patch16_224", checkpoint=path, **overrides).eval()
    by_file = load_timesformer(path, num_heads=4).eval()  # geometry read off the weights
    assert by_file.cfg.to_dict() == by_name.cfg.to_dict()
    with torch.no_grad():
        assert torch.equal(by_name(x), source(x)) and torch.equal(by_file(x), source(x))


def test_wrong_files_give_one_line_errors_naming_the_file(tmp_path):
    overrides = dict(img_size=32, patch_size=8, num_frames=4, num_classes=5, embed_dim=32, depth=3, num_heads=4)
    cases = {
        "joint.pyth": (official_file(tiny("joint_space_time"), tmp_path / "joint.pyth"), "holds a joint_space_time"),
        "frames.pyth": (official_file(tiny(frames=2), tmp_path / "frames.pyth"), "shape mismatch.*time_embed"),
        "deit.pth": (tmp_path / "deit.pth", "not a TimeSformer"),
        "garbage.pyth": (tmp_path / "garbage.pyth", "not a readable PyTorch"),
        "empty.pyth": (tmp_path / "empty.pyth", "empty"),
        "depth.pyth": (official_file(tiny(depth=2), tmp_path / "depth.pyth"), "missing keys.*blocks.2"),
    }
    torch.save({"model": {"cls_token": torch.zeros(1, 1, 32), "patch_embed.proj.weight": torch.zeros(32, 3, 8, 8)}},
               tmp_path / "deit.pth")
    (tmp_path / "garbage.pyth").write_bytes(b"\x00not a pickle" * 10)
    (tmp_path / "empty.pyth").write_bytes(b"")
    for name, (path, message) in cases.items():
        with pytest.raises(CheckpointError, match=message) as info:
            create_model("timesformer_base_patch16_224", checkpoint=path, **overrides)
        text = str(info.value)
        assert "\n" not in text and str(path) in text, (name, text)


# -- the hybrid TimeSformer (conv stem per frame) and its start from an image ViT ----------------------


def hybrid_vit(depth=2, seed=0):
    torch.manual_seed(seed)
    return perturbed(create_model("digits_natural_vit", depth=depth, img_size=32), seed).eval()


def hybrid_tsf(depth=2, frames=4, **kw):
    return TimeSformer(TimeSformerConfig(**{**TIMESFORMER_CONFIGS["moving_digits_tsf"], "depth": depth,
                                            "num_frames": frames, "img_size": 32, **kw})).eval()


def test_inflated_image_model_gives_the_image_models_logits_on_a_still_clip():
    """``inflate_image_weights``: temporal paths start as the identity, so a clip of one repeated frame
    (and a one-frame clip) gets exactly the image ViT's logits; the stem's BatchNorm statistics come along."""
    from iared.models.timesformer import inflate_image_weights

    vit = hybrid_vit()
    tsf = hybrid_tsf()
    assert inflate_image_weights(tsf, vit.state_dict()) == []  # same classes: nothing left fresh
    frame = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        expected = vit(frame)
        torch.testing.assert_close(tsf(frame[:, None].expand(-1, 4, -1, -1, -1)), expected, atol=1e-5, rtol=0)
        moving = tsf(torch.rand(3, 4, 3, 32, 32))
    assert moving.shape == (3, 10)
    one = hybrid_tsf(frames=1)
    inflate_image_weights(one, vit.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(one(frame[:, None]), expected, atol=1e-5, rtol=0)


def test_inflation_refuses_what_does_not_fit_in_one_line():
    from iared.models.timesformer import inflate_image_weights

    vit = hybrid_vit(depth=2)
    with pytest.raises(CheckpointError, match=r"vit\.pt: a ViT with 2 blocks.*has 3"):
        inflate_image_weights(hybrid_tsf(depth=3), vit.state_dict(), "vit.pt")
    with pytest.raises(CheckpointError, match="divided_space_time"):
        inflate_image_weights(hybrid_tsf(attention_type="joint_space_time"), vit.state_dict(), "vit.pt")
    with pytest.raises(CheckpointError, match=r"vit\.pt: does not fit the TimeSformer \(cls_token is \(1, 1, 144\)"):
        inflate_image_weights(hybrid_tsf(embed_dim=96, num_heads=4), vit.state_dict(), "vit.pt")
    fresh_head = hybrid_tsf(num_classes=7)
    assert inflate_image_weights(fresh_head, vit.state_dict()) == ["head.weight", "head.bias"]


def test_hybrid_timesformer_geometry_is_read_off_its_weights_and_its_stem_is_counted(tmp_path):
    """A TimeSformer file without a config: the conv stem's widths, the patch (2 ** stages) and input
    channels come from ``patch_embed.backbone.*``; MACs count the stem once per frame."""
    from safetensors.torch import save_file

    from iared import flops
    from iared.models.timesformer import config_from_state_dict

    model = perturbed(hybrid_tsf(), 3)
    cfg = config_from_state_dict(model.state_dict(), num_heads=4)
    assert (cfg.conv_stem, cfg.patch_size, cfg.in_chans, cfg.img_size) == ((16, 32, 64), 8, 3, 32)
    path = tmp_path / "tsf.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    loaded = load_timesformer(path, num_heads=4, mean=model.cfg.mean, std=model.cfg.std).eval()
    x = torch.rand(2, 4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), atol=1e-6, rtol=0)
    per_frame = 32 * 32 * 3 * 16 * 9 + 16 * 16 * 16 * 32 * 9 + 8 * 8 * 32 * 64 * 9
    assert flops.embed_macs(model.cfg) == 4 * per_frame + model.cfg.num_patches * 144 * 64
    assert model.fixed_macs() == flops.embed_macs(model.cfg) + 144 * 10
    with pytest.raises(ValueError, match=r"log2\(patch_size\) = 3"):
        TimeSformerConfig(img_size=32, patch_size=8, conv_stem=(16, 32))


def test_hybrid_timesformer_prunes_exactly():
    """Threshold 0 keeps everything (the unpruned logits); packed equals padded with tokens dropped."""
    model = perturbed(hybrid_tsf(), 1)
    pruned = spread_interpreters(IARed(model, num_stages=2), std=2.0).eval()
    x = torch.rand(3, 4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(pruned(x, threshold=0.0).logits, model(x), atol=1e-5, rtol=0)
        packed, padded = pruned(x, threshold=0.5, layout="packed"), pruned(x, threshold=0.5, layout="padded")
    assert (packed.keep[-1].sum(1) < model.num_tokens).all()
    torch.testing.assert_close(packed.logits, padded.logits, atol=1e-5, rtol=0)


def test_init_image_takes_a_shipped_name_or_a_file_and_refuses_the_rest(tmp_path):
    """``iared train --init-image``: the shipped ``digits_natural_vit`` by name, or any weights file of it,
    inflate into ``moving_digits_tsf`` alike; an image model or a missing file is refused in one line."""
    from safetensors.torch import save_file

    from iared.loading import inflate_from_image

    by_name = create_model("moving_digits_tsf")
    assert inflate_from_image(by_name, "digits_natural_vit") == []
    path = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in create_model("digits_natural_vit", pretrained=True).state_dict().items()},
              str(path))
    by_file = create_model("moving_digits_tsf")
    inflate_from_image(by_file, path)
    for (name, a), b in zip(by_name.state_dict().items(), by_file.state_dict().values()):
        # the shipped file is float16: its position table is resampled from float16 values there
        torch.testing.assert_close(a, b, atol=1e-3, rtol=0, msg=name)
    with pytest.raises(ValueError, match="inflates an image ViT into a TimeSformer; VisionTransformer"):
        inflate_from_image(create_model("digits_natural_vit"), path)
    with pytest.raises(FileNotFoundError, match=r"--init-image .*nope\.safetensors: no such file"):
        inflate_from_image(create_model("moving_digits_tsf"), tmp_path / "nope.safetensors")


def test_segment_plan_is_made_once_per_stage_and_stays_exact(monkeypatch):
    """The sorts and counts behind a ragged layout's attention segments run once per stage, however
    many blocks the stage has, and the blocks that reuse them stay exact."""
    from iared.models import timesformer

    model = tiny(depth=4)
    loop = ReducedModel(model, [None, RandomReducer(seed=0), RandomReducer(seed=1)], [0, 1, 3]).eval()
    made = []
    original = timesformer._SegmentPlan.of
    monkeypatch.setattr(timesformer._SegmentPlan, "of", staticmethod(lambda *a: made.append(1) or original(*a)))
    x = clips(3)
    with torch.no_grad():
        out = loop(x, "threshold", threshold=0.4, layout="packed")
        expected = reference_logits(model, x, loop.stage_starts, out.keep)
    assert len(made) == 2  # stage 0 runs dense (whole grid, no plan); stages 1 (2 blocks) and 2 (1 block)
    assert float((out.logits - expected).abs().max()) <= TOL
