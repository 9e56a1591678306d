"""The package as pip sees it: the wheel holds every subpackage and the one version; ``import covsvd`` loads
no optional library; every extra the suite relies on is installed (a missing one fails here, never a skip)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

import covsvd

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
SUBPACKAGES = ["util", "data", "capture", "algebra", "adapt", "export", "cli", "lab"]
# Libraries of the extras (and what they pull in) that the core must not import.
OPTIONAL = ["matplotlib", "seaborn", "polars", "pandas", "scipy", "pyarrow", "IPython", "ipywidgets", "ipykernel",
            "jupyterlab", "jupyter_client", "nbformat", "nbclient", "peft", "bitsandbytes", "covsvd.lab"]


def test_import_covsvd_loads_no_optional_library():
    code = "import json, sys, covsvd; print(json.dumps(sorted(sys.modules)))"
    env = {"PYTHONPATH": str(ROOT / "lib"), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    loaded = json.loads(out.stdout.splitlines()[-1])
    assert "covsvd.adapt" in loaded and "torch" in loaded  # the import did run
    bad = sorted(m for m in loaded if m.split(".")[0] in OPTIONAL or m.startswith("covsvd.lab"))
    assert not bad, f"`import covsvd` loaded optional libraries: {bad}"


def test_every_public_name_resolves():
    """``from covsvd import *`` works: every name of ``__all__`` (and of each stage package's) is defined."""
    import importlib

    for module in ["covsvd", *(f"covsvd.{s}" for s in SUBPACKAGES if s != "lab")]:
        mod = importlib.import_module(module)
        missing = [n for n in getattr(mod, "__all__", []) if not hasattr(mod, n)]
        assert not missing, f"{module}.__all__ names what it does not define: {missing}"


def test_every_extra_the_suite_needs_is_installed():
    extras = PYPROJECT["project"]["optional-dependencies"]
    assert {"lab", "data", "peft", "quant", "test"} <= set(extras)
    reqs = [Requirement(r) for key in ("lab", "data", "peft", "quant", "test") for r in extras[key]]
    names = {r.name for r in reqs if r.marker is None or r.marker.evaluate()}
    missing = []
    for name in sorted(names):
        try:
            metadata.version(name)
        except metadata.PackageNotFoundError:
            missing.append(name)
    assert not missing, f"not installed (run `make venv`, or pip install '.[lab,data,peft,quant,test]'): {missing}"


def test_the_version_has_one_source():
    assert "version" not in PYPROJECT["project"] and "version" in PYPROJECT["project"]["dynamic"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "covsvd.version.__version__"}
    assert re.fullmatch(r"\d+\.\d+\.\d+", covsvd.__version__)


def test_the_wheel_holds_every_module_and_the_version(tmp_path):
    """Build the wheel offline (no isolation, no dependencies) from a copy of the sources, so the build
    leaves nothing in the checkout, and compare it with lib/covsvd."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "lib", src / "lib", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                    "--quiet", "-w", str(tmp_path / "dist"), str(src)], check=True, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("covsvd-*.whl")
    assert wheel.name.startswith(f"covsvd-{covsvd.__version__}-")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        (meta,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        fields = zf.read(meta).decode()
        (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        scripts = zf.read(entry_points).decode()
    for sub in SUBPACKAGES:
        assert f"covsvd/{sub}/__init__.py" in names, sub
    sources = {p.relative_to(ROOT / "lib").as_posix() for p in (ROOT / "lib" / "covsvd").rglob("*.py")}
    assert sources == {n for n in names if n.endswith(".py")}
    assert re.search(rf"^Version: {re.escape(covsvd.__version__)}$", fields, re.M)
    assert {"lab", "data", "peft", "quant", "test"} <= set(re.findall(r"^Provides-Extra: (\S+)$", fields, re.M))
    assert "covsvd = covsvd.cli.main:main" in scripts
