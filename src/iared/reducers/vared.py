"""VA-RED² (Pan et al., ICLR 2021) on a divided space-time TimeSformer: per clip and per stage (a group
of consecutive blocks), how many frames are computed and how wide the MLPs run.

::

    x = backbone.embed(clips)                                # (B, 1 + T S, C) dense rows
    for each stage g:
        stride, width = policy_g(x)                          # per clip: soft gates (train) / argmax (eval)
        sub = x at frames offset, offset + stride, ...       # (B, 1 + T' S, C), T' = T / stride
        sub = blocks_g(sub) with MLPs at ``width`` x hidden  # the work really done
        x   = rebuild(x, sub)                                # skipped frames from the computed ones
    logits = backbone.forward_head(x)

* **Temporal choice** (``strides``, 1 / 2 / 4): the stage's blocks run on the sub-clip of frames
  ``offset + k * stride`` (``offset = (stride - 1) // 2``): temporal attention among those frames,
  spatial attention within each, the class token in every computed frame, its update the mean over
  them (:meth:`iared.models.timesformer.Block.forward_frames`). A skipped frame t keeps its own input
  and gets the stage's update ``delta_j = out_j - in_j`` of the computed frames j mixed per channel:
  ``out_t = in_t + sum_j M[t, j, c] * delta_j`` (:class:`TemporalRebuild`), ``M`` learned and
  initialised to linear interpolation between the two nearest computed frames (the nearest one past
  the ends): ``T' C`` multiply-accumulates per rebuilt token.
* **Channel choice** (``widths``, 1 / 1/2 / 1/4 of the MLP's hidden units): the weights are the
  backbone's, shared by every width: width w runs the first ``w * hidden`` units of an importance
  order (a permutation of the hidden units, :meth:`VaRedTimeSformer.calibrate`: mean |GELU| times the
  norm of the unit's ``fc2`` column; the identity until calibrated). The left-out units' contribution
  is rebuilt by a learned per-channel bias per (block, width), initialised by ``calibrate`` to its
  mean on the calibration clips: zero multiply-accumulates (a linear map of the computed units would
  fold into ``fc2`` and change the shared weights; a bias keeps them shared).
* **Unpruned** (stride 1, width 1): the blocks are the backbone's, run on the same rows: the logits
  equal the backbone's exactly.
* **Policy** (:class:`StagePolicy`): the stage input's patch tokens pooled per frame, their mean and
  mean absolute frame-to-frame change (2 C) -> a hidden layer -> one logit per stride and per width
  (a factorised choice). Training: Gumbel-softmax gates, the stage output the gate-weighted mixture
  of the strides' outputs, each with MLPs whose hidden units are weighted by the widths' gates (the
  mixture of the widths exactly, since they share weights: one full-width MLP per stride); expected
  MACs from the gates. Inference: argmax, clips that chose the same (stride, width) run together
  (:meth:`VaRedTimeSformer.forward`), so the skipped work is really skipped.
* **MACs** per clip (``VaRedOutput.macs``): the backbone's fixed MACs, then per stage the policy, every
  block at its sub-clip and width (:func:`iared.flops.divided_block_macs`) and the rebuild.

The model has its own loop rather than :class:`iared.stages.ReducedModel`'s: a stage changes the
clip's frame count and MLP width, not which tokens are alive, so its blocks run on dense sub-clips
(the reshape path, no segment attention), grouped by choice.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from iared import flops
from iared.tokens import DenseTokens

STRIDES = (1, 2, 4)
WIDTHS = (1.0, 0.5, 0.25)


@dataclass
class VaRedConfig:
    """``stage_starts``: first block of each stage (None: ``num_stages`` equal groups)."""

    num_stages: int = 3
    stage_starts: tuple[int, ...] | None = None
    strides: tuple[int, ...] = STRIDES
    widths: tuple[float, ...] = WIDTHS
    policy_hidden: int = 64

    def __post_init__(self):
        self.strides, self.widths = tuple(int(s) for s in self.strides), tuple(float(w) for w in self.widths)
        if self.strides[0] != 1 or self.widths[0] != 1.0:
            raise ValueError(f"the first choice must be the unpruned one (stride 1, width 1), got "
                             f"strides {self.strides}, widths {self.widths}")
        if self.stage_starts is not None:
            self.stage_starts = tuple(int(s) for s in self.stage_starts)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def num_choices(self) -> int:
        return len(self.strides) * len(self.widths)

    def choice(self, stride_index: int, width_index: int) -> int:
        """The combined choice code ``stride_index * len(widths) + width_index``."""
        return stride_index * len(self.widths) + width_index


def computed_frames(num_frames: int, stride: int) -> list[int]:
    """The frames a stage at ``stride`` computes: ``(stride - 1) // 2``, then every ``stride``-th."""
    if stride < 1 or num_frames % stride:
        raise ValueError(f"temporal stride {stride} does not divide the clip's {num_frames} frames")
    return list(range((stride - 1) // 2, num_frames, stride))


def interpolation_weights(num_frames: int, stride: int) -> Tensor:
    """``(T - T', T')``: each skipped frame's linear-interpolation weights over the computed frames
    (the two nearest; past the first / last computed frame, that frame alone)."""
    kept = computed_frames(num_frames, stride)
    skipped = [t for t in range(num_frames) if t not in kept]
    w = torch.zeros(len(skipped), len(kept))
    for row, t in enumerate(skipped):
        right = next((j for j, f in enumerate(kept) if f > t), None)
        if right is None or right == 0:
            w[row, len(kept) - 1 if right is None else 0] = 1.0
            continue
        left = right - 1
        a = (t - kept[left]) / (kept[right] - kept[left])
        w[row, left], w[row, right] = 1 - a, a
    return w


class StagePolicy(nn.Module):
    """Per clip: logits over the strides and over the widths from the stage input ``(B, 1 + T S, C)``."""

    def __init__(self, dim: int, hidden: int, num_strides: int, num_widths: int):
        super().__init__()
        self.num_strides = num_strides
        self.fc1 = nn.Linear(2 * dim, hidden)
        self.fc2 = nn.Linear(hidden, num_strides + num_widths)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, x: Tensor, frames: int) -> tuple[Tensor, Tensor]:
        B, _, C = x.shape
        per_frame = x[:, 1:].reshape(B, frames, -1, C).mean(2)  # (B, T, C)
        change = (per_frame[:, 1:] - per_frame[:, :-1]).abs().mean(1) if frames > 1 else torch.zeros_like(per_frame[:, 0])
        logits = self.fc2(F.relu(self.fc1(torch.cat([per_frame.mean(1), change], dim=1))))
        return logits[:, : self.num_strides], logits[:, self.num_strides:]

    def macs(self) -> int:
        return self.fc1.in_features * self.fc1.out_features + self.fc2.in_features * self.fc2.out_features


class TemporalRebuild(nn.Module):
    """One stage's skipped frames from the computed ones, per stride (module docstring)."""

    def __init__(self, num_frames: int, dim: int, strides: tuple[int, ...]):
        super().__init__()
        self.num_frames = num_frames
        self.mix = nn.ParameterDict({
            str(s): nn.Parameter(interpolation_weights(num_frames, s)[..., None].repeat(1, 1, dim))
            for s in strides if s > 1})

    def forward(self, x: Tensor, sub: Tensor, stride: int) -> Tensor:
        """``x``: the stage input ``(B, 1 + T S, C)``; ``sub``: the blocks' output on the computed frames
        ``(B, 1 + T' S, C)``. Returns ``(B, 1 + T S, C)``."""
        if stride == 1:
            return sub
        B, _, C = x.shape
        T = self.num_frames
        kept = computed_frames(T, stride)
        skipped = [t for t in range(T) if t not in kept]
        frames_in = x[:, 1:].reshape(B, T, -1, C)
        out_kept = sub[:, 1:].reshape(B, len(kept), -1, C)
        delta = out_kept - frames_in[:, kept]
        rebuilt = frames_in[:, skipped] + torch.einsum("kjc,bjsc->bksc", self.mix[str(stride)], delta)
        frames = torch.empty_like(frames_in)
        frames[:, kept] = out_kept
        frames[:, skipped] = rebuilt
        return torch.cat([sub[:, :1], frames.flatten(1, 2)], dim=1)

    def macs(self, stride: int, positions: int, dim: int) -> int:
        kept = len(computed_frames(self.num_frames, stride))
        return (self.num_frames - kept) * positions * kept * dim if stride > 1 else 0


class _NarrowMlp(nn.Module):
    """A block's MLP on the hidden units ``units`` (an index tensor, or None: all), plus ``bias``
    ``(C,)`` for the left-out units; or with ``unit_gates`` ``(B, hidden)`` every unit weighted per clip
    and ``bias`` ``(B, C)``: the soft mixture of the widths."""

    def __init__(self, mlp: nn.Module, units: Tensor | None = None, bias: Tensor | None = None,
                 unit_gates: Tensor | None = None):
        super().__init__()
        self.mlp, self.units, self.bias, self.unit_gates = mlp, units, bias, unit_gates

    def forward(self, x: Tensor) -> Tensor:
        fc1, fc2 = self.mlp.fc1, self.mlp.fc2
        if self.unit_gates is not None:
            h = self.mlp.act(fc1(x)) * self.unit_gates[:, None, :]
            return fc2(h) + self.bias[:, None, :]
        h = self.mlp.act(F.linear(x, fc1.weight[self.units], fc1.bias[self.units]))
        return F.linear(h, fc2.weight[:, self.units], fc2.bias + self.bias)


@dataclass
class VaRedOutput:
    """``logits`` ``(B, classes)``; ``macs`` ``(B,)`` float64, per clip (expected under the gates in
    training); ``choices`` ``(B, stages)`` the combined choice codes (argmax of the gates in training);
    ``stride_probs`` / ``width_probs``: per stage ``(B, strides)`` / ``(B, widths)`` (None for fixed choices)."""

    logits: Tensor
    macs: Tensor
    choices: Tensor
    stride_probs: list[Tensor | None] = field(default_factory=list)
    width_probs: list[Tensor | None] = field(default_factory=list)


class VaRedTimeSformer(nn.Module):
    """A divided space-time :class:`iared.models.timesformer.TimeSformer` with VA-RED²'s per-clip
    temporal and channel choices per stage (module docstring). The backbone's weights are used as
    they are (shared by every choice); the trainable parts are the policies, the temporal rebuild
    maps and the channel rebuild biases (:meth:`trainable_parameters`)."""

    def __init__(self, backbone: nn.Module, cfg: VaRedConfig | None = None):
        super().__init__()
        from iared.stages import check_stage_starts, equal_stage_starts

        cfg = cfg or VaRedConfig()
        c = backbone.cfg
        if getattr(c, "attention_type", None) != "divided_space_time":
            raise ValueError(f"VA-RED² needs a divided_space_time TimeSformer, got {type(backbone).__name__} "
                             f"({getattr(c, 'attention_type', 'no attention_type')})")
        for s in cfg.strides:
            computed_frames(c.num_frames, s)
        self.backbone, self.cfg = backbone, cfg
        depth = len(backbone.blocks)
        self.stage_starts = check_stage_starts(cfg.stage_starts or equal_stage_starts(depth, cfg.num_stages), depth)
        self.hidden = backbone.blocks[0].mlp.fc1.out_features
        self.units = [max(1, round(w * self.hidden)) for w in cfg.widths]
        dim = c.embed_dim
        self.policies = nn.ModuleList(StagePolicy(dim, cfg.policy_hidden, len(cfg.strides), len(cfg.widths))
                                      for _ in self.stage_starts)
        self.rebuild = nn.ModuleList(TemporalRebuild(c.num_frames, dim, cfg.strides) for _ in self.stage_starts)
        self.mlp_bias = nn.Parameter(torch.zeros(depth, len(cfg.widths), dim))  # width 0 (all units): unused
        self.register_buffer("unit_order", torch.arange(self.hidden).repeat(depth, 1))
        # the soft path weights hidden unit j by the gates of the widths that include it
        self._stage_blocks = [list(range(a, b)) for a, b in zip(self.stage_starts, self.stage_starts[1:] + (depth,))]

    # -- structure --------------------------------------------------------------------------------

    @property
    def num_stages(self) -> int:
        return len(self.stage_starts)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [*self.policies.parameters(), *self.rebuild.parameters(), self.mlp_bias]

    def freeze_backbone(self) -> VaRedTimeSformer:
        self.backbone.requires_grad_(False)
        return self

    def describe(self) -> dict:
        return {"method": "VA-RED2", **self.cfg.to_dict(), "stage_starts": list(self.stage_starts)}

    # -- compute accounting -----------------------------------------------------------------------

    def stage_macs(self, stage: int, stride_index: int, width_index: int) -> float:
        """MACs of stage ``stage``'s blocks and rebuild at one choice (the policy not included)."""
        c = self.backbone.cfg
        s = self.cfg.strides[stride_index]
        frames = c.num_frames // s
        blocks = sum(flops.divided_block_macs(frames, c.patches_per_frame, c.embed_dim, self.units[width_index])
                     for _ in self._stage_blocks[stage])
        return float(blocks + self.rebuild[stage].macs(s, c.patches_per_frame, c.embed_dim))

    def macs_table(self) -> Tensor:
        """``(stages, strides, widths)`` float64: :meth:`stage_macs` of every choice."""
        return torch.tensor([[[self.stage_macs(g, i, j) for j in range(len(self.cfg.widths))]
                              for i in range(len(self.cfg.strides))] for g in range(self.num_stages)],
                            dtype=torch.float64)

    def full_macs(self) -> float:
        """The backbone's MACs per clip (every stage at stride 1, width 1, no policy)."""
        return float(self.backbone.fixed_macs() + sum(self.stage_macs(g, 0, 0) for g in range(self.num_stages)))

    def policy_macs(self) -> float:
        return float(sum(p.macs() for p in self.policies))

    def fixed_choice_macs(self, stride_index: int, width_index: int) -> float:
        """MACs per clip with one choice at every stage and no policy."""
        return float(self.backbone.fixed_macs()
                     + sum(self.stage_macs(g, stride_index, width_index) for g in range(self.num_stages)))

    # -- the data path ----------------------------------------------------------------------------

    def _mlp(self, block: int, width_index: int) -> nn.Module | None:
        if width_index == 0:
            return None  # the block's own MLP: the unpruned arithmetic
        units = self.unit_order[block, : self.units[width_index]]
        return _NarrowMlp(self.backbone.blocks[block].mlp, units, self.mlp_bias[block, width_index])

    def _soft_mlp(self, block: int, width_gates: Tensor) -> nn.Module:
        # unit at rank r of the order is in width j when r < units[j]; its weight: the sum of those gates
        ranks = torch.arange(self.hidden, device=width_gates.device)
        member = (ranks[None, :] < torch.tensor(self.units, device=ranks.device)[:, None]).to(width_gates.dtype)
        by_rank = width_gates @ member  # (B, hidden) in rank order
        gates = torch.empty_like(by_rank).index_copy_(1, self.unit_order[block], by_rank)
        bias = width_gates[:, 1:] @ self.mlp_bias[block, 1:]  # (B, C)
        return _NarrowMlp(self.backbone.blocks[block].mlp, bias=bias, unit_gates=gates)

    def run_stage(self, x: Tensor, stage: int, stride_index: int, width_index: int | None = None,
                  width_gates: Tensor | None = None) -> Tensor:
        """Stage ``stage`` on dense clip rows ``x`` ``(B, 1 + T S, C)`` at one stride, one width (or
        the soft mixture of the widths, ``width_gates`` ``(B, widths)``). Returns ``(B, 1 + T S, C)``."""
        c = self.backbone.cfg
        stride = self.cfg.strides[stride_index]
        if stride == 1:
            sub = x
        else:
            B, _, C = x.shape
            frames = x[:, 1:].reshape(B, c.num_frames, -1, C)[:, computed_frames(c.num_frames, stride)]
            sub = torch.cat([x[:, :1], frames.flatten(1, 2)], dim=1)
        for b in self._stage_blocks[stage]:
            mlp = self._soft_mlp(b, width_gates) if width_gates is not None else self._mlp(b, width_index)
            sub = self.backbone.blocks[b].forward_frames(sub, mlp)
        return self.rebuild[stage](x, sub, stride)

    def forward(self, clips: Tensor, choice: Tensor | tuple[int, int] | None = None, *, soft: bool | None = None,
                tau: float = 1.0, random_choices: Tensor | None = None) -> VaRedOutput:
        """``clips`` ``(B, T, C, H, W)``.

        choice: None: the policies decide; ``(stride_index, width_index)``: that choice at every stage,
        no policy; a ``(B, stages)`` long tensor of combined codes (:meth:`VaRedConfig.choice`): given
        per clip (random floors), no policy.
        soft: Gumbel-softmax gates at temperature ``tau`` and the mixture of the choices (default: in
        training mode with the policies deciding); otherwise hard choices, clips grouped by choice.
        """
        x = self.backbone.embed(clips).data
        B = x.shape[0]
        nW = len(self.cfg.widths)
        T = self.backbone.cfg.num_frames
        table = self.macs_table().to(x.device)
        macs = torch.full((B,), self.backbone.fixed_macs(), dtype=torch.float64, device=x.device)
        soft = self.training and choice is None if soft is None else soft
        if soft and choice is not None:
            raise ValueError("soft gates come from the policies: give choice=None with soft=True")
        codes = []
        stride_probs: list[Tensor | None] = []
        width_probs: list[Tensor | None] = []
        for g in range(self.num_stages):
            if choice is None:
                ls, lw = self.policies[g](x, T)
                macs = macs + self.policies[g].macs()
                stride_probs.append(ls.softmax(-1))
                width_probs.append(lw.softmax(-1))
            else:
                stride_probs.append(None)
                width_probs.append(None)
            if soft:
                gs = F.gumbel_softmax(ls, tau=tau)
                gw = F.gumbel_softmax(lw, tau=tau)
                x = sum(gs[:, i, None, None] * self.run_stage(x, g, i, width_gates=gw)
                        for i in range(len(self.cfg.strides)))
                macs = macs + torch.einsum("bi,bj,ij->b", gs.double(), gw.double(), table[g])
                code = gs.argmax(-1) * nW + gw.argmax(-1)
            else:
                if choice is None:
                    code = ls.argmax(-1) * nW + lw.argmax(-1)
                elif isinstance(choice, Tensor):
                    code = choice[:, g].to(x.device)
                else:
                    code = torch.full((B,), self.cfg.choice(*choice), dtype=torch.long, device=x.device)
                x = self._run_grouped(x, g, code)
                macs = macs + table[g].reshape(-1)[code]
            codes.append(code)
        logits = self.backbone.forward_head(DenseTokens.from_embeddings(x, 1))
        return VaRedOutput(logits, macs, torch.stack(codes, 1), stride_probs, width_probs)

    def _run_grouped(self, x: Tensor, stage: int, code: Tensor) -> Tensor:
        """Hard choices ``code`` ``(B,)``: the clips of each distinct choice run together."""
        nW = len(self.cfg.widths)
        present = torch.unique(code).tolist()
        if len(present) == 1:
            return self.run_stage(x, stage, present[0] // nW, present[0] % nW)
        out = torch.empty_like(x)
        for c in present:
            idx = (code == c).nonzero().squeeze(1)
            out[idx] = self.run_stage(x[idx], stage, c // nW, c % nW)
        return out

    # -- calibration: the hidden units' order and the left-out units' mean ------------------------

    @torch.no_grad()
    def calibrate(self, clips: Tensor) -> VaRedTimeSformer:
        """Order every block's hidden units by importance (mean |GELU(fc1 x)| on ``clips``, unpruned
        model, times the unit's ``fc2`` column norm) and set each width's rebuild bias to the mean
        contribution of the units it leaves out. The unpruned model is unchanged."""
        x = self.backbone.embed(clips).data
        for b, block in enumerate(self.backbone.blocks):
            captured = {}

            def hook(module, inputs, output, captured=captured):
                captured["h"] = output.reshape(-1, output.shape[-1])

            handle = block.mlp.act.register_forward_hook(hook)
            x = block.forward_frames(x)
            handle.remove()
            h = captured["h"]
            w2 = block.mlp.fc2.weight  # (C, hidden)
            importance = h.abs().mean(0) * w2.norm(dim=0)
            order = importance.argsort(descending=True)
            self.unit_order[b] = order
            mean_h = h.mean(0)
            for j, k in enumerate(self.units):
                if j == 0:
                    continue
                left = order[k:]
                self.mlp_bias[b, j] = w2[:, left] @ mean_h[left]
        return self
