"""The Backbone protocol: what the stage loop (:mod:`iared.stages`) needs from a model.

A backbone turns inputs into a :class:`iared.tokens.Tokens` batch, runs blocks that map Tokens to
Tokens in any layout, and reads predictions off the surviving tokens. The loop never asks which
architecture it runs: ViT / DeiT here; video and multiscale backbones implement the same members.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from torch import Tensor, nn

from iared.tokens import Tokens


@runtime_checkable
class Backbone(Protocol):
    """``embed`` -> blocks -> ``forward_head``, plus the MAC counts that make FLOPs analytic.

    ``blocks[i](tokens, record=None) -> tokens``: a block runs on whatever tokens are alive; when
    given a :class:`iared.models.vit.BlockRecord` it fills it with what reducers read (class
    attention, keys). ``num_prefix_tokens`` tokens at the front of every image are never removed.

    Blocks need not be alike: a multiscale backbone (MViTv2) changes width and grid from block to
    block, so the MAC count and the input shape are asked per block. A block whose output grid
    differs from its input's (a resolution change) returns every token of the new grid, so the
    alive count after it is ``block_input_shape(block + 1)[0]``. Optional:
    ``default_stage_starts(num_stages)``, where reducers belong when blocks are not interchangeable.
    """

    blocks: Sequence[nn.Module]
    num_prefix_tokens: int

    @property
    def num_tokens(self) -> int: ...  # tokens per input after embed, prefix included

    @property
    def token_dim(self) -> int: ...

    @property
    def token_grid(self) -> tuple[int, ...]: ...  # shape of the non-prefix tokens, row-major

    def embed(self, inputs: Tensor) -> Tokens: ...

    def forward_head(self, tokens: Tokens) -> Tensor: ...

    def block_input_shape(self, block: int) -> tuple[int, int]: ...  # (tokens, channels) entering it, none dropped

    def block_macs(self, n, block: int): ...  # MACs of block `block` on n alive tokens (int or (B,) tensor)

    def fixed_macs(self) -> float: ...  # embedding + head

    def patch_pixels(self, inputs: Tensor, block: int = 0) -> Tensor: ...  # (B, N, pixels per token of
    # the grid entering `block`; pixel floors)
