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

import contextlib
import io
import logging
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from iared.pruning import IARed


class BudgetModel(nn.Module):
    """``IARed`` in budget mode as a plain module: ``forward(images (B, C, H, W)) -> logits (B, classes)``.

    Exactly ``model(images, "budget", keep_ratio=keep_ratio).logits``: the same stage loop, whose
    budget policy (:func:`iared.reducers.policy.keep_from_scores`) reads the per-stage counts
    from static shapes, so the traced graph holds ``TopK`` + gathers and no host-side decision.
    """

    def __init__(self, model: IARed, keep_ratio: float | Sequence[float]):
        super().__init__()
        self.model = model
        model.stage_settings("budget", keep_ratio=keep_ratio)  # validates the ratios now, not at trace time
        self.keep_ratio = keep_ratio

    def forward(self, images: Tensor) -> Tensor:
        return self.model(images, "budget", keep_ratio=self.keep_ratio).logits


class ExportError(RuntimeError):
    """An export that failed; the message is one line naming the stage (``export``, ``opset``, ``check``)."""


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")


@contextlib.contextmanager
def _quiet_exporter():
    """The exporters narrate every pass on stdout, warn through ``warnings`` and log tracebacks
    of conversions they then work around (or that :func:`export_budget_onnx` redoes): none of it
    is the user's business when the export succeeds, and a failure is reported in one line."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "torch._export", "onnxscript", "onnx_ir")]
    levels = [lg.level for lg in loggers]
    sink = io.StringIO()
    try:
        for lg in loggers:
            lg.setLevel(logging.CRITICAL)
        with warnings.catch_warnings(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _set_opset(path: str, opset: int) -> None:
    """Rewrite the ONNX file at ``path`` to the default-domain ``opset`` if the exporter chose
    another (the dynamo exporter writes 18 at least and its own down-conversion fails on the
    unoptimised graph; the optimised graph it saves converts cleanly)."""
    import onnx
    from onnx import version_converter

    proto = onnx.load(path)
    current = max((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), default=None)
    if current == opset:
        return
    try:
        converted = version_converter.convert_version(proto, opset)
        if opset < 18:
            _drop_opset18_reduce_attribute(converted)
        onnx.checker.check_model(converted)
    except Exception as e:  # noqa: BLE001 -- onnx raises RuntimeError / ValidationError / C++ assertion text
        raise ExportError(f"stage opset: converting the exported graph from opset {current} to {opset} failed "
                          f"({_first_line(e)}); try --opset {current}") from None
    onnx.save(converted, path)


# Reductions that took ``axes`` as an input and gained ``noop_with_empty_axes`` in opset 18.
_REDUCE_18 = {"ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2", "ReduceLogSum",
              "ReduceLogSumExp", "ReduceSumSquare"}


def _drop_opset18_reduce_attribute(proto) -> None:
    """onnx's 18 -> 17 adapter moves ``axes`` back to an attribute but leaves
    ``noop_with_empty_axes`` behind, which opset 17 does not know. With axes given, its default
    0 is opset 17's behaviour, so the attribute can go; a 1 cannot be expressed and is refused."""
    for node in proto.graph.node:
        if node.op_type not in _REDUCE_18 or node.domain not in ("", "ai.onnx"):
            continue
        for attr in list(node.attribute):
            if attr.name == "noop_with_empty_axes":
                if attr.i != 0:
                    raise ValueError(f"{node.op_type} node {node.name!r} uses noop_with_empty_axes=1 (opset 18 only)")
                node.attribute.remove(attr)


def export_budget_onnx(model: IARed, path: str | Path, keep_ratio: float | Sequence[float], *, batch: int = 1,
                       opset: int = 17, dynamo: bool | None = None) -> Path:
    """Write budget mode to ONNX (dynamic batch axis) at default-domain opset ``opset`` exactly,
    atomically (:func:`iared.files.write_atomic`). ``dynamo=None`` tries the dynamo exporter and
    falls back to the TorchScript one. Exporter chatter is silenced; a failure is one
    :class:`ExportError` line naming the stage. Returns ``path``."""
    from iared.files import write_atomic

    path = Path(path)
    module = BudgetModel(model, keep_ratio).eval()
    cfg = model.backbone.cfg
    example = torch.randn(batch, cfg.in_chans, cfg.img_size, cfg.img_size)

    def write(tmp: str) -> None:
        errors = []
        for use_dynamo in ([dynamo] if dynamo is not None else [True, False]):
            try:
                kwargs = dict(input_names=["images"], output_names=["logits"], opset_version=opset,
                              dynamo=use_dynamo)
                if use_dynamo:
                    kwargs["dynamic_shapes"] = {"images": {0: torch.export.Dim("batch", min=1, max=4096)}}
                    kwargs["external_data"] = False
                else:
                    kwargs["dynamic_axes"] = {"images": {0: "batch"}, "logits": {0: "batch"}}
                with torch.no_grad(), _quiet_exporter():
                    torch.onnx.export(module, (example,), tmp, **kwargs)
                break
            except Exception as e:  # noqa: BLE001 -- try the other exporter, then report both
                errors.append(f"dynamo={use_dynamo}: {_first_line(e)}")
        else:
            raise ExportError(f"stage export: budget mode could not be traced to ONNX ({'; '.join(errors)})")
        with _quiet_exporter():
            _set_opset(tmp, opset)

    return write_atomic(path, write, to_path=True)


def check_onnx(model: IARed, path: str | Path, keep_ratio: float | Sequence[float], samples: int = 2) -> float:
    """Max abs difference between onnxruntime's logits for ``path`` and PyTorch's budget mode on
    ``samples`` random images; an onnxruntime failure is an :class:`ExportError` (stage check)."""
    cfg = model.backbone.cfg
    images = torch.randn(samples, cfg.in_chans, cfg.img_size, cfg.img_size)
    with torch.no_grad():
        ref = model(images, "budget", keep_ratio=keep_ratio).logits
    try:
        with _quiet_exporter():
            got = run_onnx(path, images)
    except ImportError as e:
        raise ExportError(f"stage check: onnxruntime is not installed ({_first_line(e)}); "
                          "pip install -e '.[export]'") from None
    except Exception as e:  # noqa: BLE001 -- onnxruntime raises its own exception types
        raise ExportError(f"stage check: onnxruntime could not run {path} ({_first_line(e)})") from None
    return float((got - ref).abs().max())


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
