"""On a toy problem where only a fixed region matters, reward training must find that region."""

import torch
import torch.nn.functional as F

from iared import IARed, IARedConfig, flops
from iared.models import VisionTransformer, ViTConfig
from iared.train.interpreters import InterpreterTrainConfig, InterpreterTrainer

GRID = 4  # 16x16 image, 4x4 patches
REGION = [0, 1]  # patch indices (row-major) that carry the label


def make_toy(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 16, 16, generator=g)
    labels = torch.randint(0, 2, (n,), generator=g)
    # The label is the orientation of stripes inside the region; everything else is noise.
    stripes = (torch.arange(8) % 2 * 2 - 1).float()
    horizontal = stripes[:4, None].expand(4, 8)
    vertical = stripes[None, :8].expand(4, 8)
    pattern = torch.where(labels[:, None, None, None].bool(), horizontal, vertical)
    x[:, :, 0:4, 0:8] = 0.3 * x[:, :, 0:4, 0:8] + 1.5 * pattern
    return x, labels


def train_backbone(model, steps=150):
    x, y = make_toy(4096, seed=1)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (64,), generator=g)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def test_reward_training_finds_the_informative_region(tmp_path):
    torch.manual_seed(0)
    backbone = train_backbone(VisionTransformer(ViTConfig(img_size=16, patch_size=4, in_chans=1, num_classes=2,
                                                          embed_dim=32, depth=3, num_heads=2)))
    model = IARed(backbone, IARedConfig(num_stages=3, interpreter_heads=4))
    x, y = make_toy(4096, seed=2)
    dataset = list(zip(x, y.tolist()))
    cfg = InterpreterTrainConfig(steps_per_stage=120, batch_size=64, lr=1e-2, tau=1.0, eval_every=1000,
                                 save_every=10_000, out=str(tmp_path))
    InterpreterTrainer(model, dataset, cfg, progress=False).run()

    xt, yt = make_toy(512, seed=3)
    with torch.no_grad():
        full_acc = (backbone(xt).argmax(-1) == yt).float().mean()
        out = model(xt, threshold=0.5)
    pruned_acc = (out.logits.argmax(-1) == yt).float().mean()
    kept_patches = out.keep[0][:, 1:].float().mean(0)  # after stage 1, per patch position
    inside = kept_patches[REGION].mean()
    outside = kept_patches[[i for i in range(GRID * GRID) if i not in REGION]].mean()
    assert full_acc > 0.97
    assert pruned_acc >= full_acc - 0.02, (pruned_acc, full_acc)
    assert inside > 0.9, kept_patches
    assert outside < 0.4, kept_patches
    assert out.macs.mean() < 0.6 * flops.full_macs(backbone.cfg)
