"""Tests for the embedded digits-clutter task."""

import pickle

import numpy as np
import pytest
import torch

from iared.data import (
    CANVAS,
    PATCH,
    TASKS,
    DigitsClutter,
    background_fraction,
    build_dataset,
    patch_foreground,
)
from iared.data.digits import INK_THRESHOLD, MAX_FRAGMENTS, _sources


@pytest.fixture(scope="module")
def train():
    return DigitsClutter("train", length=1000, seed=0)


def test_item_shapes_dtypes_ranges(train):
    for i in range(10):
        image, label, mask = train[i]
        assert image.shape == (1, CANVAS, CANVAS) and image.dtype == torch.float32
        assert mask.shape == (CANVAS, CANVAS) and mask.dtype == torch.bool
        assert isinstance(label, int) and 0 <= label <= 9
        assert image.min() >= 0 and image.max() <= 1
        assert mask.any()
    assert (DigitsClutter.num_classes, DigitsClutter.in_chans, DigitsClutter.image_size) == (10, 1, 64)
    assert CANVAS // PATCH == 8


def test_default_lengths_and_bad_arguments():
    assert [len(DigitsClutter(s)) for s in ("train", "val", "test")] == [50_000, 2_000, 2_000]
    assert len(DigitsClutter("val", length=7)) == 7
    with pytest.raises(ValueError, match="split"):
        DigitsClutter("validation")
    for bad in (0, -3, 2.5, True, "10"):
        with pytest.raises(ValueError, match="length"):
            DigitsClutter("train", length=bad)
    ds = DigitsClutter("test", length=5)
    with pytest.raises(IndexError):
        ds[5]
    assert torch.equal(ds[-1][0], ds[4][0])


def test_deterministic_pure_function_of_seed_split_index(train):
    a = train[3]
    b = DigitsClutter("train", length=10, seed=0)[3]  # length does not change sample content
    assert torch.equal(a[0], b[0]) and a[1] == b[1] and torch.equal(a[2], b[2])
    assert not torch.equal(train[3][0], train[4][0])
    assert not torch.equal(DigitsClutter("train", seed=1)[3][0], a[0])
    assert not torch.equal(DigitsClutter("val")[3][0], a[0])


def test_splits_are_disjoint_and_cover_all_sources():
    idx = {s: set(DigitsClutter(s).source_indices.tolist()) for s in ("train", "val", "test")}
    assert not idx["train"] & idx["val"] and not idx["train"] & idx["test"] and not idx["val"] & idx["test"]
    assert len(idx["train"] | idx["val"] | idx["test"]) == 1797
    assert abs(len(idx["train"]) / 1797 - 0.6) < 0.01 and abs(len(idx["val"]) / 1797 - 0.2) < 0.01
    # The split never depends on the user's seed.
    assert np.array_equal(DigitsClutter("val", seed=5).source_indices, DigitsClutter("val").source_indices)
    # Digits and fragments of a sample come from the sample's own split.
    _, labels, _ = _sources()
    for split in ("val", "test"):
        ds = DigitsClutter(split)
        for i in range(20):
            s = ds.render(i)
            assert s["source"] in idx[split] and labels[s["source"]] == s["label"]
            assert set(s["fragment_sources"]) <= idx[split] - {s["source"]}


def test_mask_is_exactly_the_digit_ink_and_clutter_outside(train):
    for i in range(40):
        s = train.render(i)
        image, mask, digit, clutter = (torch.from_numpy(s[k]) for k in ("image", "mask", "digit", "clutter"))
        item_image, _, item_mask = train[i]
        assert torch.equal(item_image[0], image) and torch.equal(item_mask, mask)
        assert torch.equal(image, torch.maximum(digit, clutter))
        assert torch.equal(mask, digit > INK_THRESHOLD)
        assert (image[mask] > INK_THRESHOLD).all()
        clutter_ink = clutter > INK_THRESHOLD
        assert clutter_ink.any() and not (clutter_ink & mask).any()
        # No clutter at all (not even faint pixels) inside the digit's ink box.
        top, bottom, left, right = s["digit_box"]
        assert (clutter[top:bottom, left:right] == 0).all()
        assert mask[:top].sum() == mask[bottom:].sum() == mask[:, :left].sum() == mask[:, right:].sum() == 0
        # Clutter covers at least as many patches as the digit.
        n_digit = int(patch_foreground(mask).sum())
        n_clutter = int(patch_foreground(clutter_ink).sum())
        assert n_clutter >= n_digit, (i, n_clutter, n_digit)
        assert 1 <= len(s["fragment_sources"]) <= MAX_FRAGMENTS


def test_background_fraction_is_high(train):
    frac = background_fraction(train, n=300)
    assert 0.70 <= frac < 0.95
    # Cross-check against a direct count.
    masks = torch.stack([train[i][2] for i in range(300)])
    per_patch = masks.reshape(300, 8, 8, 8, 8).any(dim=4).any(dim=2)
    assert frac == pytest.approx(1 - per_patch.float().mean().item())


def test_patch_foreground_hand_made_mask():
    mask = torch.zeros(16, 24, dtype=torch.bool)
    mask[0, 9] = True  # patch row 0, col 1
    mask[15, 23] = True  # patch row 1, col 2 -> index 5
    assert patch_foreground(mask).tolist() == [False, True, False, False, False, True]
    batch = torch.stack([mask, torch.zeros_like(mask), torch.ones_like(mask)])
    out = patch_foreground(batch)
    assert out.shape == (3, 6)
    assert not out[1].any() and out[2].all()
    assert patch_foreground(mask, patch=4).shape == (24,)
    assert patch_foreground(mask, patch=4).nonzero().flatten().tolist() == [2, 23]
    with pytest.raises(ValueError):
        patch_foreground(torch.zeros(10, 16, dtype=torch.bool))


def test_labels_roughly_balanced(train):
    labels = np.array([train.render(i)["label"] for i in range(1000)])
    counts = np.bincount(labels, minlength=10)
    assert counts.min() >= 60 and counts.max() <= 140, counts


def test_pickles_and_works_in_dataloader_workers():
    ds = DigitsClutter("val", length=8, seed=3)
    clone = pickle.loads(pickle.dumps(ds))
    assert torch.equal(clone[2][0], ds[2][0])
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=1)
    images, labels, masks = next(iter(loader))
    assert images.shape == (4, 1, 64, 64) and labels.shape == (4,) and masks.shape == (4, 64, 64)
    assert torch.equal(images[1], ds[1][0]) and labels[1].item() == ds[1][1]


def test_registry():
    assert TASKS["digits-clutter"] is DigitsClutter
    ds = build_dataset("digits-clutter", "test", length=12, seed=2)
    assert isinstance(ds, DigitsClutter) and (ds.split, len(ds), ds.seed) == ("test", 12, 2)
    with pytest.raises(ValueError, match="digits-clutter"):
        build_dataset("no-such-task", "train")
