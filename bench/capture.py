"""Benchmark of covsvd.capture_moments on the embedded default model (not a test; `make bench`).

Measures, side by side in one run (see bench/results/capture.md for a recorded table):
  1. capture time / plain forward time over the same batches;
  2. capture time / (forward time + time of the same accumulator GEMMs run alone): the arithmetic limit;
  3. peft's CorDA covariance collection (peft.tuners.lora.corda.calib_cov_distribution, one unpadded
     sequence per call, as it requires) on the same real tokens: time ratio and agreement of the matrices;
  4. peak memory (VmHWM of fresh subprocesses, reset just before the capture) at 10k and 100k tokens, under
     glibc's default malloc and a fixed mmap threshold (RSS = live memory), and with the 10k run's batches
     repeated; glibc's heap in use vs held free (mallinfo2) at the end of each run.
Also the error of accumulate="float32" against the float64 default.

Timing method: the machine may be shared, so every method is timed on each batch in turn (order rotated
per batch) and per-batch times are summed; load changes then hit every method alike. The two captures
(float64, float32) are ``MomentCapture`` sessions (what ``capture_moments`` loops over) on their own
copies of the model, open for the whole run; their set-up, hook removal and final ``moments()`` are
timed too. peft's collection is called once per batch (its per-call set-up is a few ms).
Run: ``.venv/bin/python bench/capture.py [--tokens N] [--out PATH]``.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import json
import os
import platform
import subprocess
import sys
import time
import types
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

import covsvd  # noqa: E402
from covsvd.capture.hooked import MomentCapture  # noqa: E402
from covsvd.capture.moments import add_gram_upper_  # noqa: E402

HERE = Path(__file__).resolve().parent


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# ----------------------------------------------------------------------------------------------------
# peft's CorDA collection


def peft_config():
    from peft import LoraConfig
    from peft.tuners.lora.config import CordaConfig

    return LoraConfig(
        target_modules=r".*(query|key|value|dense)", init_lora_weights="corda", corda_config=CordaConfig()
    )


def peft_sums(model, batch, config) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """peft's covariance collection over the real tokens of ``batch``, one unpadded sequence per model call.

    Returns its per-module covariance *sums* (``covariance_matrix * sample_count``) and sample counts, so
    batches can be added up; peft's own hook, unchanged.
    """
    from peft.tuners.lora.corda import calib_cov_distribution, target_modules

    ids, mask = batch["input_ids"], batch["attention_mask"].bool()

    def run_model():
        for row, keep in zip(ids, mask, strict=True):
            model(input_ids=row[keep][None])  # (1, n_real): one unpadded sequence

    calib_cov_distribution(model, config, run_model, None, None)
    sums, counts = {}, {}
    for name, module in target_modules(model, config):
        sums[name] = module.covariance_matrix * module.sample_count
        counts[name] = module.sample_count
        del module.covariance_matrix, module.sample_count
    return sums, counts


class _NoMaxScaling(types.ModuleType):
    """``torch`` for peft's hook with ``torch.max(x)`` -> 1, so it sums plain ``x^T x`` (agreement check only)."""

    def __init__(self):
        super().__init__("torch")

    def __getattr__(self, name):
        if name == "max":
            return lambda x, *a, **k: torch.ones((), dtype=x.dtype, device=x.device)
        return getattr(torch, name)


# ----------------------------------------------------------------------------------------------------
# the same accumulator GEMMs, alone


def gemm_plan(model, batch) -> list[tuple[int, bool]]:
    """``[(d_in, per_token), ...]``: one entry per distinct accumulator capture uses (shared inputs once)."""
    moments = covsvd.capture_moments(model, [batch], progress=False)
    n_real = int(batch["attention_mask"].sum())
    distinct = {id(m): m for m in moments.values()}.values()
    return [(m.d_in, m.count == n_real) for m in distinct]


def gemm_operands(plan, rows: int, shared: bool, seed: int = 0) -> tuple[list, list]:
    """Random rows ``(rows, d)`` (fp64 and an fp32 copy) and an fp64 ``(d, d)`` sum for each accumulator of ``plan``.

    ``shared=False``: each accumulator its own rows and sum, as in capture, where each reads a different
    module's input. ``shared=True``: one of each per width, reused by every accumulator of that width: later
    GEMMs then find their operands in cache, which capture's never do (the cache-warm lower bound).
    """
    g = torch.Generator().manual_seed(seed)
    xs, outs, by_width = [], [], {}
    for d, _ in plan:
        if not (shared and d in by_width):
            x = torch.randn(rows, d, generator=g)
            by_width[d] = ({torch.float64: x.double(), torch.float32: x}, torch.zeros(d, d, dtype=torch.float64))
        xs.append(by_width[d][0])
        outs.append(by_width[d][1])
        if not shared:
            del by_width[d]
    return xs, outs


def gemms_alone(plan, batch, operands, dtype) -> None:
    """The upper-block Gram GEMMs capture runs for ``batch``, on random rows of the same shapes and dtype."""
    n_real, n_seq = int(batch["attention_mask"].sum()), batch["input_ids"].shape[0]
    xs, outs = operands
    for (_, per_token), x, out in zip(plan, xs, outs, strict=True):
        add_gram_upper_(out, x[dtype][: n_real if per_token else n_seq])


# ----------------------------------------------------------------------------------------------------
# peak memory, in fresh processes


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


class _MallInfo2(ctypes.Structure):
    _fields_ = [(f, ctypes.c_size_t) for f in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                "fsmblks", "uordblks", "fordblks", "keepcost")]


def malloc_heap() -> dict | None:
    """glibc's ``mallinfo2()`` (glibc >= 2.33), all arenas: KiB in use (allocated chunks plus mmap'd blocks)
    and KiB free but still held by malloc (resident unless trimmed); ``None`` without it."""
    try:
        fn = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return None
    fn.restype = _MallInfo2
    m = fn()
    return {"in_use_kib": (m.uordblks + m.hblkhd) // 1024, "held_free_kib": m.fordblks // 1024}


REPEATED = "glibc default, the small run's batches repeated"
MALLOC_SETTINGS = {
    "glibc default": {},
    # fixed mmap threshold: large blocks are mmap'd and returned on free, so heap fragmentation cannot
    # masquerade as growth (glibc otherwise raises the threshold as blocks are freed)
    "MALLOC_MMAP_THRESHOLD_=131072": {"MALLOC_MMAP_THRESHOLD_": "131072"},
}


def memory_child(mode: str, tokens: int, repeat_of: int = 0) -> None:
    """Fresh process: load, build batches, one plain forward, reset the peak RSS, then run ``mode``
    (``"capture"``: capture_moments, float64, kind full; ``"forward"``: plain forwards over the same
    batches) and print the peak RSS (``VmHWM``) it reached.

    ``repeat_of > 0``: the batches of the first ``repeat_of`` tokens, cycled until ``tokens`` real tokens
    (more tokens, the same batch shapes); else the batches of the first ``tokens`` tokens of the text."""
    model, tok = covsvd.load_default_model()
    batches = covsvd.calibration_batches(tok, split="all", max_tokens=repeat_of or tokens)
    if repeat_of:
        base, n = batches, covsvd.count_tokens(batches)
        batches = base * -(-tokens // n)
    with torch.no_grad():
        model(**batches[0])  # allocator warm: the baseline includes one plain forward
    with open("/proc/self/clear_refs", "w") as f:  # Linux: "5" resets the peak RSS (VmHWM) to the current RSS
        f.write("5")
    before = _status_kib("VmRSS")
    if mode == "capture":
        moments = covsvd.capture_moments(model, batches, progress=False)  # noqa: F841 (alive for the heap reading)
    else:
        with torch.no_grad():
            for b in batches:
                model(**b)
    print(json.dumps({"tokens": covsvd.count_tokens(batches), "before_kib": before,
                      "peak_kib": _status_kib("VmHWM"), "heap": malloc_heap()}))


def memory_run(mode: str, tokens: int, env: dict, repeat_of: int = 0) -> dict:
    out = subprocess.run([sys.executable, __file__, "--memory-child", mode, str(tokens), str(repeat_of)], check=True,
                         capture_output=True, text=True, env={**os.environ, **env})
    return json.loads(out.stdout.strip().splitlines()[-1])


def memory_cell(mode: str, tokens: int, env: dict, repeats: int, repeat_of: int = 0) -> dict:
    """``memory_run`` ``repeats`` times: ``{"tokens", "peaks" (KiB, each run), "peak_kib" (their median)}``.

    Under glibc's default malloc the peak of the same run varies by up to ~20% between processes (where the
    heap fragments differs), so one run per cell is not a measurement."""
    runs = [memory_run(mode, tokens, env, repeat_of) for _ in range(repeats)]
    peaks = sorted(r["peak_kib"] for r in runs)
    heap = None
    if all(r["heap"] for r in runs):  # medians of the glibc heap readings at the end of the run
        heap = {k: sorted(r["heap"][k] for r in runs)[len(runs) // 2] for k in runs[0]["heap"]}
    return {"tokens": runs[0]["tokens"], "peaks": peaks, "peak_kib": peaks[len(peaks) // 2], "heap": heap}


# ----------------------------------------------------------------------------------------------------


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=None, help="real tokens (default: every window of split='all')")
    p.add_argument("--padded", action="store_true",
                   help="batch windows in corpus order (about 50%% padding) instead of length-sorted (< 1%%)")
    p.add_argument("--agree-batches", type=int, default=4, help="batches for the unscaled-peft agreement check")
    p.add_argument("--memory", type=int, nargs=2, default=[10_000, 100_000], metavar=("SMALL", "LARGE"))
    p.add_argument("--memory-repeats", type=int, default=3, help="fresh processes per memory cell (median kept); 0 skips the memory runs")
    p.add_argument("--out", type=Path, default=HERE / "results" / "capture.md")
    p.add_argument("--memory-child", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.memory_child:
        memory_child(args.memory_child[0], int(args.memory_child[1]), int(args.memory_child[2]))
        return

    load_start = os.getloadavg()
    model, tok = covsvd.load_default_model()
    batches = covsvd.calibration_batches(tok, split="all", max_tokens=args.tokens, sort_by_length=not args.padded)
    n_tokens = covsvd.count_tokens(batches)
    n_slots = sum(b["input_ids"].numel() for b in batches)  # tokens the batched forward computes, padding included
    n_linear = len(covsvd.find_targets(model))
    config = peft_config()
    plan = gemm_plan(model, batches[0])
    rows = max(int(b["attention_mask"].sum()) for b in batches)
    own, shared = gemm_operands(plan, rows, shared=False), gemm_operands(plan, rows, shared=True)
    print(f"{n_tokens} real tokens in {len(batches)} batches; {n_linear} Linear targets, "
          f"{len(plan)} distinct accumulators; torch threads {torch.get_num_threads()}", flush=True)

    times = {k: 0.0 for k in ("forward", "capture64", "capture32", "gemm64", "gemm32", "gemm64_shared", "peft",
                              "forward1")}
    per_batch: dict[str, list[float]] = {k: [] for k in times}
    peft_sum: dict[str, torch.Tensor] = {}
    peft_n: dict[str, int] = {}
    # one model per capture (each holds its own hooks for the whole run) and one for forward / peft
    model64, model32 = copy.deepcopy(model), copy.deepcopy(model)

    def forward(b):
        with torch.no_grad():
            model(**b)

    def forward_unpadded(b):  # what peft's collection runs, without its hooks
        with torch.no_grad():
            for row, keep in zip(b["input_ids"], b["attention_mask"].bool(), strict=True):
                model(input_ids=row[keep][None])

    def peft(b):
        s, c = peft_sums(model, b, config)
        for n in s:
            peft_sum[n] = peft_sum.get(n, 0) + s[n]
            peft_n[n] = peft_n.get(n, 0) + c[n]

    forward(batches[0])  # warm-up
    t0 = time.perf_counter()
    cap64 = MomentCapture(model64, accumulate="float64").__enter__()
    times["capture64"] += time.perf_counter() - t0
    t0 = time.perf_counter()
    cap32 = MomentCapture(model32, accumulate="float32").__enter__()
    times["capture32"] += time.perf_counter() - t0
    methods = [
        ("forward", forward),
        ("capture64", cap64.add),
        ("capture32", cap32.add),
        ("gemm64", lambda b: gemms_alone(plan, b, own, torch.float64)),
        ("gemm32", lambda b: gemms_alone(plan, b, own, torch.float32)),
        ("gemm64_shared", lambda b: gemms_alone(plan, b, shared, torch.float64)),
        ("peft", peft),
        ("forward1", forward_unpadded),
    ]
    t_all = time.perf_counter()
    try:
        for i, b in enumerate(batches):
            k = i % len(methods)
            for key, fn in methods[k:] + methods[:k]:  # rotated order
                dt = timed(lambda fn=fn, b=b: fn(b))
                times[key] += dt
                per_batch[key].append(dt)
            if i % 10 == 0 or i == len(batches) - 1:
                print(f"  batch {i + 1}/{len(batches)}  elapsed {time.perf_counter() - t_all:.0f}s  "
                      + " ".join(f"{k}={v:.1f}" for k, v in times.items()), flush=True)
    finally:
        t0 = time.perf_counter()
        cap64.__exit__(None, None, None)
        times["capture64"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        cap32.__exit__(None, None, None)
        times["capture32"] += time.perf_counter() - t0
    t0 = time.perf_counter()
    m64 = cap64.moments()
    times["capture64"] += time.perf_counter() - t0
    t0 = time.perf_counter()
    m32 = cap32.moments()
    times["capture32"] += time.perf_counter() - t0

    # agreement: capture vs peft (as is: per-sequence 1/max^2 weights, / sequences), and vs peft's hook with
    # the max-scaling neutralised (then its sums are plain X^T X over the same real tokens)
    token_layers = [n for n in m64 if n != "pooler.dense"]
    def unit_trace(c):
        return c / c.diagonal().sum()
    as_is = max(rel(unit_trace((peft_sum[n] / peft_n[n]).double()), unit_trace(m64[n].matrix()))
                for n in token_layers)
    import peft.tuners.lora.corda as corda

    few = batches[: args.agree_batches]
    ours_few = covsvd.capture_moments(model, few, progress=False)
    saved_torch, corda.torch = corda.torch, _NoMaxScaling()
    try:
        unscaled = [peft_sums(model, b, config)[0] for b in few]
    finally:
        corda.torch = saved_torch
    exact_agree = max(rel(sum(u[n] for u in unscaled).double() / ours_few[n].count, ours_few[n].matrix())
                      for n in token_layers)
    pooler_shape = tuple(torch.as_tensor(peft_sum["pooler.dense"]).shape)

    # float32 accumulation vs float64
    f32_fro = max(rel(m32[n].matrix(), m64[n].matrix()) for n in m64)
    f32_eig = []  # (relative error of the smallest eigenvalue, condition number, layer), full-rank layers
    for n in {id(m): n for n, m in m64.items()}.values():
        if m64[n].count < 4 * m64[n].d_in:
            continue  # too few rows for a full-rank matrix (the pooler: one row per sequence)
        e64 = torch.linalg.eigvalsh(m64[n].matrix())
        e32 = torch.linalg.eigvalsh(m32[n].matrix())
        f32_eig.append((float((e32[0] - e64[0]).abs() / e64[0]), float(e64[-1] / e64[0]), n))
    f32_eig.sort()

    mem = {}
    if args.memory_repeats > 0:
        print("memory runs (fresh processes)...", flush=True)
        mem = {(setting, mode): [memory_cell(mode, t, env, args.memory_repeats) for t in args.memory]
               for setting, env in MALLOC_SETTINGS.items() for mode in ("forward", "capture")}
        small = args.memory[0]
        for mode in ("forward", "capture"):  # the same small run (shared cell), its batches cycled to the large count
            mem[(REPEATED, mode)] = [mem[("glibc default", mode)][0],
                                     memory_cell(mode, args.memory[1], {}, args.memory_repeats, repeat_of=small)]
    load_end = os.getloadavg()

    t = times
    pb = {k: torch.tensor(v, dtype=torch.float64) for k, v in per_batch.items()}  # (n_batches,) seconds

    def ratios(num: str, *den: str) -> tuple[float, float]:
        """(ratio of the summed times, median over batches of the per-batch ratio: robust to load spikes)."""
        return t[num] / sum(t[d] for d in den), float((pb[num] / sum(pb[d] for d in den)).median())

    r1_64, r1_32 = ratios("capture64", "forward"), ratios("capture32", "forward")
    r2_64, r2_32 = ratios("capture64", "forward", "gemm64"), ratios("capture32", "forward", "gemm32")
    r2_shared = ratios("capture64", "forward", "gemm64_shared")
    r3_64, r3_32 = ratios("peft", "capture64"), ratios("peft", "capture32")
    def growth(setting: str, mode: str) -> float:
        small, large = mem[(setting, mode)]
        return large["peak_kib"] / small["peak_kib"] - 1

    def ok(good: bool) -> str:
        return "met" if good else "**missed**"

    def heap_lines() -> list[str]:
        """Where the RSS goes under glibc's default malloc: in use vs free-but-held, at the end of each run."""
        rows = [(setting, mode, cell) for setting in ("glibc default", REPEATED) for mode in ("forward", "capture")
                for cell in mem[(setting, mode)] if cell["heap"]]
        if not rows:
            return []
        return [
            "",
            "glibc's heap at the end of each run under the default malloc (`mallinfo2()`, all arenas, median of the "
            "processes, MiB): *in use* is what is allocated (chunks and mmap'd blocks: model, batches, and for "
            "capture its returned moments), *held free* is memory malloc keeps resident after it was freed "
            "(fragmentation); RSS growth that is not in *in use* is the allocator's, not the data's:",
            "",
            "| run | mode | real tokens | in use | held free |",
            "|---|---|---:|---:|---:|",
            *[f"| {setting} | {mode} | {c['tokens']:,} | {c['heap']['in_use_kib'] / 1024:.0f} | "
              f"{c['heap']['held_free_kib'] / 1024:.0f} |" for setting, mode, c in rows],
            "",
        ]

    if args.memory_repeats > 0:
        mem_lines = [
            "Peak memory: a fresh process per cell loads the model, builds the batches and runs one plain forward; "
            "then its peak RSS is reset (`/proc/self/clear_refs` = 5) and it runs either `capture_moments` (float64, "
            "kind full) or plain forwards over the same batches; the cell is `VmHWM` after that, in MiB: the median of "
            f"{args.memory_repeats} fresh processes, their range in brackets. The token "
            "ids are built before the reset. Two glibc malloc settings, because the default one fragments the heap "
            "as a run goes on (a plain forward alone grows too, and the same run's peak varies between processes); "
            "and, under the default malloc, the small run's batches cycled to the large token count (more tokens, "
            "no new batch shapes: what grows with the token count alone; its small cell is the default one's):",
            "",
            "| malloc | real tokens | peak, plain forwards | peak, capture | capture - forwards |",
            "|---|---:|---:|---:|---:|",
            *[f"| {setting} | {f['tokens']:,} | {f['peak_kib'] / 1024:.0f} [{f['peaks'][0] / 1024:.0f}-"
              f"{f['peaks'][-1] / 1024:.0f}] | {c['peak_kib'] / 1024:.0f} [{c['peaks'][0] / 1024:.0f}-"
              f"{c['peaks'][-1] / 1024:.0f}] | {(c['peak_kib'] - f['peak_kib']) / 1024:+.0f} |"
              for setting in (*MALLOC_SETTINGS, REPEATED)
              for f, c in zip(mem[(setting, "forward")], mem[(setting, "capture")], strict=True)],
            "",
            *[f"- {setting}: median peak growth from {args.memory[0]:,} to {args.memory[1]:,} tokens: capture "
              f"{100 * growth(setting, 'capture'):+.1f}% (target < 10%: {ok(growth(setting, 'capture') < 0.10)}), "
              f"plain forwards {100 * growth(setting, 'forward'):+.1f}%."
              for setting in (*MALLOC_SETTINGS, REPEATED)],
            *heap_lines(),
        ]
    else:
        mem_lines = ["Peak memory: not measured in this run (`--memory-repeats 0`).", ""]
    lines = [
        "# capture benchmark",
        "",
        f"Default model (all-MiniLM-L6-v2), {n_tokens:,} real tokens of `calibration_batches(tok, split=\"all\", "
        f"sort_by_length={not args.padded})` "
        f"({len(batches)} batches of up to 16 x 128; {100 * (1 - n_tokens / n_slots):.0f}% of the batched "
        f"forward's positions are padding), all {n_linear} Linear layers, kind `full`; "
        f"{len(plan)} distinct accumulators (q/k/v share one). "
        f"CPU: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, OMP_WAIT_POLICY {os.environ.get('OMP_WAIT_POLICY', 'unset')}. Load average {load_start[0]:.1f} at start, {load_end[0]:.1f} at end "
        f"on {os.cpu_count()} cores (every method was timed on each batch in turn, so the ratios share any "
        f"load). `{' '.join(['python', 'bench/capture.py'] + sys.argv[1:])}` reproduces it.",
        "",
        "| measure | float64 (default) | float32 GEMMs | target |",
        "|---|---:|---:|---|",
        f"| plain forward (s) | {t['forward']:.1f} | {t['forward']:.1f} | |",
        f"| capture_moments (s) | {t['capture64']:.1f} | {t['capture32']:.1f} | |",
        f"| accumulator GEMMs alone, each accumulator its own rows (s) | {t['gemm64']:.1f} | {t['gemm32']:.1f} | |",
        f"| the same GEMMs on one set of rows per width, cache-warm (s) | {t['gemm64_shared']:.1f} | | |",
        f"| peft CorDA collection (s) | {t['peft']:.1f} | {t['peft']:.1f} | |",
        f"| of which: its forwards, one unpadded sequence per call, without hooks (s) | {t['forward1']:.1f} | "
        f"{t['forward1']:.1f} | |",
        f"| (1) capture / forward | {r1_64[0]:.2f} ({r1_64[1]:.2f}) | {r1_32[0]:.2f} ({r1_32[1]:.2f}) | |",
        f"| (2) capture / (forward + GEMMs) | {r2_64[0]:.3f} ({r2_64[1]:.3f}) | {r2_32[0]:.3f} ({r2_32[1]:.3f}) | "
        f"<= 1.15: {ok(max(r2_64) <= 1.15)} / {ok(max(r2_32) <= 1.15)} |",
        f"| (2) against the cache-warm GEMMs | {r2_shared[0]:.3f} ({r2_shared[1]:.3f}) | | |",
        f"| (3) peft time / capture time | {r3_64[0]:.2f}x ({r3_64[1]:.2f}x) | {r3_32[0]:.2f}x ({r3_32[1]:.2f}x) | "
        f">= 3x: {ok(min(r3_64) >= 3)} / {ok(min(r3_32) >= 3)} |",
        "",
        "Ratios: of the summed times, and in parentheses the median over batches of the per-batch ratio (robust "
        "to load spikes from other processes); a target counts as met only if both meet it. The capture times "
        "include opening the hooks, removing them and the final `moments()`. The GEMMs alone run the "
        "accumulators' upper-block Gram products (`add_gram_upper_`) on random rows of the same shapes: each "
        "accumulator on its own rows and into its own sum, as in capture, where each reads a different module's "
        "input; the cache-warm row reuses one set per width, so every GEMM after the first of a width finds its "
        f"operands in cache (it was this bench's baseline up to stop 8; {t['gemm64_shared']:.1f} s vs "
        f"{t['gemm64']:.1f} s here).",
        "",
        f"What dominates: capture = forward + exact Gram GEMMs + the rest (masking, fp64 casts, O(d_in) sums, "
        f"hooks): {t['forward']:.1f} + {t['gemm64']:.1f} + {t['capture64'] - t['forward'] - t['gemm64']:.1f} s "
        f"(float64), {t['forward']:.1f} + {t['gemm32']:.1f} + {t['capture32'] - t['forward'] - t['gemm32']:.1f} s "
        f"(float32). Even with nothing but forward + GEMMs, (3) could reach at most "
        f"{t['peft'] / (t['forward'] + t['gemm64']):.2f}x (float64) / {t['peft'] / (t['forward'] + t['gemm32']):.2f}x "
        f"(float32) on this CPU. peft spends {t['forward1']:.1f} s of its {t['peft']:.1f} s in its own forwards "
        f"(one unpadded sequence per call) and the rest in its hooks: unshared q/k/v products, an fp32 `x.T @ x` "
        f"per sequence and module, and a max plus NaN/inf scans of every input and every d_in x d_in product.",
        "",
        "Agreement with peft (36 token-level layers; max over layers of the relative Frobenius difference):",
        "",
        f"- peft as is, both matrices scaled to unit trace: {as_is:.2e}. peft divides each sequence by its "
        "largest activation (`x / max(x)`) and averages over sequences, not tokens, so its matrix is a "
        "differently weighted average: the difference is the estimator's, not rounding.",
        f"- peft's hook with that scaling neutralised (`torch.max` -> 1), summed / real tokens, on the first "
        f"{len(few)} batches: {exact_agree:.2e} (fp32 GEMMs in peft vs fp64 here).",
        f"- `pooler.dense`: peft's hook squeezes the (1, 384) CLS input to a vector and its `x.T @ x` becomes a "
        f"dot product: its \"covariance\" has shape {pooler_shape}; covsvd counts one row per sequence.",
        "",
        f"float32 vs float64 accumulation: max relative Frobenius error {f32_fro:.1e}. Relative error of the "
        f"smallest eigenvalue over the {len(f32_eig)} full-rank accumulators: median "
        f"{f32_eig[len(f32_eig) // 2][0]:.1e}, worst {f32_eig[-1][0]:.1e} (`{f32_eig[-1][2]}`, condition number "
        f"{f32_eig[-1][1]:.1e})." if f32_eig else f"float32 vs float64: max relative Frobenius error {f32_fro:.1e}.",
        "",
        *mem_lines,
        "- The running sums are O(d_in^2) and allocated once: 25 fp64 accumulators, "
        f"{sum(m.sum_xx.numel() for m in {id(m): m for m in m64.values()}.values()) * 8 / 2**20:.0f} MiB.",
        "",
    ]
    text = "\n".join(lines)
    print()
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
