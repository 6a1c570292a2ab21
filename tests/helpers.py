"""Helpers shared by test modules (import as ``from tests.helpers import ...``)."""

import json

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


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    """``iared ARGV`` in this process: (exit status, stdout, stderr)."""
    from iared.cli import main

    capsys.readouterr()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def json_lines(text: str) -> list[dict]:
    """Strict JSON (bare NaN / Infinity refused), one object per non-empty line."""
    def refuse(name):
        raise AssertionError(f"not JSON: {name}")

    return [json.loads(line, parse_constant=refuse) for line in text.splitlines() if line.strip()]
