"""iared.prune: the drop-in module (logits out, knob attributes), grad-cam and timm's loop on it,
and pruned files as safetensors / reducers-only files with a backbone reference."""

import itertools
import json
import warnings

import numpy as np
import pytest
import torch

import iared
from iared.checkpoint import CheckpointError, state_sha256
from iared.dropin import PrunedModel
from iared.models import TASK_PRUNED, create_model
from iared.pruning import IARed, InferenceSettings, load_pruned, save_pruned
from tests.helpers import perturbed, spread_interpreters

TINY = {"img_size": 32, "patch_size": 8, "embed_dim": 48, "depth": 3, "num_heads": 3, "num_classes": 10}


def tiny_timm():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    return perturbed(timm.create_model("vit_tiny_patch16_224", pretrained=False, **TINY))


def tiny_ours(seed: int = 0):
    torch.manual_seed(seed)
    return perturbed(create_model("deit_tiny_patch16_224", **TINY), seed)


def images(n: int = 4):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(3))


def spread(pruned: PrunedModel) -> PrunedModel:
    spread_interpreters(pruned.reduced)
    return pruned


# -- the three-line path -------------------------------------------------------------------------------


def test_timm_model_three_lines_logits_equal_at_no_reduction():
    m = tiny_timm()
    x = images()
    with pytest.warns(UserWarning, match="untrained"):
        p = iared.prune(m, threshold=0.0)
    out = p(x)
    assert isinstance(out, torch.Tensor) and out.shape == (4, 10)
    with torch.no_grad():
        ref = m(x)
    assert (out - ref).abs().max().item() <= 1e-5
    assert p.details(x).kept_fraction().min().item() == 1.0  # every token kept: a real no-reduction run
    p.keep_ratio = 1.0
    assert p.mode == "budget" and (p(x) - ref).abs().max().item() <= 1e-5
    p.mode = "all"
    assert (p(x) - ref).abs().max().item() <= 1e-5


def test_training_free_methods_at_no_reduction_equal_timm():
    m = tiny_timm()
    x = images()
    ref = m(x)
    for method, knob in [("tome", {"r": 0}), ("evit", {"keep_rate": 1.0}), ("random", {"keep_ratio": 1.0}),
                         ("pixel", {"keep_ratio": 1.0})]:
        p = iared.prune(m, method, **knob)
        assert (p(x) - ref).abs().max().item() <= 1e-5, method


# -- the knob --------------------------------------------------------------------------------------------


def test_threshold_attribute_takes_effect_fewer_tokens_at_higher_threshold():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p = spread(iared.prune(tiny_ours()))
    x = images()
    kept, macs, logits = [], [], []
    for t in (0.0, 0.3, 0.5, 0.7, 1.0):
        p.threshold = t
        out = p.details(x)
        kept.append(out.kept_fraction().mean().item())
        macs.append(out.macs.mean().item())
        logits.append(p(x))
    assert kept[0] == 1.0 and kept[-1] == 0.0
    assert all(a >= b for a, b in itertools.pairwise(kept)) and kept[1] > kept[3]
    assert macs[0] > macs[2] > macs[-1]
    assert not torch.allclose(logits[0], logits[2])


def test_keep_ratio_attribute_selects_budget_mode():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p = iared.prune(tiny_ours())
    x = images()
    p.keep_ratio = 0.25
    assert p.mode == "budget"
    out = p.details(x)
    assert torch.allclose(out.kept_fraction()[:, 0], torch.full((4,), 0.25))  # 4 of 16 patches in every image
    p.threshold = 0.0  # back to threshold mode
    assert p.mode == "threshold" and p.details(x).kept_fraction().min().item() == 1.0


def test_reducer_knob_attribute_tome_r():
    p = iared.prune(tiny_timm(), "tome", r=0)
    x = images()
    dense = sum(n.sum().item() for n in p.details(x).tokens_per_block)
    p.r = 4
    assert all(r.r == 4 for r in p.reduced.reducers[1:])
    merged = sum(n.sum().item() for n in p.details(x).tokens_per_block)
    assert merged < dense
    assert p.r == 4 and "r=4" in repr(p).splitlines()[0] + repr(p).splitlines()[1]
    with pytest.raises(AttributeError, match="tome has no threshold: its knob is r"):
        p.threshold  # noqa: B018


@pytest.mark.parametrize("name, value, match", [
    ("threshold", 1.5, "threshold 1.5"), ("threshold", [0.5, 0.5], r"threshold \[0.5, 0.5\]: one value or 3"),
    ("keep_ratio", 0.0, "keep_ratio 0.0"), ("keep_ratio", 1.2, "keep_ratio 1.2"), ("mode", "fast", "mode 'fast'"),
])
def test_bad_knob_refused_in_one_line(name, value, match):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p = iared.prune(tiny_ours())
    with pytest.raises(ValueError, match=match) as e:
        setattr(p, name, value)
    assert "\n" not in str(e.value)
    assert p.threshold == 0.5 and p.mode == "threshold"  # unchanged


def test_bad_knobs_at_prune_refused():
    m = tiny_timm()
    with pytest.raises(ValueError, match="r must be >= 0.*got -1"):
        iared.prune(m, "tome", r=-1)
    with pytest.raises(TypeError, match="tome has no knob threshold"):
        iared.prune(m, "tome", threshold=0.5)
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        iared.prune(m, "nope")
    with pytest.raises(ValueError, match="budget' needs a keep_ratio"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        iared.prune(m, mode="budget")
    with pytest.raises(TypeError, match="prune: torch.nn.modules.linear.Linear is not a backbone"):
        iared.prune(torch.nn.Linear(2, 2))


def test_knob_defaults_to_what_the_checkpoint_recorded(tmp_path):
    model = spread_interpreters(IARed(tiny_ours())).eval()
    save_pruned(model, tmp_path / "p.pt", inference=InferenceSettings(threshold=0.7))
    p = iared.prune(tmp_path / "p.pt")
    assert p.method == "iared" and p.threshold == 0.7 and p.mode == "threshold" and not p.training
    x = images()
    assert torch.equal(p(x), model(x, threshold=0.7).logits)
    assert not torch.equal(p(x), model(x, threshold=0.5).logits)


@pytest.mark.parametrize("task", sorted(TASK_PRUNED))
def test_shipped_pruned_files_load_with_their_threshold(task):
    from importlib import resources

    path = resources.files("iared") / "assets" / TASK_PRUNED[task]
    if not path.is_file():
        pytest.skip(f"{path} not shipped")
    ref = load_pruned(path)
    p = iared.prune(str(path))
    assert p.threshold == ref.inference.threshold
    x = torch.rand((2, *_input_shape(ref.backbone)), generator=torch.Generator().manual_seed(0))
    assert torch.equal(p(x), ref(x, threshold=ref.inference.threshold).logits)


def _input_shape(backbone):
    from iared.models.families import input_shape

    return input_shape(backbone.cfg)


def test_prune_takes_reduced_and_pruned_models():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p = iared.prune(tiny_ours(), keep_ratio=0.5)
    q = iared.prune(p)
    assert q.reduced is p.reduced and q.method == "iared"
    assert iared.prune(p.reduced).method == "iared"
    with pytest.raises(ValueError, match="holds iared reducers, not tome"):
        iared.prune(p.reduced, "tome")
    from iared.reducers.registry import build_reduced

    e = iared.prune(build_reduced("evit", tiny_ours(), 0.5))
    assert e.method == "evit" and e.keep_rate == 0.5
    e.keep_rate = 0.75
    assert [r.keep_rate for r in e.reduced.reducers[1:]] == [0.75] * 2


# -- where a model goes: timm's loop, grad-cam ---------------------------------------------------------


def test_timm_style_validation_loop():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = spread(iared.prune(tiny_timm()))
    data = torch.utils.data.TensorDataset(images(8), torch.arange(8) % 10)
    correct = 0
    for x, y in torch.utils.data.DataLoader(data, batch_size=3):
        with torch.no_grad():
            logits = model(x)
        pred = logits.cpu().argmax(-1)
        correct += int((pred == y).sum())
        assert torch.equal(pred, model.details(x).logits.argmax(-1))
    assert 0 <= correct <= 8
    assert model._layouts == {}  # forward keeps nothing unless cam_reshape asked for it


@pytest.mark.parametrize("knob", [{"threshold": 0.5}, {"keep_ratio": 0.5}, {"threshold": 0.0}])
def test_gradcam_runs_on_the_pruned_model(knob):
    pytest.importorskip("pytorch_grad_cam")
    from pytorch_grad_cam import GradCAM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p = spread(iared.prune(tiny_timm(), **knob))
    x = images(3)
    cam = GradCAM(model=p, target_layers=[p.backbone.blocks[-1].norm1], reshape_transform=p.cam_reshape(-1))
    maps = cam(input_tensor=x, targets=None)
    assert maps.shape == (3, 32, 32) and np.isfinite(maps).all() and maps.max() > 0


def test_cam_reshape_puts_tokens_on_the_grid_and_dropped_ones_at_zero():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p = spread(iared.prune(tiny_ours(), threshold=0.5))
    x = images()
    reshape = p.cam_reshape(-1)
    seen = []
    hook = p.backbone.blocks[-1].norm1.register_forward_hook(lambda mod, i, o: seen.append(reshape(o)))
    out = p.details(x)
    hook.remove()
    grid = seen[0]
    assert grid.shape == (4, 48, 4, 4)
    alive = out.keep[-1][:, 1:].reshape(4, 4, 4)  # alive entering the last stage (one block)
    assert 0 < alive.float().mean() < 1
    assert torch.equal(grid.abs().sum(1) > 0, alive)


# -- files -------------------------------------------------------------------------------------------------


def test_safetensors_round_trip_with_settings_in_metadata(tmp_path):
    from safetensors import safe_open

    model = spread_interpreters(IARed(tiny_ours())).eval()
    path = tmp_path / "p.safetensors"
    save_pruned(model, path, inference=InferenceSettings(threshold=0.65, keep_ratio=0.5))
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    config = json.loads(meta["config"])
    assert json.loads(meta["format"]) == "iared-pruned/2"
    assert config["inference"] == {"threshold": 0.65, "keep_ratio": 0.5, "target_kept": None, "calibration_samples": None} and config["iared"]["num_stages"] == 3
    back = load_pruned(path)
    assert back.inference == InferenceSettings(threshold=0.65, keep_ratio=0.5)
    x = images()
    assert torch.equal(back(x, threshold=0.65).logits, model(x, threshold=0.65).logits)
    p = iared.prune(path)
    assert p.threshold == 0.65 and torch.equal(p(x), model(x, threshold=0.65).logits)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_reducers_only_file_round_trip_and_hash_check(tmp_path, suffix):
    backbone = tiny_ours()
    model = spread_interpreters(IARed(backbone)).eval()
    full, ref = tmp_path / f"full{suffix}", tmp_path / f"ref{suffix}"
    save_pruned(model, full)
    save_pruned(model, ref, backbone="reference")
    assert ref.stat().st_size * 4 < full.stat().st_size
    x = images()
    back = load_pruned(ref, backbone=tiny_ours())  # same weights, another instance
    assert torch.equal(back(x).logits, model(x).logits)
    assert torch.equal(iared.prune(ref, backbone=tiny_ours())(x), model(x).logits)
    with pytest.raises(CheckpointError, match="sha256 .* differs") as e:
        load_pruned(ref, backbone=tiny_ours(seed=1))
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="holds the interpreters only: give its backbone"):
        load_pruned(ref)
    with pytest.raises(ValueError, match="holds its own backbone"):
        load_pruned(full, backbone=backbone)


def test_reducers_only_file_names_a_shipped_backbone(tmp_path):
    backbone = create_model("digits_vit", pretrained=True)
    model = IARed(backbone).eval()
    save_pruned(model, tmp_path / "r.safetensors", backbone="reference")
    back = load_pruned(tmp_path / "r.safetensors")  # no backbone given: the shipped one the file names
    x = torch.rand(2, 1, 64, 64)
    assert torch.equal(back(x).logits, model(x).logits)
    assert state_sha256(back.backbone) == state_sha256(backbone)


def test_saving_the_dropin_records_its_knob(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p = iared.prune(tiny_ours(), threshold=0.4)
    p.save(tmp_path / "p.safetensors")
    q = iared.prune(tmp_path / "p.safetensors")
    assert q.threshold == 0.4
    x = images()
    assert torch.equal(q(x), p(x))
    with pytest.raises(ValueError, match="backbone='bad'"):
        save_pruned(p, tmp_path / "x.pt", backbone="bad")


def test_iared_takes_a_timm_model():
    m = tiny_timm()
    model = IARed(m).eval()
    x = images()
    assert (model(x, mode="all").logits - m(x)).abs().max().item() <= 1e-5
    with pytest.raises(TypeError, match="IARed: torch.nn.modules.linear.Linear is not a backbone"):
        IARed(torch.nn.Linear(2, 2))


def test_a_hugging_face_vit_drops_in_like_a_timm_one():
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=128,
                                    image_size=32, patch_size=8, num_labels=10)
    torch.manual_seed(0)
    hf = transformers.ViTForImageClassification(config).eval()
    x = torch.randn(2, 3, 32, 32)
    p = iared.prune(hf, "random", keep_ratio=1.0)
    with torch.no_grad():
        want = hf(pixel_values=x).logits
        assert torch.allclose(p(x), want, atol=1e-5)
        p.keep_ratio = 0.5
        assert p.details(x).kept_fraction()[0, -1] < 0.2  # three stages at 0.5: 1/8 of the patches left
