"""``python -m covsvd VERB ...`` (also the ``covsvd`` script).

Core verbs:
    capture   capture activation second moments of a model and save them (safetensors)

Verbs of installed extensions are found through the ``covsvd.cli`` entry-point group: each entry point names a
function ``add(subparsers)`` that creates its parser and sets ``run=<function(args) -> int>``. The lab registers
``figures`` and ``ablate`` this way (pyproject.toml), so this module never imports it.

Adding a core verb: write ``add_<verb>(subparsers)`` and append it to :data:`VERBS`. Imports of heavy modules go
inside the run function so ``--help`` stays instant.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from importlib.metadata import entry_points

ENTRY_POINTS = "covsvd.cli"


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


# --------------------------------------------------------------------------------------------- main

VERBS: list[Callable] = [add_capture]


def extension_verbs() -> list[Callable]:
    """The ``add(subparsers)`` functions registered under the ``covsvd.cli`` entry-point group, by name."""
    return [ep.load() for ep in sorted(entry_points(group=ENTRY_POINTS), key=lambda ep: ep.name)]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m covsvd", description="covsvd: covariance-oriented SVD initialisation of adapters."
    )
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for add in VERBS + extension_verbs():
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.run(args) or 0)
