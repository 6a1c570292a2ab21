"""Distillation from a CNN teacher (``iared train --teacher``, :mod:`iared.train.distill`).

Tiny models on digits-clutter (1 channel): a 5-stage ConvNet of width 8 as teacher, a 2-block ViT
of width 32 as student; a few steps of batch 8 per run.
"""

import json

import pytest
import torch
import torch.nn.functional as F

from iared.checkpoint import CheckpointError
from iared.cli import main as cli_main
from iared.models import ConvNet, ConvNetConfig, VisionTransformer, ViTConfig, create_model, load_model
from iared.train.distill import Distiller, hint_pairs, load_teacher

TEACHER = ["--model", "digits_natural_cnn", "--model-override", "in_chans=1", "--model-override", "mean=(0.0,)",
           "--model-override", "std=(1.0,)", "--model-override", "widths=(8, 8, 8, 8, 8)"]
STUDENT = ["--model", "digits_vit", "--model-override", "depth=2", "--model-override", "embed_dim=32",
           "--model-override", "num_heads=2"]
RUN = ["--batch-size", "8", "--val-size", "16", "--warmup", "2", "--lr", "2e-3", "--no-progress"]


def small_teacher(**kw) -> ConvNet:
    return ConvNet(ConvNetConfig(in_chans=1, mean=(0.0,), std=(1.0,), widths=(8, 8, 8, 8, 8), **kw)).eval()


def small_student(**kw) -> VisionTransformer:
    return VisionTransformer(ViTConfig(**{**dict(img_size=64, patch_size=8, in_chans=1, embed_dim=32, depth=2,
                                                 num_heads=2, num_classes=10, mean=(0.0,), std=(1.0,)), **kw}))


def test_hint_pairs_spread_stages_over_blocks_last_on_last():
    assert hint_pairs([2, 3, 4], 6) == [(2, 1), (3, 3), (4, 5)]
    assert hint_pairs([2, 3, 4], 12) == [(2, 3), (3, 7), (4, 11)]
    assert hint_pairs([2, 3, 4], 2) == [(3, 0), (4, 1)]  # more stages than blocks: the deepest ones
    assert hint_pairs([4], 3) == [(4, 2)]


def test_convnet_cells_are_patches_and_head_reads_the_max():
    teacher = small_teacher()
    x = torch.rand(2, 1, 64, 64)
    maps = teacher.feature_maps(x)
    assert [m.shape[-1] for m in maps] == [32, 16, 8, 8, 8]
    assert teacher.hint_stages() == [2, 3, 4]  # the stages at the final stride, 8 px: one cell per ViT patch
    torch.testing.assert_close(teacher(x), teacher.head(maps[-1].flatten(2).max(dim=2).values))
    with pytest.raises(ValueError, match="no tokens to drop"):
        teacher(x, keep=torch.ones(2, 64, dtype=torch.bool))


def test_token_hints_target_the_teacher_cell_under_each_patch():
    """The hint of patch token j is the teacher's cell at (j // 8, j % 8): an adapter that reads a
    patch's pixels would fit it only if the rows are in the same (row-major) order."""
    torch.manual_seed(0)
    teacher, student = small_teacher(), small_student()
    d = Distiller(teacher, student, kd=0.0, hint=1.0, hint_class=0.0)
    x = torch.rand(3, 1, 64, 64)
    loss, parts = d.loss(student, x, torch.tensor([1, 2, 3]), 0.0)
    # recompute by hand: blocks 0 and 1 after stages 3 and 4 (2 blocks, 3 stages)
    assert d.pairs == [(3, 0), (4, 1)]
    maps = teacher.feature_maps(x)
    tokens, outs = student.embed(x), []
    for block in student.blocks:
        tokens = block(tokens)
        outs.append(tokens.data)
    want = 0.0
    for (stage, block), adapter in zip(d.pairs, d.adapters["tokens"]):
        m = maps[stage]
        cells = torch.stack([m[:, :, j // 8, j % 8] for j in range(64)], dim=1)  # token order, by index
        want += F.mse_loss(adapter(outs[block][:, 1:]), F.layer_norm(cells, (m.shape[1],))) / 2
    ce = F.cross_entropy(student(x), torch.tensor([1, 2, 3]))
    torch.testing.assert_close(loss, ce + want)
    assert parts["hint"] == pytest.approx(float(want.detach()), rel=1e-5) and parts["hint_class"] == 0.0


def test_class_hint_and_kd_are_what_they_say():
    torch.manual_seed(1)
    teacher, student = small_teacher(), small_student()
    d = Distiller(teacher, student, kd=1.0, hint=0.0, hint_class=1.0)
    x, y = torch.rand(2, 1, 64, 64), torch.tensor([0, 5])
    _, parts = d.loss(student, x, y, 0.1)
    t_logits, s_logits = teacher(x), student(x)
    kd = (F.softmax(t_logits, 1) * (F.log_softmax(t_logits, 1) - F.log_softmax(s_logits, 1))).sum(1).mean()
    assert parts["kd"] == pytest.approx(float(kd.detach()), rel=1e-4)
    assert parts["hint"] == 0.0 and parts["hint_class"] > 0


def test_teacher_does_not_learn_and_student_gets_hint_gradients():
    torch.manual_seed(2)
    teacher, student = small_teacher(), small_student()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    d = Distiller(teacher, student, kd=0.0, hint=1.0, hint_class=0.0)
    loss, _ = d.loss(student, torch.rand(4, 1, 64, 64), torch.arange(4), 0.0)
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert student.patch_embed.proj.weight.grad.abs().sum() > 0
    assert all(p.grad is not None for p in d.adapters["tokens"].parameters())
    assert all(p.grad is None for p in d.adapters["class"].parameters())  # weight 0: not computed
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())  # BN statistics too


def test_mismatched_teachers_are_refused_in_one_line():
    with pytest.raises(ValueError, match="feature cells are 16 px, the student's patches 8 px"):
        Distiller(small_teacher(pools=4), small_student())
    with pytest.raises(ValueError, match="num_classes is 10, the student's 7"):
        Distiller(small_teacher(), small_student(num_classes=7))
    Distiller(small_teacher(pools=4), small_student(), hint=0.0, hint_class=0.0)  # logits alone need no cells


def test_distilled_run_learns_resumes_exactly_and_exports_a_plain_vit(tmp_path, capsys):
    teacher_dir, student_dir, resumed = tmp_path / "teacher", tmp_path / "student", tmp_path / "resumed"
    assert cli_main(["train", "--task", "digits-clutter", *TEACHER, *RUN, "--steps", "4", "--out", str(teacher_dir),
                     "--export", str(tmp_path / "teacher.pt")]) == 0
    # the exported teacher (torch file with its config) loads as a ConvNet with the run's weights
    exported, trained = load_model(tmp_path / "teacher.pt"), load_model(teacher_dir / "checkpoint.pt")
    assert isinstance(exported, ConvNet) and exported.cfg.widths == (8, 8, 8, 8, 8)
    x = torch.rand(2, 1, 64, 64)
    torch.testing.assert_close(exported.eval()(x), trained.eval()(x), atol=2e-2, rtol=0)  # float16 export

    common = ["train", "--task", "digits-clutter", *STUDENT, *RUN, "--steps", "4", "--log-every", "1",
              "--teacher", str(teacher_dir / "checkpoint.pt")]
    assert cli_main([*common, "--out", str(student_dir), "--export", str(tmp_path / "student.safetensors")]) == 0
    assert cli_main([*common, "--out", str(resumed), "--stop-at", "2"]) == 0
    assert cli_main(["train", "--out", str(resumed), "--resume", "--no-progress"]) == 0
    a = torch.load(student_dir / "checkpoint.pt", weights_only=True)
    b = torch.load(resumed / "checkpoint.pt", weights_only=True)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for k in a["distill"]:  # the adapters are saved with the run and restored on resume
        assert torch.equal(a["distill"][k], b["distill"][k]), k
    lines = [json.loads(s) for s in (student_dir / "log.jsonl").read_text().splitlines()]
    train_lines = [e for e in lines if e["event"] == "train"]
    assert all({"ce", "kd", "hint", "hint_class"} <= set(e) for e in train_lines)
    # the student's weights alone: a plain ViT, no adapter, no teacher
    student = create_model("digits_vit", checkpoint=tmp_path / "student.safetensors", depth=2, embed_dim=32,
                           num_heads=2)
    assert isinstance(student, VisionTransformer)


def test_bad_teachers_are_one_line_errors(tmp_path, capsys):
    vit = tmp_path / "vit"
    assert cli_main(["train", "--task", "digits-clutter", *STUDENT, *RUN, "--steps", "1", "--out", str(vit)]) == 0
    capsys.readouterr()
    for teacher, expect in [(vit / "checkpoint.pt", "holds a VisionTransformer; a teacher is a ConvNet"),
                            (tmp_path / "missing.pt", "file not found")]:
        assert cli_main(["train", "--task", "digits-clutter", *STUDENT, *RUN, "--steps", "1", "--out",
                         str(tmp_path / "s"), "--teacher", str(teacher)]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and expect in err and str(teacher) in err
    with pytest.raises(CheckpointError, match="holds a VisionTransformer"):
        load_teacher(str(vit / "checkpoint.pt"), "cpu")


def test_token_drop_with_hints_is_refused_before_training(tmp_path, capsys):
    teacher_dir = tmp_path / "teacher"
    assert cli_main(["train", "--task", "digits-clutter", *TEACHER, *RUN, "--steps", "1", "--out", str(teacher_dir)]) == 0
    capsys.readouterr()
    assert cli_main(["train", "--task", "digits-clutter", *STUDENT, *RUN, "--steps", "2", "--out", str(tmp_path / "s"),
                     "--teacher", str(teacher_dir / "checkpoint.pt"), "--token-drop", "0.5"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--hint 0 --hint-class 0" in err and not (tmp_path / "s" / "checkpoint.pt").exists()
    # logits alone work with dropped tokens
    assert cli_main(["train", "--task", "digits-clutter", *STUDENT, *RUN, "--steps", "2", "--out", str(tmp_path / "k"),
                     "--teacher", str(teacher_dir / "checkpoint.pt"), "--token-drop", "0.5", "--hint", "0",
                     "--hint-class", "0"]) == 0


def test_skipped_bad_steps_leave_the_logged_parts_finite(tmp_path, monkeypatch):
    """A step skipped by --max-bad-steps (NaN loss) must not enter the logged means of the loss's parts."""
    import math

    teacher_dir = tmp_path / "teacher"
    assert cli_main(["train", "--task", "digits-clutter", *TEACHER, *RUN, "--steps", "1", "--out", str(teacher_dir)]) == 0
    real, calls = Distiller.loss, []

    def nan_at_second(self, *a, **kw):
        loss, parts = real(self, *a, **kw)
        calls.append(1)
        if len(calls) == 2:
            return loss * float("nan"), {k: float("nan") for k in parts}
        return loss, parts

    monkeypatch.setattr(Distiller, "loss", nan_at_second)
    out = tmp_path / "s"
    assert cli_main(["train", "--task", "digits-clutter", *STUDENT, *RUN, "--steps", "3", "--log-every", "3",
                     "--max-bad-steps", "1", "--out", str(out), "--teacher", str(teacher_dir / "checkpoint.pt")]) == 0
    lines = [json.loads(s) for s in (out / "log.jsonl").read_text().splitlines()]
    assert any(e["event"] == "bad_step" for e in lines)
    train = [e for e in lines if e["event"] == "train"][-1]
    assert all(math.isfinite(train[k]) for k in ("ce", "kd", "hint", "hint_class")), train
