"""IA-RED²: a ViT whose tokens leave the computation, stage by stage, as interpreters decide.

:class:`IARed` is the stage loop of :mod:`iared.stages` with one
:class:`iared.interpreter.MultiHeadInterpreter` before each stage::

    tokens = backbone.embed(images)                       # (B, P + N, C) dense
    for each stage g (a group of consecutive blocks):
        scores = interpreter_g(tokens)                    # keep probability per alive token
        keep   = policy(scores, mode)                     # sample | threshold | budget | all
        tokens = tokens.select(keep)                      # dropped tokens really leave
        tokens = blocks_g(tokens)
    logits = backbone.forward_head(tokens)                # norm + head on the class token

Modes: ``sample`` draws keep ~ Bernoulli(score) (training), ``threshold`` keeps score > t
(inference; counts differ per image, so the batch becomes packed or padded), ``budget`` keeps
the top-k per image (same count for all, stays dense), ``all`` skips the stage's interpreter.
A mode may be given per stage: curriculum training runs earlier stages in ``threshold``, the
trained one in ``sample`` and later ones in ``all``.
"""

from __future__ import annotations

import functools
import os
from dataclasses import asdict, dataclass, replace

from torch import nn

from iared.interpreter import MultiHeadInterpreter, default_interpreter_heads
from iared.models.families import backbone_families, family_of, family_of_config
from iared.models.protocol import Backbone
from iared.reducers.base import DEFAULT_THRESHOLD, MODES  # noqa: F401  (re-exported)
from iared.stages import ReducedModel, ReducedOutput, check_stage_starts, equal_stage_starts

PrunedOutput = ReducedOutput  # the name earlier releases used


@dataclass
class IARedConfig:
    """Where the interpreters sit and how they look. Saved with every pruned checkpoint."""

    num_stages: int = 3
    interpreter_heads: int = 6
    stage_starts: tuple[int, ...] | None = None  # first block of each stage; default: equal groups

    def resolve(self, depth: int, default: tuple[int, ...] | None = None) -> tuple[int, ...]:
        """The stage starts: given ones, else ``default`` (the backbone's), else equal groups."""
        starts = self.stage_starts or default or equal_stage_starts(depth, self.num_stages)
        return check_stage_starts(starts, depth)


class IARed(ReducedModel):
    """A backbone plus one :class:`MultiHeadInterpreter` before each stage of blocks.

    ``IARed(backbone)``: 3 equal stages, 6 interpreter heads where the width allows. The
    backbone is any :class:`iared.models.protocol.Backbone`: a :class:`iared.models.VisionTransformer`
    (DeiT from timm included), an MViTv2 (:mod:`iared.models.mvit`), whose stages start where its
    ``default_stage_starts`` says and whose interpreters take each stage's width, or a TimeSformer
    (:mod:`iared.models.timesformer`), whose interpreters score every space-time token. A timm
    ``VisionTransformer`` is converted first (:func:`iared.from_timm`).
    """

    def __init__(self, backbone: Backbone, config: IARedConfig | None = None, **kw):
        from iared.dropin import as_backbone

        backbone = as_backbone(backbone, "IARed")  # a timm ViT: converted, same weights
        config = config or IARedConfig(**kw)
        default = getattr(backbone, "default_stage_starts", None)
        starts = config.resolve(len(backbone.blocks), default(config.num_stages) if default else None)
        dims = [backbone.block_input_shape(s)[1] for s in starts]
        # One head count for every stage (checkpoints record one): the preferred one where every width allows.
        heads = config.interpreter_heads
        while any(d % heads for d in dims):
            heads = default_interpreter_heads(dims[0], heads - 1)
        config.interpreter_heads = heads
        super().__init__(backbone, [MultiHeadInterpreter(d, heads) for d in dims], starts)
        self.config = config

    @property
    def interpreters(self) -> nn.ModuleList:
        return self.reducers

    def config_dict(self) -> dict:
        return asdict(self.config)

    @property
    def inference(self) -> InferenceSettings:
        return self.__dict__.get("_inference") or InferenceSettings()

    @inference.setter
    def inference(self, value: InferenceSettings) -> None:
        self.__dict__["_inference"] = value

    def calibrate(self, inputs, target_kept: float | list[float], *, batch_size: int = 64) -> InferenceSettings:
        """Thresholds that keep ``target_kept`` of the patch tokens on ``inputs`` (unlabelled;
        :func:`iared.calibration.calibrate_thresholds`), stored in :attr:`inference` (so
        :func:`save_pruned` writes them) and returned with it."""
        from iared.calibration import calibrate_thresholds, sample_inputs

        sample = sample_inputs(inputs)
        thresholds = calibrate_thresholds(self, sample, target_kept, batch_size=batch_size)
        target = [float(v) for v in target_kept] if isinstance(target_kept, (list, tuple)) else float(target_kept)
        self.inference = replace(self.inference, threshold=thresholds, target_kept=target,
                                 calibration_samples=len(sample))
        return self.inference

@dataclass
class InferenceSettings:
    """How a pruned checkpoint is meant to run; ``eval``, ``bench``, ``explain`` and ``export`` read it.

    ``threshold``: threshold mode's rule (one value or one per stage). ``keep_ratio``: the per-stage
    ratio of budget mode (ONNX export), None when never chosen. ``target_kept`` and
    ``calibration_samples``: where ``threshold`` was calibrated (:meth:`IARed.calibrate`), the kept
    fraction it was chosen for and the number of unlabelled inputs it was chosen on; None otherwise.
    """

    threshold: float | list[float] = DEFAULT_THRESHOLD
    keep_ratio: float | list[float] | None = None
    target_kept: float | list[float] | None = None
    calibration_samples: int | None = None


PRUNED_FORMAT = "iared-pruned/2"
# /1 stored the interpreters under ``interpreters.*`` and no inference settings.
_OLD_FORMATS = {"iared-pruned/1": "interpreters."}


BACKBONE_STORAGE = ("embed", "reference")  # save_pruned's ``backbone``: a copy in the file, or a reference


def save_pruned(model: IARed, path, extra: dict | None = None,
                inference: InferenceSettings | None = None, backbone: str = "embed") -> None:
    """Backbone + interpreters + configs + inference settings in one file, written atomically.

    ``path``: ``.pt`` (torch) or ``.safetensors`` (tensors; format and config as JSON metadata).
    ``backbone="reference"``: the interpreters alone (a few hundred kB) plus a reference to the backbone,
    its weights' sha256 (:func:`iared.checkpoint.state_sha256`) and, when it is a shipped one
    (``digits_vit``...), its name; :func:`load_pruned` then takes the backbone (``backbone=``) and refuses
    one whose weights differ. ``model``: an :class:`IARed`, or :func:`iared.prune`'s module (its current
    threshold / keep ratio become the file's inference settings).
    """
    from iared.checkpoint import save_atomic

    if not isinstance(model, IARed) and isinstance(getattr(model, "reduced", None), IARed):  # iared.prune's
        inference = inference or model.inference_settings()
        model = model.reduced
    if backbone not in BACKBONE_STORAGE:
        raise ValueError(f"save_pruned: backbone={backbone!r}; one of {', '.join(BACKBONE_STORAGE)}")
    inference = inference or getattr(model, "inference", None) or InferenceSettings()
    family = family_of(model.backbone)
    if family is None:
        raise TypeError(f"save_pruned: no checkpoint format for a {type(model.backbone).__name__} backbone")
    config = {"architecture": family, "model": model.backbone.cfg.to_dict(), "iared": model.config_dict(),
              "reducer": model.reducers[0].describe(), "inference": asdict(inference), **(extra or {})}
    state = model.state_dict()
    if backbone == "reference":
        config["backbone_ref"] = backbone_reference(model.backbone)
        state = {k: v for k, v in state.items() if not k.startswith("backbone.")}
    save_atomic({"format": PRUNED_FORMAT, "model": state, "config": config}, path)


def save_inference(source, path, inference: InferenceSettings) -> None:
    """A copy of the pruned checkpoint ``source`` with ``inference`` as its settings, written atomically
    to ``path``: everything else in the file (weights, training record, task) is kept as it was."""
    from iared.checkpoint import read_checkpoint, save_atomic

    obj = read_checkpoint(source)
    config = obj.get("config") if isinstance(obj.get("config"), dict) else {}
    if obj.get("format") != PRUNED_FORMAT or "iared" not in config:
        raise ValueError(f"{source}: not an {PRUNED_FORMAT} checkpoint; load it and save it with save_pruned")
    save_atomic({**obj, "config": {**config, "inference": asdict(inference)}}, path)


def save_calibrated(model: IARed, source, path) -> None:
    """``model`` with its (calibrated) :attr:`IARed.inference` to ``path``: a copy of its checkpoint file
    ``source`` with the new settings (:func:`save_inference`), or :func:`save_pruned` with no file."""
    if source is not None:
        save_inference(source, path, model.inference)
    else:
        save_pruned(model, path)


def backbone_reference(backbone) -> dict:
    """How a reducers-only file names its backbone: ``{"sha256": ..., "name": shipped name or None}``."""
    from iared.checkpoint import state_sha256

    digest = state_sha256(backbone)
    return {"sha256": digest, "name": next((n for n in _shipped_backbones() if _shipped_sha256(n) == digest), None)}


def _shipped_backbones() -> tuple[str, ...]:
    from iared.models import EMBEDDED_CHECKPOINTS

    return tuple(EMBEDDED_CHECKPOINTS)


@functools.cache
def _shipped_sha256(name: str) -> str | None:
    from iared.checkpoint import state_sha256
    from iared.models import create_model

    try:
        return state_sha256(create_model(name, pretrained=True))
    except (OSError, ValueError):  # an asset missing from this install
        return None


def _referenced_backbone(ref: dict, given, path):
    """The backbone a reducers-only file refers to: ``given`` (a module or a backbone file) or the shipped
    one it names; its weights must hash to the reference's sha256."""
    from iared.checkpoint import CheckpointError, state_sha256
    from iared.models import create_model

    if given is None:
        if not ref.get("name"):
            raise ValueError(f"{path} holds the interpreters only: give its backbone, load_pruned({str(path)!r}, "
                             f"backbone=...) (weights sha256 {str(ref.get('sha256'))[:12]}...)")
        given = create_model(ref["name"], pretrained=True)
    elif isinstance(given, (str, os.PathLike)):
        from iared.loading import load_backbone

        given = load_backbone(given, pruned_note=False)
    else:
        from iared.dropin import as_backbone

        given = as_backbone(given, "load_pruned")
    digest = state_sha256(given)
    if digest != ref.get("sha256"):
        raise CheckpointError(f"bad backbone for {path}: its weights' sha256 {digest[:12]}... differs from the "
                              f"{str(ref.get('sha256'))[:12]}... the interpreters were trained on")
    return given


def load_pruned(path, backbone=None) -> IARed:
    """An :class:`IARed` from :func:`save_pruned`'s file, ``.pt`` or ``.safetensors`` (``weights_only``
    load, strict keys).

    The model's ``inference`` attribute holds the file's :class:`InferenceSettings` (the threshold it
    was trained with, for files written before settings were recorded). ``backbone``: for a reducers-only
    file, the backbone (module, timm ViT, or backbone file; default: the shipped one the file names),
    refused in one line when its weights are not the ones referenced.
    """
    from iared.checkpoint import CheckpointError, extract_state_dict, load_weights, read_checkpoint

    obj = read_checkpoint(path)
    config = obj.get("config") if isinstance(obj.get("config"), dict) else {}
    fmt = obj.get("format")
    if (fmt != PRUNED_FORMAT and fmt not in _OLD_FORMATS) or "iared" not in config:
        raise CheckpointError(f"bad checkpoint {path}: not an IA-RED² checkpoint (no interpreters inside); "
                              "train one with `iared train-interpreters`")
    ref = config.get("backbone_ref")
    if backbone is not None and ref is None:
        raise ValueError(f"{path} holds its own backbone: backbone= is for reducers-only files")
    family = family_of_config(config, path)  # files written before MViT hold ViTs
    net = _referenced_backbone(ref, backbone, path) if ref is not None else None
    try:
        backbone_cls, config_cls = backbone_families()[family]
        net = net if net is not None else backbone_cls(config_cls(**config["model"]))
        model = IARed(net, IARedConfig(**config["iared"]))
        inference = config.get("inference")
        if not isinstance(inference, dict):  # format /1: the threshold it was trained with
            train = config.get("train") if isinstance(config.get("train"), dict) else {}
            inference = {"threshold": train.get("threshold", DEFAULT_THRESHOLD)}
        model.inference = InferenceSettings(**inference)
    except (TypeError, ValueError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"bad checkpoint {path}: invalid config: {str(e).splitlines()[0]}") from None
    state = extract_state_dict(obj, path)
    if fmt in _OLD_FORMATS:
        old = _OLD_FORMATS[fmt]
        state = {("reducers." + k[len(old):] if k.startswith(old) else k): v for k, v in state.items()}
    if ref is not None:
        state = {**{f"backbone.{k}": v for k, v in model.backbone.state_dict().items()}, **state}
    load_weights(model, state, path)
    return model.eval()
