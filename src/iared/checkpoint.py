"""Reading and writing checkpoints: safe loading, atomic writes, errors that name the file.

Formats read: safetensors; PyTorch files holding a plain state dict, the official DeiT layout
``{"model": state_dict}``, or iared's own training checkpoints (``{"model": ..., "config": ...}``).
PyTorch files are always opened with ``weights_only=True``: a checkpoint cannot run code.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from iared.files import write_atomic, write_bytes


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used; the message names the file and the problem."""


def save_atomic(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` (safetensors for ``.safetensors`` paths; iared's ``{"format", "model", ...}`` dicts
    keep ``model`` as the tensors and the rest as JSON metadata) through :func:`iared.files.write_atomic`:
    readers never see half a file, and the file gets the usual 0644-style permissions."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import save

        tensors, metadata = _split_for_safetensors(obj, path)
        return write_bytes(path, save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata))
    return write_atomic(path, lambda f: torch.save(obj, f))


# A safetensors file holds tensors plus str -> str metadata. iared's own files (``{"format": ..., "model":
# state_dict, "config": ...}``) keep ``model`` as the tensors and every other entry as JSON in the
# metadata; read_checkpoint gives the same dict back, so readers see one structure whatever the suffix.
_NESTED = "model"


def _split_for_safetensors(obj: dict, path) -> tuple[dict, dict[str, str] | None]:
    if not isinstance(obj.get("format"), str) or not isinstance(obj.get(_NESTED), dict):
        return obj, None  # a plain state dict
    try:
        metadata = {k: json.dumps(v) for k, v in obj.items() if k != _NESTED}
    except TypeError as e:
        raise ValueError(f"cannot write {path}: its settings are not JSON ({e}); use a .pt file") from None
    return obj[_NESTED], metadata


def _join_from_safetensors(tensors: dict, metadata: dict[str, str] | None) -> dict:
    if not metadata or "format" not in metadata:
        return tensors
    try:
        obj = {k: json.loads(v) for k, v in metadata.items()}
    except ValueError:  # foreign metadata that is not ours
        return tensors
    if not str(obj.get("format", "")).startswith("iared-"):
        return tensors
    return {**obj, _NESTED: tensors}


def state_sha256(state: nn.Module | dict[str, torch.Tensor]) -> str:
    """A fingerprint of a model's weights: sha256 over every (name, shape, float32 values) in name order.

    Independent of the file it came from (safetensors, .pt, float16 storage loaded into float32) and of
    the device; what a reducers-only pruned file records to name the backbone it was trained on."""
    sd = state.state_dict() if isinstance(state, nn.Module) else state
    h = hashlib.sha256()
    for name in sorted(sd):
        t = sd[name].detach().cpu()
        t = t.float() if t.is_floating_point() else t
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def read_checkpoint(path: str | os.PathLike, check_finite: bool = True) -> dict[str, Any]:
    """The raw contents of a checkpoint file as a dict (safetensors: the tensors; an iared file written as
    safetensors: the same ``{"format", "model", "config", ...}`` dict as its .pt form).

    Every problem is a one-line :class:`CheckpointError` naming the file: missing, a directory,
    empty, unreadable, a pickle that needs code to load, not a dict, or (``check_finite``)
    holding NaN / inf in any floating-point tensor, which would otherwise run and report
    nonsense (a NaN interpreter keeps no token and claims a 30x speed-up).
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"bad checkpoint {path}: is a directory, not a checkpoint file")
    if not path.is_file():
        raise CheckpointError(f"bad checkpoint {path}: file not found")
    if path.stat().st_size == 0:
        raise CheckpointError(f"bad checkpoint {path}: file is empty (0 bytes)")
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open
            from safetensors.torch import load_file

            with safe_open(str(path), "pt") as f:
                metadata = f.metadata()
            obj = _join_from_safetensors(dict(load_file(str(path))), metadata)
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch and safetensors raise many types for foreign files
        raise CheckpointError(f"bad checkpoint {path}: {_load_failure(e)}") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"bad checkpoint {path}: expected a dict, found {type(obj).__name__}")
    if check_finite:
        bad = non_finite_tensors(obj)
        if bad:
            raise CheckpointError(f"bad checkpoint {path}: non-finite values (NaN or inf) in {_short(bad)}")
    return obj


# torch's weights_only refusal is a paragraph of advice around one sentence that says what was refused
_REFUSED = re.compile(r"(Trying to load unsupported [^\n]*|Unsupported global: [^\n]*)")
_GARBLED = re.compile(r"(Unsupported operand [^\n]*|Unpickler[^\n]*)")


def _load_failure(e: Exception) -> str:
    text = str(e).strip()
    first = text.splitlines()[0] if text else type(e).__name__
    if text.startswith("Weights only load failed"):
        m = _REFUSED.search(text)
        if m:
            what = " ".join(m.group(1).split()).rstrip(".")
            return f"refused to unpickle code or objects (weights_only loading): {what}"
        m = _GARBLED.search(text)
        first = " ".join(m.group(1).split()).rstrip(".") if m else "corrupt pickle data"
    if len(first) > 200:  # cut at a word, and say so
        first = first[:200].rsplit(" ", 1)[0] + " ..."
    return f"not a readable PyTorch or safetensors file ({first})"


def non_finite_tensors(obj: Any, prefix: str = "") -> list[str]:
    """Names (``a.b.c``) of floating-point tensors holding NaN or inf, anywhere inside ``obj``."""
    if isinstance(obj, torch.Tensor):
        if obj.is_floating_point() or obj.is_complex():
            return [] if bool(torch.isfinite(obj).all()) else [prefix or "<tensor>"]
        return []
    if isinstance(obj, dict):
        items = obj.items()
    elif isinstance(obj, (list, tuple)):
        items = enumerate(obj)
    else:
        return []
    out = []
    for k, v in items:
        out += non_finite_tensors(v, f"{prefix}.{k}" if prefix else str(k))
    return out


def config_from_dict(cls, values: Any, path: str | os.PathLike, what: str):
    """``cls(**values)`` for a dataclass config read from a checkpoint, every failure one line
    naming the file: not a dict, unknown keys (a newer or foreign file), or the dataclass's own
    validation (``ValueError`` / ``TypeError`` from ``__post_init__``)."""
    if not isinstance(values, dict):
        raise CheckpointError(f"bad checkpoint {path}: config '{what}' is {type(values).__name__}, not a dict")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise CheckpointError(f"bad checkpoint {path}: config '{what}' has unknown keys {_short(unknown)} "
                              f"(known: {', '.join(sorted(known))})")
    try:
        return cls(**values)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"bad checkpoint {path}: config '{what}' is invalid: {' '.join(str(e).split())}") from None


def extract_state_dict(obj: dict[str, Any], path: str | os.PathLike = "<memory>") -> dict[str, torch.Tensor]:
    """The model weights inside a checkpoint: ``{"model": sd}``, ``{"state_dict": sd}`` or ``sd``."""
    for key in ("model", "state_dict", "model_ema"):
        if isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    sd = {k.removeprefix("module."): v for k, v in obj.items()}  # DDP-saved weights
    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if not sd or bad:
        raise CheckpointError(f"bad checkpoint {path}: no model state dict found (non-tensor entries: {bad[:5]})")
    return sd


def load_weights(model: nn.Module, state_dict: dict[str, torch.Tensor], path: str | os.PathLike = "<memory>") -> None:
    """Strict load that lists every offending key instead of PyTorch's multi-line dump."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    shapes = [
        f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state_dict and state_dict[k].shape != own[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"missing keys {_short(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_short(unexpected)}")
    if shapes:
        problems.append(f"shape mismatch [{'; '.join(shapes[:8])}{' ...' if len(shapes) > 8 else ''}]")
    if problems:
        raise CheckpointError(f"bad checkpoint {path}: " + "; ".join(problems))
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in state_dict.items()})


def _short(keys: list[str], n: int = 8) -> str:
    return "[" + ", ".join(keys[:n]) + (f", ... ({len(keys)} in all)" if len(keys) > n else "") + "]"
