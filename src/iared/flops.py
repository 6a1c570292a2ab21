"""Analytic compute of a ViT with a variable number of tokens per block: the one place for FLOP formulas.

Convention: multiply-accumulates of the matrix products (what DeiT and IA-RED² report as
"FLOPs": DeiT-S = 4.6 G at 224 px). Elementwise work (LayerNorm, GELU, softmax, residual adds)
is left out, as fvcore-style counters do.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:  # models import this module for their MAC counts
    from iared.models.vit import ViTConfig


def block_macs(n, dim: int, mlp_ratio: float):
    """One block on ``n`` tokens (int or tensor): qkv + proj + MLP (linear in n), QK^T + AV (quadratic)."""
    return n * dim * dim * (4 + 2 * mlp_ratio) + 2 * n * n * dim


def gated_block_macs(n, n_qkv, n_proj, n_mlp, dim: int, mlp_ratio: float):
    """A block whose token-wise products ran on some of its ``n`` alive tokens only (streaming reuse,
    :mod:`iared.streaming`): qkv on ``n_qkv``, the output projection on ``n_proj``, the MLP on
    ``n_mlp`` rows; attention (QK^T, AV) over all ``n``. Equals :func:`block_macs` when all are ``n``."""
    return dim * dim * (3 * n_qkv + n_proj + 2 * mlp_ratio * n_mlp) + 2 * n * n * dim


def rfft_macs(length: int) -> float:
    """A real FFT (or its inverse) of ``length`` points: ``length * log2(length)`` real
    multiply-accumulates (a complex FFT of half the length, (m/2) log2 m complex products of 4)."""
    return length * math.log2(length) if length > 1 else 0.0


def aug_shortcut_macs(n, dim: int, blocks: int):
    """One augmented shortcut on ``n`` tokens: its block-circulant product through the FFT
    (:func:`iared.models.vit.block_circulant_matmul`), ``blocks`` x ``blocks`` circulant blocks of
    ``b = dim / blocks``: per token, ``blocks`` forward and ``blocks`` inverse real FFTs of b points
    and ``blocks**2 * (b // 2 + 1)`` complex products (4 real each). The weights' own spectra are
    computed once per forward pass, not per token, and left out (as the bias and the GELU)."""
    b = dim // blocks
    return n * (2 * blocks * rfft_macs(b) + 4 * blocks * blocks * (b // 2 + 1))


def vit_block_macs(n, cfg: ViTConfig):
    """One block of a ViT of ``cfg`` on ``n`` tokens: :func:`block_macs` plus its augmented
    shortcuts (``cfg.aug_shortcuts`` beside the attention and as many beside the MLP)."""
    macs = block_macs(n, cfg.embed_dim, cfg.mlp_ratio)
    if cfg.aug_shortcuts:
        macs = macs + 2 * cfg.aug_shortcuts * aug_shortcut_macs(n, cfg.embed_dim, cfg.aug_circulant_blocks)
    return macs


def interpreter_macs(n, dim: int):
    """Interpreter on ``n`` tokens: keys for all tokens, the query for the class token only, dot products."""
    return n * dim * dim + dim * dim + n * dim


def mlp_predictor_macs(n, dim: int, hidden: int):
    """DynamicViT-style score predictor on ``n`` tokens: two-layer local MLP + global mix + scorer."""
    return n * (dim * hidden + hidden * hidden // 2 + hidden // 2 * hidden // 4 + hidden // 4 * 2)


def bipartite_matching_macs(n, dim: int):
    """ToMe's matching on ``n`` tokens: cosine similarity of the two halves (n/2 x n/2 dot products)."""
    return (n // 2) * (n - n // 2) * dim


def token_fusion_macs(n, dim: int):
    """Weighted average of ``n`` tokens into fewer (ToMe's merge, EViT's fusion): a product per channel."""
    return n * dim


def significance_macs(n):
    """ATS's significance on ``n`` tokens: class attention times value norm (the block computed both)."""
    return n


def embed_macs(cfg: ViTConfig) -> int:
    """The patch embedding: one ``patch_size`` convolution, or a ``conv_stem`` (3x3 convs, each at its
    stage's input resolution) and a 1x1 projection; for a video model (``num_frames``), every frame's."""
    if not getattr(cfg, "conv_stem", ()):
        return cfg.num_patches * cfg.embed_dim * cfg.in_chans * cfg.patch_size**2
    macs, prev, side = 0, cfg.in_chans, cfg.img_size
    for width in cfg.conv_stem:
        macs += side * side * prev * width * 9
        prev, side = width, side // 2
    frames = getattr(cfg, "num_frames", 1)  # a video model runs the stem on every frame
    return frames * macs + cfg.num_patches * cfg.embed_dim * prev


def head_macs(cfg: ViTConfig) -> int:
    return cfg.num_classifier_heads * cfg.embed_dim * cfg.num_classes


def vit_macs(cfg: ViTConfig, tokens_per_block: Sequence | Tensor | None = None,
             interpreter_tokens: Sequence | Tensor = ()) -> Tensor:
    """Per-image MACs. ``tokens_per_block``: ``depth`` counts (ints or ``(B,)`` tensors), default
    all tokens; ``interpreter_tokens``: token count seen by each interpreter (same forms)."""
    full = cfg.num_patches + cfg.num_prefix_tokens
    if tokens_per_block is None:
        tokens_per_block = [full] * cfg.depth
    if len(tokens_per_block) != cfg.depth:
        raise ValueError(f"need {cfg.depth} token counts, got {len(tokens_per_block)}")
    total = torch.as_tensor(float(embed_macs(cfg) + head_macs(cfg)), dtype=torch.float64)
    for n in tokens_per_block:
        total = total + vit_block_macs(torch.as_tensor(n, dtype=torch.float64), cfg)
    for n in interpreter_tokens:
        total = total + interpreter_macs(torch.as_tensor(n, dtype=torch.float64), cfg.embed_dim)
    return total


def full_macs(cfg: ViTConfig) -> float:
    """MACs of the unpruned backbone for one image."""
    return float(vit_macs(cfg))


def divided_block_macs(frames: int, positions: int, dim: int, hidden: int):
    """A divided space-time TimeSformer block on a dense clip of ``frames`` frames of ``positions``
    patch tokens and one class token, its MLP ``hidden`` units wide (VA-RED²'s temporal and channel
    choices, :mod:`iared.reducers.vared`). Linear layers: temporal qkv + proj + ``temporal_fc`` (5 C^2)
    on the patch tokens, spatial qkv + proj (4 C^2) on them and the class token's copy in every frame,
    the MLP (2 C hidden) on every token; attention products 2 C n^2 per segment: ``positions``
    temporal segments of ``frames`` tokens, ``frames`` spatial ones of ``positions + 1``. With every
    frame and the whole MLP it is :meth:`iared.models.timesformer.Block.macs` on the whole clip."""
    n_p = frames * positions
    linear = n_p * 5 * dim * dim + (n_p + frames) * 4 * dim * dim + (n_p + 1) * 2 * dim * hidden
    return linear + 2 * dim * positions * frames**2 + 2 * dim * frames * (positions + 1) ** 2
