"""Token reducers behind one protocol (:mod:`iared.reducers.base`): IA-RED²'s interpreter, the
peers and the no-learning floors. Each is a small class; :mod:`iared.stages` runs them all."""

from iared.reducers.base import DEFAULT_THRESHOLD, MODES, Reducer, StageInput, StageSettings
from iared.reducers.policy import budget_count, budget_counts, keep_from_scores

__all__ = ["DEFAULT_THRESHOLD", "MODES", "Reducer", "StageInput", "StageSettings", "budget_count", "budget_counts",
           "keep_from_scores"]
