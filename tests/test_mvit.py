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
