"""What the embedded tasks (digits-clutter, digits-natural, moving-digits) share: every sample is a
pure function of ``(seed, split, index)``, so an index is checked the same way everywhere, and a
sample once rendered can be kept as 8-bit pixels and packed mask bits instead of rendered again."""

from __future__ import annotations

import operator
from collections.abc import Callable

import numpy as np
import torch


def checked_index(dataset, i) -> int:
    """``i`` as a non-negative int below ``len(dataset)`` (negative indices count from the end);
    ``IndexError`` naming the dataset otherwise."""
    i = operator.index(i)
    n = len(dataset)
    if i < 0:
        i += n
    if not 0 <= i < n:
        raise IndexError(f"index {i} out of range for {dataset!r}")
    return i


class RenderCache:
    """Rendered samples of one dataset, in memory: pixels in [0, 1] as uint8 (the tasks quantise to 8
    bits, so nothing is lost), labels, masks as packed bits.

    ``get(i, render)`` renders sample ``i`` once (``render(i) -> (pixels, label, mask)``, numpy) and
    returns ``(float tensor, label, bool tensor)``. The arrays are allocated on first use with
    ``np.zeros``, which pages in lazily: memory grows with the indices visited. A pickled cache (a
    DataLoader worker's copy) starts empty.
    """

    def __init__(self, length: int, pixel_shape: tuple[int, ...], mask_shape: tuple[int, ...]):
        self.length, self.pixel_shape, self.mask_shape = length, tuple(pixel_shape), tuple(mask_shape)
        self._arrays: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_arrays": None}

    def get(self, i: int, render: Callable[[int], tuple[np.ndarray, int, np.ndarray]]
            ) -> tuple[torch.Tensor, int, torch.Tensor]:
        if self._arrays is None:
            n, mask_bits = self.length, int(np.prod(self.mask_shape))
            self._arrays = (np.zeros((n, *self.pixel_shape), np.uint8), np.zeros(n, np.int64),
                            np.zeros((n, (mask_bits + 7) // 8), np.uint8), np.zeros(n, bool))
        pixels, labels, masks, done = self._arrays
        if not done[i]:
            image, label, mask = render(i)
            pixels[i] = np.rint(image * 255)
            labels[i] = label
            masks[i] = np.packbits(mask)
            done[i] = True
        bits = np.unpackbits(masks[i])[:int(np.prod(self.mask_shape))]
        return (torch.from_numpy(pixels[i]).float().div_(255), int(labels[i]),
                torch.from_numpy(bits.reshape(self.mask_shape).astype(bool)))


class RenderedTask(torch.utils.data.Dataset):
    """An embedded task whose ``render(i)`` dict holds the pixels (key ``PIXELS``), ``label`` and the
    mask (key ``MASK``). Items are ``(pixels, label, mask)`` tensors, rendered each time or, with
    ``cache``, kept in ``_memo`` (a :class:`RenderCache` the subclass sizes)."""

    PIXELS = "image"
    MASK = "mask"
    length: int
    cache: bool
    _memo: RenderCache

    def render(self, i) -> dict:
        raise NotImplementedError

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i) -> tuple[torch.Tensor, int, torch.Tensor]:
        if not self.cache:
            pixels, label, mask = self._parts(i)
            return torch.from_numpy(pixels), label, torch.from_numpy(mask)
        return self._memo.get(checked_index(self, i), self._parts)

    def _parts(self, i) -> tuple[np.ndarray, int, np.ndarray]:
        s = self.render(i)
        return s[self.PIXELS], s["label"], s[self.MASK]
