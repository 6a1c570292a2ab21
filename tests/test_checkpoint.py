"""Bad checkpoints fail with one error naming the file (and the offending keys); saves are atomic."""

import os
import pickle

import pytest
import torch
from safetensors.torch import save_file

from iared.checkpoint import CheckpointError, extract_state_dict, load_weights, read_checkpoint, save_atomic
from iared.models import create_model, load_model
from iared.pruning import IARed, load_pruned, save_pruned

SMALL = dict(depth=2, embed_dim=32, num_heads=2)


def small_model():
    torch.manual_seed(0)
    return create_model("digits_vit", **SMALL)


def load_small(path):
    return create_model("digits_vit", checkpoint=path, **SMALL)


def one_line(err: pytest.ExceptionInfo, path) -> str:
    msg = str(err.value)
    assert "\n" not in msg
    assert str(path) in msg
    return msg


# -- files that are not checkpoints -------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_missing_file(tmp_path, suffix):
    path = tmp_path / f"nope{suffix}"
    with pytest.raises(CheckpointError) as err:
        load_small(path)
    assert "not found" in one_line(err, path)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_zero_byte_file(tmp_path, suffix):
    path = tmp_path / f"empty{suffix}"
    path.touch()
    with pytest.raises(CheckpointError) as err:
        load_small(path)
    assert "empty" in one_line(err, path)


@pytest.mark.parametrize("content", [os.urandom(4096), b"these are not the weights you are looking for\n" * 20,
                                     b"PK\x03\x04" + os.urandom(300)])  # looks like a zip (torch's format)
@pytest.mark.parametrize("suffix", [".pt", ".pth", ".safetensors"])
def test_garbage_file(tmp_path, content, suffix):
    path = tmp_path / f"garbage{suffix}"
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as err:
        load_small(path)
    assert "not a readable" in one_line(err, path)


def test_directory_instead_of_file(tmp_path):
    with pytest.raises(CheckpointError) as err:
        load_small(tmp_path)
    one_line(err, tmp_path)


def test_pickle_cannot_run_code(tmp_path):
    """weights_only loading: a malicious pickle is refused and its payload never runs."""
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return os.mkdir, (str(marker),)

    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps({"model": Payload()}, protocol=2))
    with pytest.raises(CheckpointError) as err:
        load_small(path)
    one_line(err, path)
    assert not marker.exists()
    pickle.loads(path.read_bytes())  # the payload is live: a plain unpickler runs it
    assert marker.is_dir()


def test_not_a_dict_and_no_state_dict(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], path)
    with pytest.raises(CheckpointError) as err:
        read_checkpoint(path)
    assert "expected a dict, found list" in one_line(err, path)

    path = tmp_path / "meta.pt"
    torch.save({"epoch": 3, "note": "no weights here"}, path)
    with pytest.raises(CheckpointError) as err:
        load_small(path)
    msg = one_line(err, path)
    assert "no model state dict" in msg and "epoch" in msg


# -- checkpoints for a different model ----------------------------------------------------------


def test_missing_and_unexpected_keys_are_listed(tmp_path):
    sd = small_model().state_dict()
    del sd["blocks.1.mlp.fc2.weight"], sd["norm.bias"]
    sd["blocks.1.extra.weight"] = torch.zeros(3)
    path = tmp_path / "keys.pt"
    torch.save({"model": sd}, path)
    with pytest.raises(CheckpointError) as err:
        load_small(path)
    msg = one_line(err, path)
    assert "missing keys [blocks.1.mlp.fc2.weight, norm.bias]" in msg
    assert "unexpected keys [blocks.1.extra.weight]" in msg


def test_wrong_depth_lists_the_extra_blocks(tmp_path):
    path = tmp_path / "deeper.safetensors"
    torch.manual_seed(0)
    save_file(create_model("digits_vit", depth=3, embed_dim=32, num_heads=2).state_dict(), path)
    with pytest.raises(CheckpointError) as err:
        load_small(path)
    msg = one_line(err, path)
    assert "unexpected keys [blocks.2." in msg and "missing" not in msg


def test_wrong_shapes_are_listed(tmp_path):
    path = tmp_path / "wide.pt"
    torch.manual_seed(0)
    torch.save(create_model("digits_vit", depth=2, embed_dim=48, num_heads=2).state_dict(), path)
    with pytest.raises(CheckpointError) as err:
        load_small(path)
    msg = one_line(err, path)
    assert "shape mismatch" in msg
    assert "cls_token: file (1, 1, 48) vs model (1, 1, 32)" in msg
    assert " ..." in msg  # more than eight mismatches: the list is cut, not dumped


def test_wrong_class_count_names_the_head(tmp_path):
    sd = small_model().state_dict()
    sd["head.weight"], sd["head.bias"] = torch.zeros(5, 32), torch.zeros(5)
    path = tmp_path / "head.pt"
    torch.save(sd, path)
    with pytest.raises(CheckpointError) as err:
        load_small(path)
    msg = one_line(err, path)
    assert "head.weight: file (5, 32) vs model (10, 32)" in msg and "head.bias" in msg


def test_failed_load_leaves_the_model_untouched():
    model = small_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sd = {k: torch.zeros_like(v) for k, v in before.items()}
    del sd["norm.weight"]
    with pytest.raises(CheckpointError):
        load_weights(model, sd, "x.pt")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_loads_ddp_prefixed_and_half_precision_weights(tmp_path):
    model = small_model()
    sd = {f"module.{k}": v.half() for k, v in model.state_dict().items()}
    path = tmp_path / "ddp.pt"
    torch.save({"state_dict": sd}, path)
    loaded = load_small(path)
    for k, v in loaded.state_dict().items():
        assert v.dtype == torch.float32 and torch.equal(v, model.state_dict()[k].half().float())


def test_load_model_needs_a_config(tmp_path):
    path = tmp_path / "plain.pt"
    torch.save(small_model().state_dict(), path)
    with pytest.raises(CheckpointError) as err:
        load_model(path)
    assert "no model config" in one_line(err, path)


def test_load_pruned_refuses_a_backbone_checkpoint(tmp_path):
    path = tmp_path / "backbone.pt"
    model = small_model()
    torch.save({"model": model.state_dict(), "config": {"model": model.cfg.to_dict()}}, path)
    with pytest.raises(CheckpointError) as err:
        load_pruned(path)
    assert "not an IA-RED² checkpoint" in one_line(err, path)
    # and the round trip of a real one is exact
    pruned = IARed(model, num_stages=2, interpreter_heads=2)
    save_pruned(pruned, tmp_path / "pruned.pt")
    back = load_pruned(tmp_path / "pruned.pt")
    assert back.stage_starts == pruned.stage_starts
    assert all(torch.equal(v, pruned.state_dict()[k]) for k, v in back.state_dict().items())


def test_extract_state_dict_prefers_model_entry():
    sd, ema = {"module.a": torch.ones(1)}, {"a": torch.zeros(1)}
    out = extract_state_dict({"model_ema": ema, "model": sd, "optimizer": {"state": {}}, "epoch": 3})
    assert out.keys() == {"a"} and torch.equal(out["a"], torch.ones(1))


# -- atomic saving ------------------------------------------------------------------------------


class Boom(RuntimeError):
    pass


def _half_writer(exc):
    def fake_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise exc

    return fake_save


@pytest.mark.parametrize("exc", [Boom("disk full"), KeyboardInterrupt()])
def test_failed_save_leaves_no_file(tmp_path, monkeypatch, exc):
    monkeypatch.setattr(torch, "save", _half_writer(exc))
    target = tmp_path / "run" / "checkpoint.pt"
    with pytest.raises(type(exc)):
        save_atomic({"model": {"w": torch.ones(3)}}, target)
    assert list(target.parent.iterdir()) == []  # neither the file nor the temporary file


def test_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    target = tmp_path / "checkpoint.pt"
    save_atomic({"model": {"w": torch.ones(3)}}, target)
    monkeypatch.setattr(torch, "save", _half_writer(Boom("killed")))
    with pytest.raises(Boom):
        save_atomic({"model": {"w": torch.zeros(3)}}, target)
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]
    assert torch.equal(read_checkpoint(target)["model"]["w"], torch.ones(3))


def test_failed_safetensors_save_leaves_no_file(tmp_path, monkeypatch):
    import safetensors.torch

    def fail(*args, **kwargs):
        raise Boom("serialisation failed")

    monkeypatch.setattr(safetensors.torch, "save", fail)
    with pytest.raises(Boom):
        save_atomic({"w": torch.ones(3)}, tmp_path / "w.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_save_atomic_round_trip_and_permissions(tmp_path):
    path = save_atomic({"w": torch.arange(4.0)}, tmp_path / "sub" / "w.safetensors")
    assert torch.equal(read_checkpoint(path)["w"], torch.arange(4.0))
    umask = os.umask(0o022)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600
