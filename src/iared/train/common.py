"""Pieces every training loop shares: distributed setup, resumable data order, LR schedule,
checkpoints, logging.

A loop built from these (see :mod:`iared.train.backbone`) looks like::

    rank, world, device = init_distributed()
    sampler = StepBatchSampler(len(train_set), cfg.batch_size, cfg.seed, cfg.steps,
                               start_step=step, rank=rank, world=world)
    for step, batch in zip(range(step, cfg.steps), DataLoader(train_set, batch_sampler=sampler)):
        set_lr(optimizer, warmup_cosine(step, cfg.lr, cfg.warmup, cfg.steps))
        ...
        ckpt.maybe_save(step + 1, lambda: training_state(model, optimizer, step + 1, cfg))
    cleanup()

Determinism contract: the data a step sees is a pure function of ``(seed, step)`` (and of
``rank`` / ``world`` for the share each process takes), the learning rate is a pure function
of ``step``, and a checkpoint holds the model, the optimizer and the RNG states. So a run
killed after step k and resumed gives bit for bit the weights of a run that never stopped
(same machine, same world size).

Checkpoints are plain dicts of tensors / numbers / strings, readable with
``torch.load(weights_only=True)``::

    {"format": "iared-train/1", "model": state_dict, "optimizer": optimizer.state_dict(),
     "step": int, "rng": {...tensors/ints...}, "config": {"model": ..., "train": ...}, ...}
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from iared.checkpoint import CheckpointError, non_finite_tensors, read_checkpoint, save_atomic
from iared.files import json_safe, remove_stale_temporaries

__all__ = [
    "CHECKPOINT_FORMAT",
    "Checkpointer",
    "RunLogger",
    "NonFiniteError",
    "StepBatchSampler",
    "StepGuard",
    "all_reduce_sums",
    "autocast",
    "average_gradients",
    "capture_rng",
    "cleanup",
    "init_distributed",
    "is_main",
    "param_groups",
    "parse_overrides",
    "progress",
    "rank_share",
    "restore_rng",
    "resume_training_state",
    "seed_everything",
    "set_lr",
    "training_state",
    "unwrap",
    "warmup_cosine",
    "write_run_config",
]

CHECKPOINT_FORMAT = "iared-train/1"


# -- distributed ------------------------------------------------------------------------------


def init_distributed(device: str = "auto") -> tuple[int, int, torch.device]:
    """Join the process group when launched by ``torchrun`` (``WORLD_SIZE`` > 1), else run alone.

    Backend: NCCL when CUDA is available, gloo otherwise (CPU). ``device``: ``"auto"`` (CUDA
    ``LOCAL_RANK`` if available, else CPU), or an explicit ``"cpu"`` / ``"cuda"``.
    Returns ``(rank, world_size, device)``.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    if use_cuda:
        dev = torch.device("cuda", local_rank if world > 1 or device in ("auto", "cuda") else None)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=world)
    return rank, world, dev


def is_main() -> bool:
    """True on rank 0 (and in a single-process run)."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def cleanup() -> None:
    """Leave the process group (no-op when not distributed)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside a ``DistributedDataParallel`` (or the model itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def all_reduce_sums(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Sum each value over all ranks (identity in a single process)."""
    if world_size() == 1:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return dict(zip(keys, t.tolist()))


def average_gradients(params, world: int | None = None) -> None:
    """All-reduce and average the gradients of ``params`` over the ranks (identity alone).

    For loops that do not wrap their model in ``DistributedDataParallel`` (the interpreter and
    fine-tuning loops run the stage loop with per-stage modes and train a subset of parameters);
    a rank whose parameter got no gradient contributes zeros, so every rank steps identically.
    """
    world = world_size() if world is None else world
    if world == 1:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)
        p.grad /= world


def rank_share(indices: torch.Tensor, rank: int | None = None, world: int | None = None) -> torch.Tensor:
    """This rank's part of a global batch (``indices[rank::world]``): the global batch, and so the
    data order, is the same whatever the number of processes."""
    world = world_size() if world is None else world
    if world == 1:
        return indices
    rank = dist.get_rank() if rank is None else rank
    if len(indices) % world:
        raise ValueError(f"batch size {len(indices)} is not divisible by {world} processes")
    return indices[rank::world]


def autocast(device: torch.device):
    """bf16 autocast on CUDA (the forward passes of every training loop); a no-op elsewhere, where
    CPU bf16 kernels are slower than float32 for these models (see iared bench)."""
    import contextlib

    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# -- data order -------------------------------------------------------------------------------


class StepBatchSampler(torch.utils.data.Sampler):
    """Batch sampler whose batch at step ``s`` is a pure function of ``(seed, s)``.

    The global batch of step ``s`` holds positions ``s*B .. s*B+B-1`` of an endless stream made
    of one random permutation of ``range(size)`` per epoch (permutation ``e`` is seeded by
    ``(seed, e)``). Rank ``r`` of ``world`` takes ``global_batch[r::world]``, so the union over
    ranks is exactly the single-process batch, and resuming at ``start_step`` needs no state.

    Args:
        size: dataset length.
        batch_size: *global* batch size (all ranks together); must be divisible by ``world``.
        seed: data-order seed.
        steps: total steps of the run; iteration yields ``steps - start_step`` batches.
        start_step: first step to yield (resume).
        shuffle: False gives the dataset order (position ``p`` -> ``p % size``).
    """

    def __init__(self, size: int, batch_size: int, seed: int, steps: int, start_step: int = 0,
                 rank: int = 0, world: int = 1, shuffle: bool = True):
        if size < 1:
            raise ValueError("StepBatchSampler needs a non-empty dataset")
        if batch_size % world:
            raise ValueError(f"batch size {batch_size} is not divisible by the world size {world}")
        self.size, self.batch_size, self.seed = int(size), int(batch_size), int(seed)
        self.steps, self.start_step, self.rank, self.world = int(steps), int(start_step), rank, world
        self.shuffle = shuffle
        self._perms: dict[int, torch.Tensor] = {}

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            if len(self._perms) >= 2:
                self._perms.pop(min(self._perms))
            if self.shuffle:
                g = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) % (2**63))
                self._perms[epoch] = torch.randperm(self.size, generator=g)
            else:
                self._perms[epoch] = torch.arange(self.size)
        return self._perms[epoch]

    def global_batch(self, step: int) -> list[int]:
        """Dataset indices of the whole batch of ``step`` (all ranks)."""
        out = []
        pos, end = step * self.batch_size, (step + 1) * self.batch_size
        while pos < end:
            epoch, off = divmod(pos, self.size)
            take = min(end - pos, self.size - off)
            out.extend(self._permutation(epoch)[off : off + take].tolist())
            pos += take
        return out

    def batch(self, step: int) -> list[int]:
        """The indices this rank uses at ``step``."""
        return self.global_batch(step)[self.rank :: self.world]

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start_step, self.steps):
            yield self.batch(step)

    def __len__(self) -> int:
        return max(0, self.steps - self.start_step)


# -- optimisation -----------------------------------------------------------------------------


def warmup_cosine(step: int, base_lr: float, warmup: int, total: int, min_lr: float = 0.0) -> float:
    """Learning rate at ``step`` (0-based): linear warmup to ``base_lr`` over ``warmup`` steps
    (step 0 gets ``base_lr / warmup``), then cosine decay to ``min_lr`` at ``total``."""
    if warmup > 0 and step < warmup:
        return base_lr * (step + 1) / warmup
    span = max(1, total - warmup)
    t = min(1.0, (step - warmup) / span)
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * t))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's LR (groups may carry ``lr_scale``)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: no weight decay on biases, norms and tokens / position embeddings (1-D
    parameters and names ending in ``_token`` / ``pos_embed``), the usual ViT recipe."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or name.endswith(("_token", "pos_embed")):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def capture_rng() -> dict[str, Any]:
    """RNG states as tensors / ints only, so the checkpoint loads with ``weights_only=True``."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
        "numpy_pos": int(np_state[2]),
        "numpy_gauss": (int(np_state[3]), float(np_state[4])),
        "python": torch.tensor(random.getstate()[1], dtype=torch.int64),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], *state["numpy_gauss"]))
    random.setstate((3, tuple(int(v) for v in state["python"].tolist()), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# -- checkpoints ------------------------------------------------------------------------------


def resume_training_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> int:
    """Put a :func:`training_state` dict back (weights, optimizer, random generators); returns its step."""
    unwrap(model).load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    restore_rng(state["rng"])
    return int(state["step"])


def training_state(model: nn.Module, optimizer: torch.optim.Optimizer, step: int, train_cfg: Any,
                   **extra) -> dict[str, Any]:
    """The dict a :class:`Checkpointer` writes. ``model`` may be DDP-wrapped and must carry
    ``cfg.to_dict()`` (our backbones do); ``train_cfg`` is a dataclass; ``extra`` entries are
    stored as given (keep them tensors / numbers / strings / containers of those)."""
    inner = unwrap(model)
    return {
        "format": CHECKPOINT_FORMAT,
        "model": inner.state_dict(),
        "optimizer": optimizer.state_dict(),
        "step": int(step),
        "rng": capture_rng(),
        "config": {"model": inner.cfg.to_dict(), "train": dataclasses.asdict(train_cfg)},
        **extra,
    }


class Checkpointer:
    """Writes ``directory/filename`` atomically every ``every`` steps and at the end, rank 0 only.

    ``save_atomic`` writes to a temporary file and renames it, so a run killed mid-write keeps
    the previous checkpoint intact. The state is built lazily (``state_fn``) so ranks that do
    not write pay nothing.
    """

    def __init__(self, directory: str | os.PathLike, every: int = 0, filename: str = "checkpoint.pt"):
        self.directory = Path(directory)
        self.every = int(every)
        self.path = self.directory / filename
        self.saved_step: int | str | None = None  # step (or a label such as "stage 2 step 0") last written
        if is_main():  # a run starts or resumes here: what a killed write left behind goes (and is named)
            remove_stale_temporaries(self.directory)

    def maybe_save(self, step: int, state_fn: Callable[[], dict]) -> bool:
        if self.every > 0 and step % self.every == 0:
            self.save(state_fn, step)
            return True
        return False

    def save(self, state_fn: Callable[[], dict] | dict, step: int | None = None) -> Path | None:
        """Write the state; a state holding NaN / inf is refused (:class:`NonFiniteError`) and
        the previous checkpoint stays: a diverged run must never destroy its last good state."""
        if not is_main():
            return None
        state = state_fn() if callable(state_fn) else state_fn
        step = state.get("step", step) if step is None else step
        bad = non_finite_tensors(state)
        if bad:
            raise NonFiniteError(f"step {step}: the training state holds non-finite values "
                                 f"({', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}); not written, "
                                 f"{self.describe()}")
        path = save_atomic(state, self.path)
        self.saved_step = step
        return path

    def describe(self) -> str:
        """Where the last good state is, for messages."""
        if self.saved_step is not None:
            at = f"step {self.saved_step}" if isinstance(self.saved_step, int) else self.saved_step
            return f"last good checkpoint: {self.path} ({at})"
        if self.path.is_file():
            return f"last good checkpoint: {self.path} (from before this invocation)"
        return f"no checkpoint written yet (the first goes to {self.path})"

    def exists(self) -> bool:
        return self.path.is_file()

    def load(self) -> dict[str, Any]:
        """The saved training state (``weights_only=True``); :class:`CheckpointError` if it is
        missing, unreadable or not an iared training checkpoint."""
        return load_training_state(self.path)


def load_training_state(path: str | os.PathLike) -> dict[str, Any]:
    state = read_checkpoint(path)
    missing = [k for k in ("model", "optimizer", "step", "config") if k not in state]
    if state.get("format") != CHECKPOINT_FORMAT or missing:
        raise CheckpointError(
            f"bad checkpoint {path}: not an iared training checkpoint (format {state.get('format')!r}, "
            f"missing keys {missing}); --resume needs the checkpoint.pt written by `iared train`"
        )
    return state


# -- non-finite steps -------------------------------------------------------------------------


class NonFiniteError(RuntimeError):
    """Training produced NaN / inf; the message is one line naming the step and the last good
    checkpoint."""


class StepGuard:
    """The one place every training loop asks "may this step update the weights?".

    Call :meth:`check` after ``loss.backward()`` and before ``optimizer.step()``. A finite loss
    and finite gradients: True. Otherwise the step is skipped (gradients cleared, False) while
    fewer than ``max_bad_steps`` steps have been skipped in this run, as mixed-precision loss
    scaling does; past that, :class:`NonFiniteError` stops the run. Nothing non-finite reaches
    the weights, so nothing non-finite reaches a checkpoint (:meth:`Checkpointer.save` refuses
    it anyway). Under DDP every rank takes the same decision (gradients are already averaged;
    the loss flag is summed over ranks).
    """

    def __init__(self, max_bad_steps: int = 0, checkpointer: Checkpointer | None = None, what: str = "step",
                 device: torch.device | str = "cpu"):
        if max_bad_steps < 0:
            raise ValueError(f"max_bad_steps must be >= 0, got {max_bad_steps}")
        self.max_bad_steps = int(max_bad_steps)
        self.checkpointer = checkpointer
        self.what = what
        self.device = torch.device(device)
        self.bad_steps = 0

    def problem(self, loss: torch.Tensor, parameters) -> str | None:
        """What is non-finite in this step (None: nothing)."""
        loss_bad = float(not bool(torch.isfinite(loss.detach()).all()))
        if all_reduce_sums({"bad": loss_bad}, self.device)["bad"] > 0:
            return f"loss is {float(loss.detach().float().mean())}" if loss_bad else "loss is non-finite on another rank"
        named = parameters if isinstance(parameters, dict) else {str(i): p for i, p in enumerate(parameters)}
        bad = [n for n, p in named.items() if p.grad is not None and not bool(torch.isfinite(p.grad).all())]
        if bad:
            more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
            return f"non-finite gradient in {bad[0]}{more}"
        return None

    def check(self, step: int, loss: torch.Tensor, parameters, optimizer: torch.optim.Optimizer | None = None) -> bool:
        """``step``: the 1-based number of the step being taken (as logs and checkpoints count).
        ``parameters``: a dict name -> parameter (``dict(model.named_parameters())``) or a list."""
        problem = self.problem(loss, parameters)
        if problem is None:
            return True
        self.bad_steps += 1
        kept = self.checkpointer.describe() if self.checkpointer is not None else "nothing written"
        if self.bad_steps > self.max_bad_steps:
            budget = f" ({self.bad_steps - 1} bad steps skipped before; --max-bad-steps {self.max_bad_steps})" \
                if self.max_bad_steps else ""
            raise NonFiniteError(f"{self.what} {step}: {problem}; training stopped{budget}; {kept}")
        if optimizer is not None:
            optimizer.zero_grad(set_to_none=True)
        if is_main():
            import sys

            print(f"iared: {self.what} {step}: {problem}; step skipped ({self.bad_steps} of at most "
                  f"{self.max_bad_steps})", file=sys.stderr)
        return False


def write_run_config(out: str | os.PathLike, config: dict) -> None:
    """A run's settings beside its checkpoint: ``config.json`` and, when PyYAML is installed,
    ``config.yaml``; ``--config`` reads either back and repeats the run (:mod:`iared.commands`).
    Rank 0 only: another rank's temporary could be taken for a killed write's and removed
    (:class:`Checkpointer` clears those when rank 0 starts), failing that rank's rename."""
    from iared.files import write_json, write_text

    if not is_main():
        return
    out = Path(out)
    write_json(out / "config.json", config)
    try:
        import yaml
    except ImportError:  # YAML is the readable copy; the JSON one is what the run needs
        return
    write_text(out / "config.yaml", yaml.safe_dump(json_safe(config), sort_keys=False))


# -- logging ----------------------------------------------------------------------------------


class RunLogger:
    """A run's log, rank 0 only: one JSON object per line in ``path`` (``log.jsonl``; wall time ``time``
    added; strict JSON, NaN / inf written as null), the same records as rows of ``log.csv`` beside it
    (a column per key, the file rewritten when a new key appears, as Lightning's CSVLogger does),
    and, when TensorBoard is installed (optional, as in timm), every number as a scalar under
    ``tensorboard/``. The first record says which of these sinks are active (``sinks``)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.csv_path = self.path.with_suffix(".csv")
        self.start = time.time()
        self._columns: list[str] | None = None  # the CSV header, read from the file on the first record
        self._writer = None  # the TensorBoard SummaryWriter, opened on the first record
        self._said = False

    def log(self, **record) -> None:
        if not is_main():
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        record = json_safe({**record, "time": round(time.time() - self.start, 3)})
        if not self._said:
            self._writer = _tensorboard_writer(self.path.parent / "tensorboard")
            sinks = [self.path.name, self.csv_path.name] + (["tensorboard/"] if self._writer is not None else [])
            line = {**record, "sinks": sinks}
            self._said = True
        else:
            line = record
        with open(self.path, "a") as f:
            f.write(json.dumps(line, allow_nan=False) + "\n")
        self._write_csv(record)
        if self._writer is not None:
            _tensorboard_scalars(self._writer, record)

    def _write_csv(self, record: dict) -> None:
        import csv
        import io

        from iared.files import write_text

        if self._columns is None:  # resumed into a folder: keep its header
            self._columns = _csv_header(self.csv_path)
        cells = {k: v if isinstance(v, (int, float, str)) or v is None else json.dumps(v) for k, v in record.items()}
        new = [k for k in cells if k not in self._columns]
        if new or not self.csv_path.is_file():  # a new column: the whole file again, with the wider header
            rows = _csv_rows(self.csv_path) if self.csv_path.is_file() else []
            self._columns = self._columns + new
            buffer = io.StringIO()
            writer = csv.DictWriter(buffer, self._columns)
            writer.writeheader()
            writer.writerows([*rows, cells])
            write_text(self.csv_path, buffer.getvalue())
            return
        with open(self.csv_path, "a", newline="") as f:
            csv.DictWriter(f, self._columns).writerow(cells)


def _csv_header(path: Path) -> list[str]:
    import csv

    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return next(csv.reader(f), [])


def _csv_rows(path: Path) -> list[dict]:
    import csv

    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _tensorboard_writer(directory: Path):
    """A SummaryWriter on ``directory``, or None when TensorBoard is not installed (an optional sink)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # torch.utils.tensorboard needs the tensorboard package
        return None
    return SummaryWriter(log_dir=str(directory))


def _tensorboard_scalars(writer, record: dict) -> None:
    """Every number of ``record`` as a scalar, tagged by what the record is (``train/loss``,
    ``eval/val/top1``, ``stage0/reward``) at its ``step``; lists as ``key/0``, ``key/1``, ..."""
    parts = [str(record[k]) for k in ("event", "split") if isinstance(record.get(k), str)]
    if isinstance(record.get("stage"), int):
        parts.append(f"stage{record['stage']}")
    prefix = "/".join(parts) or "train"
    step = record.get("step") if isinstance(record.get("step"), int) else None
    for key, value in record.items():
        if key in ("event", "split", "stage", "step", "time"):
            continue
        values = value if isinstance(value, list) else [value]
        for i, v in enumerate(values):
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                writer.add_scalar(f"{prefix}/{key}" + (f"/{i}" if isinstance(value, list) else ""), v, step)
    writer.flush()  # a run can be killed at any time; what was logged should be on disk


def progress(iterable=None, **kw):
    """tqdm on rank 0, a silent pass-through elsewhere (or when ``disable=True``)."""
    from tqdm.auto import tqdm

    kw["disable"] = kw.get("disable", False) or not is_main()
    kw.setdefault("dynamic_ncols", True)
    kw.setdefault("mininterval", 1.0)
    return tqdm(iterable, **kw)


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """``["depth=3", "embed_dim=32"]`` -> ``{"depth": 3, "embed_dim": 32}`` (values as Python
    literals where they parse, else strings)."""
    import ast

    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"bad override {item!r}: expected KEY=VALUE")
        try:
            out[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            out[key.strip()] = value.strip()
    return out
