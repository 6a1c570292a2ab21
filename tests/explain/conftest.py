"""Shared tiny models for the explanation tests."""

from __future__ import annotations

import pytest
import torch

from iared.models.vit import VisionTransformer, ViTConfig
from iared.pruning import IARed, save_pruned

DIGITS_TINY = {"img_size": 64, "patch_size": 8, "in_chans": 1, "num_classes": 10, "embed_dim": 24, "depth": 3,
               "num_heads": 2, "mean": (0.0,), "std": (1.0,)}


def tiny_iared(seed: int = 0) -> IARed:
    """A random digits-sized IA-RED² model: 64x64x1 input, 8x8 patches, 3 blocks = 3 stages."""
    torch.manual_seed(seed)
    return IARed(VisionTransformer(ViTConfig(**DIGITS_TINY))).eval()


@pytest.fixture
def model() -> IARed:
    return tiny_iared()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny_pruned.pt"
    save_pruned(tiny_iared(), path)
    return path
