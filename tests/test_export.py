"""Export paths: budget mode through ONNX + onnxruntime, threshold mode under torch.compile."""

import pytest
import torch

from iared.export import BudgetModel, compile_threshold, export_budget_onnx, run_onnx
from iared.models.vit import VisionTransformer, ViTConfig
from iared.pruning import IARed


def tiny_model(seed: int = 0) -> IARed:
    torch.manual_seed(seed)
    backbone = VisionTransformer(ViTConfig(img_size=32, patch_size=8, in_chans=3, num_classes=7, embed_dim=48,
                                           depth=3, num_heads=3))
    model = IARed(backbone, num_stages=3, interpreter_heads=3).eval()
    with torch.no_grad():
        for interp in model.interpreters:
            interp.qk.weight.normal_(0, 0.5)
    return model


def images(batch, seed=1):
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("keep", [0.5, (0.8, 0.6, 0.5), 1.0])
def test_budget_model_matches_budget_mode(keep):
    model = tiny_model()
    x = images(4)
    with torch.inference_mode():
        ref = model(x, "budget", keep_ratio=keep).logits
        out = BudgetModel(model, keep)(x)
    assert (out - ref).abs().max() <= 1e-5


def test_budget_model_rejects_bad_ratio():
    with pytest.raises(ValueError, match="keep_ratio"):
        BudgetModel(tiny_model(), 1.5)


@pytest.mark.slow
def test_budget_onnx_runs_in_onnxruntime(tmp_path):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    model = tiny_model()
    path = export_budget_onnx(model, tmp_path / "budget.onnx", 0.5, opset=17)
    graph = onnx.load(str(path))
    onnx.checker.check_model(graph)
    assert max(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")) >= 17
    ops = {node.op_type for node in graph.graph.node}
    for fn in graph.functions:
        ops |= {node.op_type for node in fn.node}
    # tokens really leave: top-k of the scores and a gather of the kept rows, not a mask
    assert "TopK" in ops and ops & {"GatherElements", "Gather", "GatherND"}, sorted(ops)
    x = images(3, seed=5)  # another batch size than the export's example: the batch axis is dynamic
    with torch.inference_mode():
        ref = model(x, "budget", keep_ratio=0.5).logits
    assert (run_onnx(path, x) - ref).abs().max() <= 1e-4


@pytest.mark.slow
def test_threshold_mode_under_torch_compile():
    torch._dynamo.reset()
    model = tiny_model()
    x = images(4)
    threshold = [0.45, 0.5, 0.5]
    with torch.inference_mode():
        ref = model(x, "threshold", threshold=threshold)
        counts = [k.sum(1).tolist() for k in ref.keep]
        assert any(len(set(c)) > 1 for c in counts), counts
        out = compile_threshold(model, threshold, attention="bucket")(x)
    assert (out - ref.logits).abs().max() <= 1e-4


@pytest.mark.slow
def test_cli_export_checks_onnxruntime(tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    from iared.cli import main as cli_main
    from iared.pruning import save_pruned

    ckpt, out = tmp_path / "pruned.pt", tmp_path / "budget.onnx"
    save_pruned(tiny_model(), ckpt)
    assert cli_main(["export", str(ckpt), str(out), "--keep", "0.6", "--check"]) == 0
    assert out.is_file() and "max abs diff" in capsys.readouterr().err
    assert cli_main(["export", str(ckpt), str(out), "--keep", "0.6", "--opset", "13"]) == 2


@pytest.mark.slow
def test_augmented_shortcuts_export_to_onnx(tmp_path):
    """The FFT product of augmented shortcuts has no ONNX lowering: under export the same
    block-circulant matrix runs as one dense matmul, and onnxruntime gives the eager logits."""
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    backbone = VisionTransformer(ViTConfig(img_size=32, patch_size=8, in_chans=3, num_classes=7, embed_dim=48,
                                           depth=3, num_heads=3, aug_shortcuts=2, aug_circulant_blocks=4))
    with torch.no_grad():  # shortcuts start near zero: make them matter
        for name, p in backbone.named_parameters():
            if "shortcuts" in name:
                p.normal_(0, 0.3)
    model = IARed(backbone, num_stages=3, interpreter_heads=3).eval()
    with torch.no_grad():
        for interp in model.interpreters:
            interp.qk.weight.normal_(0, 0.5)
    path = export_budget_onnx(model, tmp_path / "aug.onnx", 0.5, opset=17)
    x = images(3, seed=7)
    with torch.inference_mode():
        ref = model(x, "budget", keep_ratio=0.5).logits
        plain = IARed(VisionTransformer(ViTConfig(**{**backbone.cfg.__dict__, "aug_shortcuts": 0})),
                      num_stages=3, interpreter_heads=3).eval()
        plain.load_state_dict(model.state_dict(), strict=False)
        assert (plain(x, "budget", keep_ratio=0.5).logits - ref).abs().max() > 1e-2  # the shortcuts count
    assert (run_onnx(path, x) - ref).abs().max() <= 1e-4
