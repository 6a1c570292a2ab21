"""One file format for every reduced model: ``save_reduced`` / ``load_reduced``.

A reduced file holds the backbone (or a reference to it: ``backbone="reference"``, as
:func:`iared.pruning.save_pruned`), the stage starts, each stage's reducer description
(``Reducer.describe()``, None for a stage with no reducer), the reducers' weights and the forward
settings the model runs at. :func:`load_reduced` rebuilds any registered method through
:func:`iared.reducers.registry.reducer_from_description`, so a new method needs no code here.

IA-RED² models keep their own format (``iared-pruned/2``, :func:`iared.pruning.save_pruned`: an
:class:`iared.IARed` with its inference settings); both functions hand them to it, so
``load_reduced`` reads every pruned file ever written (``iared-pruned/1`` and ``/2`` too).
"""

from __future__ import annotations

from iared.stages import ReducedModel

REDUCED_FORMAT = "iared-reduced/1"


def save_reduced(model, path, *, settings: dict | None = None, backbone: str = "embed",
                 extra: dict | None = None) -> None:
    """``model`` (a :class:`ReducedModel` of any registered method, or :func:`iared.prune`'s module) to
    ``path`` (``.pt`` or ``.safetensors``), written atomically. ``settings``: the stage-loop keyword
    arguments it runs at (default: the drop-in module's, else none)."""
    from iared.checkpoint import save_atomic
    from iared.models.families import family_of
    from iared.pruning import BACKBONE_STORAGE, IARed, backbone_reference, save_pruned

    if isinstance(model, IARed) or isinstance(getattr(model, "reduced", None), IARed):
        return save_pruned(model, path, extra=extra, backbone=backbone)  # IA-RED²'s format, its inference settings
    if isinstance(getattr(model, "reduced", None), ReducedModel):  # iared.prune's module: its current knob
        settings = settings if settings is not None else model.forward_kwargs()
        model = model.reduced
    if backbone not in BACKBONE_STORAGE:
        raise ValueError(f"save_reduced: backbone={backbone!r}; one of {', '.join(BACKBONE_STORAGE)}")
    family = family_of(model.backbone)
    if family is None:
        raise TypeError(f"save_reduced: no checkpoint format for a {type(model.backbone).__name__} backbone")
    reducers = [None if (r := model.reducer(g)) is None else r.describe() for g in range(model.num_stages)]
    config = {"architecture": family, "model": model.backbone.cfg.to_dict(), "stage_starts": list(model.stage_starts),
              "reducers": reducers, "settings": dict(settings or {}), **(extra or {})}
    state = model.state_dict()
    if backbone == "reference":
        config["backbone_ref"] = backbone_reference(model.backbone)
        state = {k: v for k, v in state.items() if not k.startswith("backbone.")}
    save_atomic({"format": REDUCED_FORMAT, "model": state, "config": config}, path)


def load_reduced(path, backbone=None) -> ReducedModel:
    """The model :func:`save_reduced` (or :func:`iared.pruning.save_pruned`) wrote, in eval mode; its
    ``settings`` attribute holds the forward settings saved with it. ``backbone``: for a reducers-only
    file, the backbone it refers to (default: the shipped one it names)."""
    from iared.checkpoint import CheckpointError, extract_state_dict, load_weights, read_checkpoint
    from iared.models.families import backbone_families, family_of_config
    from iared.pruning import _referenced_backbone, load_pruned
    from iared.reducers.registry import reducer_from_description

    obj = read_checkpoint(path)
    if obj.get("format") != REDUCED_FORMAT:
        model = load_pruned(path, backbone=backbone)
        from dataclasses import asdict

        model.settings = {k: v for k, v in asdict(model.inference).items() if v is not None}
        return model
    config = obj.get("config") if isinstance(obj.get("config"), dict) else {}
    ref = config.get("backbone_ref")
    if backbone is not None and ref is None:
        raise ValueError(f"{path} holds its own backbone: backbone= is for reducers-only files")
    try:
        net = _referenced_backbone(ref, backbone, path) if ref is not None else None
        if net is None:
            backbone_cls, config_cls = backbone_families()[family_of_config(config, path)]
            net = backbone_cls(config_cls(**config["model"]))
        reducers = [None if d is None else reducer_from_description(net, d, g)
                    for g, d in enumerate(config["reducers"])]
        model = ReducedModel(net, reducers, tuple(int(s) for s in config["stage_starts"]))
    except (TypeError, ValueError, KeyError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"bad checkpoint {path}: invalid config: {str(e).splitlines()[0]}") from None
    # a reducers-only file of weightless reducers (ToMe, the floors, ...) holds no tensors at all
    state = extract_state_dict(obj, path) if ref is None or obj.get("model") else {}
    if ref is not None:
        state = {**{f"backbone.{k}": v for k, v in model.backbone.state_dict().items()}, **state}
    load_weights(model, state, path)
    model.settings = dict(config.get("settings") or {})
    return model.eval()
