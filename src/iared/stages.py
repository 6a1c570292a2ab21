"""The stage loop: one forward pass for every backbone and every token reducer.

::

    tokens = backbone.embed(inputs)
    for each stage (a reducer, then a group of consecutive blocks):
        decision = reducer(tokens, record of the block before)    # IA-RED², ToMe, EViT, ATS, ...
        tokens   = tokens.apply(decision)                         # drop / merge: tokens really leave
        tokens   = blocks(tokens)
    logits = backbone.forward_head(tokens)

A dense head (:mod:`iared.heads.dpt`) asks for ``features_at``: the loop then also returns, after
each of those blocks, every token's features on the full grid, dropped tokens restored from the
features they had when they were dropped (:meth:`iared.tokens.Tokens.keeping_grid`).

Training, evaluation, the bench, ``compare`` and ONNX export all run this loop
(:meth:`ReducedModel.forward`); nothing else iterates over blocks.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor, nn

from iared.models.protocol import Backbone
from iared.models.vit import BlockRecord
from iared.reducers.base import MODES, Reducer, StageInput, StageSettings
from iared.reducers.policy import budget_count
from iared.tokens import PackedAttention, RaggedLayout, Tokens

RAGGED_LAYOUTS: tuple[str, ...] = ("packed", "padded", "static")

Mode = str
BlockRunner = Callable[[int, nn.Module, Tokens, BlockRecord | None], Tokens]


def equal_stage_starts(depth: int, num_stages: int) -> tuple[int, ...]:
    """First block of each of ``num_stages`` equal groups (DeiT-S, 3 stages: 0, 4, 8)."""
    return tuple(round(i * depth / num_stages) for i in range(num_stages))


def check_stage_starts(starts: Sequence[int], depth: int) -> tuple[int, ...]:
    starts = tuple(int(s) for s in starts)
    if not starts or starts[0] < 0 or list(starts) != sorted(set(starts)) or starts[-1] >= depth:
        raise ValueError(f"stage_starts must be increasing block indices in [0, {depth}): {starts}")
    if starts[0] != 0:  # the loop runs stage 0 from its start: blocks before it would silently never run
        raise ValueError(f"stage_starts must start at block 0 (give the first stage no reducer, None): {starts}")
    return starts


@dataclass
class ReducedOutput:
    """What the stage loop returns. ``N0`` = all tokens of an input, prefix included.

    (A multiscale backbone reports stage g on its own grid: ``N0`` = the tokens of that grid, see
    :meth:`iared.models.protocol.Backbone.block_input_shape`.)
    ``scores[g]``: ``(B, N0)`` the stage-g reducer's score per token in original positions, 0 for
    tokens gone earlier (None when the stage did not run or its method has no scores).
    ``keep[g]``: ``(B, N0)`` bool, tokens alive after stage g's reduction (a merged token counts at
    the position of the token it was merged into). ``macs``: ``(B,)`` analytic MACs per input,
    reducers included. ``log_prob``: ``(B,)`` sum of the sampled decisions' log-probabilities.
    ``tokens_per_block``: ``(B,)`` alive counts before every block.

    ``scores``, ``keep``, ``tokens_per_block`` and ``macs`` are worked out from the pass's trace
    when first read: a caller that wants the logits alone (serving, timing) pays nothing for the
    accounting, which at batch 1 was about two thirds of the extra tensor operations of a pruned pass.
    """

    logits: Tensor
    trace: _Trace = field(repr=False)
    log_prob: Tensor | None = None
    num_prefix: int = 1
    stats: dict = field(default_factory=dict)
    features: list[Tensor] = field(default_factory=list)  # (B, N0, C) per block of ``features_at``
    macs_of: Callable[[_Trace], Tensor] | None = field(default=None, repr=False)

    @functools.cached_property
    def scores(self) -> list[Tensor | None]:
        return [None if d is None or d.scores is None else before.scatter(d.scores, n0)
                for before, d, n0 in self.trace.decisions]

    @functools.cached_property
    def keep(self) -> list[Tensor]:
        return [_alive_on_grid(layout, n0) for layout, n0 in self.trace.alive_layouts]

    @functools.cached_property
    def tokens_per_block(self) -> list[Tensor]:
        return [layout.lengths() for layout in self.trace.block_layouts]

    @functools.cached_property
    def macs(self) -> Tensor:
        return self.macs_of(self.trace).to(self.logits.device)

    @functools.cached_property
    def overflow(self) -> list[Tensor | None]:
        """``overflow[g]``: ``(B,)`` patch tokens stage g's rule kept but the static layout's capacity
        dropped (0 everywhere when it fits; None when the stage made no selection)."""
        out = []
        for (before, decision, _), (after, _) in zip(self.trace.decisions, self.trace.alive_layouts):
            if decision is None or decision.keep is None:
                out.append(None)
                continue
            wanted = before.sum_per_image((decision.keep & before.patch_mask()).long())
            out.append(wanted - (after.lengths() - self.num_prefix))
        return out

    @property
    def gflops(self) -> Tensor:
        return self.macs / 1e9

    def kept_fraction(self) -> Tensor:
        """``(B, stages)``: fraction of the input's patch tokens alive after each stage."""
        return torch.stack([k[:, self.num_prefix:].float().mean(1) for k in self.keep], dim=1)


class ReducedModel(nn.Module):
    """A backbone with a token reducer (or None) before each stage of blocks.

    ``stage_starts[g]``: the first block of stage g. ``reducers[g]``: a
    :class:`iared.reducers.base.Reducer`, or None for a stage that keeps everything.
    """

    def __init__(self, backbone: Backbone, reducers: Sequence[Reducer | None], stage_starts: Sequence[int]):
        super().__init__()
        self.backbone = backbone
        self.stage_starts = check_stage_starts(stage_starts, len(backbone.blocks))
        if len(reducers) != len(self.stage_starts):
            raise ValueError(f"{len(reducers)} reducers for {len(self.stage_starts)} stages")
        # An nn.ModuleList cannot hold None: stages without a reducer hold an Identity placeholder.
        self.reducers = nn.ModuleList(r if r is not None else nn.Identity() for r in reducers)
        # Each stage's blocks, sliced once: slicing an nn.ModuleList builds a new module every time.
        self._stage_blocks = tuple(tuple(self.stage_blocks(g)) for g in range(self.num_stages))

    @property
    def num_stages(self) -> int:
        return len(self.stage_starts)

    def reducer(self, stage: int) -> Reducer | None:
        r = self.reducers[stage]
        return None if isinstance(r, nn.Identity) else r

    def stage_blocks(self, stage: int) -> Sequence[nn.Module]:
        ends = self.stage_starts[1:] + (len(self.backbone.blocks),)
        return self.backbone.blocks[self.stage_starts[stage]: ends[stage]]

    def forward(self, inputs: Tensor, mode: Mode | Sequence[Mode] = "threshold", *,
                threshold: float | Sequence[float] = 0.5, keep_ratio: float | Sequence[float] | None = None,
                flops_ratio: float | None = None, layout: RaggedLayout = "packed",
                attention: PackedAttention = "auto", exploration: float = 0.0,
                attention_out: list | None = None, noise: Tensor | None = None,
                features_at: Sequence[int] = (), block_runner: BlockRunner | None = None,
                capacity: int | Sequence[int | None] | None = None) -> ReducedOutput:
        """Run the reduced model on ``inputs`` (``(B, C, H, W)`` images, or what the backbone embeds).

        mode: one of ``MODES`` or one per stage; threshold: one value or one per stage.
        keep_ratio / flops_ratio: budget mode, the fraction of alive patch tokens each stage keeps,
        or a target fraction of the unpruned FLOPs (solved to a uniform keep ratio).
        layout: how ragged batches are held (``packed`` concatenates, ``padded`` pads + masks to the
        batch's longest image, ``static`` pads + masks to a width fixed in advance: no host
        synchronisation, one graph for ``torch.compile``; see :meth:`iared.tokens.Tokens.select_capacity`).
        capacity: ``static`` layout, the most patch tokens each stage keeps per image (one value or one
        per stage; None: no cap, the width stays what it was). ``output.overflow`` counts the tokens an
        image lost to it.
        exploration: sample mode draws from ``eps + (1 - 2 eps) * score``.
        noise: sample mode's uniform draws ``(B, N0)`` in original token positions (default: torch's RNG).
        features_at: block indices whose outputs a dense head reads; ``output.features[i]`` is
        ``(B, N0, C)`` after block ``features_at[i]`` (sorted order), prefix tokens included: alive tokens'
        current features, dropped tokens' features from the last block they were alive in.
        attention_out: pass a list to receive one :class:`iared.tokens.AttentionMap` per block, the
        attention the pruned model really computed (explainers; runs the explicit-attention path).
        block_runner: ``runner(block_index, block, tokens, record) -> tokens`` runs each block instead of
        ``block(tokens, record=record)``, inside this same loop (streaming reuse, :mod:`iared.streaming`).
        """
        settings = self.stage_settings(mode, threshold, keep_ratio, flops_ratio, exploration, noise)
        capacities = self.stage_capacities(layout, capacity)
        tokens = self.backbone.embed(inputs)
        if attention != "auto":
            tokens = replace(tokens, attention=attention)
        if features_at:
            tokens = tokens.keeping_grid()
        trace = _Trace()
        record = None
        for stage in range(self.num_stages):
            n0 = self.backbone.block_input_shape(self.stage_starts[stage])[0]  # the stage's grid
            reducer = self.reducer(stage)
            if reducer is not None and settings[stage].mode != "all":
                decision = reducer(StageInput(tokens, stage, settings[stage], inputs, self.backbone, record,
                                               self.stage_starts[stage]))
                trace.decided(tokens, decision, n0)
                tokens = tokens.apply(decision, ragged=layout, capacity=capacities[stage])
            else:
                trace.decided(tokens, None, n0)
            trace.alive(tokens, n0)
            blocks = self._stage_blocks[stage]
            wants_record = self._next_needs_record(stage, settings)
            for i, block in enumerate(blocks):
                record = BlockRecord() if wants_record and i == len(blocks) - 1 else None
                trace.entering_block(tokens)
                if block_runner is not None:
                    tokens = block_runner(self.stage_starts[stage] + i, block, tokens, record)
                elif attention_out is None:
                    tokens = block(tokens, record=record)
                else:
                    weights: list = []
                    before, tokens = tokens, block(tokens, weights, record=record)
                    attention_out.append(before.attention_map(weights[0]))
                if self.stage_starts[stage] + i in features_at:
                    trace.features.append(tokens.on_grid())
        logits = self.backbone.forward_head(tokens)
        return ReducedOutput(logits, trace, trace.log_prob, self.backbone.num_prefix_tokens,
                             features=trace.features, macs_of=self._macs)

    # -- settings ------------------------------------------------------------------------------

    def _next_needs_record(self, stage: int, settings: Sequence[StageSettings]) -> bool:
        nxt = stage + 1
        if nxt >= self.num_stages:
            return False
        reducer = self.reducer(nxt)
        return reducer is not None and reducer.needs_record and settings[nxt].mode != "all"

    def stage_capacities(self, layout: RaggedLayout, capacity) -> list[int | None]:
        """One capacity per stage (patch tokens; None: no cap) for the ``static`` layout."""
        if layout not in RAGGED_LAYOUTS:
            raise ValueError(f"layout must be one of {RAGGED_LAYOUTS}, got {layout!r}")
        G = self.num_stages
        if capacity is None:
            return [None] * G
        if layout != "static":
            raise ValueError(f"capacity caps the static layout's width: give layout='static', not {layout!r}")
        caps = [capacity] * G if isinstance(capacity, int) else list(capacity)
        if len(caps) != G or any(c is not None and (not isinstance(c, int) or c < 1) for c in caps):
            raise ValueError(f"capacity: a positive token count, one value or {G} (None for no cap), got {capacity!r}")
        return caps

    def stage_settings(self, mode, threshold=0.5, keep_ratio=None, flops_ratio=None,
                       exploration: float = 0.0, noise: Tensor | None = None) -> list[StageSettings]:
        G = self.num_stages
        modes = [mode] * G if isinstance(mode, str) else list(mode)
        if len(modes) != G or any(m not in MODES for m in modes):
            raise ValueError(f"mode must be one of {MODES} or a list of {G} of them, got {mode!r}")
        thresholds = [threshold] * G if isinstance(threshold, (int, float)) else list(threshold)
        if len(thresholds) != G:
            raise ValueError(f"threshold: one value or {G}, got {threshold!r}")
        ratios: list[float | None] = [None] * G
        if "budget" in modes:
            if (keep_ratio is None) == (flops_ratio is None):
                raise ValueError("budget mode needs exactly one of keep_ratio or flops_ratio")
            if flops_ratio is not None:
                keep_ratio = self.ratio_for_flops(flops_ratio)
            ratios = [keep_ratio] * G if isinstance(keep_ratio, (int, float)) else list(keep_ratio)
            if len(ratios) != G or not all(0 < r <= 1 for r in ratios):
                raise ValueError(f"keep_ratio must be in (0, 1], one value or {G}: {keep_ratio!r}")
        return [StageSettings(m, float(t), r, exploration, noise) for m, t, r in zip(modes, thresholds, ratios)]

    # -- compute accounting ----------------------------------------------------------------------

    def _macs(self, trace: _Trace) -> Tensor:
        total = torch.as_tensor(self.backbone.fixed_macs(), dtype=torch.float64)
        for block, layout in enumerate(trace.block_layouts):
            total = total + self.backbone.block_macs(layout.lengths().to(torch.float64), block)
        for before, decision, _ in trace.decisions:
            if decision is not None:
                m = decision.macs(before.lengths()) if callable(decision.macs) else decision.macs
                total = total + (m.detach().double() if isinstance(m, Tensor) else float(m))
        return total

    def macs_for_ratios(self, ratios: float | Sequence[float]) -> float:
        """Analytic MACs per input when each stage with a reducer keeps ``ratios`` of the alive patch
        tokens (the budget rule; reducers' own cost included). Stages without a reducer keep all."""
        G = self.num_stages
        ratios = [ratios] * G if isinstance(ratios, (int, float)) else list(ratios)
        backbone = self.backbone
        prefix = backbone.num_prefix_tokens
        total = backbone.fixed_macs()
        alive = backbone.num_tokens - prefix
        for stage in range(G):
            reducer = self.reducer(stage)
            if reducer is not None:
                if hasattr(reducer, "macs"):
                    total += float(reducer.macs(alive + prefix))
                alive = budget_count(alive, ratios[stage])
            first = self.stage_starts[stage]
            for block in range(first, first + len(self.stage_blocks(stage))):
                total += float(backbone.block_macs(alive + prefix, block))
                grid = backbone.block_input_shape(block)[0]
                if block + 1 < len(backbone.blocks) and backbone.block_input_shape(block + 1)[0] != grid:
                    alive = backbone.block_input_shape(block + 1)[0] - prefix  # a new grid starts whole
        return total

    def full_macs(self) -> float:
        """MACs of the backbone alone (no reducers), one input."""
        b = self.backbone
        return b.fixed_macs() + float(sum(b.block_macs(b.block_input_shape(i)[0], i) for i in range(len(b.blocks))))

    def ratio_for_flops(self, flops_ratio: float) -> float:
        """The uniform per-stage keep ratio whose FLOPs are closest to ``flops_ratio`` x unpruned."""
        full = self.full_macs()
        floor = self.macs_for_ratios(1e-9) / full
        if not floor <= flops_ratio <= 1.0 + 1e-9:
            raise ValueError(f"flops_ratio {flops_ratio} out of reach: must lie in [{floor:.3f}, 1]")
        lo, hi = 0.0, 1.0
        for _ in range(40):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if self.macs_for_ratios(mid) < flops_ratio * full else (lo, mid)
        return hi


class _Trace:
    """What one forward pass leaves for its :class:`ReducedOutput`: token layouts (positions and
    counts, no features) and decisions, recorded without arithmetic on the hot path."""

    def __init__(self):
        self.decisions: list[tuple] = []  # (layout before the stage, Decision or None, N0 of its grid)
        self.alive_layouts: list[tuple] = []  # (layout after the stage's reduction, N0)
        self.block_layouts: list = []  # the layout entering every block
        self.log_prob: Tensor | None = None
        self.features: list[Tensor] = []

    def decided(self, tokens, decision, n0: int) -> None:
        self.decisions.append((tokens.layout() if decision is not None else None, decision, n0))
        if decision is not None and decision.log_prob is not None:
            self.log_prob = decision.log_prob if self.log_prob is None else self.log_prob + decision.log_prob

    def alive(self, tokens, n0: int) -> None:
        self.alive_layouts.append((tokens.layout(), n0))

    def entering_block(self, tokens) -> None:
        last = self.block_layouts[-1] if self.block_layouts else None
        # Blocks keep the layout (same index tensor): record a new one only where it changed.
        same = last is not None and last.index is tokens.index and last.weights is tokens.weights
        self.block_layouts.append(last if same else tokens.layout())


def _alive_on_grid(layout, n0: int) -> Tensor:
    # A token gated to weight 0 (DynamicViT's training-time mask) is not alive; merged sizes are >= 1.
    alive = torch.ones_like(layout.index, dtype=torch.float32)
    if layout.weights is not None:
        alive = (layout.weights.detach() > 0).float()
    return layout.scatter(alive, n0) > 0
