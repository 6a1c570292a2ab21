"""The README and docs/: short, linked, current, and every measured figure backed by a file.

- docs/results.md is what ``scripts/results_page.py`` makes of docs/*.json today (not stale);
- README.md is at most 200 lines;
- every relative link in README.md and docs/**/*.md points to an existing file (and, for a link
  into a Markdown file with ``#anchor``, to an existing heading);
- every number with a unit (``2.04x``, ``96.60 %``, ``-0.50 pt``, ``4.74 ms``) in README.md is quoted
  from docs/results.md, the page generated from the JSON, so a README figure with no file behind it
  fails. The one exception is a figure from a paper, on a line that says "the paper reports";
- every ``torch X.Y.Z`` the README names is a version some JSON file records;
- the README's Python snippet runs (with ``pretrained=False``: no download), and its test command
  is exactly the one ``.ci/run`` runs.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
README = ROOT / "README.md"

# A number with a unit: 2.04x, 96.60 %, +0.10 pt, 4.74 ms (minus signs ASCII or typographic).
FIGURE = re.compile(r"(?<![\w.])[+\-−]?(\d+(?:\.\d+)?)(?:(x)(?![\w])|\s?(%|pt|ms)(?![\w]))")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
PAPER = "the paper reports"


def _results_page():
    spec = importlib.util.spec_from_file_location("results_page", ROOT / "scripts" / "results_page.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def figures(text: str) -> list[str]:
    """The figures of ``text`` as number + unit, sign dropped ("0.50 pt" for "−0.50 pt")."""
    out = []
    for m in FIGURE.finditer(text):
        unit = m.group(2) or m.group(3)
        out.append(f"{m.group(1)}{unit}" if unit == "x" else f"{m.group(1)} {unit}")
    return out


def _anchors(md: Path) -> set[str]:
    """GitHub's heading anchors of a Markdown file."""
    out = set()
    for line in md.read_text().splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            out.add("".join(c for c in title if c.isalnum() or c in " -_").replace(" ", "-"))
    return out


def _markdown_files() -> list[Path]:
    return [README] + sorted(DOCS.rglob("*.md"))


def test_results_page_is_current():
    page = _results_page().render(DOCS)
    assert (DOCS / "results.md").read_text() == page, \
        "docs/results.md is stale: run python scripts/results_page.py"


def test_results_page_names_each_source_and_machine():
    page = (DOCS / "results.md").read_text()
    for path in DOCS.glob("*.json"):
        assert f"({path.name})" in page, f"docs/results.md does not link {path.name}"
    sources = [line for line in page.splitlines() if line.startswith("Source: ")]
    assert sources and all("Machine: " in line for line in sources)


def test_readme_is_short():
    lines = README.read_text().count("\n")
    assert lines <= 200, f"README.md has {lines} lines (at most 200; the rest belongs in docs/)"


@pytest.mark.parametrize("md", _markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(md):
    broken = []
    for target in LINK.findall(md.read_text()):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (md.parent / path).resolve() if path else md
        if not dest.exists():
            broken.append(target)
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(f"{target} (no such heading)")
    assert not broken, f"{md.relative_to(ROOT)}: broken links {broken}"


def test_readme_figures_come_from_the_results_page():
    quoted = set(figures((DOCS / "results.md").read_text()))
    missing = []
    for n, line in enumerate(README.read_text().splitlines(), 1):
        if PAPER in line:
            continue
        missing += [f"line {n}: {f}" for f in figures(line) if f not in quoted]
    assert not missing, ("README figures not in docs/results.md (quote them from the page, or add the "
                         f"JSON that measured them and regenerate it): {missing}")


def test_readme_torch_versions_are_recorded():
    recorded = set()
    for path in DOCS.glob("*.json"):
        recorded |= set(re.findall(r'"torch": "(\d+\.\d+\.\d+)', path.read_text()))
    named = set(re.findall(r"torch (\d+\.\d+\.\d+)", README.read_text()))
    assert named <= recorded, f"torch versions in README.md that no JSON records: {named - recorded}"


def test_figure_pattern():
    assert figures("2.04x, −0.50 pt, 96.60 %, 4.74 ms, 8 x 224, 3x3 convs, up to 2x.") == \
        ["2.04x", "0.50 pt", "96.60 %", "4.74 ms", "2x"]


def test_readme_test_command_is_ci():
    ci = (ROOT / ".ci" / "run").read_text()
    command = 'python -m pip install -q -e ".[test]" && python -m pytest'
    assert command in ci and command in README.read_text()


def test_readme_python_snippet_runs():
    pytest.importorskip("timm")
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert blocks, "README.md has no Python snippet"
    code = blocks[0].replace("pretrained=True", "pretrained=False")  # offline: random weights
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)  # noqa: S102 - our own README
    out = scope["out"]
    assert out.logits.shape[0] == 8 and len(out.keep) == 3


def test_every_json_in_docs_parses():
    for path in DOCS.glob("*.json"):
        json.loads(path.read_text())


def shown_commands(md: Path) -> list[str]:
    """The ``iared ...`` command lines of a Markdown file's bash blocks (comments and line
    continuations handled; ``torchrun ... -m iared`` counts)."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", md.read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            for part in line.split("&&"):
                part = re.sub(r"\s#.*$", "", part).strip()
                m = re.search(r"(?:^|\s-m\s)iared(\s.*)?$", part) if "iared" in part else None
                if m and (part.startswith("iared") or " -m iared" in part):
                    out.append("iared" + (m.group(1) or ""))
    return out


_SHOWN = [(md, cmd) for md in _markdown_files() for cmd in shown_commands(md)]


@pytest.mark.parametrize("md,command", _SHOWN, ids=[f"{md.name}: {c[:60]}" for md, c in _SHOWN])
def test_shown_commands_parse(md, command, capsys):
    """Every command the README and docs show is one the CLI accepts (parsed, not run)."""
    import shlex

    from iared.cli import build_parser

    argv = shlex.split(command)[1:]
    if argv in (["--version"], ["--help"]):
        return
    try:
        build_parser().parse_args(argv)
    except SystemExit as e:
        err = capsys.readouterr().err.strip().splitlines()
        pytest.fail(f"{md.relative_to(ROOT)}: `{command}` is refused by the CLI: {err[-1] if err else e}")
