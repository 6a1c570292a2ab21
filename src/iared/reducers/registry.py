"""Every token reducer by name: its knob, its natural placement, a knob sweep, and how to run it.

``build_reduced(method, backbone, knob)`` puts the method's reducers at their natural stages on
any depth; ``runner(method, model, knob)`` runs it with the stage settings its knob needs;
``default_knobs(method)`` spans little to strong reduction. The knobs:

========== ============================================================ =========== =================
method     knob                                                         no reduction placement (12 blocks)
========== ============================================================ =========== =================
random     keep ratio per stage (budget top-k of random scores);        1.0         0, 4, 8
           one value or one per stage
pixel      keep ratio per stage (budget top-k of pixel std ranks)       1.0         0, 4, 8
framediff  keep ratio per stage (budget top-k of frame-change ranks;    1.0         0, 4, 8
           video backbones only)
iared      threshold on the interpreter scores (IA-RED²'s rule)         0.0         0, 4, 8
tome       r, tokens merged per image at every stage                    0           1, 2, ..., 11
evit       keep rate: ceil(rate * alive patches) kept, rest fused       1.0         3, 6, 9
ats        ratio: K = round(ratio * alive patches) CDF quantiles        1.0 (off)   3, 6, 9
dynamicvit keep ratio per predictor (see iared.reducers.dynamicvit)     1.0         3, 6, 9
========== ============================================================ =========== =================

Placements on any depth: IA-RED² and the floors, 3 equal stages from block 0
(:func:`iared.stages.equal_stage_starts`); ToMe, one stage per block from block 1 (it reads the
keys of the block before); EViT and ATS, :func:`quarter_locations` (``round(depth/4)``,
``round(depth/2)``, ``round(3 depth/4)``). Reducers that read the block before need a stage start
of 1 or more; a leading stage with no reducer runs the blocks before the first reducer. On a
backbone that says where reducers help (MViTv2's ``default_stage_starts``: the first stride-1 block
of each resolution stage) every method takes those places instead (:func:`default_locations`);
ToMe refuses a backbone whose keys are pooled over the grid (``supports_key_weights = False``).

A new method is one :class:`Method` entry in :data:`METHODS` (see ``dynamicvit``) plus its reducer
class: the entry is the whole contract (knob, placement, build, train hook, checkpoint rebuild), so no
code here or in ``compare`` tests a method's name. Files of any method: :mod:`iared.reduced_io`.

Video (TimeSformer): every method runs on space-time tokens (ToMe, EViT and ATS read the spatial
attention's class-token row and keys, which TimeSformer's blocks record; DynamicViT's gates are key
weights in both attentions); ``framediff`` needs a time axis and refuses images.
:func:`check_applies` says why a method does not apply to a backbone, in one line, before any work.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from iared.reducers.ats import ATS
from iared.reducers.base import Reducer, quarter_locations
from iared.reducers.evit import EViT
from iared.reducers.floors import FrameDifference, PixelSaliency, RandomReducer
from iared.reducers.tome import ToMe
from iared.stages import ReducedModel, ReducedOutput, equal_stage_starts


def every_block_from_one(depth: int) -> tuple[int, ...]:
    """ToMe's placement: a stage before every block but the first."""
    if depth < 2:
        raise ValueError(f"ToMe needs at least 2 blocks, got depth {depth}")
    return tuple(range(1, depth))


def three_equal_stages(depth: int) -> tuple[int, ...]:
    return equal_stage_starts(depth, 3)


@dataclass(frozen=True)
class Method:
    """A token reducer as the registry knows it.

    ``knob``: what the number means; ``no_reduction``: the knob value that keeps every token;
    ``sweep``: default knob values, little to strong reduction; ``locations(depth)``: the blocks
    its reducers sit before; ``reducer(backbone, knob, stage)``: one stage's reducer (None where
    the method needs more than the backbone, e.g. trained interpreters); ``settings(knob)``: the
    stage-loop keyword arguments (mode, threshold, keep ratio) that run it; ``learns``: whether
    it has weights to train.

    The hooks (None: the default): ``build(backbone, knob, locs, interpreters=, seed=)`` builds the
    whole model (methods with weights); ``sweep_for(backbone)`` a sweep scaled to it;
    ``refuses(backbone)`` why it cannot run there; ``seeded(seed, stage)`` a reproducible reducer;
    ``train(job, backbone, train_set, knob, progress) -> (model, info)`` trains (or loads) its weights
    on the frozen backbone (:mod:`iared.train.hooks`), once per knob when ``knob_in_weights``;
    ``rebuild(backbone, description)`` the reducer a checkpoint describes (default: ``reducer`` at
    ``description[knob_key]``). ``knob_at_build``: the knob lives in the reducers (else in
    ``settings``); ``floor``: a no-learning floor.
    """

    name: str
    knob: str
    no_reduction: float
    sweep: tuple
    locations: Callable[[int], tuple[int, ...]]
    reducer: Callable | None = None
    settings: Callable[[object], dict] = lambda knob: {}
    learns: bool = False
    video_only: bool = False  # needs a time axis (token grid (T, H, W))
    # the contract's hooks (None: the default behaviour)
    build: Callable | None = None  # (backbone, knob, locs, **kw) -> ReducedModel, for methods with weights
    sweep_for: Callable | None = None  # backbone -> knob sweep scaled to it (ToMe's r)
    refuses: Callable | None = None  # backbone -> why the method cannot run on it, or None
    seeded: Callable | None = None  # (seed, stage) -> a reproducible reducer (the random floor)
    train: Callable | None = None  # (job, backbone, train_set, knob, progress) -> (model, info); see iared.train.hooks
    knob_in_weights: bool = False  # train once per knob (DynamicViT) rather than once for the whole sweep
    knob_at_build: bool = False  # the knob is set in the reducers (ToMe's r); else read from the forward settings
    floor: bool = False  # a no-learning floor (compare reports every learned method next to them)
    knob_key: str = "keep_ratio"  # the knob's key in the reducers' describe() (and the drop-in attribute)
    rebuild: Callable | None = None  # (backbone, description) -> reducer, for iared.reduced_io.load_reduced
    fresh: Callable | None = None  # backbone -> the model with untrained weights (iared.prune of a backbone)
    how_to_train: str = ""  # one line for the untrained warning / refusal


def _budget(knob) -> dict:
    return {"mode": "budget", "keep_ratio": list(knob) if isinstance(knob, (list, tuple)) else float(knob)}


def _iared_settings(knob) -> dict:
    """Threshold mode at ``knob``; the no-reduction knob 0 runs mode ``all``: ``score > 0`` would drop
    a token whose sigmoid score underflows to exactly 0.0, and "no reduction" means the unpruned model."""
    if not isinstance(knob, (list, tuple)) and float(knob) <= 0.0:
        return {"mode": "all"}
    return {"mode": "threshold", "threshold": knob}


def _tome_refuses(backbone) -> str | None:
    if getattr(backbone, "supports_key_weights", True):
        return None
    return (f"tome does not run on {type(backbone).__name__}: its blocks pool keys over the "
            "token grid, so merged tokens' sizes (proportional attention) have no meaning there")


def _build_iared(backbone, knob, locs, *, interpreters=None, **_):
    return _iared(backbone, locs, interpreters)


def _build_dynamicvit(backbone, knob, locs, **_):
    from iared.reducers.dynamicvit import build_dynamicvit

    return build_dynamicvit(backbone, float(knob), locations=locs)


def _rebuild_iared(backbone, d):
    from iared.interpreter import MultiHeadInterpreter

    return MultiHeadInterpreter(backbone.token_dim, int(d["interpreter_heads"]))


def _rebuild_dynamicvit(backbone, d):
    from iared.reducers.dynamicvit import DynamicViTPredictor

    return DynamicViTPredictor(backbone.token_dim, float(d["keep_ratio"]), float(d.get("tau", 1.0)))


def _fresh_iared(backbone):
    from iared.pruning import IARed

    return IARed(backbone)


def _hook(name: str) -> Callable:
    """A training hook of :mod:`iared.train.hooks`, imported when called (training pulls in more)."""
    def call(*args, **kwargs):
        from iared.train import hooks

        return getattr(hooks, name)(*args, **kwargs)
    call.__name__ = name
    return call


def _tome_sweep(backbone) -> tuple:
    """r values merging about 15 .. 85 % of the patch tokens by the last block (at most half of
    the alive tokens leave per block)."""
    merges = len(backbone.blocks) - 1
    n = backbone.num_tokens - backbone.num_prefix_tokens
    rs = sorted({max(1, round(f * n / merges)) for f in (0.15, 0.3, 0.45, 0.6, 0.75, 0.85)})
    return tuple(rs)


METHODS: dict[str, Method] = {
    "random": Method("random", "keep ratio per stage (budget top-k of uniform random scores)", 1.0,
                     (0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3), three_equal_stages,
                     lambda backbone, knob, stage: RandomReducer(), _budget, floor=True,
                     seeded=lambda seed, stage: RandomReducer(seed + stage),
                     rebuild=lambda backbone, d: RandomReducer(d.get("seed"))),
    "pixel": Method("pixel", "keep ratio per stage (budget top-k by pixel standard deviation)", 1.0,
                    (0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3), three_equal_stages,
                    lambda backbone, knob, stage: PixelSaliency(), _budget, floor=True),
    "framediff": Method("framediff", "keep ratio per stage (budget top-k by change since the previous frame; video)",
                        1.0, (0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3), three_equal_stages,
                        lambda backbone, knob, stage: FrameDifference(), _budget, video_only=True,
                        floor=True),
    "iared": Method("iared", "threshold on the interpreter's keep score (threshold mode)", 0.0,
                    (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8), three_equal_stages, None,
                    _iared_settings, learns=True,
                    build=_build_iared, train=_hook("train_iared"), knob_key="threshold",
                    rebuild=_rebuild_iared, fresh=_fresh_iared,
                    how_to_train="train them with `iared train-interpreters`"),
    "tome": Method("tome", "r: tokens merged per image before every block from block 1", 0,
                   (1, 2, 4, 6, 8, 12, 16), every_block_from_one,
                   lambda backbone, knob, stage: ToMe(int(knob), backbone.token_dim),
                   sweep_for=_tome_sweep, refuses=_tome_refuses, knob_key="r",
                   knob_at_build=True),
    "evit": Method("evit", "keep rate: ceil(rate * alive patches) kept, the rest fused into one token", 1.0,
                   (0.9, 0.8, 0.7, 0.6, 0.5, 0.4), quarter_locations,
                   lambda backbone, knob, stage: EViT(float(knob), backbone.token_dim), knob_key="keep_rate",
                   knob_at_build=True),
    "ats": Method("ats", "ratio: K = round(ratio * alive patches) CDF quantiles sampled per image (1 = off)",
                  1.0, (0.9, 0.8, 0.7, 0.6, 0.5, 0.4), quarter_locations,
                  lambda backbone, knob, stage: ATS(ratio=float(knob)), knob_key="ratio", knob_at_build=True,
                  rebuild=lambda backbone, d: ATS(d.get("ratio"), d.get("max_tokens"))),
    # DynamicViT's predictors learn: the builder lives beside them (iared.reducers.dynamicvit).
    "dynamicvit": Method("dynamicvit", "keep ratio per predictor (fraction of the alive patch tokens)", 1.0,
                         (0.9, 0.8, 0.7, 0.6, 0.5), quarter_locations, None, learns=True,
                         build=_build_dynamicvit, train=_hook("train_dynamicvit"), knob_in_weights=True,
                         knob_at_build=True, rebuild=_rebuild_dynamicvit,
                         how_to_train="train them with iared.train.dynamicvit.train_dynamicvit"),
}


def method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown token reducer {name!r}; known: {', '.join(METHODS)}") from None


def check_applies(name: str, backbone) -> None:
    """Raise a one-line ``ValueError`` when method ``name`` cannot run on ``backbone`` (and why)."""
    m = method(name)
    video = len(tuple(getattr(backbone, "token_grid", ()))) == 3
    if m.video_only and not video:
        raise ValueError(f"{name} does not apply to {type(backbone).__name__}: it compares each patch with the same "
                         "patch in the previous frame, and images have no frames (use a video backbone)")
    if m.refuses is not None and (why := m.refuses(backbone)):
        raise ValueError(why)


def default_methods(backbone, methods: Sequence[str]) -> tuple[str, ...]:
    """``methods`` as given, plus the video-only ones (``framediff``) on a video backbone."""
    video = len(tuple(getattr(backbone, "token_grid", ()))) == 3
    extra = [n for n, m in METHODS.items() if m.video_only and video and n not in methods]
    return (*methods, *extra)


def default_knobs(name: str, quick: bool = False, backbone=None) -> tuple:
    """Knob values from little to strong reduction (``quick``: one middle value). With ``backbone``,
    ToMe's r values are scaled to its token count and depth."""
    m = method(name)
    sweep = m.sweep_for(backbone) if m.sweep_for is not None and backbone is not None else m.sweep
    return (sweep[len(sweep) // 2],) if quick else tuple(sweep)


def stage_starts(name: str, depth: int) -> tuple[int, ...]:
    """The blocks that the method's reducers sit before, on a backbone of ``depth`` blocks."""
    return method(name).locations(depth)


def default_locations(name: str, backbone, reads_record: bool = False) -> tuple[int, ...]:
    """Where method ``name``'s reducers sit on ``backbone``: its natural placement by depth, or, on a
    backbone whose blocks are not interchangeable (MViTv2: ``default_stage_starts``), as many stages
    placed where the backbone says reducers help, minus block 0 for methods that read the block
    before their stage (``reads_record``)."""
    natural = method(name).locations(len(backbone.blocks))
    starts = getattr(backbone, "default_stage_starts", None)
    if starts is None:
        return natural
    locs = tuple(starts(len(natural) + 1))
    return tuple(s for s in locs if s >= 1)[:len(natural)] if reads_record else locs[:len(natural)]


def build_reduced(name: str, backbone, knob, stage_starts: Sequence[int] | None = None, *,
                  interpreters: Sequence[Reducer] | None = None, seed: int | None = None) -> ReducedModel:
    """``backbone`` with method ``name``'s reducers at ``stage_starts`` (the blocks they sit before;
    default: the method's natural placement), set to ``knob``.

    ``interpreters``: IA-RED²'s trained :class:`iared.interpreter.MultiHeadInterpreter`, one per
    stage (required for ``iared``; their stages are ``stage_starts`` or 3 equal ones).
    ``seed``: the random floor's generator. Run the model with :func:`runner` (or
    ``model(x, **forward_kwargs(name, knob))``): the policy methods take their knob from the stage
    settings, not from the reducers.
    """
    m = method(name)
    if m.refuses is not None and (why := m.refuses(backbone)):
        raise ValueError(why)
    if stage_starts is None:
        reads_record = m.reducer is not None and m.reducer(backbone, m.no_reduction, 0).needs_record
        stage_starts = default_locations(name, backbone, reads_record)
    locs = tuple(int(s) for s in stage_starts)
    if m.build is not None:
        return m.build(backbone, knob, locs, interpreters=interpreters, seed=seed)
    if m.seeded is not None and seed is not None:
        reducers = [m.seeded(seed, g) for g in range(len(locs))]
    else:
        reducers = [m.reducer(backbone, knob, g) for g in range(len(locs))]
    if any(r.needs_record for r in reducers) and locs and locs[0] < 1:
        raise ValueError(f"{name} reads the block before its stage: stage starts must be >= 1, got {locs}")
    if locs and locs[0] != 0:  # a leading stage with no reducer runs the first blocks
        return ReducedModel(backbone, [None, *reducers], (0, *locs))
    return ReducedModel(backbone, reducers, locs)


def _iared(backbone, locs: tuple[int, ...], interpreters) -> ReducedModel:
    from iared.pruning import IARed, IARedConfig

    if not interpreters:
        raise ValueError("iared needs trained interpreters (one per stage): train them with "
                         "`iared train-interpreters`, or load a pruned checkpoint")
    interpreters = list(interpreters)
    if len(interpreters) != len(locs):
        raise ValueError(f"iared: {len(interpreters)} interpreters for stage starts {locs}")
    model = IARed(backbone, IARedConfig(num_stages=len(locs), interpreter_heads=interpreters[0].num_heads,
                                        stage_starts=locs))
    for mine, theirs in zip(model.reducers, interpreters):
        mine.load_state_dict(theirs.state_dict())
    return model


def reducer_from_description(backbone, description: dict, stage: int = 0) -> Reducer:
    """The reducer a checkpoint describes (its ``describe()``), through its method's entry: the
    method's ``rebuild`` hook, or its ``reducer`` built at the described knob."""
    m = method(str(description.get("method")))
    if m.rebuild is not None:
        return m.rebuild(backbone, description)
    return m.reducer(backbone, description.get(m.knob_key, m.no_reduction), stage)


def forward_kwargs(name: str, knob) -> dict:
    """The stage-loop keyword arguments that run method ``name`` at ``knob``."""
    return method(name).settings(knob)


def runner(name: str, model: ReducedModel, knob) -> Callable[..., ReducedOutput]:
    """``inputs -> ReducedOutput``: ``model`` in eval mode, run with the settings of ``knob``."""
    model.eval()
    kwargs = forward_kwargs(name, knob)
    return lambda inputs, **overrides: model(inputs, **{**kwargs, **overrides})
