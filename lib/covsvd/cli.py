"""``python -m covsvd VERB ...`` (also the ``covsvd`` script).

Verbs:
    figures   execute the notebooks headless and rewrite figures/ (``make figures``)
    capture   capture activation second moments of a model and save them (safetensors)
    ablate    the local CPU ablation sweep, resumable (``make ablations``; options in :mod:`covsvd.ablate`)

Adding a verb: write ``add_<verb>(subparsers)`` that creates its parser and sets ``run=<function(args) -> int>``,
then append it to :data:`VERBS`. Imports of heavy modules (torch, nbclient) go inside the run function so
``--help`` stays instant.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence

# ------------------------------------------------------------------------------------------ figures


def run_figures(args: argparse.Namespace) -> int:
    from .figures import NotebookError
    from .figures import run_figures as run

    try:
        run(only=args.only, quick=args.quick, timeout=args.timeout)
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
    p.add_argument("--timeout", type=float, default=None, metavar="S",
                   help="seconds allowed per notebook (default 600, quick 300)")
    p.set_defaults(run=run_figures)


# ------------------------------------------------------------------------------------------ capture


def run_capture(args: argparse.Namespace) -> int:
    import covsvd

    t0 = time.perf_counter()
    if args.model == "default":
        model, tokenizer = covsvd.load_default_model()
    else:
        model, tokenizer = covsvd.load_model(args.model)
    batches = covsvd.calibration_batches(
        tokenizer, texts=args.texts, split=args.split, seq_len=args.seq_len, max_tokens=args.max_tokens
    )
    n_tokens = covsvd.count_tokens(batches)
    t1 = time.perf_counter()
    moments = covsvd.capture_moments(model, batches, targets=args.targets, kind=args.kind, progress=True)
    t2 = time.perf_counter()
    covsvd.save_moments(args.out, moments, model=model)
    t3 = time.perf_counter()
    print(
        f"captured {len(moments)} modules (kind={args.kind}) over {n_tokens} real tokens "
        f"({args.split} split) -> {args.out}\n"
        f"load {t1 - t0:.1f} s, capture {t2 - t1:.1f} s, save {t3 - t2:.1f} s"
    )
    return 0


def add_capture(sub) -> None:
    p = sub.add_parser(
        "capture",
        help="capture E[x x^T] of every target Linear's input and save it (safetensors)",
        description="Run calibration text through a model with hooks and save each target module's second "
        "moment (sums in fp64, real tokens only). Load it back with covsvd.load_moments(FILE, model).",
    )
    p.add_argument("--model", required=True, metavar="PATH|default",
                   help="a local transformers checkpoint directory, or 'default' (embedded all-MiniLM-L6-v2)")
    p.add_argument("--out", required=True, metavar="FILE", help="output file (e.g. minilm.moments.safetensors)")
    p.add_argument("--kind", choices=("full", "diag"), default="full",
                   help="full (d_in x d_in) or diag (d_in) second moment (default full)")
    p.add_argument("--max-tokens", type=int, default=None, metavar="N",
                   help="stop after N real tokens (default: the whole split)")
    p.add_argument("--texts", default=None, metavar="FILE",
                   help="a UTF-8 text file to calibrate on (default: the embedded pydoc corpus)")
    p.add_argument("--split", choices=("train", "heldout", "all"), default="train",
                   help="which split of the passages (default train)")
    p.add_argument("--seq-len", type=int, default=128, metavar="T", help="tokens per window (default 128)")
    p.add_argument("--targets", default=None, metavar="REGEX",
                   help="capture only modules whose full name matches REGEX (default: every Linear)")
    p.set_defaults(run=run_capture)


# ------------------------------------------------------------------------------------------ ablate


def add_ablate(sub) -> None:
    from .ablate import register_cli  # the verb's parser and run function live beside the sweep

    register_cli(sub)


# --------------------------------------------------------------------------------------------- main

VERBS: list[Callable] = [add_figures, add_capture, add_ablate]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m covsvd", description="covsvd: covariance-oriented SVD initialisation of adapters."
    )
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for add in VERBS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.run(args) or 0)
