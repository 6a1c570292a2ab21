"""One option vocabulary for every command (:mod:`iared.commands`): the shared options walked in every
command's ``--help``, the old spellings (still working, with a note), ``--version``, ``--config`` round
trips, the default task read off the checkpoint, timm's tagged names, and the logs beside ``log.jsonl``."""

import argparse
import csv
import json
from importlib import resources
from pathlib import Path

import pytest
import torch

from iared.cli import build_parser
from iared.cli import main as cli_main
from iared.commands import _CommaList, package_version, parse_args, resolve_task
from iared.models import create_model, split_model_name_tag

ASSETS = Path(str(resources.files("iared") / "assets"))
TINY = ["--model", "digits_vit", "--model-override", "depth=1", "--model-override", "embed_dim=32",
        "--model-override", "num_heads=2"]
# commands whose settings make a measurement or a run: --config reads them from a file
CONFIGURABLE = {"train", "train-interpreters", "train-dense", "eval", "eval-dense", "explain-eval", "compare",
                "bench", "bench-mvit", "demo"}
OLD_SPELLINGS = ["--pruned", "--iared-checkpoint", "--backbone", "--save-json"]


def commands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def visible(p: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in p._actions if a.help is not argparse.SUPPRESS]


def option(p: argparse.ArgumentParser, flag: str) -> argparse.Action | None:
    return next((a for a in visible(p) if flag in a.option_strings), None)


def parse(capsys, *argv) -> tuple[argparse.Namespace, list[str]]:
    """The namespace of a command line and the lines it printed on stderr (the deprecation notes)."""
    capsys.readouterr()
    args = parse_args(build_parser(), [str(a) for a in argv])
    return args, capsys.readouterr().err.strip().splitlines()


# -- the vocabulary in every command's --help -------------------------------------------------------


@pytest.mark.parametrize("name", sorted(commands()))
def test_every_command_speaks_the_shared_vocabulary(name):
    p = commands()[name]
    if option(p, "--model") is not None and name != "bench-mvit":  # bench-mvit: random MViTv2 weights only
        checkpoint = option(p, "--checkpoint")
        assert checkpoint is not None and checkpoint.metavar == "FILE", name
    for a in visible(p):  # no positional checkpoint: the model is always --checkpoint FILE
        if not a.option_strings:
            assert "checkpoint" not in f"{a.dest} {a.metavar}".lower(), (name, a.dest)
    shapes = {"--json": "PATH", "--out": "DIR", "--task": "TASK", "--model": "NAME", "--config": "FILE"}
    for flag, metavar in shapes.items():
        a = option(p, flag)
        if a is not None:
            assert a.metavar == metavar, (name, flag, a.metavar)
    json_option = option(p, "--json")
    if json_option is not None:
        assert "'-'" in json_option.help and "stdout" in json_option.help, name
        assert not isinstance(json_option, argparse._StoreTrueAction), name  # a path, never a bare flag
    for a in visible(p):  # one list syntax for options: comma-separated, said in the help (input files: spaces)
        if a.option_strings and (a.nargs in ("+", "*") or isinstance(a, _CommaList)):
            assert isinstance(a, _CommaList) and "comma-separated" in a.help, (name, a.option_strings)
    assert (option(p, "--config") is not None) == (name in CONFIGURABLE), name
    shown = {o for a in visible(p) for o in a.option_strings}
    assert not shown & set(OLD_SPELLINGS), name  # still accepted, no longer advertised


def test_the_vocabulary_helpers_are_what_the_commands_use():
    """The shared options come from one place: every --json, --out, --checkpoint of the built-in commands
    has the help shape the helpers give (a hand-written one would drift from it)."""
    for name, p in commands().items():
        a = option(p, "--json")
        if a is not None:
            assert a.help.endswith("stdout, the text report then goes to stderr)"), name


def test_bare_json_where_it_was_a_flag_and_paths_elsewhere(capsys, tmp_path):
    args, _ = parse(capsys, "eval", "--json")
    assert args.json == "-"
    args, _ = parse(capsys, "eval", "--json", tmp_path / "r.json")
    assert args.json == str(tmp_path / "r.json")
    args, _ = parse(capsys, "eval-dense", "--checkpoint", "d.pt", "--json")
    assert args.json == "-"
    with pytest.raises(SystemExit):  # compare's --json always takes a path
        parse(capsys, "compare", "--json")


def test_lists_are_comma_separated_and_empty_means_none(capsys):
    args, notes = parse(capsys, "compare", "--methods", "random,evit", "--batch-sizes", "64,1",
                        "--dynamicvit-ratios", "0.7")
    assert (args.methods, args.batch_sizes, args.dynamicvit_ratios, notes) == (("random", "evit"), (64, 1), (0.7,), [])
    args, _ = parse(capsys, "compare", "--batch-sizes", "")
    assert args.batch_sizes == ()
    with pytest.raises(SystemExit):
        parse(capsys, "bench", "--batch-sizes", "1,eight")
    assert "expected comma-separated ints, got '1,eight'" in capsys.readouterr().err


# -- --version -------------------------------------------------------------------------------------


def test_version(capsys, monkeypatch):
    from importlib import metadata

    import iared

    with pytest.raises(SystemExit) as exc:
        cli_main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"iared {metadata.version('iared')}"

    def not_installed(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "version", not_installed)  # a source tree without an installed distribution
    assert package_version() == iared.__version__


# -- old spellings: still working, one line each --------------------------------------------------------


@pytest.mark.parametrize("argv, dest, value, note", [
    (["eval", "--pruned", "p.pt"], "checkpoint", "p.pt", "iared eval: --pruned is deprecated, use --checkpoint"),
    (["compare", "--iared-checkpoint", "p.pt"], "iared_checkpoint", "p.pt",
     "iared compare: --iared-checkpoint is deprecated, use --checkpoint"),
    (["compare", "--backbone", "b.pt"], "backbone", "b.pt", "iared compare: --backbone is deprecated, use --checkpoint"),
    (["demo", "--backbone", "b.pt"], "checkpoint", "b.pt", "iared demo: --backbone is deprecated, use --checkpoint"),
    (["train-interpreters", "--backbone", "b.pt"], "backbone", "b.pt",
     "iared train-interpreters: --backbone is deprecated, use --checkpoint"),
    (["export", "p.pt", "m.onnx", "--keep", "0.5"], "checkpoint", "p.pt",
     "iared export: the positional CHECKPOINT is deprecated, use --checkpoint"),
    (["make-dataset", "digits-clutter", "--out", "d"], "task", "digits-clutter",
     "iared make-dataset: the positional TASK is deprecated, use --task"),
    (["bench-mvit", "--out", "r.json"], "json", "r.json", "iared bench-mvit: --out is deprecated, use --json"),
    (["eval-dense", "--checkpoint", "d.pt", "--save-json", "r.json"], "json", "r.json",
     "iared eval-dense: --save-json is deprecated, use --json"),
    (["explain", "img.png", "--methods", "interpreter:1", "chefer"], "methods", ("interpreter:1", "chefer"),
     "iared explain: --methods interpreter:1 chefer (space-separated) is deprecated, "
     "use --methods interpreter:1,chefer"),
    (["train-dense", "--neck-hidden-sizes", "24", "32", "48", "64"], "neck_hidden_sizes", (24, 32, 48, 64),
     "iared train-dense: --neck-hidden-sizes 24 32 48 64 (space-separated) is deprecated, "
     "use --neck-hidden-sizes 24,32,48,64"),
])
def test_old_spellings_still_work_with_one_note(capsys, argv, dest, value, note):
    args, notes = parse(capsys, *argv)
    assert getattr(args, dest) == value
    assert notes == [note]
    assert not any(k.startswith("_") for k in vars(args))  # the notes do not stay in the namespace


def test_new_spellings_leave_no_note_and_both_spellings_are_refused(capsys):
    for argv in (["eval", "--checkpoint", "p.pt"], ["export", "--checkpoint", "p.pt", "m.onnx", "--keep", "0.5"],
                 ["explain", "img.png", "--methods", "interpreter:1,chefer"], ["make-dataset", "--out", "d"]):
        _, notes = parse(capsys, *argv)
        assert notes == [], argv
    args, _ = parse(capsys, "export", "--checkpoint", "p.pt", "m.onnx", "--keep", "0.5")
    assert (args.checkpoint, args.output) == ("p.pt", "m.onnx")
    for argv in (["eval", "--checkpoint", "a.pt", "--pruned", "b.pt"], ["eval-dense", "--json", "--save-json", "x"]):
        with pytest.raises(SystemExit) as exc:
            parse(capsys, *argv)
        assert exc.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


def test_the_old_pruned_spelling_runs_end_to_end(capsys):
    capsys.readouterr()
    code = cli_main(["eval", "--pruned", str(ASSETS / "digits_pruned.pt"), "--limit", "8", "--throughput-batch", "4",
                     "--repeats", "1", "--json"])
    out, err = capsys.readouterr()
    assert code == 0 and json.loads(out)["n"] == 8
    assert err.splitlines()[0] == "iared eval: --pruned is deprecated, use --checkpoint"


# -- the default task ------------------------------------------------------------------------------


def test_the_shipped_natural_pruned_model_evaluates_with_no_task(capsys):
    """Was a channel mismatch: eval defaulted to digits-clutter (1 channel), the checkpoint is RGB."""
    capsys.readouterr()
    code = cli_main(["eval", "--checkpoint", str(ASSETS / "digits_natural_pruned.pt"), "--limit", "8",
                     "--throughput-batch", "4", "--repeats", "1", "--json", "-"])
    out, err = capsys.readouterr()
    assert code == 0, err
    result = json.loads(out)
    assert result["task"] == "digits-natural" and result["n"] == 8
    assert "top-1 accuracy" in err  # the text report went to stderr, stdout stays one JSON line


def test_default_task_is_read_off_the_checkpoint(tmp_path):
    from iared.pruning import IARed, save_pruned

    # what the files record (training config) wins; the shipped backbones have none: their inputs say
    for name, task in [("digits_natural_pruned.pt", "digits-natural"), ("digits_pruned.pt", "digits-clutter"),
                       ("moving_digits_pruned.pt", "moving-digits"), ("digits_vit.safetensors", "digits-clutter"),
                       ("digits_natural_vit.safetensors", "digits-natural")]:
        assert resolve_task(None, ASSETS / name) == task, name
    tiny = create_model("digits_vit", depth=1, embed_dim=32, num_heads=2)
    recorded = tmp_path / "recorded.pt"
    save_pruned(IARed(tiny, num_stages=1, interpreter_heads=2), recorded, extra={"train": {"task": "my/folder"}})
    assert resolve_task(None, recorded) == "my/folder"
    assert resolve_task("digits-natural", recorded) == "digits-natural"  # --task given: taken as is
    assert resolve_task(None) == "digits-natural"  # nothing given: the one embedded default
    assert resolve_task(None, None, "digits_vit") == "digits-clutter"  # a registered name's inputs
    big = tmp_path / "deit.pt"
    torch.save({"model": create_model("deit_tiny_patch16_224", depth=1).state_dict()}, big)
    with pytest.raises(ValueError, match=f"no --task given and {big} records none"):
        resolve_task(None, big)


# -- timm's tagged names ---------------------------------------------------------------------------


def test_tagged_model_names(capsys, tmp_path):
    assert split_model_name_tag("deit_small_patch16_224.fb_in1k") == ("deit_small_patch16_224", "fb_in1k")
    assert split_model_name_tag("digits_vit") == ("digits_vit", "")
    tagged = create_model("deit_tiny_patch16_224.fb_in1k", depth=1)  # no download: the tag is ignored
    assert tagged.cfg == create_model("deit_tiny_patch16_224", depth=1).cfg
    tiny = create_model("digits_vit", depth=1, embed_dim=32, num_heads=2)
    path = tmp_path / "plain.pth"
    torch.save({"model": tiny.state_dict()}, path)
    capsys.readouterr()
    assert cli_main(["eval", "--checkpoint", str(path), "--model", "digits_vit.any_tag", "--model-override",
                     "depth=1", "--model-override", "embed_dim=32", "--model-override", "num_heads=2",
                     "--limit", "4", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["task"] == "digits-clutter"


# -- --config ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A 4-step `iared train` run: its config.json, config.yaml, logs and checkpoint."""
    out = tmp_path_factory.mktemp("run") / "a"
    assert cli_main(["train", *TINY, "--batch-size", "8", "--steps", "4", "--val-size", "16", "--warmup", "1",
                     "--log-every", "2", "--lr", "2e-3", "--no-progress", "--out", str(out)]) == 0
    return out


def test_a_saved_config_repeats_the_run(run_dir, tmp_path, capsys):
    from iared.commands.train import config_from_args

    saved = json.loads((run_dir / "config.json").read_text())["train"]
    from_json, _ = parse(capsys, "train", "--config", run_dir / "config.json")
    from_yaml, _ = parse(capsys, "train", "--config", run_dir / "config.yaml")
    assert vars(from_json) == {**vars(from_yaml), "config": str(run_dir / "config.json")}
    assert vars(config_from_args(from_json)) == saved  # every setting of the run, none defaulted

    again = tmp_path / "b"
    assert cli_main(["train", "--config", str(run_dir / "config.yaml"), "--out", str(again)]) == 0
    a = torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=True)
    b = torch.load(again / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert a["step"] == b["step"] == 4
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert json.loads((again / "config.json").read_text())["train"] == {**saved, "out": str(again)}


def test_flags_override_the_file_wherever_they_stand(run_dir, capsys):
    for argv in (["--config", run_dir / "config.json", "--lr", "0.5"], ["--lr", "0.5", "--config", run_dir / "config.json"]):
        args, _ = parse(capsys, "train", *argv)
        assert args.lr == 0.5 and args.steps == 4 and args.model_overrides == ["depth=1", "embed_dim=32", "num_heads=2"]


def test_config_for_other_commands_and_its_refusals(tmp_path, capsys):
    from iared.train.common import write_run_config
    from iared.train.interpreters import InterpreterTrainConfig, _config_dict

    cfg = InterpreterTrainConfig(task="digits-clutter", stage_weights=(1.0, 2.0, 3.0), tau=7.0, out="runs/x")
    write_run_config(tmp_path, _config_dict(cfg))  # what train-interpreters writes beside pruned.pt
    args, _ = parse(capsys, "train-interpreters", "--config", tmp_path / "config.yaml")
    assert {k: getattr(args, k) for k in _config_dict(cfg)} == {**_config_dict(cfg), "stage_weights": (1.0, 2.0, 3.0)}

    settings = tmp_path / "eval.yaml"
    settings.write_text("checkpoint: d.pt\ntask: digits-clutter\nbatch-size: 4\n")
    args, _ = parse(capsys, "eval-dense", "--config", settings)  # a required option given by the file
    assert (args.checkpoint, args.task, args.batch_size) == ("d.pt", "digits-clutter", 4)

    for text, problem in [("steps: 3\nwarmpu: 1\n", "unknown key 'warmpu' (not an option of iared train)"),
                          ("- 1\n- 2\n", "expected a mapping of option names to values, found list"),
                          ("lr: [1\n", "not valid YAML")]:
        settings.write_text(text)
        with pytest.raises(SystemExit) as exc:
            parse(capsys, "train", "--config", settings)
        err = capsys.readouterr().err.strip()
        assert exc.value.code == 2 and "\n" not in err
        assert err.startswith(f"iared train: error: --config {settings}: ") and problem in err, err


# -- logs --------------------------------------------------------------------------------------------


def test_a_run_logs_csv_beside_jsonl(run_dir):
    records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    sinks = records[0]["sinks"]  # said once, in the first record
    assert sinks[:2] == ["log.jsonl", "log.csv"] and not any("sinks" in r for r in records[1:])
    with open(run_dir / "log.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["event"] for r in rows] == [r["event"] for r in records]
    train = [(r, j) for r, j in zip(rows, records) if j["event"] == "train"]
    assert len(train) == 2 and all(float(r["loss"]) == pytest.approx(j["loss"]) for r, j in train)


def test_csv_widens_for_new_keys_and_keeps_its_header_on_resume(tmp_path):
    from iared.train.common import RunLogger

    log = RunLogger(tmp_path / "log.jsonl")
    log.log(event="train", step=1, loss=2.0)
    log.log(event="eval", step=1, top1=0.5, kept=[0.3, 0.2])  # new columns: the file is rewritten wider
    resumed = RunLogger(tmp_path / "log.jsonl")  # a resumed run appends under the same header
    resumed.log(event="train", step=2, loss=float("nan"))
    with open(tmp_path / "log.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["event", "step", "loss", "time", "top1", "kept"]
    assert [r[:3] for r in rows[1:]] == [["train", "1", "2.0"], ["eval", "1", ""], ["train", "2", ""]]
    assert json.loads(rows[2][5]) == [0.3, 0.2] and rows[2][4] == "0.5"
    lines = (tmp_path / "log.jsonl").read_text().splitlines()
    assert len(lines) == 3 and json.loads(lines[2])["loss"] is None


def test_tensorboard_events_when_installed(tmp_path):
    from iared.train.common import RunLogger

    try:
        import tensorboard  # noqa: F401
    except ImportError:  # optional, as in timm: then the log says it is not a sink
        RunLogger(tmp_path / "log.jsonl").log(event="train", step=1, loss=1.0)
        assert "tensorboard/" not in json.loads((tmp_path / "log.jsonl").read_text())["sinks"]
        pytest.skip("tensorboard not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log = RunLogger(tmp_path / "log.jsonl")
    log.log(event="train", step=3, loss=1.5)
    log.log(stage=0, step=2, reward=0.25, val_kept=[0.5, 0.4])
    assert "tensorboard/" in json.loads((tmp_path / "log.jsonl").read_text().splitlines()[0])["sinks"]
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert set(events.Tags()["scalars"]) == {"train/loss", "stage0/reward", "stage0/val_kept/0", "stage0/val_kept/1"}
    (loss,) = events.Scalars("train/loss")
    assert (loss.step, loss.value) == (3, 1.5)


def test_compare_checkpoint_is_sniffed_and_explain_has_a_default_out(monkeypatch, tmp_path, capsys):
    from iared import compare

    seen = []
    monkeypatch.setattr(compare, "run_compare", lambda cfg: seen.append(cfg) or {"config": {}})
    monkeypatch.setattr(compare, "format_markdown", lambda result: "table")
    for checkpoint, iared_checkpoint in [("digits_natural_pruned.pt", "digits_natural_pruned.pt"),
                                         ("digits_natural_vit.safetensors", None)]:
        assert cli_main(["compare", "--checkpoint", str(ASSETS / checkpoint), "--out", str(tmp_path / "c")]) == 0
        cfg = seen.pop()  # a pruned file brings its backbone and its interpreters; weights only the backbone
        assert cfg.backbone == str(ASSETS / checkpoint) and cfg.task == "digits-natural"
        assert cfg.iared_checkpoint == (None if iared_checkpoint is None else str(ASSETS / iared_checkpoint))
    assert option(commands()["explain"], "--out").default == "explain-out"
