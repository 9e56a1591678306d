"""Benchmark of covsvd.capture_output_moments on the embedded default model (not a test).

Measures, side by side in one run (bench/results/output_capture.md has a recorded table):
  1. output-moment capture time (mode="probe", kind="full", the 36 encoder targets: the pooler does not reach the
     final hidden states) / the time of a hand-written reference doing the same arithmetic and nothing else:
     the same forward (parameters frozen, the same leaf outputs), one backward with ``torch.autograd.grad`` to
     every target output, and the same fp64 upper-block Gram products of the real rows (``add_gram_upper_``);
  2. capture time / (forward + backward) alone, the reference without its Gram products (what the products and
     the bookkeeping add);
  3. the agreement of the two G's (the reference is an independent computation of the same sums);
  4. the memory of the output accumulators at Llama-2-7B shapes (a ``LlamaForCausalLM`` built on the meta device
     from its published config: no weights), from ``covsvd.estimate_memory(..., side="output")``, for kind diag
     and full, beside the input side's.

Timing method: the machine may be shared, so the three methods run on each batch in turn (order rotated per
batch), each on its own copy of the model, and per-batch times are summed; the capture is one ``OutputCapture``
session open for the whole run, its set-up and final ``moments()`` timed too. Run: ``python bench/output_capture.py [--tokens N] [--out PATH]``.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

import covsvd  # noqa: E402
from covsvd.capture.gram import add_gram_upper_, mirror_lower_  # noqa: E402
from covsvd.capture.memory import format_bytes  # noqa: E402
from covsvd.capture.output import OutputCapture, frozen_parameters  # noqa: E402

HERE = Path(__file__).resolve().parent
TARGETS = r"encoder\..*"


def reference(model, names, batches, seed=0, gram=True):
    """A generator: per batch, the forward + backward (+ the Gram products when ``gram``), and at the end the sums
    (fp64; zero without ``gram``)."""
    modules = dict(model.named_modules())
    sums = {n: torch.zeros(modules[n].out_features, modules[n].out_features, dtype=torch.float64) for n in names}
    gen = torch.Generator().manual_seed(seed)
    outs: dict[str, torch.Tensor] = {}

    def keep(name):
        def fn(module, args, y):
            if not y.requires_grad:
                y = y.detach().requires_grad_(True)
                outs[name] = y
                return y
            outs[name] = y
            return None
        return fn

    handles = [modules[n].register_forward_hook(keep(n)) for n in names]
    try:
        with frozen_parameters(model):
            for batch in batches:
                mask = batch["attention_mask"].bool()
                with torch.enable_grad():
                    H = model(**batch).last_hidden_state
                    V = torch.randn(H.shape, generator=gen, dtype=torch.float64).to(H.dtype) * mask[..., None]
                    grads = torch.autograd.grad((V * H).sum(), [outs[n] for n in names])
                outs.clear()
                for n, g in zip(names, grads, strict=True):
                    if gram:
                        add_gram_upper_(sums[n], g[mask].double())
                del grads
                yield None
    finally:
        for h in handles:
            h.remove()
    for s in sums.values():
        mirror_lower_(s)
    yield sums


def time_capture(model, batches, tokens):
    names = covsvd.find_targets(model, TARGETS)
    twin, bare = copy.deepcopy(model), copy.deepcopy(model)  # own copies: the capture's hooks stay off them
    t0 = time.perf_counter()
    cap = OutputCapture(model, mode="probe", targets=TARGETS, kind="full", seed=0)
    cap.__enter__()
    t_set = time.perf_counter() - t0
    ref, fb = reference(twin, names, batches), reference(bare, names, batches, gram=False)
    run = {"cap": lambda b: cap.add(b), "ref": lambda b: next(ref), "fb": lambda b: next(fb)}
    tot = dict.fromkeys(run, 0.0)
    tot["cap"] = t_set
    per = []
    try:
        for i, batch in enumerate(batches):
            order = list(run)[i % 3:] + list(run)[:i % 3]  # rotated per batch
            times = {}
            for which in order:
                t0 = time.perf_counter()
                run[which](batch)
                times[which] = time.perf_counter() - t0
                tot[which] += times[which]
            per.append(times["cap"] / times["ref"])
    finally:
        t0 = time.perf_counter()
        cap.__exit__(None, None, None)
        tot["cap"] += time.perf_counter() - t0
    t0 = time.perf_counter()
    G = cap.moments()
    tot["cap"] += time.perf_counter() - t0
    sums = next(ref)
    agree = max(float((G[n].sum_xx - sums[n]).norm() / sums[n].norm()) for n in names)
    return dict(capture=tot["cap"], reference=tot["ref"], fb=tot["fb"], ratio=tot["cap"] / tot["ref"],
                median=sorted(per)[len(per) // 2], agree=agree, targets=len(names), tokens=tokens,
                batches=len(batches))


def memory_7b():
    """``{(side, kind): MemoryEstimate}`` for Llama-2-7B shapes, on the meta device (no weights)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    return {(side, kind): covsvd.estimate_memory(model, kind=kind, side=side)
            for side in ("output", "input") for kind in ("diag", "full")}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=12000)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "output_capture.md")
    args = ap.parse_args()
    torch.manual_seed(0)
    model, tok = covsvd.load_default_model()
    batches = covsvd.calibration_batches(tok, max_tokens=args.tokens, seq_len=128, batch_size=16)
    tokens = covsvd.count_tokens(batches)
    load0 = os.getloadavg()[0]
    r = time_capture(model, batches, tokens)
    fb = r["fb"]
    load1 = os.getloadavg()[0]
    mem = memory_7b()
    lines = [
        "# output-moment capture benchmark",
        "",
        f"Default model (all-MiniLM-L6-v2, fp32), {r['tokens']:,} real tokens of `calibration_batches(tok, "
        f"max_tokens={args.tokens}, seq_len=128, batch_size=16)` ({r['batches']} batches), mode `probe` "
        f"(probes=1), kind `full`, the {r['targets']} encoder targets (`targets=r\"{TARGETS}\"`: `pooler.dense` does "
        f"not reach the final hidden states and is refused). CPU: {platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; load average {load0:.1f} at start, {load1:.1f} at end (the three "
        f"methods were timed on each batch in turn, each on its own copy of the model). `python bench/output_capture.py` reproduces it.",
        "",
        "| measure | value | target |",
        "|---|---:|---|",
        f"| capture_output_moments, one OutputCapture session incl. set-up and moments() (s) | {r['capture']:.2f} | |",
        f"| reference: same forward + autograd.grad backward + the same fp64 Gram products (s) | {r['reference']:.2f} | |",
        f"| forward + backward alone: the reference without its Gram products (s) | {fb:.2f} | |",
        f"| (1) capture / reference | {r['ratio']:.3f} (median per batch {r['median']:.3f}) | <= 1.15: "
        f"{'met' if max(r['ratio'], r['median']) <= 1.15 else '**missed**'} |",
        f"| (2) capture / (forward + backward) | {r['capture'] / fb:.2f} | |",
        f"| (3) max relative Frobenius difference of G, capture vs reference | {r['agree']:.1e} | |",
        "",
        "Memory of the fp64 accumulators at Llama-2-7B shapes (hidden 4096, MLP 11008, 32 layers, 7 targets per "
        "layer = 224; `lm_head` is not a default target), from `covsvd.estimate_memory(model, kind=..., "
        "side=...)` on a `LlamaForCausalLM` built on the meta device (no weights, so the input side assumes no "
        "sharing: its upper bound). Output side: `sum_xx` (d_out^2 or d_out) + `sum_x` + `sum_abs` per target, "
        "all at once; the per-batch row buffer is tokens x 11008 x 8 B (2048 tokens: "
        f"{format_bytes(mem[('output', 'diag')].row_buffer_bytes(2048))}).",
        "",
        "| side | kind | accumulators | every one at once |",
        "|---|---|---:|---:|",
    ]
    for (side, kind), est in mem.items():
        lines.append(f"| {side} | {kind} | {len(est.groups)} | {format_bytes(est.total_bytes)} |")
    text = "\n".join(lines) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
