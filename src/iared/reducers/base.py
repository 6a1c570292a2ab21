"""The Reducer protocol: what happens to the tokens at a stage boundary.

A reducer looks at the alive tokens (and, where its method needs them, at what the block before
recorded: class-token attention, keys) and returns a :class:`iared.tokens.Decision`: which tokens
to keep, which to merge into which, per-token scores where the method has them, the
log-probability of sampled decisions in training, and its own MACs. The stage loop applies the
decision; the reducer never touches the layout.

IA-RED²'s interpreter + policy is one reducer (:class:`iared.interpreter.MultiHeadInterpreter`);
the peers (ToMe, EViT, DynamicViT, ATS) and the floors (random, pixel saliency) are the others.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from torch import Tensor, nn

from iared.tokens import Decision, Tokens

if TYPE_CHECKING:
    from iared.models.protocol import Backbone
    from iared.models.vit import BlockRecord

Mode = Literal["sample", "threshold", "budget", "all"]
MODES: tuple[str, ...] = ("sample", "threshold", "budget", "all")
DEFAULT_THRESHOLD = 0.5  # the paper's inference rule: keep a token whose score exceeds 0.5


def check_threshold(threshold, what: str = "--threshold"):
    """``threshold`` (one value or one per stage) unchanged when every value is in [0, 1], else a one-line
    ValueError naming it: scores are keep probabilities, so 1.5 would silently drop every token
    and -0.2 keep all of them. None (use the checkpoint's) passes."""
    if threshold is None:
        return None
    values = list(threshold) if isinstance(threshold, (list, tuple)) else [threshold]
    bad = [v for v in values if not (isinstance(v, (int, float)) and 0.0 <= float(v) <= 1.0)]
    if bad:
        raise ValueError(f"{what} {threshold}: thresholds are keep probabilities, in [0, 1] (got {bad[0]})")
    return threshold


def quarter_locations(depth: int, count: int = 3) -> tuple[int, ...]:
    """``round(i * depth / (count + 1))`` for i = 1..count, within [1, depth - 1], duplicates
    dropped: 12 blocks (3, 6, 9) as EViT and DynamicViT; 6 blocks (2, 3, 4); 3 blocks (1, 2)."""
    if depth < 2:
        raise ValueError(f"a reducer that reads the block before needs at least 2 blocks, got depth {depth}")
    locs = {min(depth - 1, max(1, round(i * depth / (count + 1)))) for i in range(1, count + 1)}
    return tuple(sorted(locs))


@dataclass(frozen=True)
class StageSettings:
    """How a stage decides, given per-token scores (see :func:`iared.reducers.policy.keep_from_scores`).

    ``sample``: keep ~ Bernoulli(eps + (1 - 2 eps) score) (training); ``threshold``: keep score >
    ``threshold``; ``budget``: keep the top ``keep_ratio`` of the alive patch tokens (same count in
    every image); ``all``: the stage's reducer does not run.
    """

    mode: str = "threshold"
    threshold: float = DEFAULT_THRESHOLD
    keep_ratio: float | None = None
    exploration: float = 0.0
    # ``sample`` mode: uniform noise ``(B, N0)`` in original token positions, or None (torch's RNG).
    # Given by trainers so a draw is a pure function of (seed, step, image), whatever the layout
    # and however a batch is split over processes.
    noise: Tensor | None = None


@dataclass
class StageInput:
    """What a reducer sees. ``tokens``: the alive tokens; ``record``: the previous block's record
    when the reducer's ``needs_record`` is True (None before the first block); ``inputs``: the
    model's raw input (pixel floors read it through ``backbone.patch_pixels``); ``block``: the
    stage's first block, which says the grid its tokens lie on (multiscale backbones)."""

    tokens: Tokens
    stage: int
    settings: StageSettings
    inputs: Tensor
    backbone: Backbone
    record: BlockRecord | None = None
    block: int = 0


class Reducer(nn.Module):
    """Base class of token reducers: ``forward(StageInput) -> Decision``.

    ``needs_record``: the loop asks the block before this stage to record class attention and keys.
    ``uses_policy``: the reducer produces scores that the stage settings (threshold / sample /
    budget) turn into keep decisions; reducers with a knob of their own (ToMe's r, EViT's rate)
    set False and ignore the settings' mode (``all`` still switches them off).
    """

    needs_record: bool = False
    uses_policy: bool = True

    def forward(self, x: StageInput) -> Decision:  # pragma: no cover - interface
        raise NotImplementedError

    def describe(self) -> dict:
        """The reducer's name and knob, saved with checkpoints and reported by ``compare``."""
        return {"method": type(self).__name__}
