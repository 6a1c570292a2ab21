"""Deployment paths for a pruned ViT: budget mode to ONNX, threshold mode under ``torch.compile``.

Budget mode keeps the same number of tokens in every image, so its shapes depend only on the
input size: :class:`BudgetModel` writes that forward pass without any host-side decision (top-k
of the interpreter scores, sort, gather), which exports to ONNX as ``TopK`` + ``GatherElements``.
The exported graph really drops tokens: every block after a stage runs on ``k`` rows, not on a
masked full sequence.

Threshold mode keeps a different count per image, decided by data, so a static graph cannot hold
it; :func:`compile_threshold` runs it under ``torch.compile`` instead (the ragged selection stays
in Python between compiled regions).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from iared.pruning import IARed


class BudgetModel(nn.Module):
    """``IARed`` in budget mode as a plain module: ``forward(images (B, C, H, W)) -> logits (B, classes)``.

    Same computation as ``model(images, "budget", keep_ratio=keep_ratio).logits`` (tokens kept in
    their original order), with the per-stage counts fixed at construction so nothing is read back
    from the device.
    """

    def __init__(self, model: IARed, keep_ratio: float | Sequence[float]):
        super().__init__()
        self.model = model
        ratios = [keep_ratio] * model.num_stages if isinstance(keep_ratio, (int, float)) else list(keep_ratio)
        if len(ratios) != model.num_stages or not all(0 < r <= 1 for r in ratios):
            raise ValueError(f"keep_ratio must be in (0, 1], one value or {model.num_stages}: {keep_ratio!r}")
        alive, self.counts = model.backbone.cfg.num_patches, []
        for r in ratios:  # the same rule as IARed._policy's budget mode
            alive = max(1, round(r * alive)) if alive else 0
            self.counts.append(alive)

    def forward(self, images: Tensor) -> Tensor:
        model = self.model
        tokens = model.backbone.embed(images)
        p = tokens.num_prefix
        for stage, interpreter in enumerate(model.interpreters):
            scores = interpreter(tokens)[:, p:]  # (B, N_alive) patch scores
            top = scores.topk(self.counts[stage], dim=1).indices.sort(dim=1).values + p
            prefix = torch.arange(p, device=top.device).expand(top.shape[0], p)
            tokens = tokens.gather(torch.cat([prefix, top], dim=1))
            for block in model.stage_blocks(stage):
                tokens = block(tokens)
        return model.backbone.head_from_tokens(tokens)


def export_budget_onnx(model: IARed, path: str | Path, keep_ratio: float | Sequence[float], *, batch: int = 1,
                       opset: int = 17, dynamo: bool | None = None) -> Path:
    """Write budget mode to ONNX (dynamic batch axis). ``dynamo=None`` tries the dynamo exporter
    and falls back to the TorchScript one; returns ``path``."""
    path = Path(path)
    module = BudgetModel(model, keep_ratio).eval()
    cfg = model.backbone.cfg
    example = torch.randn(batch, cfg.in_chans, cfg.img_size, cfg.img_size)
    errors = []
    for use_dynamo in ([dynamo] if dynamo is not None else [True, False]):
        try:
            kwargs = dict(input_names=["images"], output_names=["logits"], opset_version=opset, dynamo=use_dynamo)
            if use_dynamo:
                kwargs["dynamic_shapes"] = {"images": {0: torch.export.Dim("batch", min=1, max=4096)}}
                kwargs["external_data"] = False
            else:
                kwargs["dynamic_axes"] = {"images": {0: "batch"}, "logits": {0: "batch"}}
            with torch.no_grad():
                torch.onnx.export(module, (example,), str(path), **kwargs)
            return path
        except Exception as e:  # noqa: BLE001 -- try the other exporter, then report both
            errors.append(f"dynamo={use_dynamo}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    raise RuntimeError(f"ONNX export of budget mode to {path} failed: " + "; ".join(errors))


def run_onnx(path: str | Path, images: Tensor) -> Tensor:
    """Logits of an exported model in onnxruntime (CPU)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (logits,) = session.run(["logits"], {"images": images.detach().cpu().float().numpy()})
    return torch.from_numpy(logits)


def compile_threshold(model: IARed, threshold: float | Sequence[float], *, attention: str = "auto",
                      layout: str = "packed", **compile_kw):
    """``images -> logits`` in threshold mode under ``torch.compile``.

    Dynamo compiles the dense parts and falls back to Python at the data-dependent selection
    (counts read to the host); outputs match eager mode. ``compile_kw`` go to ``torch.compile``.
    """
    compiled = torch.compile(model, **compile_kw)

    def run(images: Tensor) -> Tensor:
        return compiled(images, "threshold", threshold=threshold, attention=attention, layout=layout).logits

    return run


# -- command line ----------------------------------------------------------------------------------


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("export", help="export a pruned checkpoint's budget mode to ONNX",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="pruned IA-RED² checkpoint (iared.pruning.save_pruned)")
    p.add_argument("output", help="the .onnx file to write")
    p.add_argument("--keep", type=float, required=True, help="fraction of alive patch tokens kept per stage")
    p.add_argument("--opset", type=int, default=17)
    p.add_argument("--check", action="store_true", help="run onnxruntime and compare with PyTorch")
    p.set_defaults(func=main)
    return p


def main(args: argparse.Namespace) -> int:
    from iared.pruning import load_pruned

    if args.opset < 17:
        raise ValueError(f"--opset {args.opset}: need 17 or newer")
    model = load_pruned(args.checkpoint)
    path = export_budget_onnx(model, args.output, args.keep, opset=args.opset)
    print(f"wrote {path}", file=sys.stderr)
    if args.check:
        cfg = model.backbone.cfg
        images = torch.randn(2, cfg.in_chans, cfg.img_size, cfg.img_size)
        with torch.no_grad():
            ref = model(images, "budget", keep_ratio=args.keep).logits
        diff = float((run_onnx(path, images) - ref).abs().max())
        print(f"onnxruntime vs torch: max abs diff {diff:.2e}", file=sys.stderr)
        if diff > 1e-4:
            return 1
    return 0
