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


class InterpreterMap:
    """IA-RED²'s interpreter scores as the heatmap, from a real inference pass (threshold mode).

    ``stage=g``: the score stage g's interpreter gave each patch (0 for patches dropped before
    stage g; negative g counts from the end). ``stage=None``, "stages combined": the mean over
    all G stages of those scores, a dropped token counting 0 at every later stage::

        combined_j = (1 / G) * sum_g scores[g]_j        (scores[g]_j = 0 once j is dropped)

    Why the mean: a token's share in the computation is how many stages it survives. With the
    threshold t, a token dropped at stage g contributes scores > t for the g stages it passed,
    its (<= t) score at g, and zeros after; so the mean lies in [g t / G, (g + t) / G] and
    orders tokens first by how deep they travel and, among tokens dropped at the same stage,
    by the interpreter's confidence. Unlike the product (the probability of surviving every
    stage under the sampling policy) it does not collapse all early-dropped tokens into a tie
    at 0, which matters for rank-based metrics (AP, deletion, insertion). Class-agnostic:
    ``target`` is ignored (the interpreter asks the class token's query, not a class).
    """

    def __init__(self, stage: int | None = None, threshold: float | Sequence[float] | None = None):
        self.stage = stage
        self.threshold = threshold  # None: the model's own (its checkpoint's inference threshold)

    def __call__(self, model: IARed, images: Tensor, target=None) -> Tensor:
        if not isinstance(model, IARed):
            raise TypeError(f"the interpreter method needs an IARed model (a backbone with interpreters, "
                            f"e.g. from iared.pruning.load_pruned), got {type(model).__name__}")
        if self.stage is not None and not -model.num_stages <= self.stage < model.num_stages:
            raise ValueError(f"interpreter: stage {self.stage} out of range for a model with "
                             f"{model.num_stages} stages (0..{model.num_stages - 1})")
        threshold = model.inference.threshold if self.threshold is None else self.threshold
        with torch.no_grad():
            out = model(images, "threshold", threshold=threshold)
        return token_map_to_image(self.patch_scores(out), model.backbone)

    def patch_scores(self, out) -> Tensor:
        """``(B, h*w)`` patch scores from a :class:`PrunedOutput` (before upsampling)."""
        if self.stage is not None:
            chosen = out.scores[self.stage]
            if chosen is None:
                raise ValueError(f"interpreter: stage {self.stage} ran without its interpreter (mode 'all')")
        else:
            scores = [s for s in out.scores if s is not None]
            if not scores:
                raise ValueError("interpreter: no stage ran its interpreter")
            chosen = torch.stack(scores).sum(0) / len(out.scores)
        return chosen[:, out.num_prefix:]


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
    "interpreter": lambda stage=None, threshold=0.5: InterpreterMap(stage=stage, threshold=threshold),
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
