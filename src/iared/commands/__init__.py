"""The ``iared`` commands: one module per command, each thin over the library.

Every module exposes ``add_parser(subparsers)``, which registers the command's options and sets
``func`` to a ``main(args) -> int``; ``main`` turns the options into a library call (a dataclass
config or keyword arguments), then prints or writes the result. The library never imports this
package. :mod:`iared.cli` wires the modules together (its ``COMMANDS`` table).

One vocabulary for every command, registered by the helpers here so that each option is spelled,
parsed and explained the same way everywhere:

``--checkpoint FILE``  the model used: a pruned IA-RED² checkpoint or backbone weights, told apart by
                       the file's contents (:func:`add_model_arguments`, :func:`add_checkpoint_argument`)
``--model NAME``       a registered backbone; timm's tagged names (``deit_small_patch16_224.fb_in1k``)
                       too: the tag picks timm's pretrained weights and is otherwise ignored
``--task TASK``        an embedded task or a folder; default: the task the checkpoint was trained on,
                       else ``iared.data.DEFAULT_TASK`` (:func:`add_task_argument`, :func:`resolve_task`)
``--out DIR``          an output folder (:func:`add_out_argument`)
``--json PATH``        the report as JSON, ``-`` for stdout (:func:`add_json_argument`, :func:`write_report`)
``--target-kept F``    calibrate a pruned model's thresholds on the command's own inputs (unlabelled) so that
                       F of the patch tokens are kept (:func:`add_calibration_arguments`)
``--config FILE``      option defaults from YAML / JSON, flags override them; a run's saved
                       ``config.json`` / ``config.yaml`` reproduces it (:func:`add_config_file_argument`)
lists                  comma-separated, ``--methods a,b`` (:func:`add_list_argument`)

Old spellings (``eval --pruned``, ``compare --iared-checkpoint``, ``export CHECKPOINT OUT``, ...) are
registered with :func:`add_option`'s ``old=``: they keep working for one release, hidden from
``--help``, and :func:`parse_args` prints one deprecation line for each one used.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import types
import typing
from pathlib import Path
from typing import Any

__all__ = [
    "add_calibration_arguments",
    "add_checkpoint_argument",
    "add_config_arguments",
    "add_config_file_argument",
    "add_json_argument",
    "add_list_argument",
    "add_model_arguments",
    "add_old_option",
    "add_option",
    "add_out_argument",
    "add_task_argument",
    "check_calibration_options",
    "check_json_path",
    "finish_calibration",
    "model_options",
    "package_version",
    "parse_args",
    "parse_floats",
    "parse_overrides",
    "resolve_task",
    "write_report",
]


def package_version() -> str:
    """The installed distribution's version; the package's ``__version__`` when run from a source tree."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("iared")
    except PackageNotFoundError:
        from iared import __version__

        return __version__


# -- parsing: old spellings and --config ----------------------------------------------------------

# Namespace attribute collecting one note per old spelling used; parse_args prints them once the
# command line is final (a --config file makes it parse twice) and removes the attribute.
_NOTES = "_deprecation_notes"


def _note(namespace: argparse.Namespace, text: str) -> None:
    notes = getattr(namespace, _NOTES, [])
    if text not in notes:
        setattr(namespace, _NOTES, [*notes, text])


class _OldSpelling(argparse.Action):
    """An old spelling of an option (or, without dashes, the old positional form): stores its value
    under the new option's dest and leaves a deprecation note."""

    def __init__(self, option_strings, dest, new: str, **kw):
        self.new = new
        super().__init__(option_strings, dest, **kw)

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        old = option_string or f"the positional {self.metavar}"
        _note(namespace, f"{parser.prog}: {old} is deprecated, use {self.new}")


def add_option(p, *flags: str, old: tuple[str, ...] = (), **kw) -> argparse.Action:
    """``p.add_argument(*flags, **kw)`` and its old spellings ``old`` (``"--pruned"``, or a name
    without dashes for a former positional), hidden from ``--help``: they store into the same dest,
    print a deprecation line, and giving both spellings is refused (a mutually exclusive group)."""
    if not old:
        return p.add_argument(*flags, **kw)
    group = p.add_mutually_exclusive_group()
    action = group.add_argument(*flags, **kw)
    same = {k: kw[k] for k in ("type", "nargs", "const", "choices") if k in kw}
    for spelling in old:
        if spelling.startswith("-"):
            add_old_option(group, spelling, flags[0], dest=action.dest, metavar=action.metavar,
                           default=argparse.SUPPRESS, **same)
        else:  # a former positional: optional now, so that the new form needs no placeholder
            group.add_argument(action.dest, nargs="?", action=_OldSpelling, new=flags[0], metavar=spelling,
                               default=argparse.SUPPRESS, help=argparse.SUPPRESS, type=kw.get("type"))
    return action


def add_old_option(p, flag: str, new: str, **kw) -> argparse.Action:
    """An old option kept for one release, hidden from ``--help``, with a deprecation note pointing to
    ``new``; on its own (not through :func:`add_option`) where it keeps its own dest and meaning
    (``compare --iared-checkpoint``: interpreters only, beside the backbone)."""
    return p.add_argument(flag, action=_OldSpelling, new=new, help=argparse.SUPPRESS, **kw)


class _ConfigFile(argparse.Action):
    """``--config FILE``: the file's values become the command's defaults (see :func:`parse_args`)."""

    def __call__(self, parser, namespace, values, option_string=None):
        try:
            defaults = _config_defaults(parser, values)
        except ValueError as e:  # one line naming the file (parser.error would add the usage text)
            parser.exit(2, f"{parser.prog}: error: --config {values}: {e}\n")
        parser.set_defaults(**defaults)
        setattr(namespace, self.dest, values)


def add_config_file_argument(p: argparse.ArgumentParser) -> None:
    """``--config FILE.yaml|.json``: option values by name (``batch_size`` or ``batch-size``); the flags
    given on the command line override them. A run's ``config.json`` (or ``config.yaml``) is read as
    its training options (its ``train`` part when it also records the model)."""
    p.add_argument("--config", metavar="FILE", action=_ConfigFile,
                   help="read option values from a YAML or JSON file (a run's saved config.json / config.yaml "
                        "repeats the run); flags given override them")


def read_config(path: str | Path) -> dict[str, Any]:
    """A config file's mapping (ValueError naming the problem): YAML for ``.yaml`` / ``.yml``, else JSON."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ValueError(e.strerror.lower() if e.strerror else str(e)) from None
    if path.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ValueError("reading YAML needs PyYAML (pip install pyyaml); or give a .json file") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:  # its text is a paragraph with a caret picture; the problem and line say it
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            raise ValueError(f"not valid YAML: {getattr(e, 'problem', None) or type(e).__name__}{where}") from None
    else:
        try:
            data = json.loads(text)
        except ValueError as e:
            raise ValueError(f"not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"expected a mapping of option names to values, found {type(data).__name__}")
    # a trainer's config.json records the model beside the run's options (iared.train.common.write_run_config)
    return data["train"] if isinstance(data.get("train"), dict) else data


def _config_defaults(parser: argparse.ArgumentParser, path) -> dict[str, Any]:
    """``dest -> value`` for ``parser`` from the file at ``path``; unknown keys are refused."""
    # argparse offers no public list of a parser's actions; _actions has been stable across Python releases
    by_name = {}
    for action in parser._actions:
        if action.dest in (argparse.SUPPRESS, "help", "config"):
            continue
        if not isinstance(action, _OldSpelling):
            by_name[action.dest] = action
        for option in action.option_strings:
            by_name.setdefault(option.lstrip("-").replace("-", "_"), action)
    defaults = {}
    for key, value in read_config(path).items():
        action = by_name.get(str(key).replace("-", "_"))
        if action is None:
            raise ValueError(f"unknown key {key!r} (not an option of {parser.prog})")
        if isinstance(value, dict):  # {"depth": 3} is the --model-override depth=3 form
            value = [f"{k}={v!r}" for k, v in value.items()]
        if isinstance(action, _CommaList) and value is not None:
            value = _parse_list(",".join(map(str, value)) if isinstance(value, list) else str(value), action.cast)
        action.required = False  # the file gives it
        defaults[action.dest] = value
    return defaults


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """``parser.parse_args(argv)``; with ``--config FILE``, parsed again once the file has set the
    defaults, so every flag given overrides the file. Prints the deprecation notes of old spellings."""
    args = parser.parse_args(argv)
    if getattr(args, "config", None) is not None:
        args = parser.parse_args(argv)
    for note in getattr(args, _NOTES, ()):
        print(note, file=sys.stderr)
    if hasattr(args, _NOTES):
        delattr(args, _NOTES)
    return args


# -- the shared options ---------------------------------------------------------------------------


def add_checkpoint_argument(p, help: str, *, dest: str = "checkpoint", old: tuple[str, ...] = (),
                            **kw) -> argparse.Action:
    """``--checkpoint FILE``: the model used, a pruned checkpoint or backbone weights (sniffed)."""
    return add_option(p, "--checkpoint", old=old, dest=dest, metavar="FILE", help=help, **kw)


def add_model_arguments(p, checkpoint_help: str, overrides: bool = True, *, dest: str = "checkpoint",
                        old: tuple[str, ...] = (), pretrained_help: str | None = None) -> None:
    """``--checkpoint FILE``, ``--model NAME``, ``--pretrained`` (and ``--model-override K=V``):
    the rules of :mod:`iared.loading`."""
    add_checkpoint_argument(p, checkpoint_help, dest=dest, old=old)
    p.add_argument("--model", metavar="NAME",
                   help="backbone name (see iared.models.list_models; timm's tagged names such as "
                        "deit_small_patch16_224.fb_in1k too); with --checkpoint: how to build the file's "
                        "weights (official DeiT .pth, plain state dicts, safetensors)")
    p.add_argument("--pretrained", action="store_true",
                   help=pretrained_help or "with --model and no --checkpoint: timm's download (network needed), "
                                           "or the shipped weights of an embedded task's backbone")
    if overrides:
        p.add_argument("--model-override", action="append", metavar="KEY=VALUE", default=[],
                       help="change a config field of --model (repeatable)")


def add_task_argument(p, help: str = "embedded task (digits-natural, digits-clutter, moving-digits) or a "
                                     "folder", **kw) -> argparse.Action:
    """``--task TASK``, default None: :func:`resolve_task` reads it off the checkpoint."""
    from iared.data import DEFAULT_TASK

    return p.add_argument("--task", metavar="TASK", default=None,
                          help=f"{help} (default: the task the checkpoint was trained on, else {DEFAULT_TASK})", **kw)


def resolve_task(task: str | None, checkpoint=None, model: str | None = None, overrides: dict | None = None) -> str:
    """``--task`` as given, else the task the checkpoint (or the model name) says
    (:func:`iared.loading.checkpoint_task`), else ``iared.data.DEFAULT_TASK`` when no model is named."""
    from iared.data import DEFAULT_TASK
    from iared.loading import checkpoint_task

    if task is not None:
        return task
    found = checkpoint_task(checkpoint, model, overrides) if checkpoint is not None or model is not None else None
    if found is None and checkpoint is not None:
        raise ValueError(f"no --task given and {checkpoint} records none (nor fits an embedded task's inputs): "
                         "give --task (a task name or a folder)")
    return found or DEFAULT_TASK


def add_out_argument(p, default: str | None = None, help: str = "output folder", **kw) -> argparse.Action:
    """``--out DIR``: where a command writes its files."""
    text = f"{help} (default: {default})" if default is not None else help
    return p.add_argument("--out", metavar="DIR", default=default, help=text, **kw)


def add_allow_untrained(p: argparse.ArgumentParser) -> None:
    """``--allow-untrained``: commands whose output is the interpreters' work (explain, export) refuse a
    backbone without them (:class:`iared.loading.UntrainedError`) unless it is given."""
    p.add_argument("--allow-untrained", action="store_true",
                   help="accept a backbone without interpreters: fresh, untrained ones (random keep decisions)")


def add_json_argument(p, help: str = "write the report as JSON to PATH", *, bare: bool = False,
                      old: tuple[str, ...] = ()) -> argparse.Action:
    """``--json PATH`` (``-``: stdout). ``bare``: ``--json`` alone means stdout, for the commands where
    ``--json`` used to be a flag."""
    extra = dict(nargs="?", const="-") if bare else {}
    return add_option(p, "--json", old=old, metavar="PATH", default=None,
                      help=f"{help} ('-'{' or bare --json' if bare else ''}: stdout, the text report then goes to "
                           "stderr)", **extra)


def check_json_path(path: str | None) -> None:
    """Refuse an unwritable ``--json`` path before the work starts (``-`` is stdout)."""
    from iared.files import check_output_file

    if path and path != "-":
        check_output_file(path, "--json file")


def write_report(result: Any, text: str | None, json_path: str | None) -> None:
    """The text report, and the JSON to ``json_path``: ``-`` prints one JSON line on stdout and the
    text on stderr (so stdout stays machine-readable); a path writes the file atomically."""
    from iared.files import json_safe, write_json

    if json_path == "-":
        print(json.dumps(json_safe(result)))
    elif json_path:
        write_json(json_path, result)
    if text is not None:
        print(text, file=sys.stderr if json_path == "-" else sys.stdout)


def parse_floats(text: str) -> float | list[float]:
    """``"0.5"`` -> 0.5; ``"0.3,0.5,0.5"`` (comma-separated) -> one value per stage (``--threshold``,
    ``--target-kept``)."""
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or comma-separated numbers, got {text!r}") from None
    return values[0] if len(values) == 1 else values


def add_calibration_arguments(p, sample: str) -> None:
    """``--target-kept F[,F...]``, ``--calibration-samples N``, ``--save-calibrated FILE``: a pruned
    model's thresholds calibrated on ``sample`` (the command's own inputs, labels never read;
    :func:`iared.calibration.calibrate_thresholds`) instead of the checkpoint's."""
    from iared.calibration import DEFAULT_SAMPLES, SMALL_SAMPLE

    g = p.add_argument_group("calibration to a kept-token budget (pruned checkpoint)")
    g.add_argument("--target-kept", type=parse_floats, metavar="F[,F...]",
                   help="choose the thresholds on unlabelled inputs so that F (in (0, 1]) of the patch tokens are "
                        "kept after the last stage, each stage keeping the same share of the tokens alive when it "
                        "starts; or one F per stage: the share kept after each stage; instead of --threshold")
    g.add_argument("--calibration-samples", type=int, default=DEFAULT_SAMPLES, metavar="N",
                   help=f"with --target-kept: calibrate on {sample}, the first N (default: {DEFAULT_SAMPLES}; "
                        f"fewer than {SMALL_SAMPLE} is warned about)")
    g.add_argument("--save-calibrated", metavar="FILE",
                   help="with --target-kept: also write a copy of the checkpoint whose stored thresholds are the "
                        "calibrated ones")


def check_calibration_options(args: argparse.Namespace, pruned: bool | None = None, source: str | None = None) -> None:
    """The calibration options' refusals, before any work (:func:`iared.calibration.check_calibration`),
    the other two options without ``--target-kept``, and (``pruned`` False) a model without
    interpreters, named by ``source``."""
    from iared.calibration import DEFAULT_SAMPLES, check_calibration
    from iared.files import check_output_file

    if args.target_kept is None:
        given = [flag for flag, value in (("--save-calibrated", args.save_calibrated),
                                          ("--calibration-samples", args.calibration_samples != DEFAULT_SAMPLES))
                 if value]
        if given:
            raise ValueError(f"{', '.join(given)} apply with --target-kept (the kept fraction to calibrate for)")
        return
    check_calibration(args.target_kept, getattr(args, "threshold", None), args.calibration_samples)
    if pruned is False:
        raise ValueError(f"--target-kept calibrates a pruned model's interpreter thresholds; "
                         f"{source or 'the model given'} has no interpreters (give a pruned checkpoint)")
    if args.save_calibrated:
        check_output_file(args.save_calibrated, "--save-calibrated file")


def finish_calibration(model, source, args: argparse.Namespace, prog: str) -> None:
    """After ``model.calibrate``: one line on stderr with the thresholds, and the calibrated copy of
    ``source`` (the checkpoint file; None: the model alone) when ``--save-calibrated`` asks for it."""
    from iared.pruning import save_calibrated

    s = model.inference
    print(f"{prog}: thresholds {','.join(f'{t:.4g}' for t in s.threshold)} calibrated on {s.calibration_samples} "
          f"unlabelled input(s) for --target-kept {args.target_kept}", file=sys.stderr)
    if args.save_calibrated:
        save_calibrated(model, source, args.save_calibrated)
        print(f"{prog}: wrote {args.save_calibrated}", file=sys.stderr)


class _CommaList(argparse.Action):
    """A comma-separated list (``a,b,c``, ``''`` for none) as a tuple of ``cast`` values; with
    ``legacy_spaces``, the old space-separated form too, with a deprecation note."""

    def __init__(self, option_strings, dest, cast=str, legacy_spaces: bool = False, **kw):
        self.cast = cast
        super().__init__(option_strings, dest, nargs="+" if legacy_spaces else None, **kw)

    def __call__(self, parser, namespace, values, option_string=None):
        items = values if isinstance(values, list) else [values]
        if len(items) > 1:
            _note(namespace, f"{parser.prog}: {option_string} {' '.join(items)} (space-separated) is deprecated, "
                             f"use {option_string} {','.join(items)}")
        try:
            setattr(namespace, self.dest, _parse_list(",".join(items), self.cast))
        except ValueError as e:
            raise argparse.ArgumentError(self, str(e)) from None


def _parse_list(text: str, cast) -> tuple:
    try:
        return tuple(cast(x.strip()) for x in text.split(",") if x.strip())
    except ValueError:
        raise ValueError(f"expected comma-separated {getattr(cast, '__name__', 'value')}s, got {text!r}") from None


def add_list_argument(p, flag: str, cast=str, default: tuple | None = None, help: str = "", *,
                      legacy_spaces: bool = False, metavar: str | None = None, **kw) -> argparse.Action:
    """``--flag a,b,c``: the one list syntax. ``legacy_spaces``: where the option used to take
    space-separated values (``--methods a b``), that form still works for one release."""
    name = metavar or flag.lstrip("-").upper().replace("-", "_").rstrip("S")
    shown = f"; default {','.join(map(str, default)) or 'none'}" if isinstance(default, (tuple, list)) else ""
    # the legacy form's usage reads "N[,N...] [N ...]": a comma list, then (deprecated) more values
    shape = (f"{name}[,{name}...]", name) if legacy_spaces else f"{name}[,{name}...]"
    return p.add_argument(flag, action=_CommaList, cast=cast, legacy_spaces=legacy_spaces, default=default,
                          metavar=shape, help=f"{help} (comma-separated{shown})", **kw)


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    from iared.train.common import parse_overrides as parse

    return parse(items)


def model_options(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of :func:`iared.loading.load_backbone` / ``load_iared`` from the options."""
    return {"checkpoint": args.checkpoint, "model": args.model, "pretrained": args.pretrained,
            "overrides": parse_overrides(getattr(args, "model_override", None))}


def add_config_arguments(p: argparse.ArgumentParser, config_cls, help: dict[str, str], *,
                         lists: dict[str, type] | None = None, keep_unset: bool = False,
                         task_from_checkpoint: bool = False) -> None:
    """One option per field of the dataclass ``config_cls`` (``--batch-size`` for ``batch_size``),
    and ``--config FILE``.

    ``help``: text per field (the default is appended). ``lists``: fields taking several values of
    the given type (comma-separated; the space-separated form of earlier releases still works).
    ``model_overrides`` becomes the repeatable ``--model-override KEY=VALUE`` and
    ``progress`` becomes ``--no-progress``. ``keep_unset``: options left out are absent from the
    namespace (not set to the default), so a resumed run keeps the values it was saved with.
    ``task_from_checkpoint``: ``--task`` defaults to None, for :func:`resolve_task`.
    """
    lists = lists or {}
    hints = typing.get_type_hints(config_cls)
    add_config_file_argument(p)
    for f in dataclasses.fields(config_cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        unset = argparse.SUPPRESS if keep_unset else None
        help_text = f"{help.get(f.name, '')} (default: {default})"
        flag = "--" + f.name.replace("_", "-")
        tp = _optional_inner(hints[f.name])
        if f.name == "model_overrides":
            p.add_argument("--model-override", dest=f.name, action="append", metavar="KEY=VALUE",
                           default=unset or [], help=help_text)
        elif f.name == "progress":
            p.add_argument("--no-progress", dest=f.name, action="store_false",
                           default=unset if keep_unset else True, help="no progress bar")
        elif f.name == "task" and task_from_checkpoint:
            add_task_argument(p, help.get(f.name, ""))
        elif f.name in lists:
            add_list_argument(p, flag, lists[f.name], default=unset if keep_unset else default,
                              help=help.get(f.name, ""), legacy_spaces=True, dest=f.name,
                              metavar={int: "N", float: "X"}.get(lists[f.name], "VALUE"))
        elif tp is bool:
            p.add_argument(flag, dest=f.name, action="store_true", default=unset if keep_unset else default,
                           help=help_text)
        else:
            shared = {"checkpoint": "FILE", "out": "DIR", "model": "NAME", "task": "TASK"}  # the vocabulary's
            metavar = shared.get(f.name, f.name.upper())
            p.add_argument(flag, dest=f.name, type=tp, default=unset if keep_unset else default, help=help_text,
                           metavar=metavar)


def _optional_inner(tp):
    """``int | None`` -> ``int`` (argparse converts to the inner type); other types unchanged."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if args and typing.get_origin(tp) in (typing.Union, types.UnionType) else tp
