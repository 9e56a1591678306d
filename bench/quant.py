"""Benchmark covsvd.algebra.loftq.quantize_residual against peft's LoftQ loop, in one run. Not a test.

    .venv/bin/python bench/quant.py            # writes bench/results/quant.md
    .venv/bin/python bench/quant.py --quick    # small shapes, a smoke run (does not write the results file)

Sections
  A. A 7B down_proj shape, W 4096 x 11008 (fp32), r = 64, identity metric, nf4 (blocksize 64, no double
     quantization): quantize_residual with iters 0 and 5 (randomized SVD: an exact fp64 SVD of this shape is
     measured once, below) beside peft's own ``loftq_init`` (its compute device pointed at the CPU; fp32,
     exact ``torch.linalg.svd`` of the full residual every iteration) with ``num_iter=1``: one peft iteration
     costs one full fp32 SVD of the 4096 x 11008 residual, so ``num_iter=5`` is five of them (not run here:
     read the one-iteration time times five). Each route is measured once.
  B. A smaller shape (1024 x 2752, r = 16) where everything runs: peft ``loftq_init(num_iter=5)`` beside
     ``quantize_residual(start="zero", iters=5, keep="last")`` (the same iterates, exact fp64 SVD and with
     the randomized SVD), with their final Frobenius errors.

W = G / sqrt(d_in) + A B (G Gaussian; A (d_out, 128), B (128, d_in) Gaussian, scaled so that the low-rank part
holds about half the energy): a flat bulk plus a spiked top, like a trained weight. Timings are wall seconds
of a single run each on this machine; other work on the machine slows them (the load average is recorded).
"""

from __future__ import annotations

import argparse
import inspect
import os
import platform
import sys
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
from covsvd.algebra.loftq import quantize_residual  # noqa: E402
from covsvd.algebra.svd import truncated_svd  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "quant.md"


def make_W(d_out: int, d_in: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    bulk = torch.randn(d_out, d_in, generator=g) / d_in**0.5
    spike = torch.randn(d_out, 128, generator=g) @ torch.randn(128, d_in, generator=g)
    spike *= float(bulk.norm() / spike.norm())
    return bulk + spike  # (d_out, d_in) fp32


def peft_loftq_cpu():
    """peft's loftq_init with its one device line (``"xpu" if is_xpu_available() else "cuda"``) set to the CPU."""
    import peft.utils.loftq_utils as lu

    src = inspect.getsource(lu.loftq_init)
    line = 'compute_device = "xpu" if is_xpu_available() else "cuda"'
    if src.count(line) != 1:
        raise RuntimeError("peft's loftq_init changed; update bench/quant.py")
    scope = dict(vars(lu))
    exec(compile(src.replace(line, 'compute_device = "cpu"'), lu.__file__, "exec"), scope)  # noqa: S102
    return scope["loftq_init"]


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def fro(W, deq, L, R) -> float:
    return float((W.double() - deq.double() - L.double() @ R.double()).norm() / W.double().norm())


def section_a(lines: list[str], d_out: int, d_in: int, r: int) -> None:
    W = make_W(d_out, d_in)
    lines += [f"## A. W {d_out} x {d_in} (fp32), r = {r}, identity, nf4 blocksize 64", "",
              f"load average at start {os.getloadavg()[0]:.1f}", ""]
    rows = []
    for iters in (0, 5):
        s, res = timed(lambda iters=iters: quantize_residual(W, None, r, "identity", "nf4", iters, svd="randomized"))
        errs = ", ".join(f"{e:.5f}" for e in res.errors)
        rows.append((f"quantize_residual iters={iters} (svd=randomized, fp64)", s,
                     f"iterates {errs}; kept {res.best}"))
    loftq = peft_loftq_cpu()
    s, (deq, A, B) = timed(lambda: loftq(W, 4, r, num_iter=1))
    rows.append(("peft loftq_init num_iter=1 (fp32, exact torch.linalg.svd)", s, f"{fro(W, deq, B, A):.5f}"))
    s_svd, _ = timed(lambda: truncated_svd(W.double(), r))
    rows.append(("one exact fp64 truncated_svd of W (covsvd.algebra.svd, QR route)", s_svd, ""))
    lines += ["| route | seconds | relative Frobenius error |", "|---|---:|---|"]
    lines += [f"| {name} | {sec:.1f} | {err} |" for name, sec, err in rows]
    peft1 = rows[2][1]
    lines += ["", f"peft num_iter=5 would run five such iterations: about {5 * peft1:.0f} s by the one measured "
              f"(not run). quantize_residual iters=5 took {rows[1][1] / peft1:.2f}x one peft iteration; "
              f"iters=0 {rows[0][1] / peft1:.2f}x.", ""]


def section_b(lines: list[str], d_out: int, d_in: int, r: int) -> None:
    W = make_W(d_out, d_in, seed=1)
    lines += [f"## B. W {d_out} x {d_in} (fp32), r = {r}, identity, nf4: LoftQ with 5 iterations, every route", "",
              f"load average at start {os.getloadavg()[0]:.1f}", ""]
    loftq = peft_loftq_cpu()
    s, (deq, A, B) = timed(lambda: loftq(W, 4, r, num_iter=5))
    rows = [("peft loftq_init num_iter=5 (fp32, exact torch.linalg.svd)", s, fro(W, deq, B, A))]
    for svd in ("exact", "randomized"):
        s, res = timed(lambda svd=svd: quantize_residual(W, None, r, "identity", "nf4", 5, start="zero", keep="last",
                                                         svd=svd))
        rows.append((f"quantize_residual start=zero iters=5 keep=last (svd={svd}, fp64)", s, res.fro_errors[-1]))
    lines += ["| route | seconds | vs peft | final relative Frobenius error |", "|---|---:|---:|---:|"]
    lines += [f"| {name} | {sec:.1f} | {sec / rows[0][1]:.2f}x | {err:.6f} |" for name, sec, err in rows]
    lines.append("")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small shapes, no results file")
    args = ap.parse_args(argv)
    lines = ["# quantize_residual benchmark (bench/quant.py)", "",
             f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.machine()}, Python "
             f"{platform.python_version()}. Every route measured once (wall seconds).", ""]
    t0 = time.perf_counter()
    warm = make_W(64, 128)  # imports and first-call costs out of the timings
    quantize_residual(warm, None, 2, "identity", "nf4", 1, svd="randomized")
    peft_loftq_cpu()(warm, 4, 2, num_iter=1)
    if args.quick:
        section_a(lines, 256, 688, 8)
        section_b(lines, 128, 344, 4)
    else:
        section_a(lines, 4096, 11008, 64)
        section_b(lines, 1024, 2752, 16)
    lines.append(f"Total run time {time.perf_counter() - t0:.0f} s.")
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.quick:
        RESULTS.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
