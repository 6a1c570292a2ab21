"""The peer token reducers and the floors (iared.reducers.{floors,tome,evit,ats,registry}): each
against a hand-computed case; each with its knob at "no reduction" reproducing the backbone;
each in the packed layout where its counts vary, against every image run alone; merges with
proportional attention exact in every layout."""

import math

import pytest
import torch

from iared.models.vit import BlockRecord, VisionTransformer, ViTConfig
from iared.pruning import IARed
from iared.reducers import registry
from iared.reducers.ats import ATS, inverse_transform_keep
from iared.reducers.base import Reducer, StageInput, StageSettings
from iared.reducers.evit import EViT, keep_count
from iared.reducers.floors import PixelSaliency
from iared.reducers.tome import ToMe
from iared.stages import ReducedModel
from iared.tokens import Decision, DenseTokens, PackedTokens, PaddedTokens

TOL = 1e-5


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: with the cores shared, worker threads cost more than they give (0.7 s a forward)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_backbone(seed: int = 0, depth: int = 4, peaky: bool = False) -> VisionTransformer:
    """32 px, 8 px patches (16 patch tokens), width 48, 3 heads. ``peaky``: larger qkv weights, so
    class attention is far from uniform (ATS then keeps different counts per image)."""
    torch.manual_seed(seed)
    model = VisionTransformer(ViTConfig(img_size=32, patch_size=8, in_chans=3, num_classes=7, embed_dim=48,
                                        depth=depth, num_heads=3)).eval()
    if peaky:
        with torch.no_grad():
            for blk in model.blocks:
                blk.attn.qkv.weight.normal_(0, 0.3)
    return model


def stage_input(tokens, record=None, settings=StageSettings(), inputs=None, backbone=None, stage=1):
    return StageInput(tokens, stage, settings, inputs, backbone, record)


def blank_patch_images(blanks=(10, 4, 0, 7), seed=0) -> torch.Tensor:
    """(B, 3, 32, 32): image b has its first ``blanks[b]`` patches constant, the rest noise of growing
    amplitude (x1.4 per patch) (so pixel std ranks are known and blank ties differ in number per image)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.zeros(len(blanks), 3, 32, 32)
    for b, n in enumerate(blanks):
        for p in range(16):
            r, c = divmod(p, 4)
            scale = 0.0 if p < n else 0.01 * 1.4**p * (1 + b)
            x[b, :, 8 * r:8 * r + 8, 8 * c:8 * c + 8] = 0.3 + scale * torch.randn(3, 8, 8, generator=gen)
    return x


# -- hand-computed cases ---------------------------------------------------------------------


def _tome_case(sizes=None):
    """Class token + 5 patches; A = positions 0 (class), 2, 4; B = 1, 3, 5. Cosine matches:
    A2 -> B1 (0.894), A4 -> B5 (1.0). The class key equals k5 direction but must never merge."""
    keys = torch.tensor([[0.0, 3.0], [1.0, 0.0], [1.0, 0.5], [1.0, -1.0], [0.0, 1.0], [0.0, 2.0]])[None]
    data = torch.arange(6 * 4, dtype=torch.float32).reshape(1, 6, 4)
    tokens = DenseTokens.from_embeddings(data, 1)
    if sizes is not None:
        tokens = DenseTokens(data, tokens.index, 1, weights=torch.tensor([sizes], dtype=torch.float32))
    rec = BlockRecord()
    rec.keys = keys
    return tokens, rec, data[0]


def test_tome_merges_the_most_similar_pairs_hand_case():
    tokens, rec, x = _tome_case()
    d = ToMe(1)(stage_input(tokens, rec))
    assert d.merge_into.tolist() == [[0, 1, 2, 3, 5, 5]] and d.track_sizes
    out = tokens.apply(d)
    assert out.index.tolist() == [[0, 1, 2, 3, 5]]
    assert torch.equal(out.data[0, 4], (x[4] + x[5]) / 2)
    assert out.weights.tolist() == [[1, 1, 1, 1, 2]]
    d2 = ToMe(2)(stage_input(tokens, rec))
    assert d2.merge_into.tolist() == [[0, 1, 1, 3, 5, 5]]
    out2 = tokens.apply(d2)
    assert out2.index.tolist() == [[0, 1, 3, 5]] and out2.weights.tolist() == [[1, 2, 1, 2]]
    assert torch.equal(out2.data[0, 1], (x[1] + x[2]) / 2)
    # r is capped at half the patch tokens (5 // 2 = 2); the class token never merges.
    assert ToMe(10)(stage_input(tokens, rec)).merge_into.tolist() == d2.merge_into.tolist()
    assert ToMe(0)(stage_input(tokens, rec)) == Decision()


def test_tome_size_weighted_average_and_sizes_add_up():
    tokens, rec, x = _tome_case(sizes=[1, 1, 1, 1, 1, 3])
    out = tokens.apply(ToMe(1)(stage_input(tokens, rec)))
    assert torch.allclose(out.data[0, 4], (x[4] + 3 * x[5]) / 4)
    assert out.weights.tolist() == [[1, 1, 1, 1, 4]]


def test_evit_keeps_the_attentive_and_fuses_the_rest_hand_case():
    x = torch.randn(1, 6, 4)
    tokens = DenseTokens.from_embeddings(x, 1)
    rec = BlockRecord()
    rec.cls_attention = torch.tensor([[0.15, 0.3, 0.05, 0.25, 0.15, 0.1]])
    d = EViT(0.4)(stage_input(tokens, rec))  # ceil(0.4 * 5) = 2 kept: patches 1 and 3
    assert d.merge_into.tolist() == [[0, 1, 4, 3, 4, 4]]  # 2, 4, 5 -> 4: the most attentive of them
    out = tokens.apply(d)
    assert out.index.tolist() == [[0, 1, 3, 4]] and out.weights is None
    assert torch.equal(out.data[0, :3], x[0, [0, 1, 3]])  # kept tokens pass through bit for bit
    fused = (0.05 * x[0, 2] + 0.15 * x[0, 4] + 0.1 * x[0, 5]) / 0.3
    assert torch.allclose(out.data[0, 3], fused, atol=1e-6)
    # ceil(0.8 * 5) = 4 kept: a lone inattentive token just stays.
    assert tokens.apply(EViT(0.8)(stage_input(tokens, rec))).index.tolist() == [[0, 1, 2, 3, 4, 5]]
    assert EViT(1.0)(stage_input(tokens, rec)) == Decision()
    assert keep_count(10, 0.7) == 7 and keep_count(196, 0.7) == 138 and keep_count(3, 0.01) == 1


def test_ats_inverse_transform_sampling_hand_case():
    tokens = DenseTokens.from_embeddings(torch.zeros(1, 5, 2), 1)
    sig = torch.tensor([[0.0, 0.05, 0.6, 0.2, 0.15]])
    # sorted: p1 .05, p4 .15, p3 .2, p2 .6; CDF .05 .2 .4 1.0. K = 3 quantiles 1/6, 1/2, 5/6 -> p4, p2, p2.
    assert inverse_transform_keep(tokens, sig, torch.tensor([3])).tolist() == [[0, 0, 1, 0, 1]]
    assert inverse_transform_keep(tokens, sig, torch.tensor([1])).tolist() == [[0, 0, 1, 0, 0]]
    uniform = torch.tensor([[0.0, 0.25, 0.25, 0.25, 0.25]])
    assert inverse_transform_keep(tokens, uniform, torch.tensor([4]))[0, 1:].all()  # K = n, uniform: all kept
    # Through the reducer: significance = class attention x value norm, renormalised over patches.
    rec = BlockRecord()
    rec.cls_attention = torch.tensor([[0.5, 0.05, 0.6, 0.2, 0.15]]) / 1.5
    rec.values_norm = torch.full((1, 5), 2.0)
    d = ATS(max_tokens=3)(stage_input(tokens, rec))
    assert d.keep.tolist() == [[False, False, True, False, True]]
    assert torch.allclose(d.scores[0, 1:], sig[0, 1:]) and d.scores[0, 0] == 1
    assert ATS(ratio=0.75)(stage_input(tokens, rec)).keep.tolist() == d.keep.tolist()  # round(0.75 * 4) = 3
    assert ATS(ratio=1.0)(stage_input(tokens, rec)) == Decision()


def test_pixel_saliency_ranks_patches_by_pixel_std():
    backbone = tiny_backbone()
    x = blank_patch_images(blanks=(2,))  # patches 0, 1 blank; then increasing noise
    tokens = backbone.embed(x)
    threshold = StageSettings("threshold", 0.5)
    d = PixelSaliency()(stage_input(tokens, settings=threshold, inputs=x, backbone=backbone))
    s = d.scores[0]
    assert s[0] == 1  # class token
    assert s[1] == s[2] == pytest.approx(1 / 16)  # two blanks share ranks 0, 1: (0.5 + 1.5) / 2 / 16
    assert torch.all(s[3:].diff() > 0) and s[16] == pytest.approx(15.5 / 16)
    assert d.keep[0, 1:].tolist() == [False] * 8 + [True] * 8  # threshold 0.5 keeps the 8 most varied
    budget = PixelSaliency()(stage_input(tokens, settings=StageSettings("budget", keep_ratio=0.25), inputs=x,
                                         backbone=backbone))
    assert budget.kept_count == 5 and budget.keep[0, 13:].all() and budget.keep[0, 1:13].sum() == 0


def test_random_floor_policies():
    backbone = tiny_backbone(depth=3)
    x = torch.randn(64, 3, 32, 32)
    model = registry.build_reduced("random", backbone, 0.5, seed=1)
    with torch.no_grad():
        out = model(x, "threshold", threshold=0.7)  # keep ~ Bernoulli(0.3) per stage
        again = registry.build_reduced("random", backbone, 0.5, seed=1)(x, "threshold", threshold=0.7)
        budget = model(x, "budget", keep_ratio=0.5)
    first = out.keep[0][:, 1:].float().mean()
    assert 0.25 < float(first) < 0.35
    assert len(set(out.keep[0][:, 1:].sum(1).tolist())) > 1  # counts vary per image
    assert all(torch.equal(a, b) for a, b in zip(out.keep, again.keep))  # seeded: reproducible
    assert [set(k[:, 1:].sum(1).tolist()) for k in budget.keep] == [{8}, {4}, {2}]


# -- "no reduction" is the backbone -------------------------------------------------------------


def _interpreters(backbone):
    return list(IARed(backbone, num_stages=3, interpreter_heads=3).reducers)


@pytest.mark.parametrize("name", ["random", "pixel", "tome", "evit", "ats", "iared"])
def test_no_reduction_knob_reproduces_the_backbone(name):
    backbone = tiny_backbone(peaky=True)
    x = torch.randn(3, 3, 32, 32)
    knob = registry.METHODS[name].no_reduction
    model = registry.build_reduced(name, backbone, knob, interpreters=_interpreters(backbone))
    with torch.no_grad():
        out = registry.runner(name, model, knob)(x)
        ref = backbone(x)
    assert (out.logits - ref).abs().max() <= TOL
    assert all(bool(k.all()) for k in out.keep)


# -- packed layout where counts vary: every image alone ------------------------------------------


class Replay(Reducer):
    """Keeps the tokens a previous run kept (``keep``: ``(B, N0)`` in original positions)."""

    uses_policy = False

    def __init__(self, keep):
        super().__init__()
        self.keep = keep

    def forward(self, x):
        t = x.tokens
        return Decision(keep=self.keep[t.image_ids(), t.index])


def _alone(model, x, **kw):
    return torch.cat([model(x[i:i + 1], **kw).logits for i in range(x.shape[0])])


def _ragged(out) -> bool:
    return any(len(set(n.tolist())) > 1 for n in out.tokens_per_block)


@pytest.mark.parametrize("case", ["ats", "pixel-threshold", "mixed-merges"])
def test_varying_counts_packed_and_padded_match_each_image_alone(case):
    backbone = tiny_backbone(peaky=True)
    x = blank_patch_images()
    kw = {}
    if case == "ats":
        model = registry.build_reduced("ats", backbone, 0.8)
    elif case == "pixel-threshold":
        model = registry.build_reduced("pixel", backbone, 1.0)
        kw = {"mode": "threshold", "threshold": 0.5}
    else:  # a ragged pixel stage, then ToMe, EViT and ATS merging / sampling on packed tokens
        model = ReducedModel(backbone, [PixelSaliency(), ToMe(2), EViT(0.6), ATS(0.7)], [0, 1, 2, 3])
        kw = {"mode": "threshold", "threshold": 0.3}
    model.eval()
    with torch.no_grad():
        packed = model(x, layout="packed", **kw)
        padded = model(x, layout="padded", **kw)
        alone = _alone(model, x, **kw)
    assert _ragged(packed), "the case must give different counts per image"
    assert (packed.logits - alone).abs().max() <= TOL
    assert (padded.logits - alone).abs().max() <= TOL
    for a, b in zip(packed.tokens_per_block, padded.tokens_per_block):
        assert torch.equal(a, b)


def test_random_threshold_packed_matches_each_image_alone():
    backbone = tiny_backbone()
    x = torch.randn(5, 3, 32, 32)
    model = registry.build_reduced("random", backbone, 1.0, seed=3).eval()
    with torch.no_grad():
        packed = model(x, "threshold", threshold=0.5, layout="packed")
        padded = registry.build_reduced("random", backbone, 1.0, seed=3).eval()(x, "threshold", threshold=0.5,
                                                                                 layout="padded")
        assert _ragged(packed)
        assert (packed.logits - padded.logits).abs().max() <= TOL  # same seed, same decisions in both layouts
        for i in range(x.shape[0]):
            replays = [Replay(k[i:i + 1]) for k in packed.keep]
            replay = ReducedModel(backbone, replays, model.stage_starts).eval()
            assert (replay(x[i:i + 1]).logits - packed.logits[i]).abs().max() <= TOL


# -- merges and proportional attention in every layout ----------------------------------------------


def _layouts(rows, sizes):
    """The same images (``rows[b]``: ``(n_b, C)``, ``sizes[b]``: ``(n_b,)``) as padded and packed tokens,
    and as dense tokens when all n_b are equal."""
    counts = [r.shape[0] for r in rows]
    C = rows[0].shape[1]
    width = max(counts)
    data = torch.zeros(len(rows), width, C)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    weights = torch.zeros(len(rows), width)
    index = torch.zeros(len(rows), width, dtype=torch.long)
    for b, (r, s) in enumerate(zip(rows, sizes)):
        n = r.shape[0]
        data[b, :n], mask[b, :n], weights[b, :n], index[b, :n] = r, True, s, torch.arange(n)
    out = {"padded": PaddedTokens(data, index, 1, weights=weights, mask=mask),
           "packed": PackedTokens.from_counts(torch.cat(rows), index[mask], torch.tensor(counts), 1,
                                              weights=torch.cat(sizes))}
    if len(set(counts)) == 1:
        out["dense"] = DenseTokens(data, index, 1, weights=weights)
    return out


def _rows_of(tokens, b):
    if isinstance(tokens, PackedTokens):
        return tokens.data[tokens.image == b]
    mask = tokens.valid()
    return tokens.data[b] if mask is None else tokens.data[b][mask[b]]


@pytest.mark.parametrize("counts", [(5, 5), (5, 3)])
def test_a_token_of_size_two_attends_like_two_copies(counts):
    """Proportional attention: a token of size s contributes to every softmax exactly like s
    identical copies of it, in the dense, padded and packed layouts (and the class attention a
    reducer reads counts it s times)."""
    block = tiny_backbone().blocks[0]
    gen = torch.Generator().manual_seed(0)
    rows = [torch.randn(n, 48, generator=gen) for n in counts]
    sizes = [torch.tensor([1.0, 2.0] + [1.0] * (n - 2)) for n in counts]
    sizes[-1][-1] = 3.0
    with torch.no_grad():
        refs, ref_attn = [], []
        for r, s in zip(rows, sizes):
            copies = r.repeat_interleave(s.long(), dim=0)[None]  # token j repeated s_j times
            rec = BlockRecord()
            out = block(DenseTokens.from_embeddings(copies, 1), record=rec).data[0]
            first = torch.cumsum(s.long(), 0) - s.long()  # row of each token's first copy
            refs.append(out[first])
            owner = torch.repeat_interleave(torch.arange(r.shape[0]), s.long())  # copy -> token
            ref_attn.append(torch.zeros(r.shape[0]).index_add(0, owner, rec.cls_attention[0]))
        layouts = _layouts(rows, sizes)
        assert ("dense" in layouts) == (counts[0] == counts[1])
        for name, tokens in layouts.items():
            rec = BlockRecord()
            out = block(tokens, record=rec)
            attn = rec.cls_attention
            for b in range(len(rows)):
                assert (_rows_of(out, b) - refs[b]).abs().max() <= 1e-5, name
                got = attn[tokens.image == b] if isinstance(tokens, PackedTokens) else attn[b][:counts[b]]
                assert (got - ref_attn[b]).abs().max() <= 1e-6, name


def test_merge_gives_the_same_tokens_in_every_layout():
    """One ToMe decision on the same two images held dense, padded and packed: the same merged
    features and sizes per image."""
    gen = torch.Generator().manual_seed(1)
    rows = [torch.randn(7, 6, generator=gen) for _ in range(2)]
    sizes = [torch.tensor([1.0, 1, 2, 1, 3, 1, 1]), torch.tensor([1.0, 2, 1, 1, 1, 1, 2])]
    keys = [torch.randn(7, 4, generator=gen) for _ in range(2)]
    results = {}
    for name, tokens in _layouts(rows, sizes).items():
        rec = BlockRecord()
        rec.keys = torch.cat(keys) if name == "packed" else torch.stack(keys)
        ragged = "packed" if name == "packed" else "padded"
        merged = tokens.apply(ToMe(2)(stage_input(tokens, rec)), ragged=ragged)
        results[name] = [(_rows_of(merged, b), merged.weights[merged.image == b] if name == "packed"
                          else merged.weights[b][: merged.lengths()[b]]) for b in range(2)]
    for name in ("padded", "packed"):
        for (d, w), (d0, w0) in zip(results[name], results["dense"]):
            assert torch.allclose(d, d0, atol=1e-6) and torch.equal(w, w0)
    assert [w.sum().item() for _, w in results["dense"]] == [10.0, 9.0]  # sizes add up to the originals
    assert [w.shape[0] for _, w in results["dense"]] == [5, 5]  # 2 merges per image


# -- the registry ---------------------------------------------------------------------------------


def test_registry_placements():
    assert registry.stage_starts("evit", 12) == (3, 6, 9) == registry.stage_starts("ats", 12)
    assert registry.stage_starts("tome", 12) == tuple(range(1, 12))
    assert registry.stage_starts("iared", 12) == (0, 4, 8) == registry.stage_starts("random", 12)
    assert registry.stage_starts("evit", 6) == (2, 3, 4) and registry.stage_starts("evit", 3) == (1, 2)
    backbone = tiny_backbone()
    model = registry.build_reduced("evit", backbone, 0.7)
    assert model.stage_starts == (0, 1, 2, 3) and model.reducer(0) is None  # a leading stage without reducer
    assert registry.build_reduced("tome", backbone, 2, stage_starts=[2]).stage_starts == (0, 2)
    with pytest.raises(ValueError, match="block before"):
        registry.build_reduced("tome", backbone, 2, stage_starts=[0, 2])
    with pytest.raises(ValueError, match="trained interpreters"):
        registry.build_reduced("iared", backbone, 0.5)
    with pytest.raises(ValueError, match="unknown token reducer"):
        registry.build_reduced("nope", backbone, 1)


def test_stages_must_start_at_block_zero():
    """A first stage starting later would silently skip the blocks before it."""
    with pytest.raises(ValueError, match="start at block 0"):
        ReducedModel(tiny_backbone(), [ToMe(1)], [2])


@pytest.mark.parametrize("name", ["random", "pixel", "tome", "evit", "ats"])
def test_registry_sweep_goes_from_little_to_strong_reduction(name):
    backbone = tiny_backbone()  # near-uniform attention: ATS keeps about K tokens
    x = torch.randn(4, 3, 32, 32)
    knobs = registry.default_knobs(name, backbone=backbone)
    assert len(registry.default_knobs(name, quick=True)) == 1 and len(knobs) >= 4
    macs = []
    for knob in knobs:
        model = registry.build_reduced(name, backbone, knob, seed=0)
        with torch.no_grad():
            out = registry.runner(name, model, knob)(x)
        macs.append(float(out.macs.mean()))
        assert model.reducer(model.num_stages - 1).describe()["method"] == name
    assert macs[0] <= model.full_macs() and macs[-1] < 0.8 * macs[0]  # EViT 0.9 on 16 patches: 15 + 1 fused
    assert all(b <= a * 1.01 for a, b in zip(macs, macs[1:]))


def test_registry_floors_take_one_ratio_per_stage():
    backbone = tiny_backbone()
    out = registry.runner("pixel", registry.build_reduced("pixel", backbone, [0.5, 0.5, 1.0]),
                          [0.5, 0.5, 1.0])(blank_patch_images())
    assert [set(k[:, 1:].sum(1).tolist()) for k in out.keep] == [{8}, {4}, {4}]
    assert math.isclose(registry.METHODS["tome"].no_reduction, 0)
