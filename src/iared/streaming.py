"""Streaming inference: frame after frame, recompute only the tokens whose input changed.

A camera, a screen recording, a video call: most patches barely change from one frame to the next.
Following Eventful Transformers (Dutson et al., ICCV 2023), every token-wise product of a ViT block
sits behind a *gate* that keeps, per token, a reference input and the output computed from it::

    block(x):   qkv = gate_qkv(x)              # LayerNorm + qkv projection, per token
                a   = attention(qkv)           # recomputed every frame from the cached q, k, v
                y   = x + ls1(gate_proj(a))    # output projection, per token
                out = y + ls2(gate_mlp(y))     # LayerNorm + MLP, per token

A gate recomputes the tokens it selects, stores their new input as the reference and their output
in its cache, and hands every other token the output cached for its reference. Residual sums use
the current values. Attention is recomputed in full from the cached queries, keys and values (no
delta update): given the cache it is exact, and over the short sequences of a pruned ViT it is a
small share of a block's products. With every gate open the pass is the per-frame model, exactly.

Gate rules (:class:`GatePolicy`): ``threshold`` (relative change ``|x - ref| / |ref|`` above a value),
``top`` (that fraction of each stream's alive tokens that changed most), and the floors ``random``
(a random fraction) and ``pixel`` (the patches whose pixels changed, the same set at every gate);
``all`` recomputes everything (the per-frame model). Key frames recompute everything as EVA² does:
every ``keyframe_every`` frames, or when the patch embeddings drifted by more than ``drift`` since
the last key frame. ``hold`` is the key-frame-only floor: between key frames the last prediction
is repeated and nothing is computed.

With IA-RED² (any :class:`iared.stages.ReducedModel`) the stage loop is the model's own: its
interpreters drop tokens before each stage, a dropped token is not computed at all, and a kept one
goes through the gates (a token kept now but never computed before is always recomputed). The
state lives in an explicit :class:`StreamState` the caller owns::

    stream = Stream(model, GatePolicy("threshold", 0.1))
    state = stream.init(batch_size)           # a batch of independent streams
    for frame in frames:                      # (B, C, H, W) per step
        logits, state = stream.step(frame, state)
        state.last.macs                       # (B,) MACs this frame, per stream

Blocks must be :class:`iared.models.vit.Block` (the ViT / DeiT family, augmented shortcuts aside).
MACs follow :mod:`iared.flops`' convention: matrix products only, so the gates' own bookkeeping
(difference norms, gathers) is elementwise work and not counted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from iared import flops
from iared.models.vit import Block, BlockRecord
from iared.stages import ReducedModel
from iared.tokens import DenseTokens, Tokens

__all__ = ["GATES", "GATE_RULES", "GatePolicy", "StepStats", "Stream", "StreamState", "run_stream"]

GATE_RULES = ("threshold", "top", "random", "pixel", "all", "hold")
GATES = ("qkv", "proj", "mlp")  # the gated products of a block, in order


@dataclass(frozen=True)
class GatePolicy:
    """Which tokens the gates recompute (module docstring).

    ``rule``: one of ``GATE_RULES``. ``value``: ``threshold``: the relative change above which a token
    is recomputed; ``top`` / ``random``: the fraction of each stream's alive tokens recomputed at every
    gate; ``pixel``: the relative change of a patch's pixels since it was last recomputed.
    ``keyframe_every``: a stream recomputes everything k frames after its last key frame (0: never;
    ``hold`` needs it).
    ``drift``: a stream gets a key frame when the mean relative change of its tokens entering the first
    block since its last key frame exceeds this (0: off). ``seed``: the ``random`` rule's generator (one
    for the batch: a stream's draws depend on its batch mates, its expected share does not).
    """

    rule: str = "threshold"
    value: float = 0.1
    keyframe_every: int = 0
    drift: float = 0.0
    seed: int = 0

    def __post_init__(self):
        if self.rule not in GATE_RULES:
            raise ValueError(f"unknown gate rule {self.rule!r}: expected one of {', '.join(GATE_RULES)}")
        if not math.isfinite(self.value) or self.value < 0:
            raise ValueError(f"gate value must be a finite number >= 0, got {self.value!r}")
        if self.rule in ("top", "random") and self.value > 1:
            raise ValueError(f"gate rule {self.rule!r} takes a fraction in [0, 1], got {self.value}")
        if self.keyframe_every < 0 or not math.isfinite(self.drift) or self.drift < 0:
            raise ValueError(f"key frames: keyframe_every and drift must be >= 0, got {self.keyframe_every}, "
                             f"{self.drift}")
        if self.rule == "hold" and self.keyframe_every < 1:
            raise ValueError("gate rule 'hold' repeats the last key frame's prediction: give keyframe_every >= 1")
        if self.rule == "hold" and self.drift:
            raise ValueError("gate rule 'hold' computes nothing between key frames, so it cannot see drift: "
                             "give keyframe_every only")

    def describe(self) -> dict:
        return {"rule": self.rule, "value": self.value, "keyframe_every": self.keyframe_every,
                "drift": self.drift, "seed": self.seed}


@dataclass
class StepStats:
    """What one step computed, per stream. ``macs``: ``(B,)`` float64, the frame's MACs (embedding,
    reducers, gated products, attention, head). ``alive``: ``(B, depth)`` tokens entering each block.
    ``recomputed``: ``(B, depth, 3)`` tokens each gate (``GATES``) recomputed. ``key``: ``(B,)`` bool.
    ``tokens``: with ``Stream(record_tokens=True)``, ``(B, N0)`` int8 per token: 0 never computed (dropped
    before the first block), 1 reused at every gate, 2 recomputed by at least one qkv gate."""

    macs: Tensor
    alive: Tensor
    recomputed: Tensor
    key: Tensor
    tokens: Tensor | None = None


class _GateCache:
    """One gate's per-token state over the stream grid (``B * N0`` rows), in one buffer so that a
    gate reads and writes it in one gather and one scatter: columns ``[:c_in]`` the reference
    input, ``[c_in]`` its norm (0: never computed), ``[c_in + 1:]`` the output computed from it."""

    def __init__(self, rows: int, c_in: int, c_out: int, like: Tensor):
        self.c_in = c_in
        self.buffer = like.new_zeros(rows, c_in + 1 + c_out)


@dataclass
class StreamState:
    """The state of a batch of ``batch_size`` independent streams; owned by the caller, updated by
    :meth:`Stream.step` (which returns it). ``frame``: frames seen so far."""

    batch_size: int
    frame: int = 0
    since_key: Tensor | None = None  # (B,) frames since each stream's last key frame
    gates: dict = field(default_factory=dict)  # (block, gate) -> _GateCache
    key_ref: Tensor | None = None  # (B * N0, C) tokens entering block 0 at each stream's last key frame
    pixel_ref: dict | None = None  # block -> (B * N0, pixels) patch pixels when that block last recomputed each token
    logits: Tensor | None = None  # the last prediction (the ``hold`` rule repeats it)
    last: StepStats | None = None
    generator: torch.Generator | None = None


class Stream:
    """Streaming inference of ``model`` under ``policy`` (module docstring).

    ``model``: a :class:`iared.stages.ReducedModel` (IA-RED², any reducer, or none) or a bare ViT
    backbone. ``forward_kwargs``: how the stage loop runs the reducers (default for a model with
    recorded inference settings: threshold mode at its threshold).
    """

    def __init__(self, model: nn.Module, policy: GatePolicy | None = None, *, record_tokens: bool = False,
                 **forward_kwargs):
        if not isinstance(model, ReducedModel):
            model = ReducedModel(model, [None], [0])
        blocks = list(model.backbone.blocks)
        bad = [type(b).__name__ for b in blocks if not isinstance(b, Block) or len(b.attn_shortcuts)]
        if bad:
            raise ValueError(f"streaming runs ViT-family blocks (iared.models.vit.Block without augmented "
                             f"shortcuts); this model has {bad[0]}")
        self.model = model.eval()
        self.policy = policy or GatePolicy()
        self.record_tokens = record_tokens
        inference = getattr(model, "inference", None)
        if not forward_kwargs and inference is not None:
            forward_kwargs = {"mode": "threshold", "threshold": inference.threshold}
        self.forward_kwargs = {"layout": "packed", **forward_kwargs}
        backbone = model.backbone
        self.num_tokens = backbone.num_tokens
        self.dim = backbone.token_dim
        self.depth = len(blocks)
        self._mlp_ratio = blocks[0].mlp.fc1.out_features / self.dim

    def init(self, batch_size: int, device: torch.device | str | None = None) -> StreamState:
        """A fresh state for ``batch_size`` streams: their first frame is computed in full."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        device = device or next(self.model.parameters()).device
        generator = torch.Generator(device=device).manual_seed(self.policy.seed)
        return StreamState(batch_size, since_key=torch.zeros(batch_size, dtype=torch.long, device=device),
                           generator=generator)

    @torch.no_grad()
    def step(self, frames: Tensor, state: StreamState) -> tuple[Tensor, StreamState]:
        """One frame of every stream: ``frames`` ``(B, C, H, W)`` -> logits ``(B, classes)``, and the state."""
        if frames.shape[0] != state.batch_size:
            raise ValueError(f"step: {frames.shape[0]} frames for a state of {state.batch_size} streams")
        policy, B = self.policy, state.batch_size
        key = torch.full((B,), state.frame == 0, dtype=torch.bool, device=frames.device)
        if policy.keyframe_every:  # per stream: counted from each stream's last key frame (drift ones too)
            key |= state.since_key.to(frames.device) >= policy.keyframe_every - 1
        if policy.rule == "hold" and not key.any():
            state.frame += 1
            state.since_key += 1
            zeros = torch.zeros(B, self.depth, dtype=torch.long)
            tokens = torch.zeros(B, self.num_tokens, dtype=torch.int8) if self.record_tokens else None
            state.last = StepStats(torch.zeros(B, dtype=torch.float64), zeros, zeros[..., None].repeat(1, 1, 3),
                                   key.cpu(), tokens)
            return state.logits, state
        run = _FrameRun(self, state, key, frames)
        out = self.model(frames, block_runner=run, **self.forward_kwargs)
        backbone = self.model.backbone
        macs = torch.as_tensor(backbone.fixed_macs(), dtype=torch.float64).expand(B).clone()
        for before, decision, _ in out.trace.decisions:
            if decision is not None:
                m = decision.macs(before.lengths()) if callable(decision.macs) else decision.macs
                macs += m.detach().double().cpu() if isinstance(m, Tensor) else float(m)
        recomputed = run.counts()
        alive, done = run.alive.double(), recomputed.double()
        macs += flops.gated_block_macs(alive, done[..., 0], done[..., 1], done[..., 2], self.dim,
                                       self._mlp_ratio).sum(1)
        state.frame += 1
        state.since_key = torch.where(run.key, 0, state.since_key + 1)
        state.logits = out.logits
        tokens = None if run.token_codes is None else run.token_codes.view(B, -1).cpu()
        state.last = StepStats(macs, run.alive, recomputed, run.key.cpu(), tokens)
        return out.logits, state


class _FrameRun:
    """The block runner of one frame (:class:`iared.stages.ReducedModel`'s ``block_runner``): the gated
    block, reading and updating the state's caches."""

    def __init__(self, stream: Stream, state: StreamState, key: Tensor, frames: Tensor):
        self.stream, self.state = stream, state
        B, depth = state.batch_size, stream.depth
        self.alive = torch.zeros(B, depth, dtype=torch.long)
        self._picked: list[Tensor] = []
        self._set_key(key)
        self.token_codes = (torch.zeros(B * stream.num_tokens, dtype=torch.int8, device=frames.device)
                            if stream.record_tokens else None)
        self.pixels = self._patch_pixels(frames) if stream.policy.rule == "pixel" else None
        self.changed_pixels: Tensor | None = None  # this block's pixel rule selection, rows of the tokens

    def _patch_pixels(self, frames: Tensor) -> Tensor:
        """``(B * N0, P)``: the pixels under every token (zeros for prefix tokens), on the stream grid."""
        n0 = self.stream.num_tokens
        patches = self.stream.model.backbone.patch_pixels(frames)  # (B, N_patches, P)
        prefix = n0 - patches.shape[1]
        return torch.cat([patches.new_zeros(patches.shape[0], prefix, patches.shape[2]), patches], 1).flatten(0, 1)

    def _pixel_changes(self, block: int, rows: Tensor | None, tokens: Tokens) -> Tensor:
        """Token-aligned bool: prefix tokens, and patches whose pixels moved by more than the policy's
        value since this block last recomputed them (block by block: a token dropped before a block
        keeps that block's reference until it is computed there again)."""
        refs = self.state.pixel_ref
        if refs is None:
            refs = self.state.pixel_ref = {}
        if block not in refs:
            refs[block] = torch.zeros_like(self.pixels)
        pixels, ref = _take(self.pixels, rows), _take(refs[block], rows)
        change = (pixels - ref).norm(dim=-1) / ref.norm(dim=-1).clamp_min(1e-6)
        return (change > self.stream.policy.value) | tokens.is_prefix().reshape(-1)

    def _set_key(self, key: Tensor) -> None:
        """Which streams recompute everything this frame: ``key`` (B,) bool, and what the gates read."""
        self.key = key
        self.all_key = bool(key.all())
        self.some_key = bool(key.any()) and not self.all_key

    def __call__(self, index: int, block: Block, tokens: Tokens, record: BlockRecord | None) -> Tokens:
        x = tokens.data
        C = x.shape[-1]
        flat = x.reshape(-1, C)
        rows, image = self._rows(tokens)
        self.alive[:, index] = tokens.lengths().cpu()
        if self.token_codes is not None:
            seen = torch.arange(flat.shape[0], device=flat.device) if rows is None else rows
            self.token_codes[seen] = torch.maximum(self.token_codes[seen], torch.ones_like(self.token_codes[seen]))
        if index == 0:
            self._key_frames(flat, rows, image)
        if self.pixels is not None:
            self.changed_pixels = self._pixel_changes(index, rows, tokens)
        attn = block.attn
        heads = attn.num_heads
        qkv = self._gate(index, 0, flat, rows, image, lambda h: attn.qkv(block.norm1(h)), 3 * C, tokens)
        q, k, v = qkv.reshape(*x.shape[:-1], 3, heads, C // heads).unbind(-3)
        if record is not None:
            record.fill(tokens, q, k, v)
        a = tokens.attend(q, k, v).flatten(-2).reshape(-1, C)
        y = flat + block.ls1(self._gate(index, 1, a, rows, image, attn.proj, C, tokens))
        out = y + block.ls2(self._gate(index, 2, y, rows, image, lambda h: block.mlp(block.norm2(h)), C, tokens))
        return tokens.with_data(out.reshape(x.shape))

    def _rows(self, tokens: Tokens) -> tuple[Tensor | None, Tensor]:
        """Each token's row on the stream grid (``image * N0 + position``; None when the tokens are the
        whole grid in order), and its stream."""
        n0 = self.stream.num_tokens
        if tokens.valid() is not None:
            raise ValueError("streaming runs packed or dense token layouts, not padded ones")
        image = tokens.image_ids().reshape(-1)
        if isinstance(tokens, DenseTokens) and tokens.data.shape[1] == n0:
            return None, image
        return image * n0 + tokens.index.reshape(-1), image

    def _key_frames(self, flat: Tensor, rows: Tensor | None, image: Tensor) -> None:
        """Drift-triggered key frames, decided on the tokens entering the first block."""
        state, policy = self.state, self.stream.policy
        if not policy.drift:
            return
        n_rows = state.batch_size * self.stream.num_tokens
        if state.key_ref is None:
            state.key_ref = flat.new_zeros(n_rows, flat.shape[1])
        ref = _take(state.key_ref, rows)
        ref_norm = ref.norm(dim=-1)
        known = ref_norm > 0  # tokens seen at the stream's last key frame (a dropped one has no reference)
        change = torch.where(known, (flat - ref).norm(dim=-1) / ref_norm.clamp_min(1e-12), 0)
        zeros = torch.zeros(state.batch_size, dtype=change.dtype, device=flat.device)
        per_stream = zeros.index_add(0, image, change) / zeros.index_add(0, image, known.to(change.dtype)).clamp_min(1)
        never = zeros.index_add(0, image, known.to(change.dtype)) == 0  # no reference yet: a key frame
        self._set_key(self.key | (per_stream > policy.drift) | never)
        if self.key.any():
            picked = self.key[image].nonzero().squeeze(1)
            target = picked if rows is None else rows.index_select(0, picked)
            state.key_ref.index_copy_(0, target, flat.index_select(0, picked))

    def _gate(self, block: int, gate: int, x: Tensor, rows: Tensor | None, image: Tensor, fn, c_out: int,
              tokens: Tokens) -> Tensor:
        """``fn`` on the rows of ``x`` this gate selects; the cached outputs for the others: ``(R, c_out)``."""
        state, policy = self.state, self.stream.policy
        cache = state.gates.get((block, gate))
        if cache is None:
            cache = state.gates[(block, gate)] = _GateCache(state.batch_size * self.stream.num_tokens,
                                                            x.shape[1], c_out, x)
        c_in = cache.c_in
        if policy.rule == "all" or bool(self.all_key):
            picked = None
        else:
            held = cache.buffer.clone() if rows is None else cache.buffer.index_select(0, rows)  # patched below
            ref_norm = held[:, c_in]
            if policy.rule in ("threshold", "top"):
                change = torch.linalg.vector_norm(x - held[:, :c_in], dim=-1)
                if policy.rule == "threshold":  # never computed: norm 0, any change selects it
                    select = change > policy.value * ref_norm
                else:
                    select = _top_per_image(change / ref_norm, image, state.batch_size, policy.value)
                    select |= ref_norm == 0  # never computed: always, beyond the fraction
            elif policy.rule == "pixel":
                select = self.changed_pixels | (ref_norm == 0)
            else:  # random
                draw = torch.rand(x.shape[0], generator=state.generator, device=x.device) < policy.value
                select = draw | tokens.is_prefix().reshape(-1) | (ref_norm == 0)
            if self.some_key:
                select |= self.key[image]
            picked = select.nonzero().squeeze(1)
        if gate == 0 and (self.token_codes is not None or self.pixels is not None):
            done = torch.arange(x.shape[0], device=x.device) if picked is None else picked
            done = done if rows is None else rows.index_select(0, done)
            if self.token_codes is not None:
                self.token_codes[done] = 2
            if self.pixels is not None:
                self.state.pixel_ref[block].index_copy_(0, done, self.pixels.index_select(0, done))
        if picked is None or picked.numel() == x.shape[0]:  # every row: no gather, no scatter
            out = fn(x)
            fresh = torch.cat([x, torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(1e-12), out], 1)
            _put(cache.buffer, rows, fresh)
            self._count(block, gate, image)
            return out
        out = held[:, c_in + 1:]
        if picked.numel():
            xs = x.index_select(0, picked)
            ys = fn(xs)
            out.index_copy_(0, picked, ys)
            target = picked if rows is None else rows.index_select(0, picked)
            fresh = torch.cat([xs, torch.linalg.vector_norm(xs, dim=-1, keepdim=True).clamp_min(1e-12), ys], 1)
            cache.buffer.index_copy_(0, target, fresh)
        self._count(block, gate, image.index_select(0, picked))
        return out

    def _count(self, block: int, gate: int, image: Tensor) -> None:
        """Remember which streams' tokens a gate recomputed; counted once per frame (:meth:`counts`)."""
        self._picked.append(image + self.state.batch_size * (block * len(GATES) + gate))

    def counts(self) -> Tensor:
        """``(B, depth, 3)`` tokens each gate recomputed this frame, per stream."""
        B, depth = self.state.batch_size, self.stream.depth
        if not self._picked:
            return torch.zeros(B, depth, len(GATES), dtype=torch.long)
        flat = torch.bincount(torch.cat(self._picked), minlength=B * depth * len(GATES)).cpu()
        return flat.view(depth, len(GATES), B).permute(2, 0, 1)


def _take(t: Tensor, rows: Tensor | None) -> Tensor:
    return t if rows is None else t.index_select(0, rows)


def _put(t: Tensor, rows: Tensor | None, values: Tensor) -> None:
    """``t[rows] = values`` (rows None: all of ``t``)."""
    if rows is None:
        t.copy_(values)
    else:
        t.index_copy_(0, rows, values)


def _top_per_image(score: Tensor, image: Tensor, n_images: int, fraction: float) -> Tensor:
    """Token-aligned bool: the ``ceil(fraction * n)`` highest-scoring tokens of each image's ``n``."""
    counts = torch.bincount(image, minlength=n_images)
    k = torch.ceil(counts.double() * fraction).long()
    order = torch.argsort(score, descending=True)
    order = order[torch.argsort(image[order], stable=True)]
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(score.shape[0], device=score.device) - starts[image[order]]
    select = torch.zeros_like(image, dtype=torch.bool)
    select[order] = rank < k[image[order]]
    return select


def run_stream(stream: Stream, frames: Tensor) -> dict[str, Tensor]:
    """Stream ``frames`` ``(B, T, C, H, W)`` (B independent streams) from a fresh state.

    Returns ``logits`` ``(B, T, classes)``, ``macs`` ``(B, T)``, ``alive`` ``(B, T, depth)``,
    ``recomputed`` ``(B, T, depth, 3)`` and ``key`` ``(B, T)``.
    """
    state = stream.init(frames.shape[0], frames.device)
    logits, stats = [], []
    for t in range(frames.shape[1]):
        out, state = stream.step(frames[:, t], state)
        logits.append(out)
        stats.append(state.last)
    return {"logits": torch.stack(logits, 1), "macs": torch.stack([s.macs for s in stats], 1),
            "alive": torch.stack([s.alive for s in stats], 1),
            "recomputed": torch.stack([s.recomputed for s in stats], 1),
            "key": torch.stack([s.key for s in stats], 1)}
