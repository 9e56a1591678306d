"""The package is the pipeline: util -> data -> capture -> algebra -> adapt -> export -> cli, the lab beside.

The import graph is drawn from the source with ``ast`` (every ``import`` / ``from ... import``, module-level and
inside functions, relative ones resolved), so a lazy import inside a function counts like any other."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "lib" / "covsvd"
#: Stage order: a module may import its own stage and lower ones only. The lab sits beside (imports anything,
#: imported by nothing outside it).
RANK = {"util": 0, "version": 0, "data": 1, "capture": 2, "algebra": 3, "adapt": 4, "export": 5, "cli": 6,
        "__init__": 6, "__main__": 6, "lab": 7}
MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 80  # code lines, the docstring not counted


def module_name(path: Path) -> str:
    parts = ("covsvd", *path.relative_to(PACKAGE).with_suffix("").parts)
    return ".".join(parts[:-1]) if parts[-1] == "__init__" else ".".join(parts)


def imports(path: Path, modules: set[str]) -> set[str]:
    """The covsvd modules ``path`` imports (for ``from pkg import name``: the submodule when ``name`` is one)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "covsvd")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "covsvd":
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in modules else target)
    return {m for m in found if m in modules and m != name}


def graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: imports(path, set(files)) for name, path in files.items()}


def stage(module: str) -> str:
    parts = module.split(".")
    return "__init__" if len(parts) == 1 else parts[1]


def test_no_arrow_from_a_lower_stage_to_a_higher_one():
    bad = [f"{a} -> {b}" for a, targets in graph().items() for b in targets
           if RANK[stage(b)] > RANK[stage(a)] or (stage(b) == "lab" and stage(a) != "lab")]
    assert not bad, bad


def test_no_import_cycles():
    g = graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(g[node]):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(g):
        if node not in state:
            visit(node, [node])
    assert not cycles, cycles


def test_the_algebra_knows_no_module_or_hook():
    """Pure tensors: no module of covsvd.algebra imports from torch.nn's module classes or registers hooks."""
    for path in (PACKAGE / "algebra").rglob("*.py"):
        text = path.read_text()
        assert "from torch import nn" not in text and "nn.Module" not in text, path.name
        assert "register_forward" not in text and "register_full_backward" not in text, path.name


def test_core_files_and_functions_stay_small():
    long_files, long_functions = [], []
    for path in PACKAGE.rglob("*.py"):
        if "lab" in path.relative_to(PACKAGE).parts:
            continue
        text = path.read_text()
        if len(text.splitlines()) > MAX_FILE_LINES:
            long_files.append((path.name, len(text.splitlines())))
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                body = node.body
                first = body[0]
                doc = isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(
                    first.value.value, str)
                start = (body[1].lineno if len(body) > 1 else first.end_lineno + 1) if doc else first.lineno
                if node.end_lineno - start + 1 > MAX_FUNCTION_LINES:
                    long_functions.append((path.name, node.name, node.end_lineno - start + 1))
    assert not long_files and not long_functions, (long_files, long_functions)
