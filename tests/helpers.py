"""Helpers shared by test modules (import as ``from tests.helpers import ...``)."""

import torch


def perturbed(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random offsets on every parameter, in eval mode: timm starts biases at 0, norms at 1 and layer
    scale at 1e-6, where a wrong key mapping or a skipped term could still give equal logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


def spread_interpreters(model, std: float = 1.0):
    """Random interpreters score ~0.5 everywhere; give them a spread so thresholds bite."""
    torch.manual_seed(1)
    for interp in model.interpreters:
        torch.nn.init.normal_(interp.qk.weight, std=std)
    return model
