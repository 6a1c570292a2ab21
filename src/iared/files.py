"""Writing outputs: one atomic-write helper, and the checks every command runs on its output paths.

Every file iared writes (checkpoints, JSON, logs' sidecars, PNGs, ONNX) goes through
:func:`write_atomic`: the bytes go to a temporary file beside the target, are flushed to disk,
get the usual permissions (``0666 & ~umask``, 0644 under the common umask; ``mkstemp`` alone
would leave 0600) and are renamed over the target, so a reader never sees half a file and an
interrupted run keeps the previous version.

Commands call :func:`check_output_file` / :func:`check_output_dir` on every path they will
write *before* they start working, so a bad path fails in one line naming it instead of a
traceback after an hour of training.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

__all__ = [
    "OutputPathError",
    "check_output_dir",
    "check_output_file",
    "json_safe",
    "remove_stale_temporaries",
    "save_figure",
    "write_atomic",
    "write_bytes",
    "write_json",
    "write_text",
]


class OutputPathError(ValueError):
    """An output path that cannot be written; the message is one line naming it."""


def _umask() -> int:
    mask = os.umask(0o022)  # the only portable way to read it is to set it; put it straight back
    os.umask(mask)
    return mask


def write_atomic(path: str | os.PathLike, write: Callable[[IO[bytes]], Any] | Callable[[str], Any],
                 *, to_path: bool = False) -> Path:
    """Write ``path`` atomically. ``write(f)`` fills the open binary file ``f``; with
    ``to_path=True`` it gets the temporary file's name instead (writers that only take a path:
    matplotlib, the ONNX exporter). Parent folders are created. Returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        if to_path:
            os.close(fd)
            write(tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        else:
            with os.fdopen(fd, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files :func:`write_atomic` leaves in ``folder`` when its process is killed
    mid-write (``.NAME.XXXXXXXX.tmp``; a clean exit or an exception removes its own), and say so in one
    line. Runs call it when they start or resume in a folder: nothing else writes temporaries there,
    and without it every ``kill -9`` during a checkpoint write leaves one more file for ever."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stale = sorted(p for p in folder.glob(".*.tmp") if p.is_file() and _TEMPORARY.fullmatch(p.name))
    for p in stale:
        p.unlink(missing_ok=True)
    if stale:
        names = ", ".join(p.name for p in stale[:3]) + (f" ... ({len(stale)} in all)" if len(stale) > 3 else "")
        print(f"iared: removed {len(stale)} stale temporary file(s) of an interrupted write in {folder}: {names}",
              file=sys.stderr)
    return stale


# write_atomic's temporaries: mkstemp's ".{target name}." + 8 random characters + ".tmp"
_TEMPORARY = re.compile(r"\..+\.[A-Za-z0-9_]{8}\.tmp")


def write_folder_atomic(out: str | os.PathLike, fill: Callable[[Path], Any]) -> Path:
    """Write a whole folder at ``out`` in one rename: ``fill(tmp)`` writes into a new temporary folder
    beside ``out``, which then replaces ``out`` (an existing ``out`` is moved aside first and removed
    after, so ``out`` is always either the old folder or the new one). On any failure the temporary
    folder is removed and ``out`` is left as it was. Parent folders are created. Returns ``out``."""
    import shutil

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        fill(tmp)
        os.chmod(tmp, 0o777 & ~_umask())
        old = None
        if out.exists():
            old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".old"))
            os.replace(out, old / out.name)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return write_atomic(path, lambda f: f.write(data))


def write_text(path: str | os.PathLike, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def json_safe(obj: Any) -> Any:
    """``obj`` with every non-finite float replaced by None (JSON has no NaN / Infinity)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> Path:
    """Strict JSON (non-finite floats written as null) plus a final newline."""
    return write_text(path, json.dumps(json_safe(obj), indent=indent, allow_nan=False) + "\n")


def save_figure(fig, path: str | os.PathLike, **savefig_kw) -> Path:
    """A matplotlib figure to ``path`` (format from the suffix, default png)."""
    fmt = Path(path).suffix.lstrip(".").lower() or "png"
    return write_atomic(path, lambda tmp: fig.savefig(tmp, format=fmt, **savefig_kw), to_path=True)


# -- output path checks ---------------------------------------------------------------------------


def _can_create_in(folder: Path) -> bool:
    """Try it: ``os.access`` says yes to root on a read-only folder and knows nothing of
    read-only mounts; an anonymous temporary file is gone again when closed."""
    try:
        with tempfile.TemporaryFile(dir=folder):
            return True
    except OSError:
        return False


def _writable_parent(path: Path, what: str) -> None:
    """The nearest existing ancestor of ``path`` must be a writable folder (we create the rest)."""
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise OutputPathError(f"cannot write {what} {path}: {parent} is a file, not a folder")
            if not _can_create_in(parent):
                raise OutputPathError(f"cannot write {what} {path}: folder {parent} is not writable")
            return
    raise OutputPathError(f"cannot write {what} {path}: no existing parent folder")


def check_output_file(path: str | os.PathLike, what: str = "output file", overwrite: bool = True) -> Path:
    """Refuse, in one line, an output *file* path that is a folder, lies under a file, sits in an
    unwritable folder, or (``overwrite=False``) already exists. Writes nothing."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise OutputPathError(f"cannot write {what} {path}: it is a directory")
    if path.exists() and not overwrite:
        raise OutputPathError(f"cannot write {what} {path}: it already exists")
    _writable_parent(path, what)
    return path


def check_output_dir(path: str | os.PathLike, what: str = "output folder") -> Path:
    """Refuse, in one line, an output *folder* path that is an existing file, lies under a file or
    cannot be created / written. Writes nothing."""
    path = Path(path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise OutputPathError(f"cannot write {what} {path}: it is a file, not a folder")
        if not _can_create_in(path):
            raise OutputPathError(f"cannot write {what} {path}: the folder is not writable")
        return path
    _writable_parent(path, what)
    return path
