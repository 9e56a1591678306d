"""Benchmark: decoder LLMs at their own scale (not a test; bench/results/llm.md holds a recorded run).

1. Memory at 7B shapes. A random-init Llama (hidden 4096, intermediate 11008, 32 heads / 8 KV heads, bf16,
   ``--mem-blocks`` blocks, a small vocabulary) and the same tokens, each mode in a fresh process whose peak is
   reset once the model is built and has run one plain forward:
     default    ``capture_moments(model, batches)``: every accumulator alive at once;
     layerwise  ``capture_moments(..., layerwise=True)``: one block's accumulators on the device while it runs,
                each finished block's moments offloaded to the host (on a CPU the host is the device, so they
                still add up there; on a GPU the device holds one block);
     streaming  ``covsvd.capture.layerwise.iter_block_moments``, each block's moments dropped before the next block
                (what ``init_adapters(layerwise=True)`` holds).
   Peak: ``VmHWM`` on CPU, ``torch.cuda.max_memory_allocated`` on CUDA, against the reference "model + one
   block's accumulators + cached activations" (target: streaming within +20%); ``covsvd.estimate_memory``
   against the measured accumulator bytes; the bytes extrapolated to 32 blocks (7B) and 80 blocks (70B: hidden
   8192, intermediate 28672, 64 heads / 8 KV heads) from the measured sharing and ``memory.accumulator_bytes``.
2. Init time at the published shape. A random-init Qwen2-shaped model (24 blocks, hidden 1024, intermediate
   3584, 16 heads / 8 KV heads, fp32), ``--init-tokens`` tokens of the embedded corpus: full-C init of every
   block's Linears (capture, then orient at r = 256 and attach: ``attach_adapters``), time per phase; peft's
   CorDA preprocessing (``preprocess_corda``: its covariance collection, one unpadded sequence per call as it
   requires, then its per-layer inverse and full SVD) on the same model and tokens; exact vs randomized SVD in
   ``orient`` (time, product error, determinism) on block 0's layers.

``--device cuda``: both parts on a GPU, plus fp32 vs fp64 accumulation and the peak GPU memory of each phase.
Run: ``.venv/bin/python bench/llm.py [--device cpu|cuda] [--mem-blocks 2] [--mem-tokens 256]
[--init-tokens 16384] [--init-blocks 24] [--metrics full diag identity] [--out PATH]``.
"""

from __future__ import annotations

import argparse
import csv
import gc
import inspect
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

import covsvd  # noqa: E402
from covsvd.capture.layerwise import iter_block_moments  # noqa: E402
from covsvd.capture.memory import accumulator_bytes, estimate_memory  # noqa: E402

HERE = Path(__file__).resolve().parent
PUBLISHED = Path("data/published/gsm8k_arms.csv")  # the published init times (column init_s)
GIB = 2**30

# (hidden, intermediate, heads, KV heads, blocks of the real model)
LLAMA_7B = (4096, 11008, 32, 8, 32)
LLAMA_70B = (8192, 28672, 64, 8, 80)
QWEN_08B = (1024, 3584, 16, 8, 24)
MEM_VOCAB = 1024  # small: the embeddings are not what is measured
SVD_LAYERS = ("q_proj", "gate_proj", "down_proj")


def llama_config(shape, blocks: int, vocab: int = MEM_VOCAB):
    from transformers import LlamaConfig

    hidden, inter, heads, kv, _ = shape
    return LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=blocks,
                       num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=4096)


def qwen_config(blocks: int, vocab: int):
    from transformers import Qwen2Config

    hidden, inter, heads, kv, _ = QWEN_08B
    return Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=blocks,
                       num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=4096,
                       use_sliding_window=False)


def build(config, dtype: torch.dtype, device: str):
    """``AutoModel.from_config`` (no output head), parameters created directly in ``dtype`` on ``device``."""
    from transformers import AutoModel

    torch.manual_seed(0)
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = AutoModel.from_config(config)
    finally:
        torch.set_default_dtype(before)
    return model.eval()


def random_batches(tokens: int, seq_len: int, batch_size: int, vocab: int, seed: int = 0) -> list[dict]:
    """Rows of ``seq_len`` random ids (the last one shorter, right-padded) holding exactly ``tokens`` real tokens."""
    g = torch.Generator().manual_seed(seed)
    lengths = [seq_len] * (tokens // seq_len) + ([tokens % seq_len] if tokens % seq_len else [])
    out = []
    for i in range(0, len(lengths), batch_size):
        rows = lengths[i : i + batch_size]
        ids = torch.randint(1, vocab, (len(rows), max(rows)), generator=g)  # (B, T)
        mask = (torch.arange(max(rows))[None] < torch.tensor(rows)[:, None]).long()  # (B, T)
        out.append({"input_ids": ids * mask, "attention_mask": mask})
    return out


def distinct_bytes(moments: dict) -> int:
    """Bytes of the fp64 sums of the distinct accumulators in ``moments`` (shared inputs once)."""
    return sum(m.sum_xx.nbytes + m.sum_x.nbytes + m.sum_abs.nbytes for m in {id(m): m for m in moments.values()}.values())


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str):
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


def gib(n: float) -> str:
    return f"{n / GIB:.2f}"


# ----------------------------------------------------------------------------------------------------
# part 1: memory at 7B shapes, each mode in a fresh process


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def reset_peak(device: str) -> int:
    """Reset the peak-memory counter; returns the bytes in use now (RSS, or CUDA allocated)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    with open("/proc/self/clear_refs", "w") as f:  # Linux: "5" resets VmHWM to the current RSS
        f.write("5")
    return _status_kib("VmRSS") * 1024


def peak(device: str) -> int:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    return _status_kib("VmHWM") * 1024


def memory_child(mode: str, blocks: int, tokens: int, seq_len: int, device: str) -> None:
    """Fresh process: build the model, its batches, the estimate and one plain forward; reset the peak; run
    ``mode``; print one JSON line."""
    model = build(llama_config(LLAMA_7B, blocks), torch.bfloat16, device)
    batches = random_batches(tokens, seq_len, 1, MEM_VOCAB)
    est = estimate_memory(model, kind="full", layerwise=True)
    with torch.no_grad():  # warm-up: the baseline includes a plain forward (of 8 tokens: bf16 on CPU is slow)
        model(**{k: v[:, :8].to(device) for k, v in batches[0].items()})
    gc.collect()
    before = reset_peak(device)
    t0 = time.perf_counter()
    block_bytes = []  # the accumulator bytes of each block as it finishes
    if mode == "default":
        moments = covsvd.capture_moments(model, batches, progress=False)
        held = distinct_bytes(moments)
    elif mode == "layerwise":
        moments = covsvd.capture_moments(model, batches, progress=False, layerwise=True)
        held = distinct_bytes(moments)
    elif mode == "streaming":
        for _, moments in iter_block_moments(model, batches, progress=False):
            block_bytes.append(distinct_bytes(moments))
            del moments
        held = sum(block_bytes)
    else:
        raise ValueError(mode)
    sync(device)
    seconds = time.perf_counter() - t0
    hidden = model.config.hidden_size
    slots = sum(b["input_ids"].numel() for b in batches)
    print(json.dumps({
        "mode": mode, "before": before, "peak": peak(device), "seconds": seconds, "accumulators": held,
        "block_max": max(block_bytes, default=0), "est_total": est.total_bytes, "est_block": est.layerwise_peak_bytes,
        "est_groups": est.groups, "sharing": est.sharing, "tokens": covsvd.count_tokens(batches),
        # layerwise keeps every batch's block output (B, T, hidden) in the model dtype on `offload`
        "cache": slots * hidden * torch.finfo(torch.bfloat16).bits // 8,
        "params": sum(p.numel() for p in model.parameters()),
    }))


def memory_run(mode: str, args) -> dict:
    cmd = [sys.executable, __file__, "--memory-child", mode, str(args.mem_blocks), str(args.mem_tokens),
           str(args.mem_seq_len), args.device]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def block_accumulators(shape, groups: dict[str, list[str]]) -> int:
    """Bytes of one block's accumulators at ``shape``, with the sharing measured on the 7B-shaped model
    (``groups``: leader -> members; block 0's leaders)."""
    from transformers import AutoModel

    with torch.device("meta"):
        meta = AutoModel.from_config(llama_config(shape, 1))
    modules = dict(meta.named_modules())
    leaders = [n for n in groups if n.startswith("layers.0.")]
    return sum(accumulator_bytes(modules[n].in_features, "full") for n in leaders)


def extrapolate(shape, block_full: int, overhead: float, tokens: int) -> dict:
    """Bytes at the real model's size: weights (bf16, vocab 32000), accumulators all / one block / diag, the
    cached activations of ``tokens`` tokens, and the two peaks (with the measured overhead fraction)."""
    from transformers import AutoModel

    hidden, _, _, _, blocks = shape
    with torch.device("meta"):
        meta = AutoModel.from_config(llama_config(shape, blocks, vocab=32000))
    weights = 2 * sum(p.numel() for p in meta.parameters())
    cache = tokens * hidden * 2
    return {"params": weights // 2, "weights": weights, "all": blocks * block_full, "block": block_full,
            "cache": cache, "default_peak": weights + blocks * block_full,
            "streaming_peak": (weights + block_full + cache) * (1 + overhead), "blocks": blocks}


# ----------------------------------------------------------------------------------------------------
# part 2: init time at the published shape


def peft_corda(model, names: list[str], batches, r: int, device: str) -> dict:
    """peft's ``preprocess_corda`` on ``model``: seconds of its collection (inside ``run_model``) and in all."""
    from peft import LoraConfig
    from peft.tuners.lora.config import CordaConfig
    from peft.tuners.lora.corda import preprocess_corda

    config = LoraConfig(target_modules=names, r=r, lora_alpha=r, init_lora_weights="corda",
                        corda_config=CordaConfig(corda_method="ipm"))
    collect = {"s": 0.0}

    def run_model():  # peft's collection needs one unpadded sequence per call
        t0 = time.perf_counter()
        with torch.no_grad():
            for b in batches:
                for row, keep in zip(b["input_ids"], b["attention_mask"].bool(), strict=True):
                    model(input_ids=row[keep][None].to(device))
        sync(device)
        collect["s"] += time.perf_counter() - t0

    _, total = timed(lambda: preprocess_corda(model, config, run_model=run_model), device)
    for m in model.modules():
        for attr in ("eigens", "covariance_matrix", "sample_count", "corda_method", "rank"):
            if hasattr(m, attr):
                delattr(m, attr)
    return {"collect": collect["s"], "total": total}


def svd_comparison(model, moments: dict, r: int, device: str) -> tuple[list[dict], str]:
    """Exact vs randomized SVD in ``orient(metric="full")`` on each given layer: seconds (exact once, randomized
    best of two), ``||USP - U'S'P'||_F / ||USP||_F``, both functional errors, and whether the two randomized
    runs with one seed agree exactly."""
    if "svd" not in inspect.signature(covsvd.orient).parameters:
        return [], "`orient(..., svd=\"randomized\")` is not in this checkout: not measured"
    options = dict(svd="randomized", oversample=10, power_iters=2, seed=0)
    modules = dict(model.named_modules())
    rows = []
    for name, C in moments.items():
        W = covsvd.weight_matrix(modules[name]).detach()
        k = min(r, *W.shape)
        best = {}
        for how, kw, reps in (("exact", {}, 1), ("randomized", options, 2)):
            outs = []
            for _ in range(reps):
                o, s = timed(lambda W=W, C=C, k=k, kw=kw: covsvd.orient(
                    W, C, k, metric="full", storage_dtype=torch.float64, **kw), device)
                outs.append((o, s))
            best[how] = (outs[0][0], min(s for _, s in outs), outs)
        (ex, t_ex, _), (rz, t_rz, runs) = best["exact"], best["randomized"]
        prod_ex, prod_rz = (ex.U * ex.S) @ ex.P, (rz.U * rz.S) @ rz.P
        same = all(torch.equal(runs[0][0].U, o.U) and torch.equal(runs[0][0].P, o.P) for o, _ in runs)
        rows.append({"name": name, "shape": tuple(W.shape), "r": k, "exact_s": t_ex, "randomized_s": t_rz,
                     "product_error": float((prod_rz - prod_ex).norm() / prod_ex.norm()),
                     "rel_error_exact": ex.info["rel_error"], "rel_error_randomized": rz.info["rel_error"],
                     "deterministic": same})
    return rows, f"options {options}"


def init_bench(args) -> dict:
    """Part 2 in this process: per phase seconds (and peak GPU memory on CUDA)."""
    from transformers import AutoTokenizer

    device = args.device
    tok = AutoTokenizer.from_pretrained(covsvd.data.default_model_path(), local_files_only=True)
    model = build(qwen_config(args.init_blocks, len(tok)), torch.float32, device)
    batches = covsvd.calibration_batches(tok, split="all", seq_len=args.init_seq_len, batch_size=8,
                                         max_tokens=args.init_tokens, sort_by_length=True)
    names = covsvd.find_targets(model)
    out = {"tokens": covsvd.count_tokens(batches), "batches": len(batches), "targets": len(names),
           "params": sum(p.numel() for p in model.parameters()), "phases": {}, "mem": {}}
    if device.startswith("cuda"):  # no silent TF32 anywhere in this run
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.set_float32_matmul_precision("highest")

    def phase(key, fn):
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        result, seconds = timed(fn, device)
        out["phases"][key] = seconds
        if device.startswith("cuda"):
            out["mem"][key] = torch.cuda.max_memory_allocated()
        print(f"  {key}: {seconds:.1f} s", flush=True)
        return result

    keep = {}
    for metric in args.metrics:
        kind = {"full": "full", "diag": "diag", "identity": None}[metric]
        moments = None
        if kind is not None:
            moments = phase(f"capture {kind}", lambda kind=kind: covsvd.capture_moments(
                model, batches, kind=kind, progress=False))
            if device.startswith("cuda"):  # fp32 products (TF32 off), against the fp64 default
                m32 = phase(f"capture {kind} (fp32 products)", lambda kind=kind: covsvd.capture_moments(
                    model, batches, kind=kind, progress=False, accumulate="float32"))
                out.setdefault("fp32_error", {})[kind] = max(
                    float((m32[n].sum_xx - moments[n].sum_xx).norm() / moments[n].sum_xx.norm()) for n in m32)
                del m32
        report = phase(f"orient + attach {metric}", lambda metric=metric, moments=moments: covsvd.attach_adapters(
            model, moments, args.r, metric, targets=names, progress=False))
        out["phases"][f"of which orient {metric}"] = sum(row["init_s"] for row in report.rows)
        if metric == "full":  # block 0's q, gate and down projections, for the SVD comparison
            keep = {n: moments[n] for n in names if n.startswith("layers.0.") and n.endswith(SVD_LAYERS)}
        covsvd.detach_adapters(model)
        del moments, report
        gc.collect()
    if args.streaming:
        from covsvd.adapt.init import init_adapters

        phase("streaming init_adapters full (layerwise)", lambda: init_adapters(
            model, batches, args.r, "full", progress=False))
        covsvd.detach_adapters(model)
    if not args.no_peft:
        print("  peft CorDA preprocessing ...", flush=True)
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        corda = peft_corda(model, names, batches, args.r, device)
        out["phases"]["peft CorDA preprocess_corda"] = corda["total"]
        out["phases"]["of which its collection"] = corda["collect"]
        if device.startswith("cuda"):
            out["mem"]["peft CorDA preprocess_corda"] = torch.cuda.max_memory_allocated()
    print("  exact vs randomized SVD ...", flush=True)
    out["svd"], out["svd_note"] = svd_comparison(model, keep, args.r, device)
    return out


# ----------------------------------------------------------------------------------------------------


def published_times() -> dict[str, float]:
    """``{metric: init seconds}`` of the AntiPaSTO arms in data/published/gsm8k_arms.csv (Qwen3.5-0.8B)."""
    with (HERE.parent / PUBLISHED).open() as f:
        rows = list(csv.DictReader(f))
    want = {"full": "AntiPaSTO-CorDA (full C)", "diag": "AntiPaSTO-ASVD (diag C)", "identity": "AntiPaSTO (metric C=I)"}
    by_arm = {r["arm"]: float(r["init_s"]) for r in rows}
    return {metric: by_arm[arm] for metric, arm in want.items()}


def ok(good: bool) -> str:
    return "met" if good else "**missed**"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--mem-blocks", type=int, default=2, help="7B-shaped blocks in the memory runs (2-4)")
    p.add_argument("--mem-tokens", type=int, default=256, help="real tokens in the memory runs")
    p.add_argument("--mem-seq-len", type=int, default=128, help="tokens per sequence in the memory runs")
    p.add_argument("--init-tokens", type=int, default=16384, help="calibration tokens of the init runs (published: 16k)")
    p.add_argument("--init-seq-len", type=int, default=256, help="tokens per window in the init runs")
    p.add_argument("--init-blocks", type=int, default=24, help="Qwen-shaped blocks (the published shape: 24)")
    p.add_argument("--r", type=int, default=256, help="rank (default 256, as published)")
    p.add_argument("--metrics", nargs="+", default=["full"], choices=("full", "diag", "identity"),
                   help="metrics whose init is timed (default: full)")
    p.add_argument("--streaming", action="store_true", help="also time init_adapters(layerwise=True)")
    p.add_argument("--no-peft", action="store_true", help="skip peft's CorDA preprocessing")
    p.add_argument("--skip-memory", action="store_true", help="skip part 1")
    p.add_argument("--skip-init", action="store_true", help="skip part 2")
    p.add_argument("--out", type=Path, default=None, help="default bench/results/llm.md (llm_cuda.md on CUDA)")
    p.add_argument("--memory-child", nargs=5, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.memory_child:
        mode, blocks, tokens, seq_len, device = args.memory_child
        memory_child(mode, int(blocks), int(tokens), int(seq_len), device)
        return
    out_path = args.out or HERE / "results" / ("llm_cuda.md" if args.device.startswith("cuda") else "llm.md")
    load_start, t_start = os.getloadavg(), time.perf_counter()
    cuda = args.device.startswith("cuda")
    lines = ["# decoder LLMs at their own scale (`bench/llm.py`)", ""]

    if not args.skip_memory:
        print(f"part 1: memory, {args.mem_blocks} 7B-shaped blocks, {args.mem_tokens} tokens", flush=True)
        mem = {}
        for mode in ("default", "layerwise", "streaming"):
            t0 = time.perf_counter()
            mem[mode] = memory_run(mode, args)
            print(f"  {mode}: peak {gib(mem[mode]['peak'])} GiB ({time.perf_counter() - t0:.0f} s)", flush=True)
        s = mem["streaming"]
        block = s["block_max"]
        reference = s["before"] + block + s["cache"]
        overhead = {m: mem[m]["peak"] / reference - 1 for m in mem}
        groups = mem["default"]["est_groups"]
        unit = "RSS (VmHWM)" if not cuda else "GPU memory (max_memory_allocated)"
        block_70b = block_accumulators(LLAMA_70B, groups)
        big = {"7B": extrapolate(LLAMA_7B, block, max(overhead["streaming"], 0), 16384),
               "70B": extrapolate(LLAMA_70B, block_70b, max(overhead["streaming"], 0), 16384)}
        lines += [
            "## 1. Memory at 7B shapes",
            "",
            f"Random-init `LlamaModel`, hidden 4096, intermediate 11008, 32 heads / 8 KV heads, bf16, "
            f"{args.mem_blocks} blocks, vocab {MEM_VOCAB} ({s['params'] / 1e6:.0f}M parameters); {s['tokens']} "
            f"real tokens in sequences of {args.mem_seq_len} (batch 1); kind `full`, fp64 sums, all "
            f"{len(mem['default']['est_groups'])} accumulators of {sum(map(len, groups.values()))} targets "
            f"(q/k/v and gate/up share one each; sharing {s['sharing']}). Each mode in a fresh process; its "
            f"peak {unit} is reset after the model is built and has run one plain forward, so the baseline "
            f"holds the interpreter, torch, the model and the forward's working memory. GiB:",
            "",
            "| mode | baseline | peak | peak - baseline | accumulators measured | vs reference | seconds |",
            "|---|---:|---:|---:|---:|---:|---:|",
            *[f"| {m} | {gib(r['before'])} | {gib(r['peak'])} | {gib(r['peak'] - r['before'])} | "
              f"{gib(r['accumulators'] if m != 'streaming' else r['block_max'])}"
              f"{' (one block at a time)' if m == 'streaming' else ''} | {100 * overhead[m]:+.1f}% | "
              f"{r['seconds']:.0f} |" for m, r in mem.items()],
            "",
            f"- Reference = baseline + one block's accumulators + cached activations = {gib(s['before'])} + "
            f"{gib(block)} + {s['cache'] / 2**20:.1f} MiB = {gib(reference)} GiB. Streaming peak "
            f"{100 * overhead['streaming']:+.1f}% of it (target <= +20%: {ok(overhead['streaming'] <= 0.20)}).",
            f"- Default capture holds every block's accumulators: peak - baseline {gib(mem['default']['peak'] - mem['default']['before'])} GiB"
            f" for {gib(mem['default']['accumulators'])} GiB of sums.",
            "- `capture_moments(layerwise=True)` runs one block's accumulators at a time but returns every "
            "block's moments, offloaded to the host as each block finishes: " + (
                "on this CPU run the host is the device, so its peak is the default's; on a GPU the device holds "
                "one block (the streaming row's device share) and the host the finished moments." if not cuda else
                "the GPU holds one block's accumulators; the finished moments wait in host memory."),
            f"- `estimate_memory` (before anything runs): every accumulator {gib(s['est_total'])} GiB vs "
            f"{gib(mem['default']['accumulators'])} GiB measured (default capture: "
            f"{'equal' if s['est_total'] == mem['default']['accumulators'] else 'DIFFERENT'}); one block "
            f"{gib(s['est_block'])} GiB vs {gib(block)} GiB measured (streaming: "
            f"{'equal' if s['est_block'] == block else 'DIFFERENT'}).",
            "",
            "Extrapolated to the real sizes (bf16 weights with vocab 32,000; fp64 `full` accumulators with the "
            "sharing measured above; cached activations for 16,384 tokens in bf16; the streaming peak scaled by "
            "the overhead measured above). GiB:",
            "",
            "| model | blocks | parameters | weights | every accumulator (default capture) | one block (layerwise / "
            "streaming) | cached activations, 16k tokens | peak, default capture | peak, streaming |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
            *[f"| Llama {k} shape (hidden {sh[0]}, intermediate {sh[1]}, {sh[2]}/{sh[3]} heads) | {v['blocks']} | "
              f"{v['params'] / 1e9:.1f}B | {gib(v['weights'])} | {gib(v['all'])} | {gib(v['block'])} | "
              f"{gib(v['cache'])} | {gib(v['default_peak'])} | {gib(v['streaming_peak'])} |"
              for (k, v), sh in zip(big.items(), (LLAMA_7B, LLAMA_70B), strict=True)],
            "",
            "Llama-2-7B itself has 32 KV heads (6.7B parameters, 12.6 GiB of bf16 weights): the accumulators do not "
            "change (k/v read the hidden state either way). `kind=\"diag\"` keeps O(d_in) per accumulator: "
            f"{gib(big['7B']['blocks'] * 3 * accumulator_bytes(4096, 'diag') + big['7B']['blocks'] * accumulator_bytes(11008, 'diag'))} GiB "
            "for the whole 7B model.",
            "",
        ]

    if not args.skip_init:
        print(f"part 2: init, Qwen2-shaped, {args.init_blocks} blocks, {args.init_tokens} tokens", flush=True)
        res = init_bench(args)
        ph = res["phases"]
        published = published_times()
        covsvd_full = ph["capture full"] + ph["orient + attach full"]
        lines += [
            "## 2. Init time at the published shape",
            "",
            f"Random-init `Qwen2Model`, {args.init_blocks} blocks, hidden 1024, intermediate 3584, 16 heads / 8 KV "
            f"heads, fp32 ({res['params'] / 1e6:.0f}M parameters with the default tokenizer's vocabulary of "
            f"30,522); {res['tokens']:,} real tokens of the embedded corpus in {res['batches']} batches of up to 8 x "
            f"{args.init_seq_len} (length-sorted); all {res['targets']} Linear layers of the blocks; r = {args.r}; "
            "orient in fp64 (the default). Seconds" + (", peak GPU memory in GiB" if cuda else "") + ":",
            "",
            "| phase | seconds |" + (" peak GPU GiB |" if cuda else ""),
            "|---|---:|" + ("---:|" if cuda else ""),
            *[f"| {k} | {v:.1f} |" + (f" {gib(res['mem'][k])} |" if cuda and k in res["mem"] else (" |" if cuda else ""))
              for k, v in ph.items()],
            f"| **full-C init, capture + orient + attach** | **{covsvd_full:.1f}** |" + (" |" if cuda else ""),
            "",
        ]
        if "peft CorDA preprocess_corda" in ph:
            lines += [
                f"- peft's CorDA preprocessing / covsvd's full-C init on the same model and tokens: "
                f"**{ph['peft CorDA preprocess_corda'] / covsvd_full:.2f}x** (collection alone "
                f"{ph['of which its collection']:.1f} s vs covsvd's capture {ph['capture full']:.1f} s: "
                f"{ph['of which its collection'] / ph['capture full']:.2f}x; its eigens, an fp32 inverse and "
                f"full SVD per layer, {ph['peft CorDA preprocess_corda'] - ph['of which its collection']:.1f} s vs "
                f"covsvd's fp64 orient {ph['of which orient full']:.1f} s). peft also needs the LoRA init "
                "(`get_peft_model`) after it, not timed here.",
            ]
        if res.get("fp32_error"):
            lines.append(f"- fp32 vs fp64 products (TF32 off): max relative Frobenius difference of the sums "
                         f"{max(res['fp32_error'].values()):.1e}.")
        lines += [
            "",
            "Published init times (`data/published/gsm8k_arms.csv`, column `init_s`, Qwen3.5-0.8B, r = 256, on "
            "the authors' GPU): " + ", ".join(f"{m} {s:g} s" for m, s in published.items()) + ". This run: "
            + ", ".join(f"{m} {ph.get(f'capture {m}', 0) + ph[f'orient + attach {m}']:.1f} s"
                        for m in args.metrics) + f" on {'this GPU' if cuda else 'this CPU'} at "
            f"{res['tokens']:,} tokens.",
            "",
        ]
        blocks_x, tokens_x = QWEN_08B[4] / args.init_blocks, 16384 / res["tokens"]
        if (blocks_x, tokens_x) != (1, 1):
            project = ph["capture full"] * blocks_x * tokens_x + ph["orient + attach full"] * blocks_x
            peft_part = ""
            if "peft CorDA preprocess_corda" in ph:
                collect = ph["of which its collection"]
                peft_part = (f", peft CorDA preprocessing "
                             f"{collect * blocks_x * tokens_x + (ph['peft CorDA preprocess_corda'] - collect) * blocks_x:.0f} s")
            lines += [
                "Projected to the published setting (24 blocks, 16,384 tokens; every phase linear in blocks, capture "
                "and peft's collection also in tokens; a projection, not a measurement): covsvd full-C init "
                f"{project:.0f} s{peft_part}.",
                "",
            ]
        lines += [
            "Exact vs randomized SVD in `orient(metric=\"full\")`, block 0's layers (seconds: exact once, randomized best "
            "of 2; product "
            "error `||USP - U'S'P'||_F / ||USP||_F`; functional error `||(W - USP) M^1/2|| / ||W M^1/2||`):",
            "",
        ]
        if res["svd"]:
            lines += [
                f"{res['svd_note']}.",
                "",
                "| layer | W | r | exact s | randomized s | ratio | product error | functional error exact / "
                "randomized | same output for a seed |",
                "|---|---|---:|---:|---:|---:|---:|---:|---|",
                *[f"| `{r['name']}` | {r['shape'][0]} x {r['shape'][1]} | {r['r']} | {r['exact_s']:.2f} | "
                  f"{r['randomized_s']:.2f} | {r['randomized_s'] / r['exact_s']:.2f} | {r['product_error']:.1e} | "
                  f"{r['rel_error_exact']:.4f} / {r['rel_error_randomized']:.4f} | {r['deterministic']} |"
                  for r in res["svd"]],
            ]
            lines += [
                "",
                "Random-init weights have nearly flat singular spectra, the hardest case for a randomized range "
                "finder: the product error says how far the kept rank-r part moved, the functional error how much "
                "worse the init approximates W under the metric (what orientation optimises); trained weights "
                "decay faster. `W_res + U S P = W` holds exactly either way (orient's residual).",
            ]
        else:
            lines.append(res["svd_note"] + ".")
        lines.append("")

    load_end = os.getloadavg()
    command = " ".join(["python", "bench/llm.py", *sys.argv[1:]])
    lines[2:2] = [
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads" + (f", {torch.cuda.get_device_name()}" if cuda else "") +
        f"; load average {load_start[0]:.1f} at start, {load_end[0]:.1f} at end (the machine is shared: "
        f"seconds are this run's, ratios taken within it). `{command}` reproduces it "
        f"({(time.perf_counter() - t_start) / 60:.1f} min).",
        "",
        "Sizes: " + "; ".join(
            ([] if args.skip_memory else [f"part 1 {args.mem_blocks} 7B-shaped blocks, {args.mem_tokens} tokens"])
            + ([] if args.skip_init else [f"part 2 {args.init_blocks} Qwen-shaped blocks, {args.init_tokens:,} "
                                          f"tokens requested, metrics {', '.join(args.metrics)}"]))
        + ". The published setting (24 blocks, 16,384 tokens) is the script's default: `python bench/llm.py` "
        "(`--mem-blocks 4` for four 7B-shaped blocks).",
        "",
    ]
    if not cuda:
        lines[6:6] = [
            "GPU: not run here (no GPU in this session). `python bench/llm.py --device cuda` runs both parts on "
            "CUDA (peak GPU memory per mode and per phase from `torch.cuda.max_memory_allocated`, fp32 vs fp64 "
            "accumulation with TF32 off) and writes bench/results/llm_cuda.md.",
            "",
        ]
    text = "\n".join(lines)
    print()
    print(text)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(text)
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
