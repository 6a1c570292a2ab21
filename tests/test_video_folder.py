"""VideoFolder (iared.data.video): sampling, spatial processing, batching, broken files, real clips.

Fixtures are encoded here with PyAV (tiny MPEG-4 clips whose frame i is a flat colour that encodes
i), so a test can read back which frame was sampled; broken files are made from them (truncated,
codec id patched away) or from scratch (empty, garbage, audio-only). The real clips come from
``../shared/data/video/`` and the tests that need them skip when it is absent.
"""

from pathlib import Path

import av
import numpy as np
import pytest
import torch

from iared.data.video import (
    BadVideoError,
    VideoFolder,
    clip_transform,
    probe_video,
    read_frames,
    sample_indices,
)

VIDEO_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "video"
needs_real_clips = pytest.mark.skipif(not (VIDEO_DATA / "kinetics400_demo.mp4").is_file(),
                                      reason=f"real clips not found in {VIDEO_DATA}")


def encode(path, frames=12, size=(64, 48), codec="mpeg4", options=None):
    """Frame i is flat grey ``(10 * i + 20) mod 256`` (so the sampled frame can be read back off the pixels)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w", options=options or {}) as container:
        stream = container.add_stream(codec, rate=10)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        if codec == "mpeg4":  # intra frames at the finest quantiser: grey levels decode within 1
            stream.gop_size, stream.codec_context.qmin, stream.codec_context.qmax = 1, 1, 2
        for i in range(frames):
            image = np.full((size[1], size[0], 3), (10 * i + 20) % 256, np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def audio_only(path):
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=16000)
        for i in range(8):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 16000, i * 1024
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def grey_level(clip_frame):
    """Mean pixel value (0..255) of one ``(3, H, W)`` frame normalised with mean 0.45 / std 0.225."""
    return float((clip_frame * 0.225 + 0.45).mean() * 255)


# -- sampling and spatial processing ------------------------------------------------------------

def test_segment_sampling_follows_timesformer():
    # the middle of each of 8 segments of (n - 1) / 8 frames (TimeSformer's ssv2 sampler, test mode)
    assert sample_indices(280, 8) == [17, 52, 87, 122, 157, 191, 226, 261]
    assert sample_indices(9, 8) == [0, 1, 2, 3, 4, 5, 6, 7]
    assert sample_indices(3, 8) == [0, 0, 0, 1, 1, 1, 2, 2]  # short: frames repeat
    draws = [sample_indices(280, 8, train=True, rng=np.random.default_rng(s)) for s in range(20)]
    assert draws[0] == sample_indices(280, 8, train=True, rng=np.random.default_rng(0))  # seeded
    assert len({tuple(d) for d in draws}) == 20
    seg = 279 / 8
    for d in draws:  # every draw inside its segment
        assert all(round(seg * i) <= j <= round(seg * (i + 1)) for i, j in enumerate(d))


def test_clip_transform_eval_and_train():
    frames = np.zeros((2, 40, 80, 3), np.uint8)
    frames[:, :, 40:] = 255  # right half white
    x = clip_transform(frames, 32, (0.5,) * 3, (0.5,) * 3)
    assert x.shape == (2, 3, 32, 32) and x.dtype == torch.float32
    # shorter side 40 -> 32, width 80 -> 64, centre crop columns 16..48: left half -1, right half +1
    assert torch.allclose(x[:, :, :, :14], torch.tensor(-1.0)) and torch.allclose(x[:, :, :, 18:], torch.tensor(1.0))
    rng = lambda: np.random.default_rng(3)  # noqa: E731
    a = clip_transform(frames, 32, (0.5,) * 3, (0.5,) * 3, train=True, rng=rng())
    b = clip_transform(frames, 32, (0.5,) * 3, (0.5,) * 3, train=True, rng=rng())
    assert a.shape == (2, 3, 32, 32) and torch.equal(a, b)  # same draws, same clip
    flips = {bool(clip_transform(frames, 32, (0.5,) * 3, (0.5,) * 3, train=True,
                                 rng=np.random.default_rng(s))[0, 0, 0, 0] > 0) for s in range(12)}
    assert flips == {True, False}  # random crops and flips reach both halves at the left edge


# -- the folder -----------------------------------------------------------------------------------

@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "videos"
    encode(root / "run" / "a.mp4", frames=12)
    encode(root / "run" / "nested" / "b.avi", frames=20)
    encode(root / "sit" / "c.mkv", frames=9)
    return root


def test_folder_items_sampling_and_batching(folder):
    ds = VideoFolder(folder, num_frames=4, img_size=32)
    assert ds.classes == ["run", "sit"] and ds.targets == [0, 0, 1] and len(ds) == 3
    assert ds.frame_counts == [12, 20, 9]
    clip, label = ds[0]
    assert clip.shape == (4, 3, 32, 32) and label == 0
    # 12 frames, 4 segments of 11/4 (bounds 0, 3, 6, 8, 11): middles 1, 4, 7, 9 -> grey 30, 60, 90, 110
    assert sample_indices(12, 4) == [1, 4, 7, 9]
    assert [round(grey_level(f)) for f in clip] == pytest.approx([30, 60, 90, 110], abs=3)
    loader = torch.utils.data.DataLoader(ds, batch_size=2)
    clips, labels = next(iter(loader))
    assert clips.shape == (2, 4, 3, 32, 32) and labels.tolist() == [0, 0]  # (B, T, C, H, W)


def test_training_draws_are_a_function_of_seed_epoch_and_index(folder):
    ds = VideoFolder(folder, num_frames=4, img_size=32, train=True, seed=5, check="open")
    first = ds[1][0]
    assert torch.equal(first, ds[1][0])
    levels = {tuple(round(grey_level(f)) for f in ds[1][0])}
    for epoch in range(1, 6):
        ds.set_epoch(epoch)
        levels.add(tuple(round(grey_level(f)) for f in ds[1][0]))
    assert len(levels) > 1  # other epochs, other frames
    ds.set_epoch(0)
    assert torch.equal(first, ds[1][0])
    assert ds.frame_counts[1] == 20  # counted exactly when first read (check="open" took the header's)


def test_for_model_reads_the_model_config(folder):
    from iared.models.timesformer import TimeSformer, TimeSformerConfig

    model = TimeSformer(TimeSformerConfig(img_size=32, patch_size=8, num_frames=3, num_classes=2, embed_dim=16,
                                          depth=1, num_heads=2, mean=(0.5,) * 3, std=(0.25,) * 3)).eval()
    ds = VideoFolder.for_model(folder, model)
    assert (ds.num_frames, ds.img_size, ds.mean, ds.std) == (3, 32, (0.5,) * 3, (0.25,) * 3)
    clips, _ = next(iter(torch.utils.data.DataLoader(ds, batch_size=3)))
    with torch.no_grad():
        assert model(clips).shape == (3, 2)


# -- broken files ---------------------------------------------------------------------------------

def make_bad(kind, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "corrupt":
        path.write_bytes(b"\x00\x01not a video\xff" * 64)
    elif kind == "truncated":  # index (moov) at the end: cut off, the container does not open
        data = encode(path.with_suffix(".full.mp4"), frames=12).read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "truncated-frames":  # index first: it opens, announces 30 frames, fewer decode
        data = encode(path.with_suffix(".full.mp4"), frames=30, options={"movflags": "faststart"}).read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "audio-only":
        audio_only(path)
    elif kind == "unsupported-codec":  # a Matroska codec id no FFmpeg knows
        data = encode(path.with_suffix(".full.mkv"), frames=6).read_bytes()
        assert data.count(b"V_MPEG4/ISO/ASP") == 1
        path.write_bytes(data.replace(b"V_MPEG4/ISO/ASP", b"V_QQQQQ/ISO/QQQ"))
    elif kind == "too-short":
        encode(path, frames=3)
    for full in path.parent.glob("*.full.*"):
        full.unlink()
    return path


BAD = {
    "empty": ("x.mp4", "file is empty"),
    "corrupt": ("x.mp4", "not a readable video container"),
    "truncated": ("x.mp4", "not a readable video container, corrupt or truncated"),
    "truncated-frames": ("x.mp4", "truncated: the header announces 30 frames"),
    "audio-only": ("x.mp4", "no video stream.*audio aac"),
    "unsupported-codec": ("x.mkv", "unsupported codec"),
    "too-short": ("x.mp4", "too short: 3 decodable frames, need at least 8"),
}


@pytest.mark.parametrize("kind", list(BAD))
def test_bad_files_give_one_line_errors_naming_the_file(kind, tmp_path):
    name, message = BAD[kind]
    path = make_bad(kind, tmp_path / "bad" / "cls" / name)
    with pytest.raises(BadVideoError, match=message) as info:
        probe_video(path, min_frames=8)
    assert str(path) in str(info.value) and "\n" not in str(info.value) and info.value.path == path
    # the folder finds it at construction, before any work starts ...
    encode(tmp_path / "bad" / "cls" / "good.mp4", frames=12)
    with pytest.raises(BadVideoError, match=message) as info:
        VideoFolder(tmp_path / "bad", num_frames=8, img_size=32, min_frames=8)
    assert str(path) in str(info.value) and "\n" not in str(info.value)
    # ... or skips it, counted, when asked
    ds = VideoFolder(tmp_path / "bad", num_frames=8, img_size=32, min_frames=8, skip_bad=True)
    assert len(ds) == 1 and [p for p, _ in ds.skipped] == [path]


def test_short_videos_repeat_frames_by_default(tmp_path):
    encode(tmp_path / "v" / "a" / "short.mp4", frames=3)
    clip, _ = VideoFolder(tmp_path / "v", num_frames=8, img_size=32)[0]
    assert [round(grey_level(f)) for f in clip] == pytest.approx([20, 20, 20, 30, 30, 30, 40, 40], abs=3)


def test_light_check_leaves_truncation_to_reading_time(tmp_path):
    path = make_bad("truncated-frames", tmp_path / "v" / "a" / "x.mp4")
    ds = VideoFolder(tmp_path / "v", num_frames=4, img_size=32, check="open")  # opens fine, first frame decodes
    with pytest.raises(BadVideoError, match="truncated") as info:
        ds[0]
    assert str(path) in str(info.value)


def test_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="video folder not found"):
        VideoFolder(tmp_path / "nope")
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(ValueError, match="no videos found"):
        VideoFolder(tmp_path / "empty")
    encode(tmp_path / "half" / "a" / "v.mp4")
    (tmp_path / "half" / "b").mkdir()
    with pytest.raises(ValueError, match="without videos: b"):
        VideoFolder(tmp_path / "half")


# -- the real clips ----------------------------------------------------------------------------------

@needs_real_clips
def test_real_clips_probe_and_sample(tmp_path):
    info = probe_video(VIDEO_DATA / "kinetics400_demo.mp4")
    assert (info.frames, info.width, info.height, info.codec) == (280, 340, 256, "h264")
    avi = probe_video(VIDEO_DATA / "test.avi")  # MPEG-4 Part 2 beside an audio stream
    assert avi.codec == "mpeg4" and avi.frames == 164
    # read_frames picks exactly the frames a plain sequential decode sees at those indices
    indices = sample_indices(280, 8)
    frames = read_frames(VIDEO_DATA / "kinetics400_demo.mp4", indices)
    with av.open(str(VIDEO_DATA / "kinetics400_demo.mp4")) as container:
        every = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert frames.shape == (8, 256, 340, 3)
    assert all(np.array_equal(frames[j], every[i]) for j, i in enumerate(indices))
    # a folder of links to them (the data is never copied): eval clips at TimeSformer-B geometry
    for name, cls in (("kinetics400_demo.mp4", "a"), ("test.mp4", "b"), ("test.avi", "b")):
        (tmp_path / cls).mkdir(exist_ok=True)
        (tmp_path / cls / name).symlink_to(VIDEO_DATA / name)
    ds = VideoFolder(tmp_path, num_frames=8, img_size=224)
    assert ds.frame_counts == [280, 164, 300]  # a/kinetics, b/test.avi, b/test.mp4
    clip, label = ds[0]
    assert clip.shape == (8, 3, 224, 224) and label == 0
    expected = clip_transform(frames, 224, ds.mean, ds.std)
    assert torch.equal(clip, expected)


@needs_real_clips
def test_real_kinetics_clip_through_pruned_timesformer():
    """Decoding, sampling and the packed video path on real data: the Kinetics clip at 8 x 224 through a
    small random TimeSformer (patch 32: 8 x 7 x 7 tokens) with IA-RED² interpreters in threshold mode."""
    from iared.models.timesformer import TimeSformer, TimeSformerConfig
    from iared.pruning import IARed

    torch.manual_seed(0)
    model = TimeSformer(TimeSformerConfig(patch_size=32, num_frames=8, num_classes=400, embed_dim=48, depth=3,
                                          num_heads=4)).eval()
    iared = IARed(model).eval()
    for interpreter in iared.interpreters:
        torch.nn.init.normal_(interpreter.qk.weight, std=0.5)
    frames = read_frames(VIDEO_DATA / "kinetics400_demo.mp4", sample_indices(280, 8))
    clip = clip_transform(frames, 224, model.cfg.mean, model.cfg.std)[None]
    with torch.no_grad():
        out = iared(torch.cat([clip, clip.flip(-1)]), "threshold", threshold=0.5)
        full = model(clip)
    kept = out.kept_fraction()
    assert out.logits.shape == (2, 400) and torch.isfinite(out.logits).all()
    assert ((kept[:, 0] > 0.05) & (kept[:, 0] < 0.95)).all() and (kept > 0).all()  # tokens really left
    assert (out.macs < iared.full_macs()).all() and full.shape == (1, 400)
