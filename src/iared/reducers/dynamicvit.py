"""DynamicViT's prediction module as a reducer (Rao et al., NeurIPS 2021, Sec. 3.2).

Per alive token ``x`` (C channels; the hidden features are split in two halves)::

    z      = GELU(Linear(LayerNorm(x)))                       (C -> C)
    local  = z[:, :C/2]                                        per token
    global = sum_j w_j z_j[C/2:] / sum_j w_j                   per image, w = current keep policy
    logits = MLP(concat(local, global))                        C -> C/2 -> C/4 -> 2 (keep, drop)

``w`` is the policy so far: 1 for alive patch tokens at inference (dropped ones have left), the
product of the earlier stages' gates in training (gated tokens stay in the batch), 0 for prefix
tokens and padding (the paper's predictor sees the patch tokens only).

Two paths, chosen by the stage settings' mode (the stage loop passes them):

``sample`` (training): a hard Gumbel-softmax sample per patch token with the straight-through
    gradient, returned as a :attr:`iared.tokens.Decision.gate`: no token leaves, attention to a
    token is multiplied by its gate (masked attention, exactly 0 for a dropped token while the
    gradient reaches the predictor). ``scores`` are the *cumulative* gates (this stage's gate times
    the earlier ones, 1 for prefix tokens): what the keep-ratio loss averages
    (:mod:`iared.train.dynamicvit`).
any other mode (inference): the top ``keep_ratio`` of the alive patch tokens by keep probability
    (the budget rule of :mod:`iared.reducers.policy`, written once); ``scores`` = keep probability.
    An explicit ``budget`` mode's ``keep_ratio`` (or ``flops_ratio``) overrides the predictor's
    own, so FLOPs-matched comparisons can sweep it; ``threshold`` mode uses the predictor's own.

Placement (:func:`dynamicvit_stage_starts`): three predictors before blocks ``round(depth/4)``,
``round(depth/2)``, ``round(3 depth/4)`` (DeiT-S, 12 blocks: 3, 6, 9 as in the paper; 6 blocks:
2, 3, 4), each keeping ``keep_ratio`` of the tokens alive before it (so ``keep_ratio^s`` after
stage s); a leading stage without a reducer runs the first blocks.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from iared import flops
from iared.reducers.base import Reducer, StageInput, StageSettings, quarter_locations
from iared.reducers.policy import keep_from_scores
from iared.tokens import Decision, Tokens


class DynamicViTPredictor(Reducer):
    """DynamicViT's prediction module: ``forward(StageInput) -> Decision`` (see the module doc).

    ``dim``: token width C. ``keep_ratio``: fraction of the alive patch tokens kept at inference
    (the knob). ``tau``: Gumbel-softmax temperature of the training path.
    """

    uses_policy = False  # its own knob (keep_ratio); the training path is the "sample" mode

    def __init__(self, dim: int, keep_ratio: float, tau: float = 1.0):
        super().__init__()
        if not 0 < keep_ratio <= 1:
            raise ValueError(f"DynamicViT keep_ratio must be in (0, 1], got {keep_ratio}")
        if dim < 4:
            raise ValueError(f"DynamicViT predictor: token width {dim} is too small (needs >= 4)")
        self.keep_ratio = float(keep_ratio)
        self.tau = float(tau)
        self.local = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU())
        self.head = nn.Sequential(nn.Linear(dim, dim // 2), nn.GELU(), nn.Linear(dim // 2, dim // 4),
                                  nn.GELU(), nn.Linear(dim // 4, 2))
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    @property
    def dim(self) -> int:
        return self.local[1].in_features

    def policy(self, tokens: Tokens) -> Tensor:
        """Token-aligned weights of the global feature: the current keep policy over patch tokens."""
        w = tokens.patch_mask().to(tokens.data.dtype)
        return w if tokens.weights is None else w * tokens.weights

    def logits(self, tokens: Tokens) -> Tensor:
        """Token-aligned ``(..., 2)`` logits (keep, drop) for every alive token (prefix rows included,
        their values unused)."""
        z = self.local(tokens.data)
        half = z.shape[-1] // 2
        local, glob = z[..., :half], z[..., half:]
        w = self.policy(tokens)
        ids = tokens.image_ids().reshape(-1)
        rows = (glob * w[..., None]).reshape(ids.shape[0], -1)
        total = w.reshape(-1).new_zeros(tokens.batch_size).index_add(0, ids, w.reshape(-1))
        mean = rows.new_zeros(tokens.batch_size, rows.shape[1]).index_add(0, ids, rows)
        mean = mean / total.clamp_min(1e-6)[:, None]
        return self.head(torch.cat([local, tokens.per_token(mean)], dim=-1))

    def keep_probability(self, tokens: Tokens) -> Tensor:
        """Token-aligned keep probability; 1 for prefix tokens, 0 for padding."""
        p = self.logits(tokens).softmax(-1)[..., 0]
        return self._prefix_one(tokens, p)

    def forward(self, x: StageInput) -> Decision:
        tokens = x.tokens
        macs = self.macs(tokens.lengths())
        logits = self.logits(tokens)
        if x.settings.mode == "sample":
            hard = F.gumbel_softmax(logits, tau=self.tau, hard=True)[..., 0]  # straight-through 0 / 1
            gate = self._prefix_one(tokens, hard)
            before = tokens.weights if tokens.weights is not None else torch.ones_like(gate)
            return Decision(gate=gate, scores=before * gate, macs=macs)
        scores = self._prefix_one(tokens, logits.softmax(-1)[..., 0])
        ratio = x.settings.keep_ratio if x.settings.mode == "budget" else self.keep_ratio
        return keep_from_scores(tokens, scores, StageSettings("budget", keep_ratio=ratio), macs=macs)

    @staticmethod
    def _prefix_one(tokens: Tokens, values: Tensor) -> Tensor:
        values = torch.where(tokens.is_prefix(), torch.ones_like(values), values)
        valid = tokens.valid()
        return values if valid is None else values * valid

    def macs(self, n):
        """MACs on ``n`` alive tokens (int or ``(B,)``): the local layer and the scoring MLP."""
        return flops.mlp_predictor_macs(n, self.dim, self.dim)

    def describe(self) -> dict:
        return {"method": "dynamicvit", "keep_ratio": self.keep_ratio}


def dynamicvit_locations(depth: int, num_predictors: int = 3) -> tuple[int, ...]:
    """Blocks before which the predictors sit: the paper's 3, 6, 9 of 12 blocks, i.e.
    :func:`iared.reducers.base.quarter_locations` (6 blocks: 2, 3, 4; 3 blocks: 1, 2)."""
    return quarter_locations(depth, num_predictors)


def dynamicvit_stage_starts(depth: int, locations: Sequence[int] | None = None) -> tuple[int, ...]:
    """Stage starts of a DynamicViT model: block 0 (no reducer), then one stage per predictor."""
    locs = tuple(locations) if locations is not None else dynamicvit_locations(depth)
    if not locs or locs[0] < 1:
        raise ValueError(f"DynamicViT predictor locations must be block indices >= 1, got {locs}")
    return (0, *locs)


def build_dynamicvit(backbone, keep_ratio: float, locations: Sequence[int] | None = None, tau: float = 1.0):
    """A :class:`iared.stages.ReducedModel`: ``backbone`` with fresh DynamicViT predictors at
    ``locations`` (default :func:`dynamicvit_locations`), each keeping ``keep_ratio`` of the alive
    patch tokens at inference. Stage 0 (the blocks before the first predictor) has no reducer."""
    from iared.stages import ReducedModel

    starts = dynamicvit_stage_starts(len(backbone.blocks), locations)
    predictors = [DynamicViTPredictor(backbone.token_dim, keep_ratio, tau) for _ in starts[1:]]
    return ReducedModel(backbone, [None, *predictors], starts)


def dynamicvit_predictors(model) -> list[tuple[int, DynamicViTPredictor]]:
    """``(stage, predictor)`` for every stage of ``model`` whose reducer is a DynamicViT predictor."""
    return [(g, r) for g in range(model.num_stages) if isinstance(r := model.reducer(g), DynamicViTPredictor)]
