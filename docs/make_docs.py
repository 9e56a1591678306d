"""Write docs/layout.md and docs/api.md from the sources, so neither can drift from the code.

    python docs/make_docs.py          # rewrite both
    python docs/make_docs.py --check  # exit 1 when either is stale (tests/test_docs.py runs the same check)

layout.md: every folder of the repository with its file and line counts, and every Python module of the
library, the tests and bench with the first sentence of its docstring. api.md: every name of
``covsvd.__all__`` and of each stage subpackage's ``__all__``, with its signature and the first sentence of
its docstring (the one-line contract).
"""

from __future__ import annotations

import ast
import importlib
import inspect
import json
import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["util", "data", "capture", "algebra", "adapt", "export", "cli"]
# What each folder holds (one line each; a folder missing here makes the generator fail).
FOLDERS = {
    ".": "README, Makefile (`make test`, `make figures`, ...), pyproject.toml (dependencies, extras, tools)",
    "lib/covsvd": "the library: the public API (`__init__.py`), the version, `python -m covsvd`",
    "lib/covsvd/util": "stage 0: argument checks, digests, atomic file writes",
    "lib/covsvd/data": "stage 1: text -> token batches, model loading, which modules are targets",
    "lib/covsvd/capture": "stage 2: activation second moments (hooks, rows, Gram sums, layerwise, files, cache)",
    "lib/covsvd/algebra": "stage 3: pure tensors (damping, SVDs, orient, measures, rotations, budgets)",
    "lib/covsvd/adapt": "stage 4: the bounded-gain layer on a model (attach, init, allocate, files, sufficiency)",
    "lib/covsvd/export": "stage 5: peft LoRA export, trained adapters as a LoRA delta",
    "lib/covsvd/cli": "stage 6: the `covsvd capture` and `covsvd init` commands (the lab adds `figures`, `ablate`)",
    "lib/covsvd/lab": "the research lab beside the pipeline (notebook helpers, sweeps, plots, the explorer)",
    "tests": "the suite; its folders mirror the library's",
    "notebooks": "the JupyterLab notebooks `make figures` re-executes",
    "figures": "every figure as PNG and SVG (written by the notebooks)",
    "figures/data": "the tidy data behind each figure (CSV)",
    "data/published": "published results, each row with its source",
    "data/ablations": "the local ablation sweep's rows",
    "bench": "speed and memory measurements (`make bench`, `make bench-llm`)",
    "bench/results": "what the bench scripts measured",
    "docs": "the algebra contract, performance, layout, API reference, notes",
}
CODE_SUFFIXES = {".py", ".md", ".toml", ""}  # code and prose (Makefile has no suffix); not data or notebooks
SKIP_PARTS = {"__pycache__", "cache", "build", "dist"}


def folders_with_files() -> set[str]:
    """Every folder (relative, posix) that holds a file, hidden folders, caches and build outputs left out."""
    found = set()
    for parent, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in SKIP_PARTS and not d.endswith(".egg-info")]
        if any(not f.startswith(".") for f in files):
            found.add(Path(parent).relative_to(ROOT).as_posix())
    return found


def first_sentence(doc: str | None) -> str:
    """The docstring's first sentence (up to the first '. ' or the first blank line), on one line."""
    if not doc:
        return ""
    para = inspect.cleandoc(doc).split("\n\n", 1)[0].replace("\n", " ")
    para = re.sub(r":\w+:`~?(?:[\w.]+\.)?([^`]+)`", r"`\1`", para).replace("``", "`")  # reST roles -> Markdown
    m = re.match(r"(.+?\.)(\s|$)", para)
    return (m.group(1) if m else para).rstrip(".").strip()


def module_doc(path: Path) -> str:
    return first_sentence(ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))))


def describe(path: Path) -> str:
    """A module's docstring's first sentence, or a Markdown page's title."""
    if path.suffix == ".py":
        return module_doc(path)
    text = PENDING[path] if path in PENDING else path.read_text(encoding="utf-8")
    return next((line.lstrip("# ").strip() for line in text.splitlines() if line.startswith("# ")), "")


def notebook_title(path: Path) -> str:
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    for cell in cells:
        if cell["cell_type"] == "markdown":
            for line in "".join(cell["source"]).splitlines():
                if line.strip():
                    return line.lstrip("# ").strip()
    return ""


PENDING: dict[Path, str] = {}  # pages being generated: counted as they will be written


def lines(path: Path) -> int:
    text = PENDING[path] if path in PENDING else path.read_text(encoding="utf-8")
    return len(text.splitlines())


def files_of(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def layout() -> str:
    """The text of docs/layout.md."""
    out = ["# Layout", "",
           "Generated by `python docs/make_docs.py` (`make docs`; tests/test_docs.py fails when it is stale).",
           "Lines count the folder's code and prose (`.py`, `.md`, `.toml`, Makefile), not its data, notebooks",
           "or images. The library's stages import only the stages before them (util -> data -> capture ->",
           "algebra -> adapt -> export -> cli); the lab imports the library, never the reverse.", "",
           "| folder | files | lines | what it holds |", "|---|---:|---:|---|"]
    found = folders_with_files()
    tests = sorted(f for f in found if f.startswith("tests/"))
    unknown = sorted(f for f in found if f not in FOLDERS and f not in tests)
    if unknown:
        raise SystemExit(f"docs/make_docs.py: describe these folders in FOLDERS: {unknown}")
    folders = [f for f in FOLDERS if f in found] + tests
    for folder in folders:
        fs = files_of(ROOT / folder)
        text = [f for f in fs if f.suffix in CODE_SUFFIXES]
        count = f"{sum(lines(f) for f in text):,}" if text else "–"
        what = FOLDERS.get(folder) or (f"tests of `covsvd.{folder.split('/')[1]}`"
                                       if folder.split("/")[1] in (*STAGES, "lab") else "tests")
        out.append(f"| `{folder}/` | {len(fs)} | {count} | {what} |")
    for folder in [f for f in folders if f.startswith(("lib/", "tests", "bench", "docs"))]:
        described = [f for f in files_of(ROOT / folder) if f.suffix in {".py", ".md"}]
        if not described:
            continue
        out += ["", f"## `{folder}/`", "", "| file | lines | what it is |", "|---|---:|---|"]
        rows = [(f, describe(f)) for f in described]
        bare = [f.relative_to(ROOT).as_posix() for f, what in rows if not what and f.name != "__init__.py"]
        if bare:
            raise SystemExit(f"docs/make_docs.py: give these files a docstring (or a # title): {bare}")
        out += [f"| `{f.name}` | {lines(f)} | {what} |" for f, what in rows]
    nbs = sorted((ROOT / "notebooks").glob("*.ipynb"))
    out += ["", "## `notebooks/`", "", "| notebook | what it shows |", "|---|---|"]
    out += [f"| `{nb.name}` | {notebook_title(nb)} |" for nb in nbs]
    return "\n".join(out) + "\n"


def signature(obj) -> str:
    """The call signature without annotations (the docstring states types and shapes)."""
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return ""
    empty = inspect.Parameter.empty
    sig = sig.replace(parameters=[p.replace(annotation=empty) for p in sig.parameters.values()],
                      return_annotation=inspect.Signature.empty)
    return re.sub(r"<factory>", "...", str(sig).replace("torch.", ""))


def api_row(module: str, name: str) -> str:
    obj = getattr(importlib.import_module(module), name)
    if inspect.isclass(obj):
        head, doc = f"class `{name}{signature(obj)}`", first_sentence(obj.__doc__)
    elif callable(obj):
        head, doc = f"`{name}{signature(obj)}`", first_sentence(obj.__doc__)
    else:
        head, doc = f"`{name} = {obj!r}`", ""
    return f"- {head}: {doc}" if doc else f"- {head}"


def api() -> str:
    """The text of docs/api.md."""
    import covsvd

    out = ["# API reference", "",
           "Generated by `python docs/make_docs.py` from the docstrings (tests/test_docs.py fails when it is",
           "stale). Each line is a name, its signature and the first sentence of its docstring; the docstring",
           "itself (`help(covsvd.<name>)`) states the shapes, dtypes and what raises. The algebra every docstring",
           "refers to is docs/algebra.md.", "",
           f"## `covsvd` ({len(covsvd.__all__)} names)", ""]
    out += [api_row("covsvd", n) for n in sorted(covsvd.__all__, key=str.lower)]
    for stage in STAGES:
        mod = importlib.import_module(f"covsvd.{stage}")
        extra = [n for n in getattr(mod, "__all__", []) if n not in covsvd.__all__]
        if extra:
            out += ["", f"## `covsvd.{stage}`", "", first_sentence(mod.__doc__), ""]
            out += [api_row(f"covsvd.{stage}", n) for n in sorted(extra, key=str.lower)]
    return "\n".join(out) + "\n"


def outputs() -> dict[Path, str]:
    """The generated pages; layout.md counts the lines of both as written (its own count is a fixed point)."""
    layout_md, api_md = ROOT / "docs" / "layout.md", ROOT / "docs" / "api.md"
    PENDING.clear()
    PENDING[api_md] = api()
    PENDING[layout_md] = layout()
    PENDING[layout_md] = layout()  # its own line count does not depend on the counts in it
    out = dict(PENDING)
    PENDING.clear()
    return {layout_md: out[layout_md], api_md: out[api_md]}


def main(argv: list[str]) -> int:
    stale = [p for p, text in outputs().items() if not p.is_file() or p.read_text(encoding="utf-8") != text]
    if "--check" in argv:
        for p in stale:
            print(f"{p.relative_to(ROOT)} is stale: run python docs/make_docs.py", file=sys.stderr)
        return 1 if stale else 0
    for p, text in outputs().items():
        p.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "lib"))
    raise SystemExit(main(sys.argv[1:]))
