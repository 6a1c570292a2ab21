"""The static-shape layout (``layout="static"``): threshold mode with a fixed per-stage capacity gives
the dynamic threshold mode's logits wherever no image overflows, counts the tokens an overflowing
image loses, and the inference path compiles as one graph (no host read of per-image counts)."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from iared.models.timesformer import TimeSformer, TimeSformerConfig
from iared.models.vit import BlockRecord, VisionTransformer, ViTConfig
from iared.pruning import IARed
from tests.helpers import perturbed, spread_interpreters


def vit_model():
    torch.manual_seed(0)
    backbone = VisionTransformer(ViTConfig(img_size=32, patch_size=4, in_chans=3, num_classes=7, embed_dim=48,
                                           depth=6, num_heads=3))
    return spread_interpreters(IARed(perturbed(backbone))).eval()


def video_model(attention="divided_space_time"):
    torch.manual_seed(0)
    cfg = TimeSformerConfig(img_size=32, patch_size=8, num_frames=4, num_classes=5, embed_dim=32, depth=3,
                            num_heads=4, attention_type=attention)
    return spread_interpreters(IARed(perturbed(TimeSformer(cfg)))).eval()


def images(n=6):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(3))


def clips(n=3):
    return torch.randn(n, 4, 3, 32, 32, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("make,inputs", [(vit_model, images), (video_model, clips)], ids=["vit", "timesformer"])
def test_static_threshold_equals_dynamic_where_the_capacity_holds(make, inputs):
    model, x = make(), inputs()
    with torch.no_grad():
        dynamic = model(x, "threshold", threshold=0.5)
        kept = [k[:, 1:].sum(1) for k in dynamic.keep]
        assert 0 < int(kept[0].min()) and int(kept[0].max()) < model.backbone.num_tokens - 1  # thresholds bite
        uncapped = model(x, "threshold", threshold=0.5, layout="static")
        torch.testing.assert_close(uncapped.logits, dynamic.logits, atol=1e-5, rtol=1e-5)
        assert all(int(o.abs().sum()) == 0 for o in uncapped.overflow)
        # a capacity between the counts: images under it are exact, the others lose their lowest scores
        caps = [int(k.float().median()) for k in kept]
        capped = model(x, "threshold", threshold=0.5, layout="static", capacity=caps)
    over = capped.overflow[0]
    torch.testing.assert_close(over, (kept[0] - caps[0]).clamp_min(0))
    fits = torch.stack([o == 0 for o in capped.overflow]).all(0)
    assert fits.any() and not fits.all()
    torch.testing.assert_close(capped.logits[fits], dynamic.logits[fits], atol=1e-5, rtol=1e-5)
    assert all(int(k[:, 1:].sum(1).max()) <= c for k, c in zip(capped.keep, caps))
    # the highest-scoring tokens are the ones that stay
    s0 = dynamic.scores[0][:, 1:]
    k0 = capped.keep[0][:, 1:]
    i = int(over.argmax())
    assert float(s0[i][k0[i]].min()) >= float(s0[i][dynamic.keep[0][i, 1:] & ~k0[i]].max())


def test_static_layout_refuses_a_capacity_it_cannot_use():
    model = vit_model()
    with pytest.raises(ValueError, match="layout='static'"):
        model(images(2), "threshold", capacity=10)
    with pytest.raises(ValueError, match="positive token count"):
        model(images(2), "threshold", layout="static", capacity=[10, 0, 5])
    with pytest.raises(ValueError, match="layout must be one of"):
        model(images(2), "threshold", layout="ragged")


@pytest.mark.parametrize("attention", ["divided_space_time", "space_only"])
def test_video_grid_attention_equals_segment_attention(attention):
    """The video block's static path (attention on the full grid, dropped keys masked) and its segment
    path (attention within packed segments of alive tokens) agree on every alive token and record."""
    model = video_model(attention)
    block = model.backbone.blocks[1]
    with torch.no_grad():
        tokens = model.backbone.embed(clips())
        keep = torch.rand(tokens.index.shape, generator=torch.Generator().manual_seed(5)) < 0.4
        for selected in (tokens.select_count(keep, 30), tokens.select_capacity(keep, None, 40)):
            grid_record, segment_record = BlockRecord(), BlockRecord()
            on_grid, segments = block._on_grid(selected, grid_record), block._segments(selected, segment_record)
            valid = selected.valid() if selected.valid() is not None else torch.ones_like(keep[:, :on_grid.shape[1]])
            torch.testing.assert_close(on_grid[valid], segments[valid], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(grid_record.cls_attention[valid], segment_record.cls_attention[valid],
                                       atol=1e-6, rtol=1e-5)


# What reads a tensor's values on the host, or gives a shape that depends on them (a boolean index
# calls nonzero inside aten.index, below the dispatcher): each one is a device sync and no CUDA graph.
# torch.compile(fullgraph=True) accepts data-dependent shapes, so it does not catch these by itself.
_HOST_READS = {"nonzero", "_local_scalar_dense", "masked_select", "unique_consecutive", "_unique2", "unique_dim",
               "repeat_interleave"}


class _HostReadSpy(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        boolean_index = name.startswith("index") and len(args) > 1 and isinstance(args[1], (list, tuple)) and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1])
        if name in _HOST_READS or boolean_index:
            self.seen.append(func.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("make,inputs,kw", [
    (vit_model, images, {"mode": "threshold", "threshold": 0.5, "layout": "static", "capacity": 30}),
    (vit_model, images, {"mode": "budget", "keep_ratio": 0.7}),
    (video_model, clips, {"mode": "threshold", "threshold": 0.5, "layout": "static", "capacity": 25}),
    (video_model, clips, {"mode": "budget", "keep_ratio": 0.7}),
], ids=["vit-threshold-static", "vit-budget", "timesformer-threshold-static", "timesformer-budget"])
def test_inference_path_reads_nothing_back_to_the_host(make, inputs, kw):
    model, x = make(), inputs()
    with torch.no_grad(), _HostReadSpy() as spy:
        model(x, **kw).logits
    assert spy.seen == []
    with torch.no_grad(), _HostReadSpy() as spy:  # the spy does see them: the dynamic layout has some
        model(x, "threshold", threshold=0.5)
    assert spy.seen


def _compiled_equals_eager(model, x, **kw):
    torch._dynamo.reset()
    eager = lambda inputs: model(inputs, **kw).logits  # noqa: E731
    compiled = torch.compile(eager, fullgraph=True)  # any graph break raises
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), eager(x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kw", [
    {"mode": "threshold", "threshold": 0.5, "layout": "static", "capacity": 30},
    {"mode": "budget", "keep_ratio": 0.7},
    {"mode": "sample", "layout": "static", "noise": torch.rand(4, 65, generator=torch.Generator().manual_seed(0))},
], ids=["threshold-static", "budget", "sample-static"])
def test_vit_compiles_as_one_graph(kw):
    _compiled_equals_eager(vit_model(), images(4), **kw)


@pytest.mark.parametrize("kw", [
    {"mode": "threshold", "threshold": 0.5, "layout": "static", "capacity": 25},
    {"mode": "budget", "keep_ratio": 0.7},
], ids=["threshold-static", "budget"])
def test_timesformer_compiles_as_one_graph(kw):
    _compiled_equals_eager(video_model(), clips(2), **kw)
