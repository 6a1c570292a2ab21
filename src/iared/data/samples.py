"""What the embedded tasks (digits-clutter, digits-natural, moving-digits) share: every sample is a
pure function of ``(seed, split, index)``, so an index is checked the same way everywhere, and a
sample once rendered can be kept as 8-bit pixels and packed mask bits instead of rendered again."""

from __future__ import annotations

import multiprocessing
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
        if self._arrays is None or not self._arrays[3][i]:
            self.store(i, *self.pack(*render(i)))
        pixels, labels, masks, _ = self._arrays
        bits = np.unpackbits(masks[i])[:int(np.prod(self.mask_shape))]
        return (torch.from_numpy(pixels[i]).float().div_(255), int(labels[i]),
                torch.from_numpy(bits.reshape(self.mask_shape).astype(bool)))

    @staticmethod
    def pack(image: np.ndarray, label: int, mask: np.ndarray) -> tuple[np.ndarray, int, np.ndarray]:
        """A rendered sample as it is kept: 8-bit pixels, the label, packed mask bits."""
        return np.rint(image * 255).astype(np.uint8), int(label), np.packbits(mask)

    def store(self, i: int, pixels: np.ndarray, label: int, mask_bits: np.ndarray) -> None:
        if self._arrays is None:  # np.zeros pages in lazily: memory grows with the samples stored
            n, mask_bytes = self.length, (int(np.prod(self.mask_shape)) + 7) // 8
            self._arrays = (np.zeros((n, *self.pixel_shape), np.uint8), np.zeros(n, np.int64),
                            np.zeros((n, mask_bytes), np.uint8), np.zeros(n, bool))
        all_pixels, labels, masks, done = self._arrays
        all_pixels[i], labels[i], masks[i], done[i] = pixels, label, mask_bits, True

    def missing(self) -> list[int]:
        """Indices not rendered yet."""
        return list(range(self.length)) if self._arrays is None else np.flatnonzero(~self._arrays[3]).tolist()


_PRERENDERING = None  # the dataset a prerender pool's forked workers render from


def _one_thread() -> None:
    torch.set_num_threads(1)  # as DataLoader workers: a forked OpenMP pool would deadlock, and N workers share the cores


def _render_chunk(indices: list[int]) -> list[tuple[int, np.ndarray, int, np.ndarray]]:
    return [(i, *RenderCache.pack(*_PRERENDERING._parts(i))) for i in indices]


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

    def prerender(self, processes: int, show_progress: bool = True) -> None:
        """Render every sample into the cache now, in ``processes`` forked worker processes.

        For fast accelerators, whose steps would otherwise wait on rendering (about 8 ms per 64x64
        image on one core); the samples are pure functions of the index, so nothing changes but when
        they are made. The cache then holds ``len(self)`` samples in memory (12 KB per 64x64 RGB
        image, 55 KB per 8-frame 48x48 clip); DataLoader workers would each start an empty copy of
        it, so train with ``workers=0`` after this."""
        global _PRERENDERING
        from tqdm.auto import tqdm

        if not self.cache:
            raise ValueError(f"{self!r}: prerender needs cache=True")
        todo = self._memo.missing()
        chunks = [todo[i:i + 256] for i in range(0, len(todo), 256)]
        if not chunks:
            return
        _PRERENDERING = self
        try:
            with multiprocessing.get_context("fork").Pool(max(1, processes), _one_thread) as pool, \
                    tqdm(total=len(todo), desc=f"render {type(self).__name__}", disable=not show_progress,
                         dynamic_ncols=True, mininterval=1.0) as bar:
                for rendered in pool.imap_unordered(_render_chunk, chunks):
                    for i, pixels, label, mask_bits in rendered:
                        self._memo.store(i, pixels, label, mask_bits)
                    bar.update(len(rendered))
        finally:
            _PRERENDERING = None


def prerender_task(dataset, processes: int, show_progress: bool = True) -> None:
    """:meth:`RenderedTask.prerender` on the embedded task under ``dataset`` (through the model-input
    adapters that :func:`iared.loading.task_dataset` may wrap it in); a clear error for data that is
    not rendered (image folders, digits-clutter, which renders in microseconds)."""
    inner = dataset
    while not isinstance(inner, RenderedTask) and hasattr(inner, "dataset"):
        inner = inner.dataset
    if not isinstance(inner, RenderedTask):
        raise ValueError(f"--prerender: {type(dataset).__name__} has no rendered samples to make up front "
                         "(digits-natural and moving-digits do)")
    inner.prerender(processes, show_progress=show_progress)
