"""The lab's verbs of ``python -m covsvd`` (registered through the ``covsvd.cli.main`` entry-point group, so the
core CLI never imports the lab):

    figures   execute the notebooks headless and rewrite figures/ (``make figures``)
    ablate    the local CPU ablation sweep, resumable (``make ablations``; options in :mod:`covsvd.lab.ablate`)
"""

from __future__ import annotations

import argparse
import sys

# ------------------------------------------------------------------------------------------ figures


def run_figures(args: argparse.Namespace) -> int:
    from .figures import NotebookError
    from .figures import run_figures as run

    try:
        run(only=args.only, quick=args.quick, timeout=args.timeout, jobs=args.jobs)
    except NotebookError as e:
        print(f"\ncovsvd figures: FAILED\n{e}", file=sys.stderr)
        return 1
    return 0


def add_figures(sub) -> None:
    p = sub.add_parser(
        "figures",
        help="execute every notebook headless and rewrite figures/ (PNG + SVG + data CSV)",
        description="Execute notebooks/NN_*.ipynb in order in fresh python3 kernels (cwd notebooks/). Full mode "
        "writes the executed notebooks back in place and figures into figures/ (or $COVSVD_FIGURES_DIR); "
        "--quick sets COVSVD_QUICK=1, leaves notebooks/ untouched and writes into a temporary directory.",
    )
    p.add_argument("--quick", action="store_true", help="quick mode: fewer tokens/layers, temporary output")
    p.add_argument("--only", nargs="+", metavar="NN", help="run only these notebooks (prefixes: 03 05_abl ...)")
    p.add_argument("--jobs", type=int, default=1, metavar="N",
                   help="notebooks run at a time, longest first, after the moments they share are captured; "
                   "default 1 (in order)")
    p.add_argument("--timeout", type=float, default=None, metavar="S",
                   help="seconds allowed per notebook (default 600, quick 300)")
    p.set_defaults(run=run_figures)


# ------------------------------------------------------------------------------------------ ablate


def add_ablate(sub) -> None:
    from .ablate import register_cli  # the verb's parser and run function live beside the sweep

    register_cli(sub)


