"""Benchmark covsvd.orient: speed ratios measured side by side in one run, and accuracy. Not a test.

    .venv/bin/python bench/orient.py            # everything; writes bench/results/orient.md
    .venv/bin/python bench/orient.py --quick    # smaller shapes, a smoke run (does not write the results file)

Sections
  A. The published down_proj shape, W 1024 x 3584, r = 256, C from 64k synthetic tokens: orient(metric="full")
     in fp32 vs (a) the eigh route written in docs/algebra.md (dense M^{1/2}, M^{-1/2} by eigh, torch.linalg.svd)
     and (b) peft's collect_eigens_for_layer on the same C; accuracy vs the fp64 definition route.
  B. 24 layers of that shape end to end (capture excluded), fp32.
  C. identity / diag / corda / full at d_in in {384, 1536, 4096}, fp32 and fp64: time and accuracy.
  D. Absolute eps on the default model: spectra of its 37 inputs and the cost of eps in functional error (the
     default eps is relative now; its measurement is notebooks/04_eps.ipynb, section 4).

Synthetic tokens (A-C): x = (z * sqrt(spec)) @ Q^T + mu, then 8 outlier channels scaled by 20;
z ~ N(0, I), spec_i = i^-1.2 (normalised so mean(diag C) = 1 before the outliers), Q a random orthogonal
matrix, mu ~ 0.1 N(0, 1) per channel (uncentered, like real activations). C is accumulated with
covsvd's MomentAccumulator (fp32 GEMMs into fp64 sums). W = U diag(s) V^T with random orthonormal U, V and
s_i = i^-0.3. Timings are medians of interleaved repeats; if other work shares the machine, read
the ratios (measured side by side), not the absolute seconds.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import covsvd  # noqa: E402
from covsvd.algebra.damping import DEFAULT_EPS, DEFAULT_EPS_MODE  # noqa: E402
from covsvd.algebra.measures import functional_error  # noqa: E402
from covsvd.algebra.orient import orient as _orient  # noqa: E402
from covsvd.capture.moments import MomentAccumulator, SecondMoment  # noqa: E402

F32, F64 = torch.float32, torch.float64
RESULTS = Path(__file__).parent / "results" / "orient.md"
#: The bench's recorded eps: 1e-3 absolute (covsvd's default before it became relative). Its hand-built references
#: (the definition eigh route, M = C + eps I) add eps as given, so every orient call here is absolute unless it says so.
EPS = 1e-3


def orient(*args, eps_mode="absolute", **kwargs):
    return _orient(*args, eps_mode=eps_mode, **kwargs)


# ----------------------------------------------------------------------------------------------- data
def synthetic_moment(d_in: int, n_tokens: int, seed: int, chunk: int = 8192, n_outliers: int = 8) -> SecondMoment:
    g = torch.Generator().manual_seed(seed)
    spec = torch.arange(1, d_in + 1, dtype=F32) ** -1.2
    spec = spec / spec.mean()
    Q = torch.linalg.qr(torch.randn(d_in, d_in, generator=g)).Q  # (d_in, d_in)
    A = (Q * spec.sqrt()).T.contiguous()  # (d_in, d_in): x = z @ A
    mu = 0.1 * torch.randn(d_in, generator=g)
    outliers = torch.randperm(d_in, generator=g)[:n_outliers]
    scale = torch.ones(d_in)
    scale[outliers] = 20.0
    acc = MomentAccumulator(d_in, "full", accumulate="float32")
    done = 0
    while done < n_tokens:
        n = min(chunk, n_tokens - done)
        z = torch.randn(n, d_in, generator=g)  # (n, d_in)
        acc.add((z @ A + mu) * scale)  # (n, d_in) tokens
        done += n
    return acc.moment()


def synthetic_weight(d_out: int, d_in: int, seed: int, decay: float = 0.3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    k = min(d_out, d_in)
    U = torch.linalg.qr(torch.randn(d_out, k, generator=g)).Q
    V = torch.linalg.qr(torch.randn(d_in, k, generator=g)).Q
    s = torch.arange(1, k + 1, dtype=F32) ** -decay
    return (U * s) @ V.T  # (d_out, d_in) fp32


def rescaled(m: SecondMoment, d: torch.Tensor) -> SecondMoment:
    """The exact moments of the tokens x * d (a per-channel rescaling): another layer's C, for free."""
    d = d.double()
    return SecondMoment("full", m.sum_xx * d[:, None] * d[None, :], m.sum_x * d, m.sum_abs * d, m.count)


# ----------------------------------------------------------------------------------------------- routes
def design_eigh_route(W, C, r, eps, dtype):
    """docs/algebra.md, literally: M^{1/2}, M^{-1/2} via eigh (clamp, + eps), svd(W @ M^{1/2}), P = Vh_r @ M^{-1/2}."""
    W, C = W.to(dtype), C.to(dtype)
    lam, Q = torch.linalg.eigh(C)
    lam = lam.clamp_min(0) + eps
    M_half = (Q * lam.sqrt()) @ Q.T
    M_inv_half = (Q * lam.rsqrt()) @ Q.T
    U, S, Vh = torch.linalg.svd(W @ M_half, full_matrices=False)
    return U[:, :r], S[:r], Vh[:r] @ M_inv_half


def peft_route(W, C):
    from peft import LoraConfig
    from peft.tuners.lora.corda import collect_eigens_for_layer
    from torch import nn

    lin = nn.Linear(W.shape[1], W.shape[0], bias=False)
    with torch.no_grad():
        lin.weight.copy_(W)
    lin.covariance_matrix = C.float()
    return collect_eigens_for_layer(lin, LoraConfig())


def product(U, S, P):
    return (U.double() * S.double()) @ P.double()


def rel(a, b):
    return float((a - b).norm() / b.norm())


def timed(f):
    t0 = time.perf_counter()
    out = f()
    return time.perf_counter() - t0, out


def interleaved(fns: dict, reps: int) -> dict:
    """Median seconds of each callable, run round-robin ``reps`` times after one warm-up each."""
    for f in fns.values():
        f()
    times = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            times[k].append(timed(f)[0])
    return {k: statistics.median(v) for k, v in times.items()}


def md_table(header, rows):
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


# ----------------------------------------------------------------------------------------------- sections
def probe() -> str:
    """How busy the machine is right now: the load average and the speed of a fixed fp32 GEMM."""
    a, b = torch.randn(1024, 3584), torch.randn(3584, 3584)
    a @ b
    sec = min(timed(lambda: a @ b)[0] for _ in range(3))
    return (f"machine probe: load average {os.getloadavg()[0]:.1f}, fp32 GEMM 1024x3584x3584 at "
            f"{2 * 1024 * 3584 * 3584 / sec / 1e9:.0f} GFLOP/s (read ratios, not seconds, when it is low)")


def section_a(m, d_out, r, reps, eps, lines):
    d_in, n_tokens = m.d_in, m.count
    W = synthetic_weight(d_out, d_in, seed=1)
    C = m.matrix()  # fp64
    C32 = C.float()
    load_line = probe()

    fns = {
        "orient full fp32 (cholesky)": lambda: orient(W, m, r, metric="full", eps=eps, compute_dtype=F32),
        "definition eigh route fp32": lambda: design_eigh_route(W, C32, r, eps, F32),
        "peft collect_eigens_for_layer (fp32)": lambda: peft_route(W, C32),
        "orient corda fp32 (same algebra as peft)": lambda: orient(W, m, r, metric="corda", eps=0.01,
                                                                    eps_mode="relative", compute_dtype=F32),
        "orient full fp32 solver=eigh": lambda: orient(W, m, r, metric="full", eps=eps, compute_dtype=F32,
                                                       solver="eigh"),
        "orient full fp32 svd=randomized (p=10, q=2)": lambda: orient(W, m, r, metric="full", eps=eps,
                                                                      compute_dtype=F32, svd="randomized"),
    }
    t = interleaved(fns, reps)
    t64, _ = timed(lambda: orient(W, m, r, metric="full", eps=eps))
    t_ref, ref = timed(lambda: design_eigh_route(W, C, r, eps, F64))
    B_ref = product(*ref)
    o = orient(W, m, r, metric="full", eps=eps, compute_dtype=F32)
    o64 = orient(W, m, r, metric="full", eps=eps)
    d32 = design_eigh_route(W, C32, r, eps, F32)
    o_rand = orient(W, m, r, metric="full", eps=eps, compute_dtype=F32, svd="randomized")
    acc = {
        "orient full fp32 (cholesky)": (rel(product(o.U, o.S, o.P), B_ref), float(((o.S.double() - ref[1]) / ref[1]).abs().max())),
        "orient full fp64 (cholesky)": (rel(product(o64.U, o64.S, o64.P), B_ref), float(((o64.S - ref[1]) / ref[1]).abs().max())),
        "definition eigh route fp32": (rel(product(*d32), B_ref), float(((d32[1].double() - ref[1]) / ref[1]).abs().max())),
        "orient full fp32 svd=randomized (p=10, q=2)": (rel(product(o_rand.U, o_rand.S, o_rand.P), B_ref),
                                                        float(((o_rand.S.double() - ref[1]) / ref[1]).abs().max())),
    }
    rand_error = (o_rand.info["rel_error"], o.info["rel_error"])  # functional error: randomized vs exact
    base_a, base_b = t["definition eigh route fp32"], t["peft collect_eigens_for_layer (fp32)"]
    ours = t["orient full fp32 (cholesky)"]
    ra, rb = ours / base_a, ours / base_b
    rows = [
        [k, f"{v:.2f}", f"{v / base_a:.2f}x", f"{v / base_b:.2f}x"] for k, v in t.items()
    ] + [["orient full fp64 (cholesky), 1 run", f"{t64:.2f}", f"{t64 / base_a:.2f}x", f"{t64 / base_b:.2f}x"],
         ["definition eigh route fp64 (the reference), 1 run", f"{t_ref:.2f}", f"{t_ref / base_a:.2f}x", f"{t_ref / base_b:.2f}x"]]
    err_rows = [[k, f"{a:.2e}", f"{s:.2e}"] for k, (a, s) in acc.items()]
    ok_a, ok_b, ok_acc = ra <= 0.4, rb <= 0.6, acc["orient full fp32 (cholesky)"][0] <= 1e-4
    lines += [
        f"## A. W {d_out} x {d_in}, r = {r}, C from {n_tokens:,} synthetic tokens",
        "",
        load_line,
        "",
        f"eps = {eps:g} absolute (mean diag C = {float(C.diagonal().mean()):.3g}); cond(M) = "
        f"{o64.info['cond']:.3g} ({o64.info['cond_method']}); energy kept {o64.info['energy_kept']:.4f}, "
        f"functional error {o64.info['rel_error']:.4f}. Median of {reps} interleaved runs after a warm-up.",
        "peft runs its own damping (0.01 x mean diag C) and computes the corda basis; the row "
        "`orient corda` is the like-for-like computation.",
        "",
        md_table(["route", "seconds", "vs definition eigh fp32", "vs peft"], rows),
        "",
        f"Targets: full fp32 <= 0.4x definition eigh route: **{ra:.2f}x {'met' if ok_a else 'MISSED'}**; "
        f"<= 0.6x peft: **{rb:.2f}x {'met' if ok_b else 'MISSED'}**.",
        "",
        "Accuracy against the fp64 definition eigh route (same eps): ||B - B_ref||_F / ||B_ref||_F with "
        "B = U_r S_r P_r, and max relative error of S_r. The randomized SVD is an approximation: its functional "
        f"error under M is {rand_error[0]:.5f} vs {rand_error[1]:.5f} exact (fp32).",
        "",
        md_table(["route", "product rel. error", "S_r max rel. error"], err_rows),
        "",
        f"Target: same U_r S_r P_r to 1e-4: **{acc['orient full fp32 (cholesky)'][0]:.1e} "
        f"{'met' if ok_acc else 'MISSED'}**.",
        "",
    ]
    print("\n".join(lines[-18:]), flush=True)


def section_b(m, d_out, d_in, r, n_layers, eps, lines):
    g = torch.Generator().manual_seed(7)
    layers = [(synthetic_weight(d_out, d_in, seed=100 + i), rescaled(m, torch.exp(0.3 * torch.randn(d_in, generator=g))))
              for i in range(n_layers)]
    load_line = probe()
    worst_id, worst_err = 0.0, 0.0
    t0 = time.perf_counter()
    per = []
    for W, ml in layers:
        t1 = time.perf_counter()
        o = orient(W, ml, r, metric="full", eps=eps, compute_dtype=F32)
        per.append(time.perf_counter() - t1)
        worst_id = max(worst_id, rel(o.W_res.double() + product(o.U, o.S, o.P), W.double()))
        worst_err = max(worst_err, o.info["rel_error"])
    total = time.perf_counter() - t0
    ok = total < 30
    lines += [
        f"## B. {n_layers} layers of W {d_out} x {d_in}, r = {r}, end to end (capture excluded), fp32",
        "",
        load_line,
        "",
        f"Each layer: its own W and C (the 64k-token C with a per-layer channel rescaling, i.e. the exact "
        f"moments of rescaled tokens), `orient(metric='full', compute_dtype=float32)`, eps = {eps:g}.",
        "",
        f"Total **{total:.1f} s** (target < 30 s: **{'met' if ok else 'MISSED'}**); per layer median "
        f"{statistics.median(per):.2f} s, max {max(per):.2f} s; worst ||W_res + U S P - W|| / ||W|| = {worst_id:.1e} (fp32).",
        "",
    ]
    print("\n".join(lines[-8:]), flush=True)


def section_c(d_ins, reps, eps, lines):
    rows = []
    for d_in in d_ins:
        d_out = min(d_in, 1024)
        r = d_out // 4
        m = synthetic_moment(d_in, max(16384, 4 * d_in), seed=d_in)
        W = synthetic_weight(d_out, d_in, seed=d_in + 1)
        C = m.matrix()
        M = C + eps * torch.eye(d_in, dtype=F64)
        for metric in ("identity", "diag", "corda", "full"):
            Cm = None if metric == "identity" else m
            ref = orient(W.double(), Cm, r, metric=metric, eps=eps)
            B_ref = product(ref.U, ref.S, ref.P)
            G = {"identity": None, "diag": torch.diag(m.diag() + eps), "corda": M @ M, "full": M}[metric]
            for dtype in (F32, F64):
                Wd = W.to(dtype)
                def run(Wd=Wd, Cm=Cm, r=r, metric=metric, dtype=dtype):
                    return orient(Wd, Cm, r, metric=metric, eps=eps, compute_dtype=dtype)

                sec = interleaved({"o": run}, reps)["o"]
                o = orient(Wd, Cm, r, metric=metric, eps=eps, compute_dtype=dtype)
                P = o.P.double()
                gram = P @ P.T if G is None else P @ G @ P.T
                ortho = float((gram - torch.eye(r, dtype=F64)).abs().max())
                recon = rel(o.W_res.double() + product(o.U, o.S, o.P), W.double())
                vs64 = rel(product(o.U, o.S, o.P), B_ref)
                rows.append([f"{d_out} x {d_in}", r, metric, str(dtype).removeprefix("torch."), f"{sec:.3f}",
                             f"{ortho:.1e}", f"{recon:.1e}", f"{vs64:.1e}" if dtype == F32 else "(ref)",
                             f"{o.info['rel_error']:.4f}"])
                print("[C]", " | ".join(str(c) for c in rows[-1]), flush=True)
    lines += [
        "## C. identity / diag / corda / full by size and dtype",
        "",
        f"W d_out x d_in with d_out = min(d_in, 1024), r = d_out / 4; C from max(16384, 4 d_in) synthetic "
        f"tokens; eps = {eps:g} absolute; median of {reps} interleaved runs (storage dtype = compute dtype).",
        "`P G P^T - I`: max abs deviation from orthonormality in the metric's own Gram G: I (identity), "
        "diag(c) + eps (diag), M (full), M^2 (corda: its rows are M^2-orthonormal, not M-orthonormal). "
        "`W_res + USP - W`: relative Frobenius. `vs fp64`: the fp32 product against the fp64 one. "
        "`func. error`: info['rel_error'] under M = C + eps I.",
        "",
        md_table(["W", "r", "metric", "dtype", "seconds", "P G P^T - I", "W_res + USP - W", "vs fp64", "func. error"], rows),
        "",
    ]


def section_d(max_tokens, lines):
    from covsvd.data.targets import find_targets

    model, tok = covsvd.load_default_model()
    batches = covsvd.calibration_batches(tok, max_tokens=max_tokens)
    t_cap, moments = timed(lambda: covsvd.capture_moments(model, batches, progress=False))
    print(f"[D] captured {covsvd.count_tokens(batches)} tokens in {t_cap:.1f} s", flush=True)
    names = find_targets(model)
    mods = dict(model.named_modules())
    spec_rows, cost = [], {}
    epss = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2)
    for n in names:
        m = moments[n]
        C = m.matrix()
        lam = torch.linalg.eigvalsh(C)
        q01 = float(lam[int(0.01 * len(lam))])
        spec_rows.append([n, C.shape[0], f"{float(C.diagonal().mean()):.3g}", f"{float(lam[-1]):.3g}",
                          f"{float(lam[0]):.2g}", f"{q01:.2g}",
                          f"{float(lam[-1]) / EPS:.2g}"])
        W = mods[n].weight.detach().double()
        for r in (16, 64):
            if m.count < r:
                continue
            base = None
            for eps in (1e-7,) + epss:
                o = orient(W, m, r, metric="full", eps=eps)
                e = functional_error(W, product(o.U, o.S, o.P), C)  # under the *undamped* C
                if base is None:
                    base = e
                else:
                    cost[(r, eps)] = max(cost.get((r, eps), 0.0), e / base - 1)
    cost_rows = [[f"{eps:g}"] + [f"{100 * cost[(r, eps)]:.3g}%" for r in (16, 64)] for eps in epss]
    lines += [
        f"## D. Absolute eps on the default model (covsvd's default is now {DEFAULT_EPS:g} {DEFAULT_EPS_MODE}: "
        "notebooks/04_eps.ipynb, section 4)",
        "",
        f"The default model's 37 Linear inputs, C captured by covsvd.capture_moments over {covsvd.count_tokens(batches):,} "
        f"real tokens of the default corpus ({t_cap:.0f} s). lam_max / eps is the cond(M) bound at eps = {EPS:g} absolute.",
        "",
        md_table(["module", "d_in", "mean diag C", "lam_max", "lam_min", "lam 1st pct", "lam_max / eps"], spec_rows),
        "",
        "Cost of damping: worst relative increase, over the 37 layers, of the functional error of the `full` "
        "orientation measured under the *undamped* C, against eps = 1e-7 (default solver).",
        "",
        md_table(["eps", "r = 16", "r = 64"], cost_rows),
        "",
    ]
    print("\n".join(lines[-12:]))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small shapes, no results file")
    ap.add_argument("--skip", default="", help="sections to skip, e.g. 'D' or 'CD'")
    ap.add_argument("--out", default="", help="write the Markdown here (default: bench/results/orient.md on a "
                    "full run, nowhere with --quick / --skip)")
    args = ap.parse_args(argv)
    eps = EPS
    q = args.quick
    load0 = os.getloadavg()
    lines = [
        "# orient benchmark (bench/orient.py)",
        "",
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, OMP_WAIT_POLICY {os.environ.get('OMP_WAIT_POLICY', 'unset')}, {platform.processor() or platform.machine()}, "
        f"Python {platform.python_version()}. Load average at start {load0[0]:.1f}.",
        "",
    ]
    t_all = time.perf_counter()
    d_out, d_in, r, n_tokens = (256, 896, 64, 4096) if q else (1024, 3584, 256, 65536)
    if "A" not in args.skip or "B" not in args.skip:
        t_cap, m = timed(lambda: synthetic_moment(d_in, n_tokens, seed=0))
        print(f"[A] synthetic C: {n_tokens} tokens, d_in={d_in}, built in {t_cap:.1f} s (excluded)", flush=True)
    if "A" not in args.skip:
        section_a(m, d_out, r, 2 if q else 3, eps, lines)
    if "B" not in args.skip:
        section_b(m, d_out, d_in, r, 4 if q else 24, eps, lines)
    if "C" not in args.skip:
        section_c((96, 384) if q else (384, 1536, 4096), 1 if q else 3, eps, lines)
    if "D" not in args.skip:
        section_d(2048 if q else 16384, lines)
    lines.append(f"Load average at end {os.getloadavg()[0]:.1f}; bench wall time {time.perf_counter() - t_all:.0f} s.")
    text = "\n".join(lines) + "\n"
    out = Path(args.out) if args.out else (None if q or args.skip else RESULTS)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        print(f"wrote {out}")
    return text


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
