"""The no-learning floors every learned reducer is reported beside.

:class:`RandomReducer`: every alive patch token gets a uniform random score. Under the stage
policy (:func:`iared.reducers.policy.keep_from_scores`) budget mode keeps a random top-k (random
dropping at the same budget), threshold mode keeps a token with probability ``1 - threshold``
(per-image counts vary: the batch becomes packed).

:class:`PixelSaliency`: the score of a patch token is the standard deviation of the pixels under
it (all its pixels and channels), mapped per image to (0, 1) by rank: "keep the patches with
something in them". Budget mode keeps the k most varied patches; threshold t keeps about
``1 - t`` of them, patches with equal variance (blank background) all together.

On video, :class:`FrameDifference`: the score of a space-time token is how much its patch changed
since the previous frame (mean absolute pixel difference; frame 0 against frame 1), ranked per clip:
"keep what moves", the idea behind run-length tokenization (Choudhury et al., 2024), which drops
patches that repeat the previous frame. It needs a time axis (a backbone whose ``token_grid`` is
``(T, H, W)``) and refuses image backbones in one line.

All score prefix tokens 1 (always kept) and cost no multiply-accumulates.
"""

from __future__ import annotations

import torch
from torch import Tensor

from iared.reducers.base import Reducer, StageInput
from iared.reducers.grid import fractional_rank
from iared.reducers.policy import keep_from_scores
from iared.tokens import Decision, Tokens


def _keep_by_rank(x: StageInput, per_patch: Tensor, macs) -> Decision:
    """A floor's decision from a statistic of every patch ``(B, N_patches)``: each alive token's
    value, read at its original position, ranked within its image (prefix tokens score 1)."""
    t = x.tokens
    patch_index = (t.index - t.num_prefix).clamp_min(0)
    raw = per_patch.to(t.data.dtype)[t.image_ids(), patch_index]
    return keep_from_scores(t, _prefix_one(t, fractional_rank(t, raw)), x.settings, macs=macs)


def _prefix_one(tokens: Tokens, scores: Tensor) -> Tensor:
    """Prefix tokens score 1, padding 0 (the policy never drops the first nor keeps the second)."""
    scores = torch.where(tokens.is_prefix(), torch.ones_like(scores), scores)
    valid = tokens.valid()
    return scores if valid is None else scores * valid


class RandomReducer(Reducer):
    """Uniform random scores in [0, 1) for every alive patch token.

    ``seed``: draws come from a generator seeded once (reproducible over a run; it advances from
    batch to batch); None uses torch's global generator. The draws are made per image over the
    original token positions ``(B, N0)`` and read at each token's position, so the same seed
    gives the same decisions in the dense, padded and packed layouts.
    """

    uses_policy = True

    def __init__(self, seed: int | None = None):
        super().__init__()
        self.seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}

    def _generator(self, device: torch.device) -> torch.Generator | None:
        if self.seed is None:
            return None
        if device not in self._generators:
            self._generators[device] = torch.Generator(device).manual_seed(self.seed)
        return self._generators[device]

    def forward(self, x: StageInput) -> Decision:
        t = x.tokens
        device = t.data.device
        u = torch.rand(t.batch_size, x.backbone.num_tokens, generator=self._generator(device), device=device)
        scores = _prefix_one(t, u[t.image_ids(), t.index].to(t.data.dtype))
        return keep_from_scores(t, scores, x.settings, macs=self.macs)

    def macs(self, n) -> float:
        return 0.0

    def describe(self) -> dict:
        return {"method": "random", "seed": self.seed}


def patch_std(backbone, inputs: Tensor, block: int = 0) -> Tensor:
    """``(B, N_patches)``: standard deviation of the pixels (and channels) under every patch token of
    the grid entering ``block``."""
    return backbone.patch_pixels(inputs, block).float().std(dim=-1, correction=0)


class PixelSaliency(Reducer):
    """Pixel-variance floor: score = rank of the patch's pixel standard deviation in its image.

    Scores are ``(rank + 0.5) / n`` over the image's n alive patch tokens (ties share their mean
    rank), so threshold and budget mean the same as for a learned score. Reads the raw input
    through ``backbone.patch_pixels`` at the tokens' original positions (``Tokens.index``).
    """

    uses_policy = True

    def forward(self, x: StageInput) -> Decision:
        return _keep_by_rank(x, patch_std(x.backbone, x.inputs, x.block), self.macs)

    def macs(self, n) -> float:
        return 0.0  # elementwise statistics only (the MAC convention of iared.flops leaves them out)

    def describe(self) -> dict:
        return {"method": "pixel"}


def frame_change(backbone, inputs: Tensor, block: int = 0) -> Tensor:
    """``(B, T*H*W)``: mean absolute difference between the pixels under each space-time patch token
    and the same patch one frame earlier (frame 0: against frame 1), in token order.

    ``backbone``: a video backbone (``token_grid`` ``(T, H, W)``; :meth:`patch_pixels` on clips
    ``(B, T, C, H, W)``). An image backbone raises ``ValueError``."""
    grid = tuple(getattr(backbone, "token_grid", ()))
    if len(grid) != 3:
        raise ValueError(f"the frame-difference floor needs video tokens on a (T, H, W) grid; "
                         f"{type(backbone).__name__} has a {grid or 'no'} grid (images have no previous frame)")
    T = grid[0]
    pixels = backbone.patch_pixels(inputs, block).float()  # (B, T*S, D)
    if T < 2:
        return torch.zeros(pixels.shape[:2], device=pixels.device)
    pixels = pixels.reshape(pixels.shape[0], T, -1, pixels.shape[-1])
    diff = (pixels[:, 1:] - pixels[:, :-1]).abs().mean(-1)  # (B, T-1, S): frame t against t - 1
    return torch.cat([diff[:, :1], diff], dim=1).flatten(1)


class FrameDifference(Reducer):
    """Frame-difference floor on video: score = rank of the patch's change since the previous frame
    (:func:`frame_change`) among the clip's alive patch tokens, ``(rank + 0.5) / n`` (ties share their
    mean rank), so budget mode keeps the most-changed tokens and threshold t about ``1 - t`` of them.
    Refuses image backbones (no time axis) in one line."""

    uses_policy = True

    def forward(self, x: StageInput) -> Decision:
        return _keep_by_rank(x, frame_change(x.backbone, x.inputs, x.block), self.macs)

    def macs(self, n) -> float:
        return 0.0

    def describe(self) -> dict:
        return {"method": "framediff"}
