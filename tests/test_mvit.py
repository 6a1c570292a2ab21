"""MViTv2 (iared.models.mvit) against timm itself, and IA-RED² on its grid.

timm models are random-initialised and then perturbed (norms, biases and relative-position tables
included), so a swapped, transposed or ignored tensor changes the logits. The pruning tests check
the documented rule: a dropped token is frozen on the grid cache, alive tokens are computed from
the whole grid, a stride-2 block restores the whole coarse grid.
"""

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.models.mvitv2 import MultiScaleVit, MultiScaleVitCfg

from iared.models import create_model
from iared.models.mvit import MultiScaleViT, MViTConfig
from iared.pruning import IARed
from iared.tokens import DenseTokens, PackedTokens
from tests.helpers import perturbed

TOL = 1e-5


SMALL = [
    dict(depths=(1, 1, 1, 1), embed_dim=16, num_heads=1),
    dict(depths=(1, 2), embed_dim=(16, 24), num_heads=(2, 3), stride_q=((1, 1), (2, 2))),  # per-stage widths
    dict(depths=(2, 2, 1), embed_dim=8, num_heads=1, stride_q=((1, 1), (2, 2), (1, 1)),  # stride-1 widening
         residual_pooling=False, mlp_ratio=2.0, qkv_bias=False),
]


@pytest.mark.parametrize("cfg", SMALL)
def test_small_geometries_match_timm(cfg):
    torch.manual_seed(0)
    ref = perturbed(MultiScaleVit(MultiScaleVitCfg(**cfg), img_size=64, num_classes=5))
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ref(x)
    assert float(expected.std()) > 0.05
    ours = MultiScaleViT(MViTConfig(img_size=64, num_classes=5, **cfg)).eval()
    assert ours.state_dict().keys() == ref.state_dict().keys()
    ours.load_state_dict(ref.state_dict())
    with torch.no_grad():
        assert float((ours(x) - expected).abs().max()) <= TOL
        assert float((ours.forward_features(x) - ref.forward_features(x)).abs().max()) <= TOL


def test_mvitv2_tiny_matches_timm_and_loads_timm_files(tmp_path):
    torch.manual_seed(0)
    ref = perturbed(timm.create_model("mvitv2_tiny", pretrained=False))
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ref(x)
    assert float(expected.std()) > 0.1
    for filename in ("plain.pt", "weights.safetensors"):  # what timm's save / export writes
        path = tmp_path / filename
        sd = ref.state_dict()
        save_file(sd, path) if filename.endswith(".safetensors") else torch.save(sd, path)
        ours = create_model("mvitv2_tiny", checkpoint=path).eval()
        assert isinstance(ours, MultiScaleViT)
        with torch.no_grad():
            assert float((ours(x) - expected).abs().max()) <= TOL, filename
    # Geometry and compute: timm reports 4.7 GMACs for mvitv2_tiny at 224.
    assert [b.size for b in ours.blocks] == [56, 56, 28, 28, 14, 14, 14, 14, 14, 7]
    full = ours.fixed_macs() + sum(ours.block_macs(ours.block_input_shape(i)[0], i) for i in range(10))
    assert abs(full / 1e9 - 4.7) < 0.05


def test_create_model_names_and_overrides():
    small = create_model("mvitv2_small", img_size=64, num_classes=3)
    assert small.cfg.depths == (1, 2, 11, 2) and small.cfg.embed_dim == (96, 192, 384, 768)
    assert small(torch.zeros(1, 3, 64, 64)).shape == (1, 3)
    with pytest.raises(ValueError, match="does not divide"):
        MViTConfig(img_size=40)  # a 10x10 grid cannot halve three times


def tiny_backbone(seed=0):
    torch.manual_seed(seed)
    cfg = MViTConfig(img_size=64, num_classes=5, depths=(1, 2, 3, 2), embed_dim=16, num_heads=1)
    return perturbed(MultiScaleViT(cfg), seed)


def reference_logits(backbone, x, keep):
    """The documented rule, spelled out on whole grids: every block runs on the whole grid, an alive
    token takes its output, a dropped token keeps its features; a stride-2 block's output is whole."""
    model_starts = keep["starts"]
    grid = backbone.embed(x).data
    for stage, start in enumerate(model_starts):
        alive = keep["masks"][stage]
        end = model_starts[stage + 1] if stage + 1 < len(model_starts) else len(backbone.blocks)
        for block in backbone.blocks[start:end]:
            whole = DenseTokens.from_embeddings(grid, 0, has_class_token=False)
            out = block(whole).data
            if block.changes_grid:
                grid, alive = out, torch.ones(out.shape[:2], dtype=torch.bool)
            else:
                grid = torch.where(alive[..., None], out, grid)
    return backbone.head.fc(backbone.norm(grid).mean(1))


@pytest.mark.parametrize("mode,layout", [("threshold", "packed"), ("threshold", "padded"), ("budget", "packed")])
def test_pruned_forward_follows_the_grid_rule(mode, layout):
    backbone = tiny_backbone()
    model = IARed(backbone).eval()
    assert model.stage_starts == (0, 2, 4)  # before the first stride-1 block of each resolution stage
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = model(x, mode, threshold=0.5, keep_ratio=0.6, layout=layout)
        keep = {"starts": model.stage_starts, "masks": out.keep}
        expected = reference_logits(backbone, x, keep)
    kept = [float(k.float().mean()) for k in out.keep]
    assert all(0.2 < k < 0.9 for k in kept), kept  # tokens really left at every stage
    assert [k.shape[1] for k in out.keep] == [256, 64, 16]  # each stage reports on its own grid
    assert float((out.logits - expected).abs().max()) <= TOL
    if mode == "threshold":
        assert len(set(out.keep[0].sum(1).tolist())) > 1  # images kept different counts: ragged layouts ran
    # FLOPs follow the alive counts block by block; budget mode's prediction is the measured count.
    assert (out.macs < model.full_macs()).all()
    if mode == "budget":
        assert abs(model.macs_for_ratios(0.6) - float(out.macs[0])) < 1.0


def test_threshold_zero_reproduces_the_backbone_and_packed_whole_grid_too():
    backbone = tiny_backbone(1)
    model = IARed(backbone).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        full = backbone(x)
        out = model(x, "threshold", threshold=0.0)
        assert float((out.logits - full).abs().max()) <= TOL
        assert all(bool(k.all()) for k in out.keep)
        # Every token alive but packed: the alive-token path (grid writes, gathers, padded queries)
        # must give the whole-grid path's numbers.
        dense = backbone.embed(x)
        tokens = PackedTokens.from_dense(dense.data, dense.index, torch.ones(2, 256, dtype=torch.bool), 0,
                                         has_class_token=False, grid=dense.grid)
        for block in backbone.blocks:
            tokens = block(tokens)
        assert float((backbone.forward_head(tokens) - full).abs().max()) <= TOL
    assert float(out.macs[0]) == pytest.approx(model.full_macs() + sum(
        float(r.macs(backbone.block_input_shape(s)[0])) for r, s in zip(model.reducers, model.stage_starts)))


def test_pruned_mvit_checkpoint_round_trip(tmp_path):
    """save_pruned records the backbone family; load_pruned rebuilds an MViT (not a ViT) with the same
    logits, kept counts and MACs; a file naming an unknown family is refused in one line."""
    from iared.checkpoint import CheckpointError
    from iared.pruning import load_pruned, save_pruned

    model = IARed(tiny_backbone()).eval()
    for interpreter in model.interpreters:
        torch.nn.init.normal_(interpreter.qk.weight, std=0.5)
    path = tmp_path / "mvit_pruned.pt"
    save_pruned(model, path)
    loaded = load_pruned(path)
    assert isinstance(loaded.backbone, MultiScaleViT)
    x = torch.randn(3, 3, 64, 64)
    with torch.inference_mode():
        a, b = model(x, threshold=0.5), loaded(x, threshold=0.5)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.macs, b.macs)
    assert [k.sum(1).tolist() for k in a.keep] == [k.sum(1).tolist() for k in b.keep]
    assert model.full_macs() == loaded.full_macs()
    obj = torch.load(path, weights_only=True)
    obj["config"]["architecture"] = "swin"
    torch.save(obj, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="unknown backbone architecture 'swin'"):
        load_pruned(tmp_path / "bad.pt")


def test_pixel_floor_reads_the_cells_of_each_stage_grid():
    """patch_pixels follows the grid entering a block: a pooled token's cell covers the cells it
    pooled, so the pixel floor scores every stage's tokens (not the first grid's cells)."""
    from iared.reducers.registry import build_reduced

    backbone = tiny_backbone()
    images = torch.rand(2, 3, 64, 64)
    for block in range(len(backbone.blocks)):
        n = backbone.block_input_shape(block)[0]
        cells = backbone.patch_pixels(images, block)
        side = 64 // int(n ** 0.5)
        assert cells.shape == (2, n, 3 * side * side), block
    first = backbone.patch_pixels(images, 0)
    starts = backbone.default_stage_starts(3)
    coarse = backbone.patch_pixels(images, starts[1])
    # a coarse cell holds exactly the pixels of the fine cells under it
    assert torch.allclose(coarse.sum(-1).sum(-1), first.sum(-1).sum(-1))
    model = build_reduced("pixel", backbone, 0.5, stage_starts=starts).eval()
    with torch.inference_mode():
        out = model(images, "budget", keep_ratio=0.5)
    assert torch.isfinite(out.logits).all()


# -- peers that read the block before (EViT, ATS) on the grid -----------------------------------------


def _summary_attention_by_hand(block, grid, alive_positions):
    """The documented record, spelled out: the grid's pooled q / k / v, the alive output tokens'
    queries, their mean asking every alive token through the pooled key cell that covers it.
    ``grid`` (B, N, C): the block's input grid; ``alive_positions[b]``: positions on its output grid."""
    q, k, v, *_ = block.attn.pooled(block.norm1(grid), (block.size, block.size))
    side, kv = block.out_size, block.kv_size
    y = torch.arange(side) * kv // side
    cells = (y[:, None] * kv + y[None, :]).reshape(-1)
    attention = torch.zeros(grid.shape[0], side * side)
    norms = torch.zeros(grid.shape[0], side * side)
    for b, alive in enumerate(alive_positions):
        qb, kb, vb = q[b, alive], k[b, cells[alive]], v[b, cells[alive]]  # (n, H, D)
        logits = (qb.mean(0, keepdim=True) * kb).sum(-1) * kb.shape[-1] ** -0.5  # (n, H)
        attention[b, alive] = logits.softmax(0).mean(-1)
        norms[b, alive] = vb.norm(dim=-1).mean(-1)
    return attention, norms


@pytest.mark.parametrize("layout", ["packed", "padded"])
@pytest.mark.parametrize("block_index", [2, 3, 4])  # pooled keys 2x2 tokens per cell / stride 2 / one per cell
def test_record_is_the_summary_querys_attention_to_the_covering_key(layout, block_index):
    from iared.models.vit import BlockRecord

    backbone = tiny_backbone(3).eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        tokens = backbone.embed(x)
        for block in backbone.blocks[:block_index]:
            tokens = block(tokens)
        keep = torch.rand(tokens.data.shape[:2], generator=torch.Generator().manual_seed(5)) < 0.6
        keep[:, 0] = True
        if backbone.blocks[block_index].changes_grid:
            keep[:] = True  # a stride-2 block reads the whole grid anyway
        tokens = tokens.select(keep, layout)
        record = BlockRecord()
        out = backbone.blocks[block_index](tokens, record=record)
        block = backbone.blocks[block_index]
        grid = tokens.on_grid() if tokens.grid is not None else tokens.data
        if block.changes_grid:  # the record belongs to the coarse grid it returns, every token alive
            alive = [torch.arange(block.out_size**2)] * 2
        else:
            ids, index = tokens.image_ids(), tokens.index
            valid = tokens.valid() if tokens.valid() is not None else torch.ones_like(ids, dtype=torch.bool)
            alive = [index[(ids == b) & valid] for b in range(2)]
        attention, norms = _summary_attention_by_hand(block, grid, alive)
    got = out.scatter(record.cls_attention, attention.shape[1])
    got_norms = out.scatter(record.values_norm, norms.shape[1])
    assert float((got - attention).abs().max()) <= 1e-5
    assert float((got_norms - norms).abs().max()) <= 1e-5
    assert torch.allclose(out.sum_per_image(record.cls_attention), torch.ones(2))


@pytest.mark.parametrize("name", ["evit", "ats"])
def test_evit_and_ats_run_on_mvit(name):
    from iared.reducers.registry import build_reduced, forward_kwargs

    backbone = tiny_backbone(2).eval()
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        full = backbone(x)
        off = build_reduced(name, backbone, 1.0).eval()
        assert off.stage_starts == (0, 2, 4, 7)  # a reducer-less first stage, then each grid's first stride-1 block
        assert float((off(x, **forward_kwargs(name, 1.0)).logits - full).abs().max()) <= TOL
        model = build_reduced(name, backbone, 0.5).eval()
        packed = model(x, layout="packed", **forward_kwargs(name, 0.5))
        padded = model(x, layout="padded", **forward_kwargs(name, 0.5))
    assert float((packed.logits - padded.logits).abs().max()) <= TOL
    kept = [float(k.float().mean()) for k in packed.keep[1:]]
    assert all(k < 0.8 for k in kept), kept  # tokens really left at every reducing stage
    assert (packed.macs < model.full_macs()).all()
    assert not torch.allclose(packed.logits, full)


def test_tome_refuses_mvit_with_a_reason():
    from iared.reducers.registry import build_reduced

    with pytest.raises(ValueError, match="pool keys over the token grid"):
        build_reduced("tome", tiny_backbone(), 2)
