"""The reducer contract (issue #25 step 3): every registered method, on a tiny ViT and a tiny
TimeSformer, built by ``build_reduced`` and run by ``runner``: no reduction is the unpruned model,
``save_reduced`` -> ``load_reduced`` gives the same logits, and a new training-free method is one
Reducer subclass plus one ``Method`` entry."""

import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from iared.interpreter import MultiHeadInterpreter
from iared.models.timesformer import TimeSformer, TimeSformerConfig
from iared.models.vit import VisionTransformer, ViTConfig
from iared.reduced_io import load_reduced, save_reduced
from iared.reducers import registry
from iared.reducers.base import Reducer, StageInput
from iared.reducers.floors import _prefix_one
from iared.reducers.policy import keep_from_scores
from iared.stages import ReducedModel

SRC = Path(__file__).resolve().parents[1] / "src" / "iared"


def tiny_vit(seed=0):
    torch.manual_seed(seed)
    return VisionTransformer(ViTConfig(img_size=32, patch_size=8, in_chans=3, num_classes=7, embed_dim=48,
                                       depth=4, num_heads=3)).eval()


def tiny_timesformer(seed=0):
    torch.manual_seed(seed)
    return TimeSformer(TimeSformerConfig(img_size=32, patch_size=8, num_frames=4, depth=4, embed_dim=48,
                                         num_heads=3, num_classes=3, mean=(0.0, 0.0, 0.0),
                                         std=(1.0, 1.0, 1.0))).eval()


FAMILIES = {"vit": (tiny_vit, (2, 3, 32, 32)), "timesformer": (tiny_timesformer, (2, 4, 3, 32, 32))}
CASES = [(f, m) for f in FAMILIES for m in registry.METHODS]


def build(method, backbone, knob):
    """``build_reduced`` with what the learned methods need (fresh, seeded weights) and a seed."""
    torch.manual_seed(1)
    interpreters = None
    if method == "iared":
        locs = registry.default_locations(method, backbone)
        interpreters = [MultiHeadInterpreter(backbone.token_dim, 3) for _ in locs]
    return registry.build_reduced(method, backbone, knob, interpreters=interpreters, seed=0)


def applies(method, backbone):
    try:
        registry.check_applies(method, backbone)
    except ValueError:
        return False
    return True


def inputs(shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("family,method", CASES)
def test_no_reduction_is_the_unpruned_model(family, method):
    make, shape = FAMILIES[family]
    backbone = make()
    if not applies(method, backbone):
        pytest.skip(f"{method} does not apply to {family}")
    m = registry.method(method)
    x = inputs(shape)
    with torch.no_grad():
        full = ReducedModel(backbone, [None], [0])(x, mode="all").logits
        out = registry.runner(method, build(method, backbone, m.no_reduction), m.no_reduction)(x).logits
    assert (out - full).abs().max() <= 1e-5


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
@pytest.mark.parametrize("family,method", CASES)
def test_save_load_reduced_round_trip(tmp_path, family, method, suffix):
    make, shape = FAMILIES[family]
    backbone = make()
    if not applies(method, backbone):
        pytest.skip(f"{method} does not apply to {family}")
    knob = registry.default_knobs(method, quick=True, backbone=backbone)[0]
    model = build(method, backbone, knob)
    path = tmp_path / f"reduced{suffix}"
    save_reduced(model, path, settings=registry.forward_kwargs(method, knob))
    loaded = load_reduced(path)  # before either runs: the random floor's generator starts afresh in both
    x = inputs(shape)
    assert type(loaded) is type(model) and loaded.stage_starts == model.stage_starts
    with torch.no_grad():
        a = registry.runner(method, model, knob)(x).logits
        b = registry.runner(method, loaded, knob)(x).logits
    assert torch.equal(a, b)


def test_reducers_only_file_round_trip(tmp_path):
    backbone = tiny_vit()
    model = build("tome", backbone, 2)
    save_reduced(model, tmp_path / "r.safetensors", backbone="reference")
    loaded = load_reduced(tmp_path / "r.safetensors", backbone=tiny_vit())
    x = inputs((2, 3, 32, 32))
    with torch.no_grad():
        assert torch.equal(registry.runner("tome", model, 2)(x).logits, registry.runner("tome", loaded, 2)(x).logits)


def test_registry_and_compare_have_no_method_name_tests():
    names = "|".join(registry.METHODS)
    pattern = re.compile(rf"""(==|!=)\s*["']({names})["']|["']({names})["']\s*(==|!=)|\bin \(\s*["']({names})["']""")
    for rel in ("reducers/registry.py", "compare.py", "dropin.py", "reduced_io.py"):
        hits = [line for line in (SRC / rel).read_text().splitlines() if pattern.search(line)]
        assert not hits, f"{rel} branches on method names: {hits}"


# -- adding a training-free reducer: one Reducer subclass + one Method entry ------------------------------


class LowNormFirst(Reducer):
    """Keeps the tokens with the largest feature norm (a toy rule); knob: keep ratio (budget mode)."""

    def forward(self, x: StageInput):
        norm = x.tokens.data.norm(dim=-1)
        scores = _prefix_one(x.tokens, norm / norm.amax().clamp_min(1e-6))  # class token: always kept
        return keep_from_scores(x.tokens, scores, x.settings)

    def describe(self) -> dict:
        return {"method": "norm"}


NORM = registry.Method("norm", "keep ratio per stage (budget top-k by token norm)", 1.0, (0.8, 0.5),
                       registry.three_equal_stages, lambda backbone, knob, stage: LowNormFirst(),
                       registry.METHODS["random"].settings)


def test_a_new_training_free_reducer_is_one_class_and_one_entry(tmp_path, monkeypatch):
    monkeypatch.setitem(registry.METHODS, "norm", NORM)  # the one registry row
    backbone, x = tiny_vit(), inputs((2, 3, 32, 32))
    model = registry.build_reduced("norm", backbone, 0.5)
    with torch.no_grad():
        out = registry.runner("norm", model, 0.5)(x)
        full = registry.runner("norm", registry.build_reduced("norm", backbone, 1.0), 1.0)(x).logits
    assert out.kept_fraction()[:, -1].max() < 1.0
    assert (full - ReducedModel(backbone, [None], [0])(x, mode="all").logits).abs().max() <= 1e-5
    save_reduced(model, tmp_path / "norm.safetensors", settings=registry.forward_kwargs("norm", 0.5))
    loaded = load_reduced(tmp_path / "norm.safetensors")
    with torch.no_grad():
        assert torch.equal(registry.runner("norm", loaded, 0.5)(x).logits, out.logits)
    assert loaded.settings == registry.forward_kwargs("norm", 0.5)


def test_every_method_declares_the_contract():
    for name, m in registry.METHODS.items():
        assert m.name == name and m.sweep and callable(m.locations) and callable(m.settings)
        assert m.reducer is not None or m.build is not None, name
        assert (m.train is not None) == m.learns, name
        assert replace(m) == m


def test_load_reduced_reads_the_shipped_pruned_files():
    from iared.pruning import IARed

    for path in sorted((SRC / "assets").glob("*_pruned.pt")):
        model = load_reduced(path)
        assert isinstance(model, IARed) and model.settings["threshold"] == model.inference.threshold


@pytest.mark.parametrize("method,knob", [("tome", {"r": 2}), ("evit", {"keep_rate": 0.5}), ("random", {})])
def test_prune_loads_any_methods_file(tmp_path, method, knob):
    import iared

    pruned = iared.prune(tiny_vit(), method=method, **knob)
    save_reduced(pruned, tmp_path / "m.safetensors")
    again = iared.prune(str(tmp_path / "m.safetensors"))
    assert again.method == method
    x = inputs((2, 3, 32, 32))
    with torch.no_grad():
        if method == "random":  # its generator: compare kept counts (the knob), not draws
            assert torch.equal(pruned.details(x).kept_fraction(), again.details(x).kept_fraction())
        else:
            assert torch.equal(pruned(x), again(x))
