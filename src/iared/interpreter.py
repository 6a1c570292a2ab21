"""The multi-head interpreter of IA-RED²: a per-token "is this worth computing?" score.

    x     = LayerNorm(tokens)                       (no affine parameters)
    q, k  = split(Linear(x))                        (one linear layer, H heads of d = C / H)
    s_j   = mean_h sigmoid(q_cls,h . k_j,h / sqrt(d))

The class token's query asks every token how relevant it is; the mean over heads of the
sigmoids is a keep probability in [0, 1] (Pan et al., NeurIPS 2021, Sec. 3.2). The same score
is the heatmap of :mod:`iared.explain`. Only the class token's query is ever used, so the query
half of the linear layer runs on one row per image: the interpreter costs about one linear
layer over the tokens (see :func:`iared.flops.interpreter_macs`).

A backbone without class token (average-pooled ViTs) has no such query. There the query is the
mean of the alive patch tokens' queries (the query of their mean normalised feature,
:meth:`iared.tokens.Tokens.patch_mean`): the tokens are asked how relevant they are to the
average token, which is what the average-pooling head reads. Register tokens are prefix tokens:
they score 1 like the class token and are never dropped.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from iared import flops
from iared.reducers.base import Reducer, StageInput
from iared.reducers.policy import keep_from_scores
from iared.tokens import Decision, Tokens  # noqa: F401


class MultiHeadInterpreter(Reducer):
    """IA-RED²'s reducer: scores every alive token, and the stage policy turns scores into keeps.

    :meth:`score` ``(tokens) -> (token-aligned,)`` in [0, 1]. Prefix tokens (class, distillation)
    score exactly 1: they are always kept. Padding (in a padded layout) scores 0, which is the
    paper's "multiplied by the previous keep mask". :meth:`forward` is the Reducer protocol.
    """

    def __init__(self, dim: int, num_heads: int = 6):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"interpreter: dim {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.qk = nn.Linear(dim, 2 * dim)  # rows [:dim] give q, rows [dim:] give k
        nn.init.trunc_normal_(self.qk.weight, std=0.02)
        nn.init.zeros_(self.qk.bias)

    @torch.no_grad()
    def set_initial_score(self, score: float) -> None:
        """Bias the layer so every token scores about ``score`` while the weights are small.

        With ``q = W_q x + b``, ``k = W_k x + b`` and small ``W``, each head's logit is about
        ``|b_h|^2 / sqrt(d)``; equal entries ``a = sqrt(logit(score) / sqrt(d))`` give the target.
        Reward training starts from "keep almost everything" (as BlockDrop does): a policy that
        starts at 0.5 drops half of the useful tokens, gets punished for every mistake, and
        learns "keep everything" before it learns which tokens are redundant.
        """
        if not 0.5 <= score < 1:
            raise ValueError(f"initial score must be in [0.5, 1), got {score}")
        dim = self.qk.in_features
        d = dim // self.num_heads
        logit = torch.logit(torch.tensor(float(score))).item()
        self.qk.bias.fill_((logit / d**0.5) ** 0.5)

    def forward(self, x: StageInput) -> Decision:
        scores = self.score(x.tokens)
        return keep_from_scores(x.tokens, scores, x.settings, macs=self.macs)

    def macs(self, n):
        """MACs on ``n`` alive tokens (int or ``(B,)``)."""
        return flops.interpreter_macs(n, self.qk.in_features)

    def describe(self) -> dict:
        return {"method": "iared", "interpreter_heads": self.num_heads}

    def head_logits(self, tokens: Tokens) -> Tensor:
        """Token-aligned ``(..., H)``: per head, the class query's scaled dot product with each token's
        key, ``q_cls,h . k_j,h / sqrt(d)``, before the sigmoid. The keep score reads it through a
        sigmoid; the explainers also read it as single-query attention (a softmax over tokens)."""
        dim = self.qk.in_features
        x = self.norm(tokens.data)
        # (B, C): the class token, or the average patch token when the backbone has no class token
        # (LayerNorm is per token, so the class token's row of x is its normalised features)
        cls = tokens.summary(x)
        q = F.linear(cls, self.qk.weight[:dim], self.qk.bias[:dim]).unflatten(-1, (self.num_heads, -1))
        k = F.linear(x, self.qk.weight[dim:], self.qk.bias[dim:]).unflatten(-1, (self.num_heads, -1))
        return (tokens.per_token(q) * k).sum(-1) * k.shape[-1] ** -0.5

    def score(self, tokens: Tokens) -> Tensor:
        scores = torch.sigmoid(self.head_logits(tokens)).mean(-1)
        scores = torch.where(tokens.is_prefix(), torch.ones_like(scores), scores)
        valid = tokens.valid()
        return scores if valid is None else scores * valid


def default_interpreter_heads(dim: int, preferred: int = 6) -> int:
    """6 heads as in the authors' tool where the width allows, else the largest divisor below."""
    for h in range(preferred, 0, -1):
        if dim % h == 0:
            return h
    return 1
