"""Augmented shortcuts (Tang et al., NeurIPS 2021): the block-circulant product, the block, the
stage loop in every layout, state dicts and the compute they add."""

import pytest
import torch
import torch.nn.functional as F

from iared import flops
from iared.models import create_model
from iared.models.vit import (
    AugmentedShortcut,
    VisionTransformer,
    ViTConfig,
    block_circulant_dense,
    block_circulant_matmul,
)
from iared.pruning import IARed

TOL = 1e-5


def tiny(aug_shortcuts=2, seed=0, **kw):
    cfg = dict(img_size=32, patch_size=8, in_chans=3, num_classes=5, embed_dim=48, depth=3, num_heads=3,
               aug_shortcuts=aug_shortcuts, aug_circulant_blocks=4)
    torch.manual_seed(seed)
    model = VisionTransformer(ViTConfig(**{**cfg, **kw}))
    with torch.no_grad():  # shortcuts start near 0: give them weight so a wrong one shows
        for name, p in model.named_parameters():
            if "shortcuts" in name:
                p.normal_(0, 0.3)
    return model.eval()


def explicit_circulant(weight: torch.Tensor) -> torch.Tensor:
    """The block-circulant matrix built block by block with torch.roll: column c of a circulant
    block is its first column rolled down by c."""
    k_out, k_in, b = weight.shape
    rows = []
    for i in range(k_out):
        rows.append(torch.cat([torch.stack([torch.roll(weight[i, j], c) for c in range(b)], dim=1)
                               for j in range(k_in)], dim=1))
    return torch.cat(rows, dim=0)


@pytest.mark.parametrize("k_out, k_in, b", [(4, 4, 12), (2, 3, 5), (1, 1, 7), (3, 2, 8)])
def test_fft_product_equals_the_explicit_block_circulant_matrix(k_out, k_in, b):
    g = torch.Generator().manual_seed(k_out * 100 + b)
    weight = torch.randn(k_out, k_in, b, generator=g, dtype=torch.float64)
    x = torch.randn(2, 9, k_in * b, generator=g, dtype=torch.float64)
    dense = explicit_circulant(weight)
    assert torch.equal(block_circulant_dense(weight), dense)
    # Every block is circulant: each row is the row above rolled right by one.
    block = dense[:b, :b]
    assert torch.equal(block[1:], torch.roll(block[:-1], 1, dims=1))
    expected = x @ dense.T
    assert torch.allclose(block_circulant_matmul(x, weight), expected, atol=1e-10)
    # float32 and the gradient of the product agree with the dense product too.
    w32 = weight.float().requires_grad_()
    block_circulant_matmul(x.float(), w32).square().sum().backward()
    w_dense = weight.float().requires_grad_()
    (x.float() @ explicit_circulant(w_dense).T).square().sum().backward()
    assert torch.allclose(w32.grad, w_dense.grad, rtol=1e-4, atol=1e-3)


def test_block_is_module_plus_identity_plus_gelu_shortcuts_of_the_normed_input():
    model = tiny(aug_shortcuts=2)
    block = model.blocks[0]
    tokens = model.embed(torch.randn(2, 3, 32, 32))
    x = tokens.data
    with torch.no_grad():
        out = block(tokens).data

        def shortcuts(h, modules):
            return sum(F.gelu(h @ block_circulant_dense(s.weight).T + s.bias) for s in modules)

        h = block.norm1(x)
        y = x + block.attn(h, tokens) + shortcuts(h, block.attn_shortcuts)
        h = block.norm2(y)
        y = y + block.mlp(h) + shortcuts(h, block.mlp_shortcuts)
        plain = VisionTransformer(ViTConfig(**{**model.cfg.to_dict(), "aug_shortcuts": 0})).eval()
        plain.load_state_dict({k: v for k, v in model.state_dict().items() if "shortcuts" not in k})
    assert torch.allclose(out, y, atol=TOL)
    assert float((out - plain.blocks[0](tokens).data).abs().max()) > 0.1  # the shortcuts matter


def test_state_dict_keys_round_trip_and_refusal(tmp_path):
    model = tiny(aug_shortcuts=2)
    sd = model.state_dict()
    ours = sorted(k for k in sd if "shortcuts" in k)
    assert ours == sorted(f"blocks.{i}.{m}_shortcuts.{j}.{p}" for i in range(3) for m in ("attn", "mlp")
                          for j in range(2) for p in ("weight", "bias"))
    assert sd["blocks.0.attn_shortcuts.1.weight"].shape == (4, 4, 12)
    assert sd["blocks.0.attn_shortcuts.1.bias"].shape == (48,)
    assert not any("shortcuts" in k for k in tiny(aug_shortcuts=0).state_dict())  # timm's keys exactly

    x = torch.randn(3, 3, 32, 32)
    path = tmp_path / "aug.pt"
    torch.save({"model": sd, "config": {"model": model.cfg.to_dict()}}, path)
    geometry = {k: v for k, v in model.cfg.to_dict().items() if k not in ("mean", "std")}
    loaded = create_model("digits_vit", checkpoint=path, **geometry).eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    from iared.models import load_model

    with torch.no_grad():
        assert torch.equal(load_model(path).eval()(x), model(x))
    from iared.checkpoint import CheckpointError

    with pytest.raises((CheckpointError, ValueError), match="attn_shortcuts"):
        create_model("digits_vit", checkpoint=path, **{**geometry, "aug_shortcuts": 1})
    # A bare state dict (no config): the shortcuts are read off the keys.
    from safetensors.torch import save_file

    from iared.loading import load_backbone

    save_file(sd, tmp_path / "bare.safetensors")
    bare = load_backbone(checkpoint=tmp_path / "bare.safetensors", overrides={"num_heads": 3}).eval()
    assert (bare.cfg.aug_shortcuts, bare.cfg.aug_circulant_blocks) == (2, 4)
    with torch.no_grad():
        assert torch.allclose(bare(x), model(x), atol=TOL)


def test_threshold_zero_is_unpruned_and_pruning_runs_in_every_layout():
    backbone = tiny(aug_shortcuts=1)
    model = IARed(backbone).eval()
    torch.manual_seed(1)
    for interp in model.interpreters:
        torch.nn.init.normal_(interp.qk.weight, std=2.0)
    x = torch.randn(6, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x, threshold=0.0).logits, backbone(x))
        packed = model(x, threshold=0.5, layout="packed")
        padded = model(x, threshold=0.5, layout="padded")
        dense = model(x, mode="budget", keep_ratio=0.5)
        alone = [model(x[i:i + 1], threshold=0.5).logits[0] for i in range(2)]
    counts = torch.stack([k.sum(1) for k in packed.keep])
    assert len(set(counts[-1].tolist())) > 1 and (counts[-1] < 17).all()  # pruned, unevenly
    assert torch.allclose(packed.logits, padded.logits, atol=TOL)
    assert all(torch.allclose(a, packed.logits[i], atol=TOL) for i, a in enumerate(alone))
    assert torch.isfinite(dense.logits).all() and [int(k.sum(1)[0]) for k in dense.keep] == [9, 5, 3]
    # The pass's MACs count the shortcuts on the tokens each block really ran on.
    expected = torch.full((6,), backbone.fixed_macs(), dtype=torch.float64)
    for n in packed.tokens_per_block:
        expected += flops.vit_block_macs(n.double(), backbone.cfg)
    # ... and the rest is the interpreters', each on the tokens alive before its stage (one block each).
    seen = [torch.full((6,), 17)] + packed.tokens_per_block[:2]
    assert torch.allclose(packed.macs - expected, sum(flops.interpreter_macs(n.double(), 48) for n in seen),
                          rtol=1e-9)


def test_shortcut_macs_and_parameters():
    cfg = ViTConfig(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=3, aug_shortcuts=2,
                    aug_circulant_blocks=4)
    b = 12
    per_token = 2 * 4 * b * torch.log2(torch.tensor(float(b))).item() + 4 * 16 * (b // 2 + 1)
    assert flops.aug_shortcut_macs(1, 48, 4) == pytest.approx(per_token)
    assert per_token < 48 * 48 / 2  # cheaper than the dense projection it replaces
    plain = ViTConfig(**{**cfg.to_dict(), "aug_shortcuts": 0})
    n = 17
    assert flops.vit_block_macs(n, cfg) - flops.vit_block_macs(n, plain) == pytest.approx(2 * 2 * n * per_token)
    assert VisionTransformer(cfg).block_macs(n) == flops.vit_block_macs(n, cfg)
    assert flops.full_macs(cfg) - flops.full_macs(plain) == pytest.approx(3 * 2 * 2 * n * per_token)
    extra = sum(p.numel() for p in VisionTransformer(cfg).parameters()) - \
        sum(p.numel() for p in VisionTransformer(plain).parameters())
    assert extra == 3 * 2 * 2 * (16 * b + 48)  # k*k first columns + a bias per shortcut
    with pytest.raises(ValueError, match="must divide embed_dim"):
        ViTConfig(embed_dim=48, num_heads=3, aug_shortcuts=1, aug_circulant_blocks=5)


def test_shortcuts_train_and_run_under_bf16_autocast():
    model = tiny(aug_shortcuts=1).train()
    x = torch.randn(2, 3, 32, 32)
    model(x).logsumexp(1).sum().backward()
    grad = model.blocks[0].attn_shortcuts[0].weight.grad
    assert grad is not None and float(grad.abs().sum()) > 0
    shortcut = AugmentedShortcut(48, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = shortcut(torch.randn(5, 48, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
