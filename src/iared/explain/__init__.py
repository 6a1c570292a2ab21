"""Explanations: heatmap methods behind one call, metrics against masks and on the model, pictures.

``method(model, images, target=None) -> (B, H, W)`` maps in [0, 1] (see :mod:`.methods`);
``explain(model, images, "interpreter")`` by name, ``default_methods(model)`` lists them all
(the interpreter combined and per stage). Metrics in :mod:`.metrics`, the whole
methods x metrics evaluation in :mod:`.evaluate`, panels and charts in :mod:`.render`, the
``iared explain`` / ``iared explain-eval`` commands in :mod:`.cli`.
"""

from iared.explain.methods import (
    DEFAULT_METHODS,
    METHODS,
    AttentionRollout,
    CheferRollout,
    GradCAM,
    InterpreterMap,
    RandomMap,
    RawAttention,
    default_methods,
    explain,
    make_method,
)

__all__ = [
    "DEFAULT_METHODS",
    "METHODS",
    "AttentionRollout",
    "CheferRollout",
    "GradCAM",
    "InterpreterMap",
    "RandomMap",
    "RawAttention",
    "default_methods",
    "explain",
    "make_method",
]
