"""A small plain CNN classifier: the teacher that distils a ViT on tasks where a ViT alone learns too slowly.

On ``digits-natural`` a ViT trained from scratch stays at chance for a long time (a linear patch
embedding maps a dark stroke to the negative of a bright one, and the class token must find a
small digit among distractors), while this CNN reaches 97 % validation top-1 in 500 steps of 128.
:mod:`iared.train.distill` passes what the CNN knows to the ViT: its logits, and its feature maps
at the ViT's patch stride, token by token (DeiT's distillation from a convnet, plus FitNets-style
hints; see that module).

``ConvNet(cfg)``: ``len(widths)`` stages of 3x3 conv -> BatchNorm -> ReLU, a 2x2 max-pool after the
first ``pools`` stages, then a classifier on the feature map max-pooled over positions (a digit
anywhere lights up the cells that see it). After the pools the map has one cell per ``2 ** pools``
pixels: one cell per ViT patch when ``2 ** pools`` is the patch size. Not a token model: no
reducer runs on it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from torch import Tensor, nn

__all__ = ["CONVNET_CONFIGS", "ConvNet", "ConvNetConfig", "build_convnet"]


@dataclass
class ConvNetConfig:
    img_size: int = 64
    in_chans: int = 3
    num_classes: int = 10
    widths: tuple[int, ...] = (32, 64, 128, 128, 128)
    pools: int = 3  # a 2x2 max-pool after each of the first ``pools`` stages
    # what the data pipeline normalises inputs with (as for every backbone; the model does not)
    mean: tuple[float, ...] = (0.0, 0.0, 0.0)
    std: tuple[float, ...] = (1.0, 1.0, 1.0)

    def __post_init__(self):
        self.widths = tuple(int(w) for w in self.widths)
        self.mean, self.std = tuple(self.mean), tuple(self.std)
        if not self.widths or min(self.widths) < 1:
            raise ValueError(f"widths must be positive channel counts, got {self.widths}")
        if not 0 <= self.pools <= len(self.widths):
            raise ValueError(f"pools must be in [0, {len(self.widths)}] (one per stage at most), got {self.pools}")
        if self.img_size % (2 ** self.pools):
            raise ValueError(f"img_size {self.img_size} is not divisible by the total stride {2 ** self.pools}")
        if len(self.mean) != self.in_chans or len(self.std) != self.in_chans:
            raise ValueError(f"mean / std need {self.in_chans} values (one per input channel)")

    @property
    def stride(self) -> int:
        """Pixels per cell of the final feature map (per side)."""
        return 2 ** self.pools

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


CONVNET_CONFIGS: dict[str, dict] = {
    # digits-natural's teacher: one 8x8 cell per patch of digits_natural_vit; 60 M MACs per image.
    "digits_natural_cnn": dict(img_size=64, in_chans=3, num_classes=10, widths=(16, 32, 64, 128, 128)),
}


class ConvNet(nn.Module):
    def __init__(self, cfg: ConvNetConfig | None = None, **overrides):
        super().__init__()
        cfg = cfg or ConvNetConfig(**overrides)
        self.cfg = cfg
        from iared.models.vit import conv_stem_stages

        self.stages = nn.ModuleList(conv_stem_stages(cfg.in_chans, cfg.widths, cfg.pools))
        self.head = nn.Linear(cfg.widths[-1], cfg.num_classes)

    def feature_maps(self, images: Tensor) -> list[Tensor]:
        """The output of every stage, ``(B, C_i, H_i, W_i)``, first to last."""
        x, maps = images, []
        for stage in self.stages:
            x = stage(x)
            maps.append(x)
        return maps

    def hint_stages(self) -> list[int]:
        """The stages whose maps have the final stride (one cell per ViT patch): the ones a ViT's
        tokens can be taught position by position."""
        return list(range(max(self.cfg.pools - 1, 0), len(self.cfg.widths)))

    def head_from_maps(self, last: Tensor) -> Tensor:
        return self.head(last.amax(dim=(2, 3)))

    def forward(self, images: Tensor, keep: Tensor | None = None) -> Tensor:
        if keep is not None:
            raise ValueError("a ConvNet has no tokens to drop (keep / --token-drop are for transformers)")
        return self.head_from_maps(self.feature_maps(images)[-1])


def build_convnet(name: str, config: dict, *, pretrained: bool = False, checkpoint=None, **overrides) -> ConvNet:
    from iared.checkpoint import extract_state_dict, load_weights, read_checkpoint

    if pretrained:
        raise ValueError(f"{name}: no pretrained weights are published; train it with `iared train --model {name}`")
    model = ConvNet(ConvNetConfig(**{**config, **overrides}))
    if checkpoint is not None:
        load_weights(model, extract_state_dict(read_checkpoint(checkpoint), checkpoint), checkpoint)
    return model
