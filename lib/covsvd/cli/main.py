"""``python -m covsvd VERB ...`` (also the ``covsvd`` script).

Core verbs:
    capture   capture activation second moments of a model and save them (safetensors)
    init      orient adapters from moments (a file, or captured here) and write them: a peft LoRA adapter
              beside a residual base model (``--format peft``), or a covsvd adapters file (``--format covsvd``)

Both load a local transformers checkpoint (or ``default``, the embedded all-MiniLM-L6-v2) on ``--device`` in
``--dtype``, read calibration text from ``--data`` (.txt, .jsonl / .parquet with a text field,
:mod:`covsvd.data.textfiles`; default: the embedded pydoc corpus), print :func:`covsvd.estimate_memory` and refuse
(exit 1, naming the fix) when the accumulators would not fit the device's free memory.

Under ``torchrun --nproc-per-node N`` (``WORLD_SIZE`` / ``RANK`` / ``LOCAL_RANK`` set) every process builds the
same batches and takes every N-th one, the process group is initialised (gloo on CPU, NCCL on CUDA, each
process on ``cuda:LOCAL_RANK``; :mod:`covsvd.cli.launch`), the moments are summed across processes
(``capture_moments(..., all_reduce=True)``) and rank 0 alone writes, atomically.

Bad input exits with one line on stderr, before the model is loaded (:mod:`covsvd.cli.checks`): a malformed
option value exits 2 (argparse), any other refusal 1 (``--targets`` that is not a valid regex, a missing input
file, an output that exists without ``--overwrite`` or that cannot be written, a device that is not there, and
every ``ValueError`` / ``TypeError`` / ``OSError`` of the library). Every output is written atomically
(:mod:`covsvd.util.files`), so an error leaves no partial file.

Verbs of installed extensions are found through the ``covsvd.cli.main`` entry-point group: each entry point names a
function ``add(subparsers)`` that creates its parser and sets ``run=<function(args) -> int>``. The lab registers
``figures`` and ``ablate`` this way (pyproject.toml), so this module never imports it.

Adding a core verb: write ``add_<verb>(subparsers)`` and append it to :data:`VERBS`. Imports of heavy modules go
inside the run function so ``--help`` stays instant.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections.abc import Callable, Sequence
from importlib.metadata import entry_points
from pathlib import Path

from ..algebra.validate import ONE_SIDED_METRICS
from .checks import CLIError, check_input, check_output, positive_int, target_spec
from .inputs import DTYPES, MODEL_CLASSES, check_data, load, make_batches, token_mask
from .launch import Launch, free_memory, rank0

ENTRY_POINTS = "covsvd.cli.main"
#: Exceptions that are the user's input, not a bug: one line on stderr and exit status 1.
USER_ERRORS = (CLIError, ValueError, TypeError, OSError, ImportError, re.error)


def say(*args) -> None:
    """Print from rank 0 only (every process of a torchrun launch runs the same code)."""
    if rank0():
        print(*args, flush=True)


# ---------------------------------------------------------------------------------------- memory


def check_memory(model, launch: Launch, targets, kind: str, accumulate: str, layerwise: bool, streams: bool,
                 diag_flag: str) -> None:
    """Print :func:`covsvd.estimate_memory` beside the free memory; raise :class:`CLIError` naming the fixes when
    what the run holds at once does not fit.

    On the device: every accumulator, or the layerwise peak (one block's) with ``layerwise``. Unless the run
    ``streams`` (a streaming init frees each block's moments), the finished moments of every target also end up
    together on the host (layerwise capture offloads them there, and the file is written from there). The
    processes of a torchrun launch on one machine (``LOCAL_WORLD_SIZE``) share its RAM.
    """
    import os

    import torch

    from covsvd.capture.memory import estimate_memory
    from covsvd.capture.memory import format_bytes as size

    est = estimate_memory(model, targets, kind, layerwise, accumulate=accumulate)
    device, cpu, local = launch.device, torch.device("cpu"), int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    needs = {device: est.peak_bytes * (local if device == cpu else 1)}
    if not streams:
        host = est.total_bytes * (local if device == cpu or layerwise else 1)
        needs[cpu] = max(needs.get(cpu, 0), host)
    free = {d: free_memory(d) for d in needs}
    say(f"memory estimate (kind {kind}, fp64 sums): every accumulator {size(est.total_bytes)}, layerwise peak "
        f"{size(est.layerwise_peak_bytes)}; this run holds " + ", ".join(
            f"{size(n)} on {d} ({'free ' + size(free[d]) if free[d] is not None else 'free memory unknown: not checked'})"
            for d, n in needs.items()))
    over = [f"{size(n)} on {d} ({size(free[d])} free)" for d, n in needs.items() if free[d] is not None and n > free[d]]
    if over:
        fixes = ["--layerwise (one block's accumulators on the GPU at a time)"] if (
            device.type == "cuda" and not layerwise) else []
        if not streams:
            fixes.append("`covsvd init --layerwise --format covsvd` (streams: one block's moments at a time)")
        if kind == "full":
            fixes.append(f"{diag_flag} (O(d_in) per layer)")
        fixes.append("fewer targets (--targets NAME ... or REGEX)")
        raise CLIError(f"the accumulators need {' and '.join(over)}: use " + ", or ".join(fixes))


# ------------------------------------------------------------------------------------------ capture


def run_capture(args: argparse.Namespace) -> int:
    """Check the input (``--targets``, ``--data``, ``--device``, ``--out``) before anything runs; load, build the
    batches (this process's shard), check memory, capture, and (rank 0) save the moments."""
    import covsvd

    targets = target_spec(args.targets)
    check_data(args)
    launch = Launch(args.device)
    out = check_output(args.out, "--out", overwrite=args.overwrite)
    t0 = time.perf_counter()
    with launch:
        model, tokenizer = load(args, launch.device)
        batches = make_batches(args, tokenizer)
        n_tokens = covsvd.count_tokens(batches)
        mine = launch.shard(batches)
        check_memory(model, launch, targets, args.kind, args.accumulate, args.layerwise, streams=False,
                     diag_flag="--kind diag")
        t1 = time.perf_counter()
        moments = covsvd.capture_moments(
            model, mine, targets=targets, kind=args.kind, progress=args.progress and launch.rank == 0,
            accumulate=args.accumulate, all_reduce=launch.world > 1, layerwise=args.layerwise,
            token_mask=token_mask(args))
        t2 = time.perf_counter()
        if launch.rank == 0:
            covsvd.save_moments(moments, out, model=model, overwrite=args.overwrite)
        counted = max(m.count for m in moments.values())
    say(f"captured {len(moments)} modules (kind={args.kind}, {'layerwise' if args.layerwise else 'all at once'}) "
        f"over {counted} counted tokens ({n_tokens} real) on {launch.device} in {launch.world} process(es) "
        f"-> {out}\nload {t1 - t0:.1f} s, capture {t2 - t1:.1f} s, save {time.perf_counter() - t2:.1f} s")
    return 0


# --------------------------------------------------------------------------------------------- init


def check_init(args: argparse.Namespace, launch: Launch, kind: str | None) -> bool:
    """Every check of ``covsvd init``'s input that needs no model (:class:`CLIError`); returns whether the init
    streams (``--layerwise --format covsvd``, moments captured here, one process)."""
    if args.moments and args.data:
        raise CLIError("give --moments FILE or --data FILE, not both")
    if args.moments and launch.world > 1:
        raise CLIError("--moments needs no capture: run init in one process (without torchrun)")
    check_input(args.moments, "--moments")
    check_data(args)
    stream = (args.layerwise and args.format == "covsvd" and kind is not None and not args.moments
              and launch.world == 1)
    if args.moments_dir is not None and not stream:
        raise CLIError("--moments-dir keeps the blocks of a streaming init: add --layerwise --format covsvd (one "
                       "process, no --moments, a metric other than identity), or leave --moments-dir out")
    check_output(args.out, "--out", directory=args.format == "peft", overwrite=args.overwrite)
    if args.moments_dir is not None:
        check_output(args.moments_dir, "--moments-dir", directory=True, reuse=True)
    return stream


def run_init(args: argparse.Namespace) -> int:
    """Check the input (:func:`check_init`: an existing ``--out`` is refused unless ``--overwrite``) before
    anything runs; load; take the moments from ``--moments`` or capture them (streaming through
    ``init_adapters`` with ``--layerwise --format covsvd`` in one process); then rank 0 writes ``--format peft``
    (``export_peft``) or ``covsvd`` (attach + save)."""
    import covsvd
    from covsvd.adapt.init import init_adapters
    from covsvd.adapt.plan import capture_kind
    from covsvd.export.peft import export_peft

    kind = None if args.metric == "identity" else capture_kind(args.metric)  # identity reads no moments
    targets = target_spec(args.targets)
    launch = Launch(args.device)
    stream = check_init(args, launch, kind)
    out = Path(args.out)
    orient_kw = {k: v for k, v in (("eps", args.eps), ("eps_mode", args.eps_mode)) if v is not None}
    t0 = time.perf_counter()
    with launch:
        model, tokenizer = load(args, launch.device)
        moments, report = None, None
        if args.moments:
            moments = covsvd.load_moments(args.moments, model)
        elif kind is not None:
            batches = make_batches(args, tokenizer)
            check_memory(model, launch, targets, kind, args.accumulate, args.layerwise, stream,
                         diag_flag="--metric diag")
            if stream:  # capture a block, orient, attach, free its moments
                capture = dict(kind=kind, token_mask=token_mask(args), accumulate=args.accumulate, layerwise=True)
                report = init_adapters(model, batches, args.r, args.metric, targets=targets, capture=capture,
                                       moments_dir=args.moments_dir, progress=args.progress, **orient_kw)
            else:
                moments = covsvd.capture_moments(
                    model, launch.shard(batches), targets=targets, kind=kind,
                    progress=args.progress and launch.rank == 0, accumulate=args.accumulate,
                    all_reduce=launch.world > 1, layerwise=args.layerwise, token_mask=token_mask(args))
        t1 = time.perf_counter()
        if launch.rank != 0:
            return 0
        if args.format == "peft":  # targets None: every layer of the moments (every default target for identity)
            export_peft(model, moments, out, args.r, args.metric, targets=targets, tokenizer=tokenizer,
                        overwrite=args.overwrite, progress=args.progress, **orient_kw)
        else:
            if report is None:
                report = covsvd.attach_adapters(model, moments, args.r, args.metric, targets=targets,
                                                progress=args.progress, **orient_kw)
            covsvd.save_adapters(model, out, overwrite=args.overwrite)
    say(f"{report if report is not None else f'{args.metric} r={args.r}'} -> {out} ({args.format})\n"
        f"load + capture {t1 - t0:.1f} s, orient + write {time.perf_counter() - t1:.1f} s")
    return 0


# --------------------------------------------------------------------------------------------- parsers


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, metavar="PATH|default",
                   help="a local transformers checkpoint directory, or 'default' (embedded all-MiniLM-L6-v2)")
    p.add_argument("--model-class", choices=MODEL_CLASSES, default="auto",
                   help="auto (default): AutoModelForCausalLM when config.json names a causal-LM "
                   "architecture, else AutoModel; causal-lm / base force one")
    p.add_argument("--device", default="cpu", metavar="cpu|cuda|cuda:N|auto",
                   help="where the model and the accumulators live (default cpu; under torchrun, cuda = "
                   "cuda:LOCAL_RANK)")
    p.add_argument("--dtype", choices=DTYPES, default="float32",
                   help="model parameter dtype (default float32); inputs are cast to the accumulation dtype "
                   "before every product")


def add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default=None, metavar="FILE",
                   help="calibration text: .txt (one document), .jsonl or .parquet (a text field per record); "
                   "default: the embedded pydoc corpus")
    p.add_argument("--text-field", default="text", metavar="NAME", help="the text field of .jsonl/.parquet "
                   "records (default text)")
    p.add_argument("--prompt-field", default=None, metavar="NAME",
                   help="instruction data: each record is prompt + text, and only the text's tokens count "
                   "(labels -100 on the prompt)")
    p.add_argument("--token-mask", choices=("all", "labels"), default=None,
                   help="which real tokens count: all, or labels (labels != -100; the default with "
                   "--prompt-field). Padding never counts")
    p.add_argument("--split", choices=("train", "heldout", "all"), default=None,
                   help="passages to use (default: train for the embedded corpus, all for --data)")
    p.add_argument("--batch-size", type=positive_int, default=16, metavar="B",
                   help="sequences per batch (default 16)")
    p.add_argument("--seq-len", type=positive_int, default=128, metavar="T", help="tokens per window (default 128)")
    p.add_argument("--max-tokens", type=positive_int, default=None, metavar="N",
                   help="stop after N real tokens (default: all the data)")


def add_capture_args(p: argparse.ArgumentParser, kind: bool) -> None:
    if kind:
        p.add_argument("--kind", choices=("full", "diag"), default="full",
                       help="full (d_in x d_in) or diag (d_in) second moment (default full)")
    p.add_argument("--targets", nargs="+", default=None, metavar="NAME|REGEX",
                   help="which Linear/Conv1D modules, as peft's target_modules: module names (--targets q_proj "
                   "v_proj: every module whose full name is one of them or ends with '.NAME'), or one regular "
                   "expression matched against the whole name (--targets '.*mlp\\..*'). A single value of "
                   "letters, digits, '_' and '.' only is a name, so --targets q_proj selects every *.q_proj. "
                   "Default: every Linear/Conv1D but the output head and modules tied to an embedding")
    p.add_argument("--layerwise", action="store_true",
                   help="run the data through one transformer block at a time: one block's accumulators "
                   "alive at once")
    p.add_argument("--accumulate", choices=("float64", "float32"), default="float64",
                   help="dtype of each batch's Gram product, added into fp64 sums (default float64)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")


def add_capture(sub) -> None:
    p = sub.add_parser(
        "capture",
        help="capture E[x x^T] of every target Linear's input and save it (safetensors)",
        description="Run calibration text through a model with hooks and save each target module's second "
        "moment (sums in fp64, real tokens only). Load it back with covsvd.load_moments(FILE, model). Under "
        "torchrun each process captures its shard and rank 0 writes the summed moments.",
    )
    add_model_args(p)
    p.add_argument("--out", required=True, metavar="FILE", help="output file (e.g. model.moments.safetensors)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    add_data_args(p)
    add_capture_args(p, kind=True)
    p.set_defaults(run=run_capture)


def add_init(sub) -> None:
    p = sub.add_parser(
        "init",
        help="orient adapters from moments and write them (peft LoRA + residual base, or covsvd adapters)",
        description="Orient every target at rank r by a metric, from a moments file (--moments) or from "
        "moments captured here (--data, or the embedded corpus), and write --format peft (a directory: "
        "base/ = the model with W_res, adapter/ = a peft LoRA adapter) or --format covsvd (one safetensors "
        "file of bounded-gain adapters, covsvd.load_adapters). With --layerwise and --format covsvd the "
        "init streams: capture a block, orient it, attach, free its moments.",
    )
    add_model_args(p)
    p.add_argument("--moments", default=None, metavar="FILE", help="a moments file from `covsvd capture`")
    add_data_args(p)
    add_capture_args(p, kind=False)
    p.add_argument("--r", type=positive_int, required=True, metavar="INT", help="rank kept per layer")
    p.add_argument("--metric", choices=ONE_SIDED_METRICS, default="full",
                   help="orientation metric (default full; identity is plain SVD and reads no data)")
    p.add_argument("--eps", type=float, default=None, help="damping (default: covsvd.orient's)")
    p.add_argument("--eps-mode", choices=("absolute", "relative"), default=None,
                   help="eps absolute, or relative to mean(diag C) (default: covsvd.orient's)")
    p.add_argument("--format", choices=("peft", "covsvd"), default="peft",
                   help="peft: a directory (base/ + adapter/); covsvd: an adapters file (default peft)")
    p.add_argument("--out", required=True, metavar="PATH", help="output directory (peft) or file (covsvd)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--moments-dir", default=None, metavar="DIR",
                   help="streaming init (--layerwise --format covsvd): keep each finished block's moments here, "
                   "so a rerun resumes")
    p.set_defaults(run=run_init)


# --------------------------------------------------------------------------------------------- main

VERBS: list[Callable] = [add_capture, add_init]


def extension_verbs() -> list[Callable]:
    """The ``add(subparsers)`` functions registered under the ``covsvd.cli.main`` entry-point group, by name."""
    return [ep.load() for ep in sorted(entry_points(group=ENTRY_POINTS), key=lambda ep: ep.name)]


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line on stderr naming ``--help`` (exit status 2); the usage
    stays in ``--help``. Subparsers are made of this class too."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="python -m covsvd", description="covsvd: covariance-oriented SVD initialisation of adapters."
    )
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for add in VERBS + extension_verbs():
        add(sub)
    return parser


def one_line(error: BaseException) -> str:
    """``str(error)`` on one line (a multi-line message's lines joined by ``"; "``); the type's name when empty."""
    return "; ".join(line.strip() for line in str(error).splitlines() if line.strip()) or type(error).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Run one verb; returns its exit status. User errors (:data:`USER_ERRORS`: bad input, refusals, the
    library's ``ValueError`` / ``TypeError`` / ``OSError``) print one line on stderr and return 1; a malformed
    option value is argparse's error: one line, ``SystemExit(2)``."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except USER_ERRORS as e:
        print(f"covsvd {args.verb}: error: {one_line(e)}", file=sys.stderr)
        return 1
