"""IA-RED²: a ViT whose tokens leave the computation, stage by stage, as interpreters decide.

The whole method in one forward pass (:meth:`IARed.forward`)::

    tokens = backbone.embed(images)                       # (B, P + N, C) dense
    for each stage g (a group of consecutive blocks):
        scores = interpreter_g(tokens)                    # keep probability per alive token
        keep   = policy(scores, mode)                     # sample | threshold | budget | all
        tokens = tokens.select(keep)                      # dropped tokens really leave
        tokens = blocks_g(tokens)
    logits = backbone.head_from_tokens(tokens)            # norm + head on the class token

Modes: ``sample`` draws keep ~ Bernoulli(score) (training), ``threshold`` keeps score > t
(inference; counts differ per image, so the batch becomes packed or padded), ``budget`` keeps
the top-k per image (same count for all, stays dense), ``all`` skips the stage's interpreter.
A mode may be given per stage: curriculum training runs earlier stages in ``threshold``, the
trained one in ``sample`` and later ones in ``all``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Literal

import torch
from torch import Tensor, nn

from iared import flops
from iared.interpreter import MultiHeadInterpreter, default_interpreter_heads
from iared.models.vit import VisionTransformer
from iared.tokens import PackedAttention, RaggedLayout, Tokens

Mode = Literal["sample", "threshold", "budget", "all"]
MODES = ("sample", "threshold", "budget", "all")


@dataclass
class IARedConfig:
    """Where the interpreters sit and how they look. Saved with every pruned checkpoint."""

    num_stages: int = 3
    interpreter_heads: int = 6
    stage_starts: tuple[int, ...] | None = None  # first block of each stage; default: equal groups

    def resolve(self, depth: int) -> tuple[int, ...]:
        starts = self.stage_starts or tuple(round(i * depth / self.num_stages) for i in range(self.num_stages))
        starts = tuple(int(s) for s in starts)
        if starts[0] != 0 or list(starts) != sorted(set(starts)) or starts[-1] >= depth:
            raise ValueError(f"stage_starts must be increasing block indices starting at 0 below {depth}: {starts}")
        return starts


@dataclass
class PrunedOutput:
    """What a pruned forward pass returns. ``N0`` = all tokens of an image, prefix included.

    ``scores[g]``: ``(B, N0)`` interpreter score of stage g in original token positions, 0 for
    tokens dropped earlier (None for stages run in ``all`` mode). ``keep[g]``: ``(B, N0)`` bool,
    tokens alive after stage g. ``macs``: ``(B,)`` analytic MACs per image, interpreters
    included. ``log_prob``: ``(B,)`` log-probability of the sampled keep decisions (sample mode).
    """

    logits: Tensor
    scores: list[Tensor | None]
    keep: list[Tensor]
    macs: Tensor
    log_prob: Tensor | None = None
    num_prefix: int = 1
    stats: dict = field(default_factory=dict)

    @property
    def gflops(self) -> Tensor:
        return self.macs / 1e9

    def kept_fraction(self) -> Tensor:
        """``(B, stages)``: fraction of the image's patch tokens alive after each stage."""
        patches = torch.stack([k[:, self.num_prefix:].float().mean(1) for k in self.keep], dim=1)
        return patches


class IARed(nn.Module):
    """A backbone plus one :class:`MultiHeadInterpreter` before each stage of blocks.

    ``IARed(backbone)``: 3 equal stages, 6 interpreter heads where the width allows. The
    backbone is any :class:`iared.models.VisionTransformer` (DeiT from timm included).
    """

    def __init__(self, backbone: VisionTransformer, config: IARedConfig | None = None, **kw):
        super().__init__()
        config = config or IARedConfig(**kw)
        self.backbone = backbone
        dim = backbone.cfg.embed_dim
        config.interpreter_heads = default_interpreter_heads(dim, config.interpreter_heads)
        self.config = config
        self.stage_starts = config.resolve(backbone.cfg.depth)
        self.interpreters = nn.ModuleList(
            MultiHeadInterpreter(dim, config.interpreter_heads) for _ in self.stage_starts
        )

    @property
    def num_stages(self) -> int:
        return len(self.stage_starts)

    def stage_blocks(self, stage: int) -> nn.ModuleList | list[nn.Module]:
        ends = self.stage_starts[1:] + (len(self.backbone.blocks),)
        return self.backbone.blocks[self.stage_starts[stage]: ends[stage]]

    def forward(
        self,
        images: Tensor,
        mode: Mode | Sequence[Mode] = "threshold",
        *,
        threshold: float | Sequence[float] = 0.5,
        keep_ratio: float | Sequence[float] | None = None,
        flops_ratio: float | None = None,
        layout: RaggedLayout = "packed",
        attention: PackedAttention = "auto",
        exploration: float = 0.0,
    ) -> PrunedOutput:
        """Run the pruned model. ``images``: ``(B, C_in, H, W)``.

        mode: one of ``MODES`` or one per stage. threshold: keep where score > threshold (one value
        or one per stage).
        keep_ratio / flops_ratio: budget mode, per-stage fraction of alive patch tokens kept, or
        a target fraction of the unpruned model's FLOPs (solved to a uniform per-stage ratio).
        layout: how ragged batches are held (``packed`` concatenates, ``padded`` pads + masks).
        exploration: sample mode draws from ``eps + (1 - 2 eps) * score`` so no token is certain.
        """
        modes = self._stage_modes(mode)
        thresholds = [threshold] * self.num_stages if isinstance(threshold, (int, float)) else list(threshold)
        if len(thresholds) != self.num_stages:
            raise ValueError(f"threshold: one value or {self.num_stages}, got {threshold!r}")
        ratios = self._budget_ratios(modes, keep_ratio, flops_ratio)
        cfg = self.backbone.cfg
        n0 = cfg.num_patches + cfg.num_prefix_tokens

        tokens = self.backbone.embed(images)
        if attention != "auto":
            tokens = replace(tokens, attention=attention)
        scores_out: list[Tensor | None] = []
        keep_out: list[Tensor] = []
        log_prob = None
        block_counts: list[Tensor] = []
        interp_counts: list[Tensor] = []
        for stage, interpreter in enumerate(self.interpreters):
            stage_mode = modes[stage]
            if stage_mode != "all":
                interp_counts.append(tokens.lengths())
                scores = interpreter(tokens)
                scores_out.append(tokens.scatter(scores, n0))
                keep, stage_log_prob = self._policy(tokens, scores, stage_mode, thresholds[stage], ratios[stage],
                                                    exploration)
                if stage_log_prob is not None:
                    log_prob = stage_log_prob if log_prob is None else log_prob + stage_log_prob
                tokens = tokens.select(keep, ragged=layout)
            else:
                scores_out.append(None)
            keep_out.append(tokens.scatter(torch.ones_like(tokens.index, dtype=torch.float32), n0) > 0)
            for block in self.stage_blocks(stage):
                block_counts.append(tokens.lengths())
                tokens = block(tokens)
        logits = self.backbone.head_from_tokens(tokens)
        macs = flops.vit_macs(cfg, block_counts, interp_counts).to(logits.device)
        return PrunedOutput(logits, scores_out, keep_out, macs, log_prob, cfg.num_prefix_tokens)

    # -- policy --------------------------------------------------------------------------------

    def _policy(self, tokens: Tokens, scores: Tensor, mode: Mode, threshold: float, ratio: float | None,
                exploration: float) -> tuple[Tensor, Tensor | None]:
        """Token-aligned keep decisions (and their log-probability in sample mode)."""
        patch = ~tokens.is_prefix()
        valid = tokens.valid()
        if valid is not None:
            patch = patch & valid
        if mode == "threshold":
            return scores > threshold, None
        if mode == "sample":
            probs = exploration + (1 - 2 * exploration) * scores
            probs = probs.clamp(1e-6, 1 - 1e-6)
            keep = torch.bernoulli(probs.detach()).bool()
            log_p = torch.where(keep, probs.log(), (1 - probs).log()) * patch
            return keep, _per_image_sum(tokens, log_p)
        if mode == "budget":
            if tokens.data.dim() != 3 or valid is not None:
                raise ValueError("budget mode needs a dense batch: run earlier stages in budget mode too")
            alive = tokens.data.shape[1] - tokens.num_prefix
            k = max(1, round(ratio * alive)) if alive else 0
            ranked = torch.where(patch, scores, torch.full_like(scores, -1.0))
            top = ranked.topk(k, dim=1).indices
            keep = torch.zeros_like(patch).scatter(1, top, True)
            return keep, None
        raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")

    def _stage_modes(self, mode: Mode | Sequence[Mode]) -> list[Mode]:
        modes = [mode] * self.num_stages if isinstance(mode, str) else list(mode)
        if len(modes) != self.num_stages or any(m not in MODES for m in modes):
            raise ValueError(f"mode must be one of {MODES} or a list of {self.num_stages} of them, got {mode!r}")
        return modes

    def _budget_ratios(self, modes, keep_ratio, flops_ratio) -> list[float | None]:
        if "budget" not in modes:
            return [None] * self.num_stages
        if (keep_ratio is None) == (flops_ratio is None):
            raise ValueError("budget mode needs exactly one of keep_ratio or flops_ratio")
        if flops_ratio is not None:
            keep_ratio = self.ratio_for_flops(flops_ratio)
        ratios = [keep_ratio] * self.num_stages if isinstance(keep_ratio, (int, float)) else list(keep_ratio)
        if len(ratios) != self.num_stages or not all(0 < r <= 1 for r in ratios):
            raise ValueError(f"keep_ratio must be in (0, 1], one value or {self.num_stages}: {keep_ratio!r}")
        return ratios

    # -- compute accounting ----------------------------------------------------------------------

    def macs_for_ratios(self, ratios: float | Sequence[float]) -> float:
        """Analytic MACs per image when each stage keeps ``ratios`` of the alive patch tokens."""
        cfg = self.backbone.cfg
        ratios = [ratios] * self.num_stages if isinstance(ratios, (int, float)) else list(ratios)
        alive, counts, interp = cfg.num_patches, [], []
        for stage in range(self.num_stages):
            interp.append(alive + cfg.num_prefix_tokens)
            alive = max(1, round(ratios[stage] * alive))
            counts += [alive + cfg.num_prefix_tokens] * len(self.stage_blocks(stage))
        return float(flops.vit_macs(cfg, counts, interp))

    def ratio_for_flops(self, flops_ratio: float) -> float:
        """The uniform per-stage keep ratio whose FLOPs are closest to ``flops_ratio`` x unpruned."""
        full = flops.full_macs(self.backbone.cfg)
        floor = self.macs_for_ratios(1e-9) / full
        if not floor <= flops_ratio <= 1.0 + 1e-9:
            raise ValueError(f"flops_ratio {flops_ratio} out of reach: must lie in [{floor:.3f}, 1]")
        lo, hi = 0.0, 1.0
        for _ in range(40):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if self.macs_for_ratios(mid) < flops_ratio * full else (lo, mid)
        return hi

    def config_dict(self) -> dict:
        return asdict(self.config)


def _per_image_sum(tokens: Tokens, values: Tensor) -> Tensor:
    """Sum token-aligned values per image -> ``(B,)``."""
    if values.dim() == 2:
        return values.sum(1)
    return values.new_zeros(tokens.batch_size).index_add(0, tokens.image, values)


PRUNED_FORMAT = "iared-pruned/1"


def save_pruned(model: IARed, path, extra: dict | None = None) -> None:
    """Backbone + interpreters + both configs in one file, written atomically."""
    from iared.checkpoint import save_atomic

    config = {"model": model.backbone.cfg.to_dict(), "iared": model.config_dict(), **(extra or {})}
    save_atomic({"format": PRUNED_FORMAT, "model": model.state_dict(), "config": config}, path)


def load_pruned(path) -> IARed:
    """An :class:`IARed` from :func:`save_pruned`'s file (``weights_only`` load, strict keys)."""
    from iared.checkpoint import CheckpointError, extract_state_dict, load_weights, read_checkpoint
    from iared.models.vit import ViTConfig

    obj = read_checkpoint(path)
    config = obj.get("config") if isinstance(obj.get("config"), dict) else {}
    if obj.get("format") != PRUNED_FORMAT or "iared" not in config:
        raise CheckpointError(f"bad checkpoint {path}: not an IA-RED² checkpoint (no interpreters inside); "
                              "train one with `iared train-interpreters`")
    model = IARed(VisionTransformer(ViTConfig(**config["model"])), IARedConfig(**config["iared"]))
    load_weights(model, extract_state_dict(obj, path), path)
    return model.eval()
