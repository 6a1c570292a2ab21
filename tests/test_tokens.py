"""Token layouts: packed attention strategies, padded layout and threshold mode against running
every image alone (the definition of "no token leaks between images")."""

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from iared.models.vit import VisionTransformer, ViTConfig
from iared.pruning import IARed
from iared.tokens import (
    DenseTokens,
    PackedTokens,
    MANY_SEQUENCES_CPU,
    SHORT_KEYS_CPU,
    PaddedTokens,
    _bucket_cuts,
    _bucket_plan,
    _matmul_attention_pays,
    _sdpa_heads,
    default_packed_attention,
)

STRATEGIES = ["loop", "bucket", "nested"]
TOL = 1e-5


def tiny_model(seed: int = 0) -> IARed:
    torch.manual_seed(seed)
    backbone = VisionTransformer(ViTConfig(img_size=32, patch_size=8, in_chans=3, num_classes=7, embed_dim=48,
                                           depth=3, num_heads=3))
    model = IARed(backbone, num_stages=3, interpreter_heads=3).eval()
    with torch.no_grad():  # spread the scores so thresholds give different counts per image
        for interp in model.interpreters:
            interp.qk.weight.normal_(0, 0.5)
    return model


def packed(counts, heads=3, dim=8, seed=0, attention="auto"):
    gen = torch.Generator().manual_seed(seed)
    counts = torch.tensor(counts)
    T = int(counts.sum())
    qkv = torch.randn(T, 3, heads, dim, generator=gen)
    q, k, v = qkv.unbind(1)  # strided views, as Attention.forward makes them
    tokens = PackedTokens.from_counts(torch.zeros(T, 1), torch.zeros(T, dtype=torch.long), counts, 1, attention)
    return tokens, q, k, v


def per_image(q, k, v, counts):
    outs = []
    for qi, ki, vi in zip(q.split(counts), k.split(counts), v.split(counts)):
        outs.append(torch.nn.functional.scaled_dot_product_attention(
            qi.transpose(0, 1)[None], ki.transpose(0, 1)[None], vi.transpose(0, 1)[None])[0].transpose(0, 1))
    return torch.cat(outs)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("counts", [[5, 9, 2, 9, 17, 1, 30, 12], [3, 4], [1, 1, 2], [7] * 5 + [8]])
def test_packed_attention_matches_each_image_alone(strategy, counts):
    tokens, q, k, v = packed(counts, attention=strategy)
    out = tokens.attend(q, k, v)
    assert out.shape == q.shape
    assert (out - per_image(q, k, v, counts)).abs().max() <= TOL


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_packed_attention_equal_counts_fast_path(strategy):
    tokens, q, k, v = packed([6, 6, 6], attention=strategy)
    assert (tokens.attend(q, k, v) - per_image(q, k, v, [6, 6, 6])).abs().max() <= TOL


@pytest.mark.parametrize("buckets", [1, 2, 8])
@pytest.mark.parametrize("stacked", [True, False])
def test_bucketed_attention_any_grouping(buckets, stacked):
    """Every grouping (one padded group ... one group per length), with q, k, v as slices of one
    qkv buffer (one fused gather) or as unrelated tensors."""
    counts = [5, 9, 2, 9, 17, 1, 30, 12, 3]
    tokens, q, k, v = packed(counts)
    if not stacked:
        q, k, v = q.contiguous(), k.contiguous() * 2, v.contiguous()
    out = tokens._attend_bucketed(q, k, v, tokens.sizes, buckets=buckets)
    assert (out - per_image(q, k, v, counts)).abs().max() <= TOL


@pytest.mark.parametrize("counts", [[3, 4], [6, 6]])
def test_unknown_strategy_is_named(counts):
    tokens, q, k, v = packed(counts, attention="nope")
    with pytest.raises(ValueError, match="nope"):
        tokens.attend(q, k, v)


def test_nested_on_cpu_never_crashes_obscurely():
    """torch's jagged SDPA probes cuDNN for strided inputs and dies in CUDA init on CPU-only
    machines; the nested strategy must either work or say which strategy to use instead."""
    tokens, q, k, v = packed([4, 9, 2], attention="nested")
    try:
        out = tokens.attend(q, k, v)
    except RuntimeError as e:
        assert "bucket" in str(e) and "nested" in str(e)
    else:
        assert (out - per_image(q, k, v, [4, 9, 2])).abs().max() <= TOL


def test_bucket_cuts_cover_everything_and_respect_limit():
    lengths = sorted([3, 3, 4, 10, 10, 11, 50, 50, 51, 120])
    for buckets in (1, 2, 3, 8):
        cuts = _bucket_cuts(lengths, buckets)
        assert cuts[0] == 0 and cuts[-1] == len(lengths) and cuts == sorted(set(cuts))
        assert len(cuts) - 1 <= buckets
    assert _bucket_cuts(lengths, 1) == [0, len(lengths)]
    assert _bucket_cuts([5] * 6, 4) == [0, 6]  # one width: one group, no padding


def test_bucket_plan_indices_are_a_permutation():
    counts = (5, 9, 2, 9, 17, 1, 30, 12)
    plan = _bucket_plan(counts, 3, torch.device("cpu"))
    assert sum(plan.groups) == len(counts) and len(plan.groups) > 1
    dest = torch.cat(plan.dest)
    assert torch.equal(dest.sort().values, torch.arange(sum(counts)))  # every packed row written once
    assert sum(g.numel() for g in plan.gather) == sum(g * w for g, w in zip(plan.groups, plan.widths))
    for g, w, slots, n in zip(plan.groups, plan.widths, plan.slots, (len(d) for d in plan.dest)):
        assert slots.numel() == n and int(slots.max()) < g * w and slots.unique().numel() == n
    single = _bucket_plan((4, 6, 5), 1, torch.device("cpu"))
    assert single.groups == (3,) and single.dest is None  # one group: real rows come out in packed order


def test_varlen_off_cuda_says_what_to_use():
    tokens, q, k, v = packed([4, 9, 2], attention="varlen")
    with pytest.raises(RuntimeError, match="varlen.*CUDA.*bucket"):
        tokens.attend(q, k, v)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the varlen kernels are CUDA's")
@pytest.mark.parametrize("dtype,dim", [(torch.bfloat16, 64), (torch.float16, 36), (torch.float32, 8)])
def test_varlen_on_cuda_matches_each_image_alone_forward_and_backward(dtype, dim):
    counts = [5, 9, 2, 9, 17, 1, 30, 12]
    tokens, q, k, v = packed(counts, dim=dim, attention="varlen")
    tokens = PackedTokens.from_counts(tokens.data.cuda(), tokens.index.cuda(), torch.tensor(counts).cuda(), 1,
                                      "varlen")
    q, k, v = (t.to("cuda", dtype).requires_grad_() for t in (q, k, v))
    out = tokens.attend(q, k, v)
    ref_q, ref_k, ref_v = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref = per_image(ref_q, ref_k, ref_v, counts)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    assert out.shape == q.shape and (out.float() - ref).abs().max() <= tol
    grad = torch.randn_like(ref)
    out.backward(grad.to(dtype))
    ref.backward(grad)
    for mine, theirs in ((q, ref_q), (k, ref_k), (v, ref_v)):
        assert (mine.grad.float() - theirs.grad).abs().max() <= 5 * tol


def test_default_strategy_is_known_per_device():
    for dev in ("cpu", "cuda", "mps"):
        assert default_packed_attention(torch.device(dev)) in ("loop", "bucket", "nested", "varlen")
    # auto never picks nested off CUDA (no fused kernel there; can crash in CUDA init on CPU-only hosts)
    assert default_packed_attention(torch.device("cpu")) != "nested"
    assert default_packed_attention(torch.device("mps")) != "nested"


# -- whole model: threshold mode against each image alone -------------------------------------------


def _alone(model, images, threshold):
    return torch.cat([model(images[i: i + 1], "threshold", threshold=threshold).logits for i in range(len(images))])


@pytest.mark.parametrize("layout,strategy", [("packed", s) for s in STRATEGIES] + [("padded", "auto")])
def test_threshold_mode_matches_each_image_alone(layout, strategy):
    model = tiny_model()
    images = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    threshold = [0.45, 0.5, 0.5]
    with torch.inference_mode():
        out = model(images, "threshold", threshold=threshold, layout=layout, attention=strategy)
        counts = [k.sum(1).tolist() for k in out.keep]
        assert any(len(set(c)) > 1 for c in counts), f"counts should differ per image: {counts}"
        ref = _alone(model, images, threshold)
    assert (out.logits - ref).abs().max() <= TOL


def test_threshold_mode_packed_equals_padded_distilled():
    """Two prefix tokens (DeiT distilled): packed (auto strategy) and padded agree with each other and
    with each image alone."""
    torch.manual_seed(3)
    backbone = VisionTransformer(ViTConfig(img_size=32, patch_size=8, num_classes=5, embed_dim=48, depth=3,
                                           num_heads=3, distilled=True))
    model = IARed(backbone, num_stages=3, interpreter_heads=3).eval()
    with torch.no_grad():
        for interp in model.interpreters:
            interp.qk.weight.normal_(0, 0.5)
    images = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        packed_out = model(images, "threshold", threshold=0.5)
        padded_out = model(images, "threshold", threshold=0.5, layout="padded")
        ref = _alone(model, images, 0.5)
    assert any(len(set(k.sum(1).tolist())) > 1 for k in packed_out.keep)
    assert all(bool(k[:, :2].all()) for k in packed_out.keep)  # class + distillation tokens never dropped
    for a, b in zip(packed_out.keep, padded_out.keep):
        assert torch.equal(a, b)
    assert (packed_out.logits - padded_out.logits).abs().max() <= TOL
    assert (packed_out.logits - ref).abs().max() <= TOL
    assert torch.allclose(packed_out.macs, padded_out.macs)


def test_threshold_zero_equals_unpruned_exactly():
    model = tiny_model()
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        pruned = model(images, "threshold", threshold=0.0)
        full = model.backbone(images)
    assert all(bool(k.all()) for k in pruned.keep)
    assert torch.equal(pruned.logits, full)


def test_packed_select_then_scatter_round_trip():
    x = torch.randn(3, 6, 4)
    dense = DenseTokens.from_embeddings(x, 1)
    keep = torch.tensor([[1, 1, 0, 1, 0, 0], [1, 0, 0, 0, 0, 1], [1, 1, 1, 1, 1, 0]], dtype=torch.bool)
    tokens = dense.select(keep)
    assert isinstance(tokens, PackedTokens) and tokens.sizes == (3, 2, 5)
    assert torch.equal(tokens.scatter(torch.ones(tokens.data.shape[0]), 6) > 0, keep)
    padded = dense.select(keep, ragged="padded")
    assert isinstance(padded, PaddedTokens)
    assert torch.equal(padded.scatter(torch.ones(padded.index.shape), 6) > 0, keep)
    assert torch.equal(replace(tokens, attention="bucket").lengths(), torch.tensor([3, 2, 5]))


@pytest.mark.parametrize("layout", ["packed", "padded"])
def test_patch_mean_and_summary_per_image(layout):
    """patch_mean: the mean of each image's alive patch tokens (prefix and padding left out), in
    every layout; a merge (sizes as weights) leaves it unchanged. summary: the class token's row,
    or the patch mean without a class token."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2 + 6, 4, generator=g)
    keep = torch.rand(3, 8, generator=g) > 0.4
    keep[:, 2] = True  # at least one patch per image
    for has_class in (True, False):
        dense = DenseTokens.from_embeddings(x, num_prefix=2, has_class_token=has_class)
        tokens = dense.select(keep, ragged=layout)
        expected = torch.stack([x[i, 2:][keep[i, 2:]].mean(0) for i in range(3)])
        assert torch.allclose(tokens.patch_mean(), expected, atol=1e-6)
        assert torch.allclose(dense.patch_mean(), x[:, 2:].mean(1), atol=1e-6)
        assert torch.allclose(tokens.summary(tokens.data), x[:, 0] if has_class else expected, atol=1e-6)
    # Merge every image's second patch token into its first: weighted by sizes, the mean is kept.
    into = dense.positions().clone()
    into[:, 3] = 2
    merged = dense.merge(into, ragged=layout)
    assert merged.lengths().tolist() == [7, 7, 7]
    assert torch.allclose(merged.patch_mean(), x[:, 2:].mean(1), atol=1e-6)
    # A gated-out token does not count.
    gated = replace(dense, weights=torch.ones(3, 8).index_fill(1, torch.tensor([7]), 0.0))
    assert torch.allclose(gated.patch_mean(), x[:, 2:7].mean(1), atol=1e-6)


@pytest.mark.parametrize("keys", [3, SHORT_KEYS_CPU, SHORT_KEYS_CPU + 1])
@pytest.mark.parametrize("mask_kind", [None, "bool", "bias", "query-without-keys"])
def test_short_key_attention_matches_the_fused_kernel(keys, mask_kind):
    """Up to SHORT_KEYS_CPU keys on many sequences the CPU path is matmul + softmax (faster there):
    the same numbers as torch's SDPA, with no mask, a key mask and an additive bias."""
    g = torch.Generator().manual_seed(keys)
    B = MANY_SEQUENCES_CPU // 3 + 1  # 3 heads: just enough sequences for the matmul path
    q, k, v = (torch.randn(B, keys, 3, 8, generator=g) for _ in range(3))  # (B, N, H, D)
    assert _matmul_attention_pays(q, k) == (keys <= SHORT_KEYS_CPU)
    mask = None
    if mask_kind == "bool":
        mask = torch.rand(B, 1, 1, keys, generator=g) > 0.3
        mask[..., 0] = True  # every query sees at least one key
    elif mask_kind == "bias":
        mask = torch.randn(B, 1, 1, keys, generator=g)
    elif mask_kind == "query-without-keys":  # one query sees no key: zeros, as SDPA gives, not NaN
        mask = torch.ones(B, 1, keys, keys, dtype=torch.bool)
        mask[0, 0, 1] = False
    expected = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                              attn_mask=mask).transpose(1, 2)
    got = _sdpa_heads(q, k, v, mask)
    assert not got.isnan().any() and torch.allclose(got, expected, atol=1e-6)


def test_matmul_attention_trains_like_the_fused_kernel():
    """Training runs through the matmul path too (a video model's temporal attention): with a key mask,
    its gradients are SDPA's."""
    from iared.tokens import _matmul_attention

    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(4, 6, 2, 8, generator=g).requires_grad_() for _ in range(3))  # (B, N, H, D)
    mask = torch.rand(4, 1, 1, 6, generator=g) > 0.3
    mask[..., 0] = True
    got = _matmul_attention(q, k, v, mask)
    expected = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                              attn_mask=mask).transpose(1, 2)
    assert torch.allclose(got, expected, atol=1e-6)
    upstream = torch.randn(got.shape, generator=g)
    for a, b in zip(torch.autograd.grad(got, (q, k, v), upstream), torch.autograd.grad(expected, (q, k, v), upstream)):
        assert torch.allclose(a, b, atol=1e-5)


def test_few_sequences_keep_the_fused_kernel():
    """One image's attention is faster in torch's fused kernel at every length (measured): the matmul
    path is for many sequences only, and never for long ones or off the CPU."""
    one = torch.randn(1, SHORT_KEYS_CPU, 6, 64)  # (B, N, H, D)
    many = torch.randn(MANY_SEQUENCES_CPU // 4, SHORT_KEYS_CPU, 4, 16)
    long = torch.randn(MANY_SEQUENCES_CPU // 4, SHORT_KEYS_CPU + 1, 4, 16)
    assert not _matmul_attention_pays(one, one)
    assert _matmul_attention_pays(many, many)
    assert not _matmul_attention_pays(long, long)
    assert not _matmul_attention_pays(many.to("meta"), many.to("meta"))


def test_layout_cache_follows_the_layout_not_the_features():
    """What a block works out from positions alone is made once per stage: ``with_data`` (a block's
    output) shares it, any new layout (a selection, a changed field) starts empty."""
    tokens = DenseTokens.from_embeddings(torch.randn(2, 6, 4), 1)
    made = []
    first = tokens.per_layout("plan", lambda: made.append(1) or "plan of layout 1")
    after_block = tokens.with_data(tokens.data * 2)
    assert after_block.per_layout("plan", lambda: made.append(2) or "recomputed") == first
    keep = torch.tensor([[True, True, False, True, False, True], [True, False, True, True, True, False]])
    for other in (after_block.select(keep, "packed"), replace(after_block, num_prefix=2)):
        assert other.per_layout("plan", lambda: "new") == "new"
    assert made == [1]
