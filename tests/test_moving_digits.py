"""moving-digits (iared.data.moving) and the frame-difference floor (iared.reducers.floors.FrameDifference)."""

import numpy as np
import pytest
import torch
from PIL import Image

from iared.cli import main as cli_main
from iared.data import TASKS, MovingDigits, VideoFolder, build_dataset
from iared.data.moving import FRAME, FRAMES, token_recall
from iared.data.natural import PHOTOS
from iared.models import create_model
from iared.models.timesformer import TimeSformer, TimeSformerConfig
from iared.reducers.floors import FrameDifference, frame_change
from iared.reducers.registry import build_reduced, runner


def tiny_video_backbone(frames=4, img=32):
    torch.manual_seed(0)
    return TimeSformer(TimeSformerConfig(img_size=img, patch_size=8, num_frames=frames, depth=2, embed_dim=32,
                                         num_heads=2, num_classes=10)).eval()


# -- the frame-difference floor -------------------------------------------------------------------

def test_frame_difference_keeps_the_most_changed_tokens():
    net = tiny_video_backbone()  # 4 frames of 4x4 patches: 64 tokens
    clips = torch.full((2, 4, 3, 32, 32), 0.5)
    clips += 0.01 * torch.rand(2, 4, 3, 32, 32)  # small change everywhere
    changed = {0: [(2, 0, 0), (2, 1, 3), (3, 3, 3), (3, 2, 1)], 1: [(3, 3, 0), (2, 2, 2), (2, 0, 1), (3, 1, 1)]}
    for b, cells in changed.items():
        for t, i, j in cells:  # a new patch at frame t, kept by the later frames (changed at t only)
            clips[b, t:, :, 8 * i: 8 * i + 8, 8 * j: 8 * j + 8] = torch.rand(3, 8, 8)[None]
    score = frame_change(net, clips)
    assert score.shape == (2, 64)
    model = build_reduced("framediff", net, 4 / 64, stage_starts=(0,))
    with torch.no_grad():
        out = runner("framediff", model, 4 / 64)(clips)
    for b, cells in changed.items():
        want = torch.zeros(64, dtype=torch.bool)
        for t, i, j in cells:
            want[t * 16 + i * 4 + j] = True
        assert torch.equal(out.keep[0][b, 1:], want)
    assert isinstance(model.reducers[0], FrameDifference)
    assert torch.equal(score[:, :16], score[:, 16:32])  # frame 0 is scored by its change to frame 1
    clips[0, 1:, :, :8, 8:16] = 0.0  # a change at frame 1 (patch (0, 1)): the patch of frame 0 ranks with it
    top = frame_change(net, clips)[0].topk(2).indices
    assert sorted(top.tolist()) == [1, 17]


def test_frame_difference_refuses_images():
    vit = create_model("digits_natural_vit").eval()
    model = build_reduced("framediff", vit, 0.5)
    with pytest.raises(ValueError, match=r"frame-difference floor needs video tokens on a \(T, H, W\) grid"):
        runner("framediff", model, 0.5)(torch.rand(1, 3, 64, 64))


# -- the task ---------------------------------------------------------------------------------------

def test_registered_and_deterministic():
    assert TASKS["moving-digits"] is MovingDigits
    a, b = MovingDigits("test", length=6), build_dataset("moving-digits", "test", length=6, cache=False)
    for i in range(6):
        ca, la, ma = a[i]
        cb, lb, mb = b[i]
        assert ca.shape == (FRAMES, 3, FRAME, FRAME) and ma.shape == (FRAMES, FRAME, FRAME)
        assert torch.equal(ca, cb) and la == lb and torch.equal(ma, mb)
        assert torch.equal(ca, a[i][0])  # cached = regenerated
    other = MovingDigits("test", length=6, seed=1)
    assert not torch.equal(a[0][0], other[0][0])
    assert {a[i][1] for i in range(6)} <= set(range(10))
    assert torch.equal(ca * 255, (ca * 255).round())  # 8-bit levels


def test_splits_disjoint_in_photos_and_digits():
    splits = {s: MovingDigits(s, length=30) for s in ("train", "val", "test")}
    sources = {s: set(d.source_indices.tolist()) for s, d in splits.items()}
    assert not (sources["train"] & sources["val"]) and not (sources["train"] & sources["test"])
    assert not (sources["val"] & sources["test"])
    photos = {s: set(PHOTOS[s]) for s in splits}
    assert not (photos["train"] & photos["val"]) and not (photos["train"] & photos["test"])
    assert not (photos["val"] & photos["test"])
    for s, d in splits.items():
        for i in range(30):
            r = d.render(i)
            assert r["source"] in sources[s] and set(r["fragment_sources"]) <= sources[s]
            assert 0 <= r["photo"] < len(PHOTOS[s])


def test_masks_follow_the_digit_in_every_frame():
    ds = MovingDigits("val", length=20)
    moved = 0
    for i in range(20):
        r = ds.render(i)
        masks, alpha, clutter, path = r["masks"], r["digit_alpha"], r["clutter_alpha"], r["digit_path"]
        assert masks.any(axis=(1, 2)).all()
        assert np.array_equal(masks, alpha > 0.1)
        assert not (clutter[masks] > 0).any()  # distractors never touch the digit
        peak = alpha[0] >= 0.99 * alpha[0].max()
        for t in range(FRAMES):  # the same strokes at the digit's position in frame t
            dy, dx = path[t] - path[0]
            assert np.array_equal(np.roll(masks[0], (dy, dx), axis=(0, 1)), masks[t])
            ys, xs = np.nonzero(peak)
            here = r["clip"][t][:, ys + dy, xs + dx]
            first = r["clip"][0][:, ys, xs]
            assert np.abs(here - first).max() <= 0.15 + 2 / 255  # the digit's colour over <= 15 % background
        moved += int((path != path[0]).any())
        pan = r["pan"]
        assert (np.abs(np.diff(pan, axis=0)).max(1) >= 1).all()  # the camera moves every frame
    assert moved > 0  # some digits drift


def test_neither_floor_finds_the_digit():
    ds = MovingDigits("test", length=100)
    items = [ds[i] for i in range(100)]
    clips, masks = torch.stack([c for c, _, _ in items]), torch.stack([m for _, _, m in items])
    recall = {rule: float(token_recall(clips, masks, rule).mean()) for rule in ("framediff", "pixel", "random")}
    assert recall["framediff"] < recall["random"] < recall["pixel"] < 0.65
    assert abs(recall["random"] - 0.3) < 0.05


def test_make_dataset_writes_a_video_folder(tmp_path, capsys):
    out = tmp_path / "md"
    assert cli_main(["make-dataset", "--task", "moving-digits", "--split", "test", "--n", "5", "--out", str(out),
                     "--no-progress"]) == 0
    videos = sorted((out / "videos").rglob("*.mp4"))
    assert len(videos) == 5
    folder = VideoFolder(out / "videos", num_frames=FRAMES, img_size=FRAME, mean=(0, 0, 0), std=(1, 1, 1))
    ds = MovingDigits("test", length=5)
    for (path, _), (clip, _) in zip(folder.samples, (folder[i] for i in range(len(folder)))):
        want, label, masks = ds[int(path.stem)]
        assert path.parent.name == str(label)
        assert torch.equal(clip, want)  # lossless, every frame in place
        for t in range(FRAMES):
            png = np.asarray(Image.open(out / "masks" / str(label) / path.stem / f"{t}.png")) > 127
            assert np.array_equal(png, masks[t].numpy())
    assert cli_main(["make-dataset", "--task", "moving-digits", "--n", "5", "--out", str(out)]) == 2  # not empty


def test_make_dataset_renders_over_a_folder_of_the_users_photographs(tmp_path, capsys):
    photos = tmp_path / "my photos" / "nested"
    photos.mkdir(parents=True)
    # two flat photographs in colours no bundled photo is: every background pixel must be one of them
    for name, rgb in (("red.png", (250, 10, 10)), ("blue.jpg", (10, 10, 250))):
        Image.fromarray(np.full((300, 400, 3), rgb, np.uint8)).save(photos / name)
    out = tmp_path / "md"
    assert cli_main(["make-dataset", "--task", "moving-digits", "--n", "4", "--out", str(out), "--backgrounds",
                     str(tmp_path / "my photos"), "--no-progress"]) == 0
    folder = VideoFolder(out / "videos", num_frames=FRAMES, img_size=FRAME, mean=(0, 0, 0), std=(1, 1, 1))
    ds = MovingDigits("test", length=4, backgrounds=tmp_path / "my photos")
    bundled = MovingDigits("test", length=4)
    for path, _ in folder.samples:
        render = ds.render(int(path.stem))
        clip = folder[folder.samples.index((path, _))][0]
        assert torch.equal(clip, torch.as_tensor(render["clip"]))
        free = (render["digit_alpha"] == 0) & (render["clutter_alpha"] == 0)  # (8, 48, 48) background only
        pixels = torch.as_tensor(render["clip"]).permute(0, 2, 3, 1)[torch.as_tensor(free)]
        red = (pixels - torch.tensor([250, 10, 10]) / 255).abs().amax(1) < 0.1
        blue = (pixels - torch.tensor([10, 10, 250]) / 255).abs().amax(1) < 0.1
        assert (red | blue).float().mean() > 0.99, path
        assert not torch.equal(torch.as_tensor(render["clip"]), bundled[int(path.stem)][0])
    assert "backgrounds=" in repr(ds)
    for bad, message in ((tmp_path / "absent", "does not exist"), (tmp_path / "md", "no image files")):
        with pytest.raises(ValueError, match=message):
            MovingDigits("test", length=2, backgrounds=bad / "videos" if message == "no image files" else bad)


@pytest.mark.parametrize("task", ["digits-natural", "moving-digits"])
def test_prerender_makes_exactly_the_samples_rendering_on_demand_makes(task):
    """``--prerender``: forked workers fill the cache; every sample equals the one rendered in this
    process (samples are pure functions of the index), masks and labels too."""
    from iared.data.samples import prerender_task

    made = TASKS[task](split="val", length=12)
    prerender_task(made, 2, show_progress=False)
    assert made._memo.missing() == []
    fresh = TASKS[task](split="val", length=12, cache=False)
    for i in (0, 7, 11):
        (x, y, m), (x2, y2, m2) = made[i], fresh[i]
        assert torch.equal(x, x2) and y == y2 and torch.equal(m, m2)
    with pytest.raises(ValueError, match="no rendered samples"):
        prerender_task(TASKS["digits-clutter"](split="val"), 2)


def test_train_refuses_conflicting_start_options_before_any_work(tmp_path):
    from iared.train.backbone import BackboneTrainConfig, train

    base = dict(task="digits-natural", out=str(tmp_path / "run"), steps=1, progress=False)
    with pytest.raises(ValueError, match="--init-image excludes --checkpoint"):
        train(BackboneTrainConfig(model="moving_digits_tsf", init_image="digits_natural_vit", checkpoint="x.pt",
                                  **base))
    with pytest.raises(ValueError, match="--prerender .* --workers 0"):
        train(BackboneTrainConfig(model="digits_natural_vit", prerender=2, workers=2, **base))
    assert not (tmp_path / "run").exists()  # refused before the output folder was made


def test_the_shipped_video_policy_beats_every_floor_at_its_own_budget():
    """``moving_digits_pruned.pt`` (#13): at its threshold (0.3) on the first 100 test clips it loses at
    most 2 points to the unpruned TimeSformer with under a third of the tokens, and at exactly its
    kept fraction the pixel, random and frame-difference floors lose at least 10 points more."""
    from importlib import resources

    from iared.compare import _floor_ratios, _runner, evaluate
    from iared.loading import task_dataset
    from iared.pruning import load_pruned
    from iared.reducers import registry
    from iared.stages import ReducedModel
    from iared.train.interpreters import stack_batch

    torch.set_num_threads(min(2, torch.get_num_threads()))
    model = load_pruned(resources.files("iared") / "assets" / "moving_digits_pruned.pt")
    assert model.inference.threshold == 0.3
    clips, labels = stack_batch(task_dataset("moving-digits", "test", model.backbone.cfg), torch.arange(100))
    full, _, _ = evaluate(ReducedModel(model.backbone, [None], [0]), clips, labels, batch_size=50)
    learned, _, kept = evaluate(_runner(model, mode="threshold", threshold=0.3), clips, labels, batch_size=50)
    assert learned >= full - 0.02 and kept[-1] < 0.33, (full, learned, kept)
    for floor in ("pixel", "random", "framediff"):
        ratios = _floor_ratios(kept)
        reduced = registry.build_reduced(floor, model.backbone, ratios, model.stage_starts)
        top1, _, floor_kept = evaluate(registry.runner(floor, reduced, ratios), clips, labels, batch_size=50)
        assert abs(floor_kept[-1] - kept[-1]) < 0.02, (floor, floor_kept, kept)
        assert top1 <= learned - 0.10, (floor, top1, learned)
