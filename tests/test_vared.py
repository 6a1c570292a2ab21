"""VA-RED² on TimeSformer: exactness unpruned, MACs, grouping, gates, training toward a target."""

import torch

from iared import flops
from iared.models.timesformer import TimeSformer, TimeSformerConfig
from iared.reducers.vared import VaRedConfig, VaRedTimeSformer, interpolation_weights


def tiny(seed=0):
    torch.manual_seed(seed)
    cfg = TimeSformerConfig(img_size=16, patch_size=8, in_chans=3, num_frames=4, num_classes=5, embed_dim=16,
                            depth=4, num_heads=2)
    m = TimeSformer(cfg)
    for b in m.blocks:  # non-zero temporal paths, so strides change the result
        torch.nn.init.normal_(b.temporal_fc.weight, std=0.1)
    return m.eval()


def clips(n=6, seed=1):
    return torch.rand(n, 4, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def test_unpruned_equals_backbone():
    m = tiny()
    v = VaRedTimeSformer(m, VaRedConfig(num_stages=2)).eval()
    v.calibrate(clips(4, 3))
    x = clips()
    with torch.no_grad():
        out = v(x, (0, 0))
        assert (out.logits - m(x)).abs().max() <= 1e-5
        assert torch.allclose(out.macs, torch.tensor(v.full_macs(), dtype=torch.float64))
        assert not torch.allclose(v(x, (1, 1)).logits, m(x), atol=1e-4)


def test_macs_formula_by_hand():
    m = tiny()
    v = VaRedTimeSformer(m, VaRedConfig(num_stages=2))
    C, S, hidden = 16, 4, 64
    # the whole clip: the backbone's own block count
    assert flops.divided_block_macs(4, S, C, hidden) == m.block_macs(m.num_tokens)
    # stride 2 (frames 0, 2), width 1/2 (32 units), by hand: T' = 2, 8 patch tokens
    n_p, T = 8, 2
    block = n_p * 5 * C * C + (n_p + T) * 4 * C * C + (n_p + 1) * 2 * C * 32 + 2 * C * S * T**2 + 2 * C * T * (S + 1) ** 2
    rebuild = 2 * S * 2 * C  # 2 skipped frames x 4 positions x 2 computed frames x C
    assert v.stage_macs(0, 1, 1) == 2 * block + rebuild
    expected = m.fixed_macs() + 2 * (2 * block + rebuild)
    with torch.no_grad():
        assert float(v(clips(2), (1, 1)).macs[0]) == expected


def test_interpolation_init():
    w = interpolation_weights(8, 2)  # computed 0, 2, 4, 6; skipped 1, 3, 5, 7
    assert torch.allclose(w[0], torch.tensor([0.5, 0.5, 0, 0])) and torch.allclose(w[3], torch.tensor([0, 0, 0, 1.0]))
    assert torch.allclose(w.sum(1), torch.ones(4))


def test_grouped_batch_equals_per_clip():
    v = VaRedTimeSformer(tiny(), VaRedConfig(num_stages=2)).eval()
    x = clips(6)
    codes = torch.tensor([[0, 4], [8, 1], [0, 4], [5, 5], [3, 0], [8, 1]])
    with torch.no_grad():
        together = v(x, codes)
        for i in range(6):
            alone = v(x[i:i + 1], codes[i:i + 1])
            assert torch.allclose(together.logits[i], alone.logits[0], atol=1e-5)
            assert together.macs[i] == alone.macs[0]


def test_soft_gates_differentiable_hard_at_eval():
    v = VaRedTimeSformer(tiny(), VaRedConfig(num_stages=2)).freeze_backbone()
    v.train()
    out = v(clips(4))
    assert out.macs.requires_grad
    (out.logits.sum() + out.macs.sum() / 1e6).backward()
    assert all(p.policies[0].fc1.weight.grad is not None for p in [v])
    assert v.policies[1].fc2.weight.grad.abs().sum() > 0 and v.mlp_bias.grad.abs().sum() > 0
    v.eval()
    with torch.no_grad():
        hard = v(clips(4))
        table = v.macs_table()
        nW = len(v.cfg.widths)
        for b in range(4):
            expected = v.backbone.fixed_macs() + v.policy_macs() + sum(
                float(table[g].reshape(-1)[hard.choices[b, g]]) for g in range(2))
            assert abs(float(hard.macs[b]) - expected) < 1e-3
        assert hard.choices.max() < 3 * nW


def test_soft_width_mixture_is_exact_at_one_hot():
    # a one-hot width gate in the soft path is the hard narrow MLP
    v = VaRedTimeSformer(tiny(), VaRedConfig(num_stages=2)).eval()
    v.calibrate(clips(4, 3))
    x = v.backbone.embed(clips(3)).data
    with torch.no_grad():
        for j in range(3):
            gates = torch.nn.functional.one_hot(torch.full((3,), j), 3).float()
            assert torch.allclose(v.run_stage(x, 0, 1, width_gates=gates), v.run_stage(x, 0, 1, j), atol=1e-5)


def test_tiny_training_lowers_macs_toward_target(tmp_path):
    from iared.train.vared import VaRedTrainConfig, train_vared

    v = VaRedTimeSformer(tiny(), VaRedConfig(num_stages=2))
    x = clips(16, 5)
    y = torch.randint(0, 5, (16,), generator=torch.Generator().manual_seed(0))
    cfg = VaRedTrainConfig(steps=30, batch=8, lr=5e-2, target=0.4, lam=5.0, checkpoint_every=10)
    history = train_vared(v, x, y, cfg, out=tmp_path)
    assert history[-1]["macs_ratio"] < history[0]["macs_ratio"] - 0.1
    v.eval()
    with torch.no_grad():
        ratio = float(v(x).macs.mean()) / v.full_macs()
    assert ratio < 0.75
    # resumable: a second call at the same step count finds the finished checkpoint
    again = train_vared(VaRedTimeSformer(tiny(), VaRedConfig(num_stages=2)), x, y, cfg, out=tmp_path)
    assert again == []
