"""Distilling a ViT from a CNN teacher (``iared train --teacher``): logits and token-level hints.

Why: on ``digits-natural`` a ViT trained from scratch on labels sits at chance for thousands of
steps on 2 CPU cores, while a small CNN (:class:`iared.models.convnet.ConvNet`) reaches 97 % in
500 steps. Labels alone tell the ViT neither that a dark stroke and a bright one are the same
stroke, nor where the digit is. The teacher tells it both, densely:

- **logits** (Hinton et al. 2015; DeiT distils from a convnet the same way): KL divergence from
  the teacher's class distribution, weight ``kd``;
- **token hints** (FitNets, Romero et al. 2015): the teacher's feature map at the ViT's patch
  stride has one cell per patch token, so after student block ``b_i`` every patch token is
  regressed (through a linear adapter) onto its cell of teacher stage ``s_i``, weight ``hint``.
  Stages and blocks are paired in order, the last stage with the last block
  (:func:`hint_pairs`); targets are LayerNorm'd per cell so every stage weighs the same;
- **class-token hints**: the class token after ``b_i`` is regressed onto the teacher map of stage
  ``s_i`` max-pooled over positions (what the teacher's own classifier reads), weight
  ``hint_class``: it asks the class token to gather from the tokens that hold the digit.

The adapters are trained with the student and saved in the training checkpoint
(``distill`` entry), never in the student's weights: the exported backbone is a plain ViT.
Hints need every token, so they are refused with ``--token-drop`` (logit distillation works there).

A student with a convolutional stem (``ViTConfig.conv_stem``, a hybrid ViT) whose widths are the
teacher's first stages starts with those stages' weights (:func:`init_stem_from_teacher`): its
tokens then begin with the teacher's polarity-free stroke features, and the transformer learns
where the digit is and what it is.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Distiller", "hint_pairs", "init_stem_from_teacher", "load_teacher"]


def hint_pairs(teacher_stages: list[int], depth: int) -> list[tuple[int, int]]:
    """``(teacher stage, student block)`` pairs: the stages spread evenly over the blocks, in order,
    the last stage on the last block (3 stages, 6 blocks: blocks 1, 3, 5)."""
    n = len(teacher_stages)
    if n > depth:
        teacher_stages, n = teacher_stages[-depth:], depth
    return [(s, round((i + 1) * depth / n) - 1) for i, s in enumerate(teacher_stages)]


def load_teacher(path: str, device) -> nn.Module:
    """A trained :class:`~iared.models.convnet.ConvNet` (``iared train --model digits_natural_cnn``'s
    checkpoint or export), frozen, in eval mode. Anything else: one line naming the file."""
    from iared.checkpoint import CheckpointError
    from iared.models import ConvNet, load_model

    teacher = load_model(path)
    if not isinstance(teacher, ConvNet):
        raise CheckpointError(f"--teacher {path}: holds a {type(teacher).__name__}; a teacher is a ConvNet "
                              "(train one with `iared train --model digits_natural_cnn`)")
    return teacher.to(device).eval().requires_grad_(False)


def init_stem_from_teacher(student: nn.Module, teacher: nn.Module) -> bool:
    """Copy the teacher's first stages into the student's ``conv_stem`` when their shapes agree (same
    widths, each of those teacher stages pooling); returns whether it did."""
    stem = tuple(getattr(student.cfg, "conv_stem", ()))
    n = len(stem)
    if not n or tuple(teacher.cfg.widths[:n]) != stem or teacher.cfg.pools < n \
            or teacher.cfg.in_chans != student.cfg.in_chans:
        return False
    for i in range(n):
        student.patch_embed.backbone[i].load_state_dict(teacher.stages[i].state_dict())
    return True


class Distiller:
    """The frozen teacher and the student-side adapters (``adapters``, an ``nn.ModuleDict``: the only
    trained part, saved and restored with the run); :meth:`loss` is one training step's loss."""

    def __init__(self, teacher: nn.Module, student: nn.Module, kd: float = 1.0, hint: float = 1.0,
                 hint_class: float = 1.0, path: str = "<teacher>"):
        cfg, scfg = teacher.cfg, student.cfg
        for name in ("img_size", "in_chans", "num_classes"):
            if getattr(cfg, name) != getattr(scfg, name):
                raise ValueError(f"--teacher {path}: its {name} is {getattr(cfg, name)}, the student's "
                                 f"{getattr(scfg, name)}")
        if (hint or hint_class) and cfg.stride != scfg.patch_size:
            raise ValueError(f"--teacher {path}: its feature cells are {cfg.stride} px, the student's patches "
                             f"{scfg.patch_size} px; token hints need one cell per patch (or use --hint 0 "
                             "--hint-class 0)")
        if (hint or hint_class) and (scfg.num_prefix_tokens != 1 or not scfg.class_token):
            raise ValueError("token hints need a student with exactly one prefix token, the class token")
        self.teacher = teacher
        self.kd, self.hint, self.hint_class = kd, hint, hint_class
        self.pairs = hint_pairs(teacher.hint_stages(), scfg.depth) if (hint or hint_class) else []
        widths = [cfg.widths[s] for s, _ in self.pairs]
        device = next(student.parameters()).device
        self.adapters = nn.ModuleDict({
            "tokens": nn.ModuleList(nn.Linear(scfg.embed_dim, w) for w in widths),
            "class": nn.ModuleList(nn.Linear(scfg.embed_dim, w) for w in widths),
        }).to(device)

    def loss(self, student: nn.Module, images: Tensor, labels: Tensor, label_smoothing: float,
             keep: Tensor | None = None) -> tuple[Tensor, dict[str, float]]:
        """Cross-entropy + ``kd`` * KL(teacher || student) + hints; returns ``(loss, parts)``."""
        with torch.no_grad():
            maps = self.teacher.feature_maps(images)
            teacher_logits = self.teacher.head_from_maps(maps[-1])
        if self.pairs and keep is not None:
            raise ValueError("token hints need every token; train with --hint 0 --hint-class 0 when using "
                             "--token-drop")
        blocks_out: dict[int, Tensor] = {}
        if self.pairs:
            wanted = {b for _, b in self.pairs}
            tokens = student.embed(images)
            for i, block in enumerate(student.blocks):
                tokens = block(tokens)
                if i in wanted:
                    blocks_out[i] = tokens.data
            logits = student.forward_head(tokens)
        else:
            logits = student(images, keep=keep)
        ce = F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
        kd = F.kl_div(F.log_softmax(logits, 1), F.log_softmax(teacher_logits, 1), log_target=True,
                      reduction="batchmean")
        token_hint = logits.new_zeros(())
        class_hint = logits.new_zeros(())
        for (stage, block), ta, ca in zip(self.pairs, self.adapters["tokens"], self.adapters["class"]):
            target = maps[stage]
            width = target.shape[1]
            cells = F.layer_norm(target.flatten(2).transpose(1, 2), (width,))  # (B, N, C), row-major as tokens
            pooled = F.layer_norm(target.amax(dim=(2, 3)), (width,))
            out = blocks_out[block]
            if self.hint:
                token_hint = token_hint + F.mse_loss(ta(out[:, 1:]), cells) / len(self.pairs)
            if self.hint_class:
                class_hint = class_hint + F.mse_loss(ca(out[:, 0]), pooled) / len(self.pairs)
        total = ce + self.kd * kd + self.hint * token_hint + self.hint_class * class_hint
        parts = {"ce": float(ce.detach()), "kd": float(kd.detach()), "hint": float(token_hint.detach()),
                 "hint_class": float(class_hint.detach())}
        return total, parts
