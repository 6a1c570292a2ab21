"""Reading and writing checkpoints: safe loading, atomic writes, errors that name the file.

Formats read: safetensors; PyTorch files holding a plain state dict, the official DeiT layout
``{"model": state_dict}``, or iared's own training checkpoints (``{"model": ..., "config": ...}``).
PyTorch files are always opened with ``weights_only=True``: a checkpoint cannot run code.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used; the message names the file and the problem."""


def save_atomic(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` to a temporary file beside ``path``, then rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            if path.suffix == ".safetensors":
                from safetensors.torch import save

                f.write(save({k: v.contiguous() for k, v in obj.items()}))
            else:
                torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0o022)  # the only portable way to read it is to set it; put it straight back
    os.umask(mask)
    return mask


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """The raw contents of a checkpoint file as a dict (safetensors: the tensors)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"bad checkpoint {path}: file not found")
    if path.stat().st_size == 0:
        raise CheckpointError(f"bad checkpoint {path}: file is empty (0 bytes)")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return dict(load_file(str(path)))
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch and safetensors raise many types for foreign files
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"bad checkpoint {path}: not a readable PyTorch or safetensors file ({first[:160]})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"bad checkpoint {path}: expected a dict, found {type(obj).__name__}")
    return obj


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
