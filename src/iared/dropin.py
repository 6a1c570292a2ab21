"""The drop-in pruned model: ``iared.prune(model)`` behaves like the model it came from.

::

    m = timm.create_model("deit_small_patch16_224", pretrained=True)
    p = iared.prune(m, "tome", r=8)        # or iared.prune("pruned.safetensors"), iared.prune(ours, "evit")
    logits = p(images)                     # (B, num_classes), a Tensor: timm's loop, grad-cam, wrappers
    p.r = 12                               # the knob is an attribute (as ToMe's ``model.r``)
    out = p.details(images)                # the ReducedOutput: keep masks, scores, MACs (one more pass)

:class:`PrunedModel` is a thin module around a :class:`iared.stages.ReducedModel` (``p.reduced``):
the stage loop keeps returning a :class:`~iared.stages.ReducedOutput` for its many callers (training,
bench, compare, export, explain), and the knobs, which the loop takes per call, live here as
attributes. ``forward`` keeps nothing from the pass (no tensors, no autograd graph): what a caller
wants beyond the logits it asks :meth:`PrunedModel.details` for.

Knobs by method: ``iared`` and the floors (``random``, ``pixel``, ``framediff``) run the stage policy,
``mode`` ``"threshold"`` (keep score > ``threshold``) or ``"budget"`` (top ``keep_ratio`` per image,
a dense batch); setting ``threshold`` switches to threshold mode, setting ``keep_ratio`` to budget
mode. ``tome`` has ``r``, ``evit`` ``keep_rate``, ``ats`` ``ratio``, ``dynamicvit`` ``keep_ratio``
(set on its reducers). ``mode = "all"`` switches every reducer off: the unpruned model.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from iared.reducers.base import DEFAULT_THRESHOLD, check_threshold
from iared.reducers.registry import METHODS
from iared.stages import ReducedModel, ReducedOutput

__all__ = ["PrunedModel", "prune"]

# Methods whose knob lives on their reducers (the others take theirs from the stage settings).
# methods whose knob is set in their reducers, by its attribute name: {"tome": "r", "evit": "keep_rate", ...}
REDUCER_KNOBS = {n: m.knob_key for n, m in METHODS.items() if m.knob_at_build}
PRUNED_MODES = ("threshold", "budget", "all")


class PrunedModel(nn.Module):
    """A :class:`ReducedModel` as a drop-in module: ``forward(x) -> logits`` with its knob as attributes.

    ``x``: what the backbone embeds, ``(B, C, H, W)`` images or ``(B, T, C, H, W)`` clips;
    returns ``(B, num_classes)`` logits. Build it with :func:`prune`.
    """

    def __init__(self, reduced: ReducedModel, method: str, *, mode: str | None = None,
                 threshold: float | Sequence[float] | None = None,
                 keep_ratio: float | Sequence[float] | None = None):
        super().__init__()
        self.reduced = reduced
        self.method = method
        self._uses_policy = method not in REDUCER_KNOBS
        self._layouts: dict[int, tuple] = {}  # per block, for cam_reshape (filled only once it is asked for)
        self._track_layouts = False
        recorded = getattr(reduced, "inference", None)  # a pruned checkpoint's settings
        self._threshold = self._check_threshold(threshold if threshold is not None else
                                                getattr(recorded, "threshold", DEFAULT_THRESHOLD))
        self._keep_ratio = self._check_ratio(keep_ratio if keep_ratio is not None else
                                             getattr(recorded, "keep_ratio", None), "keep_ratio")
        if mode is None:
            mode = "budget" if keep_ratio is not None and threshold is None else "threshold"
        self.mode = mode

    # -- the knobs -------------------------------------------------------------------------------

    @property
    def backbone(self) -> nn.Module:
        return self.reduced.backbone

    @property
    def mode(self) -> str:
        """``"threshold"``, ``"budget"`` (needs ``keep_ratio``) or ``"all"`` (no reduction)."""
        return self._mode

    @mode.setter
    def mode(self, value: str) -> None:
        if value not in PRUNED_MODES:
            raise ValueError(f"mode {value!r}: one of {', '.join(PRUNED_MODES)}")
        if value == "budget" and self._uses_policy and self._keep_ratio is None:
            raise ValueError("mode 'budget' needs a keep_ratio: set pruned.keep_ratio (which selects budget mode)")
        self._mode = value

    @property
    def threshold(self) -> float | list[float]:
        """Threshold mode's rule: keep a token whose score exceeds it (one value or one per stage)."""
        self._need_policy("threshold")
        return self._threshold

    @threshold.setter
    def threshold(self, value) -> None:
        self._need_policy("threshold")
        self._threshold = self._check_threshold(value)
        self._mode = "threshold"

    @property
    def keep_ratio(self) -> float | list[float] | None:
        """Budget mode's fraction of the alive patch tokens each stage keeps (one value or one per stage)."""
        if REDUCER_KNOBS.get(self.method) == "keep_ratio":  # a reducer-held keep ratio (DynamicViT)
            return self._reducer_knob()
        self._need_policy("keep_ratio")
        return self._keep_ratio

    @keep_ratio.setter
    def keep_ratio(self, value) -> None:
        if REDUCER_KNOBS.get(self.method) == "keep_ratio":  # a reducer-held keep ratio (DynamicViT)
            self._set_reducer_knob(value)
            return
        self._need_policy("keep_ratio")
        self._keep_ratio = self._check_ratio(value, "keep_ratio")
        if value is not None:
            self._mode = "budget"
        elif self._mode == "budget":
            self._mode = "threshold"

    def __getattr__(self, name: str):
        method = self.__dict__.get("method")
        if name == REDUCER_KNOBS.get(method):
            return self._reducer_knob()
        if name in ("threshold", "keep_ratio") and method in REDUCER_KNOBS:  # the property refused it
            raise AttributeError(f"{method} has no {name}: its knob is {REDUCER_KNOBS[method]}")
        return super().__getattr__(name)

    def __setattr__(self, name: str, value) -> None:
        if name == REDUCER_KNOBS.get(self.__dict__.get("method")) and name != "keep_ratio":
            self._set_reducer_knob(value)
            return
        super().__setattr__(name, value)

    def inference_settings(self):
        """The current knob as :class:`iared.pruning.InferenceSettings` (what :func:`save_pruned` records)."""
        from dataclasses import replace

        from iared.pruning import InferenceSettings

        recorded = getattr(self.reduced, "inference", None) or InferenceSettings()  # its other fields kept
        return replace(recorded, threshold=self._threshold, keep_ratio=self._keep_ratio)

    def forward_kwargs(self) -> dict:
        """The stage-loop keyword arguments the current knob means."""
        if not self._uses_policy:
            return {"mode": "all" if self._mode == "all" else "threshold"}
        kwargs = {"mode": self._mode, "threshold": self._threshold}
        if self._mode == "budget":
            kwargs["keep_ratio"] = self._keep_ratio
        return kwargs

    # -- running ----------------------------------------------------------------------------------

    def forward(self, x: Tensor) -> Tensor:
        """``x`` ``(B, C, H, W)`` (or clips) -> ``(B, num_classes)`` logits at the current knob."""
        return self.details(x).logits

    def details(self, x: Tensor, **overrides) -> ReducedOutput:
        """The stage loop's whole output at the current knob: ``.logits``, ``.keep[g]`` ``(B, N0)``,
        ``.scores[g]``, ``.macs`` ``(B,)``, ``.kept_fraction()`` ``(B, stages)``. ``overrides``: any
        :meth:`ReducedModel.forward` keyword (``layout``, ``features_at``, ...)."""
        kwargs = {**self.forward_kwargs(), **overrides}
        if self._track_layouts and "block_runner" not in kwargs:
            kwargs["block_runner"] = self._run_block
        return self.reduced(x, **kwargs)

    def save(self, path, backbone: str = "embed") -> None:
        """:func:`iared.pruning.save_pruned` with the current knob as the file's inference settings."""
        from iared.pruning import save_pruned

        save_pruned(self, path, backbone=backbone)

    # -- explainers (pytorch-grad-cam) ------------------------------------------------------------

    def cam_reshape(self, block: int = -1) -> Callable[[Tensor], Tensor]:
        """A pytorch-grad-cam ``reshape_transform`` for a layer inside block ``block`` (``norm1``, say).

        That layer's token-aligned activations and gradients (``(B, n, C)`` dense, ``(T, C)`` packed,
        padded ...) become ``(B, C, rows, cols)`` on the patch grid; tokens gone before the block are 0,
        prefix tokens left out. From the first call on, each pass notes the token positions entering
        every block (integer tensors only)."""
        depth = len(self.backbone.blocks)
        block = block % depth
        self._track_layouts = True

        def reshape(t: Tensor) -> Tensor:
            return _on_patch_grid(t, self._layouts[block], self.backbone)

        return reshape

    def _run_block(self, i: int, block: nn.Module, tokens, record):
        with torch.no_grad():
            self._layouts[i] = (tokens.image_ids(), tokens.index, tokens.valid(), tokens.batch_size)
        return block(tokens, record=record)

    # -- checks -------------------------------------------------------------------------------------

    def _need_policy(self, what: str):
        if not self._uses_policy:
            raise AttributeError(f"{self.method} has no {what}: its knob is {REDUCER_KNOBS[self.method]}")

    def _check_threshold(self, value):
        check_threshold(value, "threshold")
        return self._per_stage(value, "threshold")

    def _check_ratio(self, value, what: str):
        if value is None:
            return None
        values = list(value) if isinstance(value, (list, tuple)) else [value]
        if not all(isinstance(v, (int, float)) and 0 < float(v) <= 1 for v in values):
            raise ValueError(f"{what} {value}: a fraction of the tokens, in (0, 1]")
        return self._per_stage(value, what)

    def _per_stage(self, value, what: str):
        if isinstance(value, (list, tuple)):
            if len(value) != self.reduced.num_stages:
                raise ValueError(f"{what} {list(value)}: one value or {self.reduced.num_stages} (one per stage)")
            return [float(v) for v in value]
        return float(value)

    def _reducers(self) -> list[nn.Module]:
        return [r for g in range(self.reduced.num_stages) if (r := self.reduced.reducer(g)) is not None]

    def _reducer_knob(self):
        return getattr(self._reducers()[0], REDUCER_KNOBS[self.method])

    def _set_reducer_knob(self, value) -> None:
        name = REDUCER_KNOBS[self.method]
        if name == "r":  # ToMe's: whole tokens
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"r {value!r}: tokens merged per block, an integer >= 0")
            value = int(value)
        else:
            self._check_ratio(value, name)
            value = float(value)
        for r in self._reducers():
            setattr(r, name, value)

    def extra_repr(self) -> str:
        knob = self.forward_kwargs() if self._uses_policy else {REDUCER_KNOBS[self.method]: self._reducer_knob()}
        return f"method={self.method!r}, " + ", ".join(f"{k}={v!r}" for k, v in knob.items())


def _on_patch_grid(t: Tensor, layout: tuple, backbone) -> Tensor:
    """Token-aligned ``(..., C)`` -> ``(B, C, rows, cols)``; positions without a token are 0."""
    ids, index, valid, batch = layout
    C = t.shape[-1]
    ids, index, rows = ids.reshape(-1), index.reshape(-1), t.reshape(-1, C)
    if valid is not None:
        keep = valid.reshape(-1)
        ids, index, rows = ids[keep], index[keep], rows[keep]
    full = t.new_zeros(batch, backbone.num_tokens, C).index_put((ids, index), rows)
    grid = tuple(backbone.token_grid)
    patches = full[:, full.shape[1] - _prod(grid):]  # prefix tokens (class, registers) come first
    return patches.reshape(batch, *grid, C).movedim(-1, 1)


def _prod(xs) -> int:
    out = 1
    for x in xs:
        out *= int(x)
    return out


def _method_of(reduced: ReducedModel) -> str:
    described = [r.describe().get("method") for g in range(reduced.num_stages)
                 if (r := reduced.reducer(g)) is not None]
    if not described:
        raise ValueError("prune: this ReducedModel has no reducers")
    return str(described[0])


def as_backbone(model: nn.Module, what: str = "prune"):
    """Our backbone as given; a timm or Hugging Face model converted through the family registry
    (:func:`iared.models.families.as_backbone`: same weights), on the original's device; anything
    else a one-line TypeError."""
    from iared.models.families import as_backbone as convert

    if all(hasattr(model, a) for a in ("embed", "blocks", "forward_head")):
        return model
    try:
        converted = convert(model)
    except TypeError as e:
        raise TypeError(f"{what}: {e} (or give a ReducedModel / IARed, or a pruned checkpoint file)") from None
    param = next(model.parameters(), None)
    return converted if param is None else converted.to(param.device)


def prune(model, method: str | None = None, **knob) -> PrunedModel:
    """``model`` with token reduction, as a module whose ``forward(x)`` returns the logits.

    ``model``: an iared backbone, a timm ``VisionTransformer`` (converted by :func:`iared.from_timm`,
    same weights), a :class:`ReducedModel` / :class:`iared.IARed`, a :class:`PrunedModel`, or a
    pruned checkpoint file (``.pt`` / ``.safetensors``; ``backbone=...`` for a reducers-only file).
    ``method``: a name in :data:`iared.reducers.registry.METHODS` (default ``iared``; for a reduced
    model or a file, the method it holds). ``knob``: ``threshold`` / ``keep_ratio`` / ``mode`` for
    the policy methods, ``r`` (tome), ``keep_rate`` (evit), ``ratio`` (ats); default: what the
    checkpoint recorded, else the method's middle sweep value. A backbone given ``iared`` gets fresh
    interpreters, and a warning that they are untrained (load trained ones from a pruned file).
    """
    from iared.reducers.registry import METHODS, build_reduced, check_applies, default_knobs

    backbone_arg = knob.pop("backbone", None)
    if isinstance(model, (str, os.PathLike)):  # any method's file (iared.reduced_io)
        from iared.reduced_io import load_reduced

        model = load_reduced(model, backbone=backbone_arg)
        if not hasattr(model, "inference"):  # not IA-RED² (whose knob comes from its inference settings)
            held = _method_of(model)
            allowed = {"mode"} | ({REDUCER_KNOBS[held]} if held in REDUCER_KNOBS else {"threshold", "keep_ratio"})
            saved = {k: v for k, v in model.settings.items() if k in allowed and not (k == "mode" and v != "all"
                                                                                      and held in REDUCER_KNOBS)}
            knob = {**saved, **knob}
    elif backbone_arg is not None:
        raise TypeError("prune: backbone= goes with a reducers-only pruned file")
    training = bool(getattr(model, "training", False))
    if isinstance(model, PrunedModel):
        model = model.reduced
    if isinstance(model, ReducedModel):
        held = _method_of(model)
        if method is not None and method != held:
            raise ValueError(f"prune: the model holds {held} reducers, not {method}")
        method, reduced = held, model
    else:
        method = method or "iared"
        if method not in METHODS:
            raise ValueError(f"prune: unknown method {method!r}; known: {', '.join(METHODS)}")
        backbone = as_backbone(model)
        check_applies(method, backbone)
        _check_knob_names(method, knob)
        name = REDUCER_KNOBS.get(method)
        entry = METHODS[method]
        if entry.learns and entry.fresh is None:
            raise ValueError(f"prune: {method}'s reducers must be trained: prune a trained model or its saved file "
                             f"(iared.prune('reduced.safetensors')); {entry.how_to_train}")
        if entry.learns:
            reduced = entry.fresh(backbone)
            warnings.warn(f"iared.prune: the {method} reducers are untrained (random keep scores); prune a "
                          f"pruned checkpoint (iared.prune('pruned.pt')) or {entry.how_to_train}", stacklevel=2)
        else:
            value = knob.pop(name) if name in knob else default_knobs(method, quick=True, backbone=backbone)[0]
            reduced = build_reduced(method, backbone, value)
            if method not in REDUCER_KNOBS and "threshold" not in knob and "keep_ratio" not in knob:
                knob["keep_ratio"] = float(value)  # the floors: budget at the sweep's middle
    _check_knob_names(method, knob)
    reducer_value = knob.pop(REDUCER_KNOBS.get(method, "-"), None)
    pruned = PrunedModel(reduced, method, **knob)
    if reducer_value is not None:
        setattr(pruned, REDUCER_KNOBS[method], reducer_value)
    return pruned.train(training)


def _check_knob_names(method: str, knob: dict) -> None:
    allowed = {"mode"} | ({REDUCER_KNOBS[method]} if method in REDUCER_KNOBS else {"threshold", "keep_ratio"})
    unknown = sorted(set(knob) - allowed)
    if unknown:
        raise TypeError(f"prune: {method} has no knob {', '.join(unknown)}; its knobs: {', '.join(sorted(allowed))}")
