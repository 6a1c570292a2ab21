"""Tests for the embedded digits-natural task (iared.data.natural) and ``iared make-dataset``."""

import hashlib
import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from iared.data import TASKS, DigitsClutter, DigitsNatural, background_fraction, build_dataset, patch_foreground
from iared.data.digits import INK_THRESHOLD, _split_tables
from iared.data.natural import MAX_FRAGMENTS, PHOTOS, _bundled_photos, patch_saliency_recall, write_dataset


@pytest.fixture(scope="module")
def test_set():
    return DigitsNatural("test", length=64)


def _stack(ds, n):
    items = [ds[i] for i in range(n)]
    return torch.stack([x for x, _, _ in items]), [y for _, y, _ in items], torch.stack([m for _, _, m in items])


def test_items_and_registration(test_set):
    assert TASKS["digits-natural"] is DigitsNatural
    assert isinstance(build_dataset("digits-natural", "val", length=3), DigitsNatural)
    image, label, mask = test_set[0]
    assert image.shape == (3, 64, 64) and image.dtype == torch.float32
    assert 0 <= image.min() and image.max() <= 1
    assert torch.equal(image, torch.round(image * 255) / 255)  # 8-bit levels, like the PNGs
    assert mask.shape == (64, 64) and mask.dtype == torch.bool and mask.any()
    assert isinstance(label, int) and 0 <= label <= 9
    assert [len(DigitsNatural(s)) for s in ("train", "val", "test")] == [50_000, 2_000, 2_000]
    with pytest.raises(ValueError, match="split"):
        DigitsNatural("validation")
    with pytest.raises(IndexError):
        test_set[64]


def test_deterministic_cached_and_seeded(test_set):
    fresh = DigitsNatural("test", length=64, cache=False)
    test_set[0]  # something cached
    clone = pickle.loads(pickle.dumps(test_set))
    assert clone._memo._arrays is None  # a DataLoader worker's copy starts empty, not with the parent's arrays
    for i in (0, 5, 63):
        a, b, c = test_set[i], fresh[i], clone[i]
        assert torch.equal(a[0], b[0]) and torch.equal(a[0], c[0]) and a[1] == b[1] == c[1]
        assert torch.equal(a[2], b[2])
    other = DigitsNatural("test", length=64, seed=1)
    assert not torch.equal(other[0][0], test_set[0][0])


def test_splits_disjoint_photos_and_digits():
    names = {s: set(PHOTOS[s]) for s in PHOTOS}
    assert not (names["train"] & names["val"] or names["train"] & names["test"] or names["val"] & names["test"])
    # the same picture under two names (skimage's cat is chelsea) must not cross splits either
    digests = {s: {hashlib.sha1(p.tobytes()).hexdigest() for p in _bundled_photos(s)} for s in PHOTOS}
    assert not (digests["train"] & digests["val"] or digests["train"] & digests["test"]
                or digests["val"] & digests["test"])
    sources = {s: set(_split_tables(s)[0].tolist()) for s in PHOTOS}
    assert not (sources["train"] & sources["val"] or sources["train"] & sources["test"]
                or sources["val"] & sources["test"])
    ds = DigitsNatural("val", length=40)
    for i in range(40):
        s = ds.render(i)
        assert s["source"] in sources["val"] and set(s["fragment_sources"]) <= sources["val"]
        assert s["source"] not in s["fragment_sources"]


def test_mask_is_the_digit(test_set):
    for i in range(20):
        s = test_set.render(i)
        mask, digit, clutter = s["mask"], s["digit_alpha"], s["clutter_alpha"]
        assert np.array_equal(mask, digit > INK_THRESHOLD)
        assert not (clutter[mask] > 0).any()  # distractors never touch the digit
        changed = np.abs(s["image"] - s["background"]).max(0) > 1.5 / 255
        assert changed[mask].mean() > 0.99  # every digit pixel is visibly drawn ...
        untouched = (digit == 0) & (clutter == 0)
        assert not changed[untouched].any()  # ... and nothing is drawn outside the layers
        n_digit = patch_foreground(torch.from_numpy(mask)).sum()
        n_clutter = patch_foreground(torch.from_numpy(clutter > INK_THRESHOLD)).sum()
        assert n_clutter >= n_digit or len(s["fragment_sources"]) == MAX_FRAGMENTS


def test_digit_not_found_by_pixel_saliency(test_set):
    """The rule "keep the 30 % of patches with the largest pixel variance (or max - min contrast)" finds
    most of the digit on the intensity-separable digits-clutter but not on digits-natural (chance: 0.3)."""
    x, _, m = _stack(test_set, 64)
    natural = {r: float(patch_saliency_recall(x, m, 0.3, r).mean()) for r in ("variance", "contrast")}
    xc, _, mc = _stack(DigitsClutter("test", length=64), 64)
    clutter = {r: float(patch_saliency_recall(xc, mc, 0.3, r).mean()) for r in ("variance", "contrast")}
    assert natural["variance"] < 0.62 and natural["contrast"] < 0.62, natural  # measured: 0.52, 0.50
    assert clutter["variance"] > 0.75 and clutter["contrast"] > 0.75, clutter  # measured: 0.84, 0.83


def test_background_fraction(test_set):
    assert 0.78 < background_fraction(test_set, n=64) < 0.9  # measured on 2000: see natural.py


def test_backgrounds_folder(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="empty") as e:
        DigitsNatural("test", backgrounds=empty)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="missing"):
        DigitsNatural("test", backgrounds=tmp_path / "missing")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match="broken.jpg") as e:
        DigitsNatural("test", backgrounds=bad)
    assert "\n" not in str(e.value)
    good = tmp_path / "good"
    good.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (50, 90, 3), dtype=np.uint8)).save(good / "noise.png")
    ds = DigitsNatural("test", length=4, backgrounds=good)
    s = ds.render(0)
    assert s["photo"] == 0 and s["image"].shape == (3, 64, 64)


def test_write_dataset_layout_and_refusals(tmp_path):
    out = tmp_path / "out"
    write_dataset("digits-natural", "test", 6, out, progress=False)
    ds = DigitsNatural("test", length=6)
    images = sorted(out.glob("images/*/*.png"))
    assert sorted(p.name for p in images) == [f"{i:05d}.png" for i in range(6)]
    for i in range(6):
        image, label, mask = ds[i]
        img = np.asarray(Image.open(out / "images" / str(label) / f"{i:05d}.png"))
        msk = np.asarray(Image.open(out / "masks" / str(label) / f"{i:05d}.png"))
        assert img.shape == (64, 64, 3) and np.array_equal(img, np.rint(image.numpy().transpose(1, 2, 0) * 255))
        assert set(np.unique(msk)) <= {0, 255} and np.array_equal(msk == 255, mask.numpy())
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left
    with pytest.raises(ValueError, match="not empty"):
        write_dataset("digits-natural", "test", 2, out, progress=False)
    write_dataset("digits-natural", "test", 2, out, overwrite=True, progress=False)
    assert len(list(out.glob("images/*/*.png"))) == 2
    # `eval --task OUT/images` sees exactly the generated pixels: no resize / crop at the model's size
    from iared.loading import task_dataset
    from iared.models import MODEL_CONFIGS, ViTConfig

    folder = task_dataset(str(out / "images"), "test", ViTConfig(**MODEL_CONFIGS["digits_natural_vit"]))
    for (path, target), (x, label) in zip(folder.samples, folder):
        image, expected_label, _ = ds[int(path.stem)]
        assert label == target == folder.class_to_idx[str(expected_label)] and torch.equal(x, image)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="backgrounds"):
        write_dataset("digits-natural", "test", 2, tmp_path / "x", backgrounds=empty, progress=False)
    assert not (tmp_path / "x").exists()


def test_make_dataset_command(tmp_path, capsys):
    from iared.cli import main

    out = tmp_path / "cmd"
    assert main(["make-dataset", "--task", "digits-natural", "--n", "3", "--out", str(out), "--no-progress"]) == 0
    assert len(list(out.glob("images/*/*.png"))) == 3 and len(list(out.glob("masks/*/*.png"))) == 3
    assert main(["make-dataset", "--task", "digits-natural", "--n", "3", "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "not empty" in err[-1]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["make-dataset", "--task", "digits-natural", "--n", "3", "--backgrounds", str(empty),
                 "--out", str(tmp_path / "y"), "--no-progress"]) == 2
    assert "backgrounds" in capsys.readouterr().err


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any folder")
def test_unreadable_backgrounds_folder(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    Image.fromarray(np.zeros((70, 70, 3), np.uint8)).save(locked / "a.png")
    locked.chmod(0)
    try:
        with pytest.raises(ValueError, match="locked"):
            DigitsNatural("test", backgrounds=locked)
    finally:
        locked.chmod(0o755)
