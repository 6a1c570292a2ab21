"""Tests for image loading, image folders and transforms."""

from pathlib import Path

import pytest
import torch
from PIL import Image

from iared.data import (
    BadImageError,
    ImageFolderDataset,
    build_dataset,
    eval_transform,
    list_images,
    load_image,
    train_transform,
)

SAMPLE = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "imagenet-sample"
needs_sample = pytest.mark.skipif(not SAMPLE.is_dir(), reason=f"shared ImageNet sample not found at {SAMPLE}")


def _grayscale_samples() -> list[Path]:
    out = []
    for p in sorted(SAMPLE.rglob("*")):
        if p.is_file():
            with Image.open(p) as im:
                if im.mode == "L":
                    out.append(p)
    return out


def _jpeg(path: Path, mode="RGB", size=(40, 30), color=(200, 30, 60)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path, format="JPEG", quality=95)
    return path


@needs_sample
def test_real_grayscale_jpegs_load_as_rgb_and_transform():
    gray = _grayscale_samples()
    assert len(gray) == 4, gray
    tf = eval_transform()
    for p in gray:
        assert p.suffix == ".JPEG"
        img = load_image(p)
        assert img.mode == "RGB"
        with Image.open(p) as raw:
            assert img.size == raw.size
        x = tf(img)
        assert x.shape == (3, 224, 224) and x.dtype == torch.float32
        # Gray in, gray out: the three channels carry the same pixels before normalisation.
        assert torch.allclose(x[0] * 0.229 + 0.485, x[1] * 0.224 + 0.456, atol=1e-4)


@needs_sample
def test_real_folder_dataset_and_build_dataset():
    ds = ImageFolderDataset(SAMPLE, transform=eval_transform())
    assert len(ds.classes) == len(list(SAMPLE.iterdir()))
    assert len(ds) >= len(ds.classes)  # upper-case .JPEG files are found
    assert ds.classes == sorted(ds.classes) and ds.targets == sorted(ds.targets)
    x, y = ds[0]
    assert x.shape == (3, 224, 224)
    # wnid folders keep the standard ImageNet-1k labels: each file name carries its class's description
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    assert ds.num_classes == 1000 and y == info.label_names().index(ds.classes[0])
    for path, target in ds.samples:
        assert info.index_to_label_name(target) == path.parent.name
        name = path.stem.split("_", 1)[1].replace("_", " ").lower()
        assert name in info.index_to_description(target).lower(), (path, info.index_to_description(target))
    built = build_dataset(str(SAMPLE), "val")  # no val/ subfolder -> the root itself
    assert built.root == SAMPLE and len(built) == len(ds)
    assert built[1][0].shape == (3, 224, 224)


def test_cmyk_palette_rgba_and_16bit_become_rgb(tmp_path):
    cmyk = _jpeg(tmp_path / "cmyk.jpg", mode="CMYK", color=(0, 255, 255, 0))  # pure red in CMYK
    with Image.open(cmyk) as raw:
        assert raw.mode == "CMYK"
    img = load_image(cmyk)
    assert img.mode == "RGB" and img.size == (40, 30)
    r, g, b = img.getpixel((20, 15))
    assert r > 200 and g < 50 and b < 50

    Image.new("P", (8, 8), 3).save(tmp_path / "pal.png")
    assert load_image(tmp_path / "pal.png").mode == "RGB"

    rgba = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    rgba.putpixel((0, 0), (10, 20, 30, 255))
    rgba.save(tmp_path / "alpha.png")
    img = load_image(tmp_path / "alpha.png")
    assert img.mode == "RGB" and img.getpixel((0, 0)) == (10, 20, 30) and img.getpixel((5, 5)) == (255,) * 3

    Image.new("I;16", (8, 8), 65535).save(tmp_path / "deep.png")
    assert load_image(tmp_path / "deep.png").getpixel((1, 1)) == (255, 255, 255)
    Image.new("I;16", (8, 8), 32896).save(tmp_path / "mid.png")
    assert load_image(tmp_path / "mid.png").getpixel((1, 1)) == (128, 128, 128)


def _bad_image_message(path: Path) -> str:
    with pytest.raises(BadImageError) as info:
        load_image(path)
    msg = str(info.value)
    assert isinstance(info.value, ValueError)
    assert str(path) in msg and "\n" not in msg
    assert info.value.path == path
    return msg


def test_bad_files_raise_clear_errors(tmp_path):
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    assert "empty (0 bytes)" in _bad_image_message(empty)

    good = _jpeg(tmp_path / "good.jpg", size=(128, 96)).read_bytes()
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(good[: len(good) // 2])
    assert "truncated or corrupt" in _bad_image_message(truncated)

    text = tmp_path / "notes.jpg"
    text.write_text("this is not an image\n")
    assert "not a recognised image" in _bad_image_message(text)

    with pytest.raises(FileNotFoundError, match="missing.jpg"):
        load_image(tmp_path / "missing.jpg")

    # A dataset surfaces the same error, naming the broken file.
    _jpeg(tmp_path / "root" / "a" / "ok.jpg")
    (tmp_path / "root" / "a" / "zero.jpg").write_bytes(b"")
    ds = ImageFolderDataset(tmp_path / "root")
    with pytest.raises(BadImageError, match="zero.jpg"):
        ds[1]


def test_image_folder_layout_and_extensions(tmp_path):
    root = tmp_path / "ds"
    _jpeg(root / "dog" / "b.JPEG")
    _jpeg(root / "dog" / "nested" / "c.jpeg")
    _jpeg(root / "cat" / "a.Jpg")
    Image.new("RGB", (9, 7)).save(root / "cat" / "z.png")
    (root / "cat" / "readme.txt").write_text("not an image")
    (root / "cat" / "._a.jpg").write_bytes(b"\x00\x05")  # macOS resource fork
    _jpeg(root / ".ipynb_checkpoints" / "x.jpg")
    (root / "empty_class").mkdir()
    with pytest.raises(ValueError, match="class folder.s. without images: empty_class") as info:
        ImageFolderDataset(root)  # an empty class would silently become a class no image teaches
    assert str(root) in str(info.value) and "\n" not in str(info.value)
    (root / "empty_class").rmdir()

    ds = ImageFolderDataset(root)
    assert ds.classes == ["cat", "dog"]
    assert ds.class_to_idx == {"cat": 0, "dog": 1}
    assert [(p.relative_to(root).as_posix(), t) for p, t in ds.samples] == [
        ("cat/a.Jpg", 0),
        ("cat/z.png", 0),
        ("dog/b.JPEG", 1),
        ("dog/nested/c.jpeg", 1),
    ]
    img, target = ds[3]
    assert isinstance(img, Image.Image) and img.mode == "RGB" and target == 1

    with pytest.raises(ValueError, match="without images: dog"):  # dog holds no .png
        ImageFolderDataset(root, transform=eval_transform(32), extensions=(".PNG",))
    ds = ImageFolderDataset(root, transform=eval_transform(32), extensions=(".PNG", "jpeg"))
    assert len(ds) == 3
    x, y = ds[0]
    assert x.shape == (3, 32, 32) and y == 0


def test_empty_and_missing_folders(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="image folder not found") as info:
        ImageFolderDataset(missing)
    assert str(missing) in str(info.value)

    (tmp_path / "empty" / "cls").mkdir(parents=True)
    (tmp_path / "empty" / "cls" / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="no images found") as info:
        ImageFolderDataset(tmp_path / "empty")
    assert str(tmp_path / "empty") in str(info.value) and "<class>" in str(info.value)

    with pytest.raises(FileNotFoundError, match="not found"):
        list_images(missing)
    with pytest.raises(ValueError, match="no images found"):
        list_images(tmp_path / "empty")
    with pytest.raises(ValueError, match="unknown task or image folder"):
        build_dataset(str(missing), "train")


def test_list_images(tmp_path):
    one = _jpeg(tmp_path / "x" / "one.JPG")
    _jpeg(tmp_path / "x" / "sub" / "two.png")
    (tmp_path / "x" / "skip.gif").write_bytes(b"GIF89a")
    assert list_images(one) == [one]
    assert [p.name for p in list_images(tmp_path / "x")] == ["one.JPG", "two.png"]


def test_transforms_and_build_dataset_splits(tmp_path):
    img = Image.new("RGB", (300, 200), (255, 0, 0))
    x = eval_transform()(img)
    assert x.shape == (3, 224, 224)
    # Normalised with timm's ImageNet statistics: red -> (1 - 0.485) / 0.229 in channel 0.
    assert x[0, 100, 100].item() == pytest.approx((1 - 0.485) / 0.229, abs=1e-3)
    assert train_transform(64)(img).shape == (3, 64, 64)

    for split in ("train", "val"):
        _jpeg(tmp_path / "d" / split / "a" / "1.jpg")
        _jpeg(tmp_path / "d" / split / "b" / "2.jpg")
    tr = build_dataset(str(tmp_path / "d"), "train", image_size=48)
    va = build_dataset(str(tmp_path / "d"), "val", image_size=48)
    assert tr.root == tmp_path / "d" / "train" and va.root == tmp_path / "d" / "val"
    assert tr.classes == va.classes == ["a", "b"]
    assert tr[0][0].shape == va[1][0].shape == (3, 48, 48)
    assert any("RandomResizedCrop" in type(t).__name__ for t in tr.transform.transforms)
    assert not any("Random" in type(t).__name__ for t in va.transform.resize_and_crop.transforms)
