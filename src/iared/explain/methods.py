"""Heatmap methods behind one call: ``method(model, images, target=None) -> (B, H, W)`` in [0, 1].

Every method is a small class configured at construction and called like pytorch-grad-cam's
CAMs. ``model`` is an :class:`iared.pruning.IARed` or a bare :class:`VisionTransformer`; only
the interpreter needs the IARed (it raises a ``TypeError`` naming the model type otherwise).
The attention-based methods explain the model that actually ran: for an IARed, the pruned pass
in threshold mode (its checkpoint's threshold), attention recorded on the packed tokens and put
back on the token grid with dropped tokens scored 0 (:class:`iared.tokens.AttentionMap`);
Grad-CAM explains the unpruned backbone (its hooks need every token at the hooked layer).
``images``: ``(B, C_in, H, W)``, already normalised as the model expects. ``target``: class
indices ``(B,)`` (or a list / int), ``None`` = the backbone's predicted class; methods that do
not depend on a class (interpreter, raw attention, rollout, random) ignore it.

Token maps live on the patch grid ``(h, w)`` (patch tokens only, row-major); they are upsampled
bilinearly (half-pixel centres, as ``cv2.resize`` in Grad-CAM) to the image size and normalised
per image to [0, 1] (min-max; a constant map becomes all zeros).

Video (a TimeSformer backbone): ``images`` are clips ``(B, T, C_in, H, W)`` and maps ``(B, T, H, W)``,
one per frame, normalised per clip (the space-time grid ``(T, h, w)``, frame-major). The interpreter
and random methods apply; the attention-based ones need one ``(N, N)`` attention per block, which
divided space-time attention does not have (:data:`VIDEO_METHODS`, :func:`check_video_methods`).

Methods (registry :data:`METHODS`; ``explain(model, images, "name[:int]")``):

==================  =======================================================================
``interpreter``     IA-RED²'s own scores from a real pruned pass (threshold mode), stages
                    combined (mean over stages, dropped tokens count 0; see
                    :class:`InterpreterMap`); ``interpreter:g`` = stage g alone (0-based)
``raw-attention``   class-token row of one block's attention, heads averaged
                    (``raw-attention:b`` = block b, default the last)
``rollout``         attention rollout (Abnar & Zuidema 2020), residual identity added
``gradcam``         Grad-CAM on a block's ``norm1`` (pytorch-grad-cam with a token reshape;
                    ``gradcam:b``, default the last block)
``chefer``          gradient-weighted rollout (Chefer, Gur & Wolf, ICCV 2021)
``random``          random patch scores: the floor every method must beat (``random:seed``)
==================  =======================================================================

The attention-based methods run the backbone's explicit-attention path (``attention_out``)
only here; inference outside explainers keeps the fused SDPA path. :func:`default_methods`
lists every method for a model, the interpreter once per stage and combined.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from iared.models.vit import VisionTransformer
from iared.pruning import IARed

__all__ = [
    "DEFAULT_METHODS",
    "METHODS",
    "AttentionRollout",
    "CheferRollout",
    "GradCAM",
    "InterpreterMap",
    "RandomMap",
    "RawAttention",
    "backbone_of",
    "check_video_methods",
    "default_methods",
    "explain",
    "is_video",
    "make_method",
    "normalize_maps",
    "resolve_target",
    "token_map_to_image",
]


# -- shared helpers ---------------------------------------------------------------------------


def backbone_of(model: nn.Module) -> VisionTransformer:
    """The backbone inside ``model`` (an :class:`IARed`) or ``model`` itself (a :class:`VisionTransformer`
    or a TimeSformer)."""
    from iared.models.timesformer import TimeSformer

    if isinstance(model, IARed):
        return model.backbone
    if isinstance(model, (VisionTransformer, TimeSformer)):
        return model
    raise TypeError(f"expected an IARed, a VisionTransformer or a TimeSformer, got {type(model).__name__}")


def is_video(model: nn.Module) -> bool:
    """Whether ``model`` (or its backbone) reads clips: its token grid is ``(T, h, w)``."""
    backbone = model.backbone if isinstance(model, IARed) else model
    return len(tuple(getattr(backbone, "token_grid", ()))) == 3


def normalize_maps(maps: Tensor) -> Tensor:
    """Per-image min-max to [0, 1]: ``(B, ...)`` -> same shape, float32. Constant maps -> 0."""
    flat = maps.detach().float().flatten(1)
    lo = flat.min(1, keepdim=True).values
    span = flat.max(1, keepdim=True).values - lo
    out = torch.where(span > 0, (flat - lo) / span.clamp_min(1e-12), torch.zeros_like(flat))
    return out.view(maps.shape)


def token_map_to_image(patch_values: Tensor, backbone: VisionTransformer) -> Tensor:
    """``(B, h*w)`` patch-token values (no prefix tokens, row-major) -> ``(B, H, W)`` in [0, 1]; on a
    video backbone ``(B, T*h*w)`` -> ``(B, T, H, W)``, every frame upsampled, normalised per clip."""
    cfg = backbone.cfg
    frames = cfg.num_frames if is_video(backbone) else 1
    grid = patch_values.float().reshape(-1, 1, cfg.grid_size, cfg.grid_size)
    up = F.interpolate(grid, size=(cfg.img_size, cfg.img_size), mode="bilinear", align_corners=False)
    maps = up[:, 0].reshape(-1, frames, cfg.img_size, cfg.img_size)
    return normalize_maps(maps if frames > 1 else maps[:, 0])


def resolve_target(target, logits: Tensor) -> Tensor:
    """``(B,)`` long class indices: ``target`` as given, or the argmax of ``logits`` when None."""
    if target is None:
        return logits.argmax(-1)
    t = torch.as_tensor(target, device=logits.device).long().reshape(-1)
    if t.numel() == 1 and logits.shape[0] != 1:
        t = t.expand(logits.shape[0])
    if t.shape[0] != logits.shape[0]:
        raise ValueError(f"target: expected {logits.shape[0]} class indices, got {t.shape[0]}")
    if (t < 0).any() or (t >= logits.shape[1]).any():
        raise ValueError(f"target: class indices must lie in [0, {logits.shape[1]}), got {t.tolist()}")
    return t


def _attention_pass(model: nn.Module, images: Tensor) -> tuple[Tensor, list[Tensor], Callable[[list], list]]:
    """Run the model that is explained with attention recorded.

    Returns the logits, one raw attention tensor per block (differentiable, for gradients) and a
    function mapping per-block tensors of the same shapes (the attentions or their gradients)
    to ``(B, heads, N0, N0)`` on the original token grid (dropped tokens 0).
    """
    if isinstance(model, IARed):
        maps: list = []
        out = model(images, "threshold", threshold=model.inference.threshold, attention_out=maps)
        n0 = model.backbone.num_tokens
        return out.logits, [m.weights for m in maps], lambda ts: [m.to_grid(n0, t) for m, t in zip(maps, ts)]
    attns: list[Tensor] = []
    logits = backbone_of(model)(images, attention_out=attns)
    return logits, attns, lambda ts: list(ts)


def _attentions(model: nn.Module, images: Tensor) -> list[Tensor]:
    """One ``(B, heads, N0, N0)`` attention-probability tensor per block (explicit path, no grad)."""
    with torch.no_grad():
        _, attns, to_grid = _attention_pass(model, images)
        return to_grid(attns)


def _check_block(block: int, backbone: VisionTransformer, method: str) -> int:
    depth = len(backbone.blocks)
    if not -depth <= block < depth:
        raise ValueError(f"{method}: block {block} out of range for a backbone of depth {depth} (0..{depth - 1})")
    return block


def _cls_row_patches(matrix: Tensor, backbone: VisionTransformer) -> Tensor:
    """``(B, N, N)`` token-to-token relevance -> class-token row, patch columns ``(B, h*w)``.

    Without a class token (row 0 would then be a register or a patch), the mean of the patch tokens'
    rows: the question the interpreter and the pooled head ask in that case."""
    prefix = backbone.num_prefix_tokens
    if getattr(backbone.cfg, "class_token", True):
        return matrix[:, 0, prefix:]
    return matrix[:, prefix:, prefix:].mean(1)


# -- methods ----------------------------------------------------------------------------------


@dataclass
class InterpreterReadings:
    """What the interpreters said in one real pruned pass (threshold mode), on the token grid.

    ``out``: the pass's :class:`iared.stages.ReducedOutput` (``scores[g]`` ``(B, N0)``, 0 for tokens
    gone before stage g; ``keep[g]``). ``attention[g]``: ``(B, N0, H)`` stage g's interpreter read
    as single-query attention (:func:`interpreter_attention`), 0 on prefix tokens and on tokens not
    alive at stage g; None for a stage that ran no interpreter, or when not asked for.
    """

    out: object
    attention: list[Tensor | None]


def interpreter_attention(interpreter, tokens, temperature: float = 1.0) -> Tensor:
    """Token-aligned ``(..., H)``: per head, ``softmax_j(q_cls . k_j / (sqrt(d) T))`` over each image's
    alive patch tokens (prefix tokens and padding get 0).

    The keep score squashes the same logits through a sigmoid, which saturates: a trained interpreter
    scores most tokens near 0 or 1, a map with little order inside either group. The softmax keeps
    the order (the logits' differences), so the map is graded where the score is flat. Prefix tokens
    are left out because they are never candidates (always kept) and the map shows patches only.
    """
    logits = interpreter.head_logits(tokens) / temperature
    logits = logits.masked_fill(~tokens.patch_mask()[..., None], float("-inf"))
    # an image with no alive patch token softmaxes over nothing (NaN): it has no map to give
    return torch.nan_to_num(tokens.softmax_per_image(logits), nan=0.0)


def read_interpreters(model: IARed, images: Tensor, threshold, *, temperature: float | None = None) -> InterpreterReadings:
    """One threshold-mode pass of ``model`` on ``images``; with ``temperature``, each stage's
    interpreter also read as attention over the tokens it scored (:func:`interpreter_attention`).

    The tokens an interpreter scores are the previous stage's output, which the stage loop hands to
    the next stage's reducer only: a block runner (the loop's own hook, :mod:`iared.stages`) keeps
    the output of each stage's last block, and stage 0 scores the embedding, recomputed here."""
    starts = model.stage_starts
    inputs: dict[int, object] = {}
    runner = None
    if temperature is not None:
        inputs[0] = model.backbone.embed(images)
        next_stage = {s - 1: g for g, s in enumerate(starts) if g > 0}

        def runner(index, block, tokens, record):
            tokens = block(tokens, record=record)
            if index in next_stage:
                inputs[next_stage[index]] = tokens
            return tokens

    out = model(images, "threshold", threshold=threshold, block_runner=runner)
    attention: list[Tensor | None] = [None] * model.num_stages
    for g, tokens in inputs.items():
        interpreter = model.reducer(g)
        if interpreter is None or out.scores[g] is None:
            continue
        n0 = model.backbone.block_input_shape(starts[g])[0]
        probs = interpreter_attention(interpreter, tokens, temperature)
        attention[g] = torch.stack([tokens.scatter(probs[..., h], n0) for h in range(probs.shape[-1])], -1)
    return InterpreterReadings(out, attention)


READOUTS = ("score", "attention", "product", "attention-product")
"""How :class:`InterpreterMap` reads the interpreters (method ``interpreter-<readout>``)."""

DEFAULT_READOUT = "attention-product"
"""What the method ``interpreter`` (and ``iared explain``, ``predict --explain``, the demo) draws: the
readout chosen on digits-natural's validation split by ``iared explain-eval --readouts ...``, best
mean rank over mIoU, mAP and deletion among the candidates; the record of that choice is the
``selection`` of docs/explain-digits-natural-readouts.json (a test checks the two agree)."""

SELECTION_CANDIDATES = tuple(f"interpreter-{r}" for r in READOUTS) + ("interpreter-attention:0",)
"""The readouts ``explain-eval --readouts`` compares on validation by default."""


class InterpreterMap:
    """IA-RED²'s interpreters as the heatmap, from a real inference pass (threshold mode): the same
    modules and the same pass the model prunes with, no separate explainer, no training for it.

    ``readout`` (``stage=g`` reads stage g alone, 0-based, negative counts from the end; ``None``
    combines the stages):

    - ``"score"``: the keep score ``s_g`` (0 for patches gone before stage g). Combined: the mean
      over all G stages, a dropped token counting 0 at every later stage (a token's share in the
      computation is how many stages it survives).
    - ``"attention"``: the interpreter read as single-query attention, the mean over heads of
      :func:`interpreter_attention` (sums to 1 over the stage's alive patches; ``temperature``
      divides the logits). Combined: the mean over stages, 0 once a token is dropped.
    - ``"product"``: ``prod_g s_g``, the probability of surviving every stage under the sampling
      policy; a token dropped at stage g gets exactly 0 (its later scores are 0). No stage.
    - ``"attention-product"``: ``attention_g^a * product^b`` (``exponents=(a, b)``, stage default 0):
      the attention's grading among the survivors, the product's zeros for what the model dropped.

    Class-agnostic: ``target`` is ignored (the interpreter asks the class token's query, not a class).
    """

    def __init__(self, readout: str = "score", stage: int | None = None, threshold: float | Sequence[float] | None = None,
                 temperature: float = 1.0, exponents: tuple[float, float] = (1.0, 1.0)):
        if readout not in READOUTS:
            raise ValueError(f"unknown interpreter readout {readout!r}; known: {', '.join(READOUTS)}")
        if readout == "product" and stage is not None:
            raise ValueError("interpreter-product multiplies every stage: it takes no stage")
        if not temperature > 0:
            raise ValueError(f"interpreter: temperature must be positive, got {temperature}")
        self.readout = readout
        self.stage = 0 if readout == "attention-product" and stage is None else stage
        self.threshold = threshold  # None: the model's own (its checkpoint's inference threshold)
        self.temperature = float(temperature)
        self.exponents = tuple(float(e) for e in exponents)

    def __call__(self, model: IARed, images: Tensor, target=None) -> Tensor:
        if not isinstance(model, IARed):
            raise TypeError(f"the interpreter method needs an IARed model (a backbone with interpreters, "
                            f"e.g. from iared.pruning.load_pruned), got {type(model).__name__}")
        if self.stage is not None and not -model.num_stages <= self.stage < model.num_stages:
            raise ValueError(f"interpreter: stage {self.stage} out of range for a model with "
                             f"{model.num_stages} stages (0..{model.num_stages - 1})")
        threshold = model.inference.threshold if self.threshold is None else self.threshold
        wants_attention = self.readout in ("attention", "attention-product")
        with torch.no_grad():
            readings = read_interpreters(model, images, threshold,
                                         temperature=self.temperature if wants_attention else None)
        return token_map_to_image(self.patch_values(readings), model.backbone)

    def patch_values(self, readings: InterpreterReadings) -> Tensor:
        """``(B, h*w)`` patch values of this readout (before upsampling)."""
        out = readings.out
        if self.readout == "score":
            return self.patch_scores(out)
        if self.readout == "product":
            return self._product(out)
        attention = self._attention(readings)
        if self.readout == "attention":
            return attention
        a, b = self.exponents
        return attention.pow(a) * self._product(out).pow(b)

    def patch_scores(self, out) -> Tensor:
        """``(B, h*w)`` keep scores from a :class:`ReducedOutput` (the ``score`` readout)."""
        return self._stages(out.scores, "its interpreter")[:, out.num_prefix:]

    def _attention(self, readings: InterpreterReadings) -> Tensor:
        return self._stages([None if a is None else a.mean(-1) for a in readings.attention],
                            "its interpreter")[:, readings.out.num_prefix:]

    def _stages(self, per_stage: list[Tensor | None], what: str) -> Tensor:
        """Stage ``self.stage``'s ``(B, N0)`` values, or (None) their sum over the ran stages / G."""
        if self.stage is not None:
            chosen = per_stage[self.stage]
            if chosen is None:
                raise ValueError(f"interpreter: stage {self.stage} ran without {what} (mode 'all')")
            return chosen
        ran = [v for v in per_stage if v is not None]
        if not ran:
            raise ValueError("interpreter: no stage ran its interpreter")
        return torch.stack(ran).sum(0) / len(per_stage)

    @staticmethod
    def _product(out) -> Tensor:
        ran = [s for s in out.scores if s is not None]
        if not ran:
            raise ValueError("interpreter: no stage ran its interpreter")
        return torch.stack(ran).prod(0)[:, out.num_prefix:]


class RawAttention:
    """Class-token row of block ``block``'s attention (heads averaged), patch columns."""

    def __init__(self, block: int = -1):
        self.block = block

    def __call__(self, model: nn.Module, images: Tensor, target=None) -> Tensor:
        backbone = backbone_of(model)
        attn = _attentions(model, images)[_check_block(self.block, backbone, "raw-attention")]
        return token_map_to_image(_cls_row_patches(attn.mean(1), backbone), backbone)


class AttentionRollout:
    """Attention rollout (Abnar & Zuidema, ACL 2020), heads averaged.

    Per block ``A' = rownorm(mean_heads(A) + I)``; ``R = A'_L ... A'_1``; class-token row.
    """

    def __call__(self, model: nn.Module, images: Tensor, target=None) -> Tensor:
        backbone = backbone_of(model)
        attns = _attentions(model, images)
        rollout = None
        for attn in attns:
            a = attn.mean(1)
            a = a + torch.eye(a.shape[-1], device=a.device, dtype=a.dtype)
            a = a / a.sum(-1, keepdim=True)
            rollout = a if rollout is None else a @ rollout
        return token_map_to_image(_cls_row_patches(rollout, backbone), backbone)


class CheferRollout:
    """Gradient-weighted attention rollout (Chefer, Gur & Wolf, ICCV 2021, "Generic
    Attention-model Explainability"), the rule for self-attention encoders:

        R = I;  for each block: A_bar = mean_heads(relu(dy_t/dA * A));  R = R + A_bar @ R

    ``y_t`` is the target-class logit. Gradients are taken with ``torch.autograd.grad`` on the
    recorded attention tensors (same values as ``retain_grad``, without touching parameters'
    ``.grad``); the input is made to require grad so this works with a frozen backbone too.
    """

    def __call__(self, model: nn.Module, images: Tensor, target=None) -> Tensor:
        backbone = backbone_of(model)
        with torch.enable_grad():
            x = images.detach().requires_grad_(True)
            logits, attns, to_grid = _attention_pass(model, x)
            t = resolve_target(target, logits)
            score = logits.gather(1, t[:, None]).sum()  # images are independent: one backward for all
            grads = to_grid(torch.autograd.grad(score, attns))
            attns = to_grid([a.detach() for a in attns])
        B, _, N, _ = attns[0].shape
        relevance = torch.eye(N, device=images.device).expand(B, N, N)
        for attn, grad in zip(attns, grads):
            a_bar = (grad.detach() * attn.detach()).clamp(min=0).mean(1)
            relevance = relevance + a_bar @ relevance
        return token_map_to_image(_cls_row_patches(relevance, backbone), backbone)


class GradCAM:
    """Grad-CAM through pytorch-grad-cam on ``backbone.blocks[block].norm1`` (the common ViT
    recipe): prefix tokens dropped, ``(B, N, C)`` reshaped to ``(B, C, h, w)``.

    pytorch-grad-cam calls ``backbone(images) -> logits`` (our fast path), hooks the layer for
    activations and gradients, weights channels by the mean gradient, applies ReLU, min-max
    normalises and resizes with ``cv2.resize`` (bilinear). Parameters' ``.grad`` and the
    backbone's train/eval mode are restored afterwards.
    """

    def __init__(self, block: int = -1):
        self.block = block

    def __call__(self, model: nn.Module, images: Tensor, target=None) -> Tensor:
        from pytorch_grad_cam import GradCAM as _GradCAM
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        backbone = backbone_of(model)
        prefix, grid = backbone.num_prefix_tokens, backbone.cfg.grid_size

        def reshape_transform(x: Tensor) -> Tensor:
            return x[:, prefix:].reshape(x.shape[0], grid, grid, x.shape[-1]).permute(0, 3, 1, 2)

        targets = None
        if target is not None:
            t = resolve_target(target, torch.empty(images.shape[0], backbone.cfg.num_classes))
            targets = [ClassifierOutputTarget(int(c)) for c in t]
        was_training = backbone.training
        saved_grads = [(p, p.grad) for p in backbone.parameters()]
        layer = backbone.blocks[_check_block(self.block, backbone, "gradcam")].norm1
        cam = _GradCAM(model=backbone, target_layers=[layer],
                       reshape_transform=reshape_transform)
        cam.compute_input_gradient = True  # gradients flow even when the backbone is frozen
        try:
            with torch.enable_grad():
                maps = cam(input_tensor=images, targets=targets)
        finally:
            cam.activations_and_grads.release()
            for p, g in saved_grads:
                p.grad = g
            backbone.train(was_training)
        return normalize_maps(torch.from_numpy(np.ascontiguousarray(maps)).to(images.device))


class RandomMap:
    """Uniform random patch scores, upsampled like the token maps: the floor.

    Seeded once at construction; successive calls continue the same stream, so a whole
    evaluation is reproducible while different batches get different maps.
    """

    def __init__(self, seed: int = 0):
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, model: nn.Module, images: Tensor, target=None) -> Tensor:
        backbone = backbone_of(model)
        values = torch.rand(images.shape[0], backbone.num_tokens - backbone.num_prefix_tokens,
                            generator=self.generator)
        return token_map_to_image(values.to(images.device), backbone)


# -- registry ---------------------------------------------------------------------------------

Method = Callable[..., Tensor]

METHODS: dict[str, Callable[..., Method]] = {
    "interpreter": lambda stage=None, threshold=None: InterpreterMap(DEFAULT_READOUT, stage, threshold),
    **{f"interpreter-{r}": (lambda r: lambda stage=None, threshold=None, **kw: InterpreterMap(r, stage, threshold, **kw))(r)
       for r in READOUTS},
    "raw-attention": lambda block=-1: RawAttention(block),
    "rollout": lambda: AttentionRollout(),
    "gradcam": lambda block=-1: GradCAM(block),
    "chefer": lambda: CheferRollout(),
    "random": lambda seed=0: RandomMap(seed),
}
"""name -> factory. ``make_method("interpreter:1")`` passes ``1`` as the factory's one argument."""

DEFAULT_METHODS = ("interpreter", "raw-attention", "rollout", "gradcam", "chefer", "random")


VIDEO_METHODS = ("interpreter", "random")  # what applies to divided space-time attention


def check_video_methods(names: Sequence[str]) -> None:
    """One-line ``ValueError`` for methods that do not apply to a video model."""
    bad = [n for n in names if str(n).partition(":")[0] not in VIDEO_METHODS]
    if bad:
        raise ValueError(f"{', '.join(bad)}: not for video (TimeSformer's divided space-time attention has no single "
                         f"attention map per clip); video methods: {', '.join(VIDEO_METHODS)}")


def default_methods(model: nn.Module | None = None) -> list[str]:
    """Every method once; for an :class:`IARed` the interpreter combined and at each stage (on a video
    model: the interpreter and random only)."""
    names = list(VIDEO_METHODS if model is not None and is_video(model) else DEFAULT_METHODS)
    if isinstance(model, IARed):
        names[1:1] = [f"interpreter:{g}" for g in range(model.num_stages)]
    elif model is not None:
        names.remove("interpreter")
    return names


def make_method(spec: str, **kwargs) -> Method:
    """A method from ``"name"`` or ``"name:int"`` (stage / block / seed), e.g. ``"interpreter:0"``.

    ``kwargs`` go to the factory (``threshold`` for the interpreter). Unknown names, a
    non-integer argument or an argument the method does not take raise a one-line ValueError.
    """
    name, sep, arg = str(spec).partition(":")
    if name not in METHODS:
        raise ValueError(f"unknown explanation method {spec!r}; known: {', '.join(METHODS)}")
    args = ()
    if sep:
        try:
            args = (int(arg),)
        except ValueError:
            raise ValueError(f"explanation method {spec!r}: the part after ':' must be an integer") from None
    try:
        return METHODS[name](*args, **kwargs)
    except TypeError:
        given = f"argument {arg!r}" if sep else ""
        given += (" and " if given and kwargs else "") + (f"options {sorted(kwargs)}" if kwargs else "")
        raise ValueError(f"explanation method {name!r} takes no {given}") from None


def explain(model: nn.Module, images: Tensor, method_name: str, target=None, **kwargs) -> Tensor:
    """``(B, H, W)`` heatmaps in [0, 1] of ``method_name`` (see :data:`METHODS`) for ``images``."""
    return make_method(method_name, **kwargs)(model, images, target)
