"""iared: faster vision transformers by dropping redundant tokens, explained by the same interpreter.

An implementation of IA-RED² (Pan et al., "Interpretability-Aware Redundancy Reduction for
Vision Transformers", NeurIPS 2021).
"""

from iared.dropin import PrunedModel, prune
from iared.interpreter import MultiHeadInterpreter
from iared.models import VisionTransformer, create_model, from_timm
from iared.prediction import predict
from iared.pruning import IARed, IARedConfig, PrunedOutput
from iared.streaming import GatePolicy, Stream

__version__ = "0.1.0"
__all__ = [
           "GatePolicy",
           "IARed",
           "IARedConfig",
           "MultiHeadInterpreter",
           "PrunedModel",
           "PrunedOutput",
           "Stream",
           "VisionTransformer",
           "__version__",
           "create_model",
           "from_timm",
           "predict",
           "prune",
]
