"""Notebook helpers for a quantized base (notebooks/11_quantized_base.ipynb): the quantized starting points of a
layer under every metric and start, and their errors per iterate.

A *run* is one :func:`~covsvd.algebra.loftq.quantize_residual` call with ``keep="all"`` (every iterate kept): a
``(metric, start)`` pair. The starting points the notebook compares are iterates of these runs::

    QLoRA            ("identity", "zero")     iterate 0   quant(W), adapter zero
    QPiSSA           ("identity", "oriented") iterate 0   plain top-r SVD, quant(W_res)
    diag / full      (metric, "oriented")     iterate 0   the metric's top-r, quant(W_res)
    LoftQ k          (metric, "zero")         iterate k   peft's LoftQ with num_iter=k under identity

Errors (all fp64, relative): ``cal_error`` / ``held_error`` the functional error
``||(W - B) M^{1/2}||_F / ||W M^{1/2}||_F`` with ``M = C + eps I`` of the calibration / held-out moments
(``B = dequant(Q) + U S P``), ``fro_error`` the plain Frobenius one, ``objective`` what the run's metric lowers.
"""

from __future__ import annotations

import torch

from ..algebra.damping import DEFAULT_EPS, DEFAULT_EPS_MODE, resolve_eps
from ..algebra.loftq import QuantizedResidual, quantize_residual
from ..algebra.measures import functional_error, functional_reference

__all__ = ["RUNS", "damped_matrix", "iterate_weight", "layer_runs", "layer_rows"]

#: The runs per layer: (metric, start) -> whether it iterates (diag only gives its iterate 0).
RUNS = {("identity", "zero"): True, ("identity", "oriented"): True, ("diag", "oriented"): False,
        ("full", "zero"): True, ("full", "oriented"): True}
F64 = torch.float64


def damped_matrix(moment, eps: float = DEFAULT_EPS, eps_mode: str = DEFAULT_EPS_MODE) -> torch.Tensor:
    """Dense ``C + eps I`` ``(d_in, d_in)`` fp64 of a full :class:`~covsvd.SecondMoment` (eps as orient resolves it)."""
    C = moment.matrix().to(F64)
    return C + resolve_eps(eps, eps_mode, float(C.diagonal().mean())) * torch.eye(C.shape[0], dtype=F64)


def iterate_weight(res: QuantizedResidual, k: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``dequant(Q_k) + U_k diag(S_k) P_k`` ``(d_out, d_in)`` in ``dtype`` (summed in it) of iterate k of a
    ``keep="all"`` run."""
    U, S, P, base = res.history[k]
    return base.dequantize().to(dtype) + (U.to(dtype) * S.to(dtype)) @ P.to(dtype)


def layer_runs(W: torch.Tensor, moment, r: int, iters: int, *, runs=RUNS, eps: float = DEFAULT_EPS,
               eps_mode: str = DEFAULT_EPS_MODE, **options) -> dict:
    """``{(metric, start): QuantizedResidual}`` (``keep="all"``) of one layer ``W (d_out, d_in)`` for every run
    in ``runs``; ``options`` go to :func:`quantize_residual` (quant, blocksize, double_quant, ...)."""
    return {(metric, start): quantize_residual(W, moment, r, metric, iters=iters if it else 0, start=start,
                                               keep="all", eps=eps, eps_mode=eps_mode, **options)
            for (metric, start), it in runs.items()}


def layer_rows(name: str, W: torch.Tensor, results: dict, M_cal: torch.Tensor, M_held: torch.Tensor) -> list[dict]:
    """One row per (run, iterate): ``layer, metric, start, k, kept`` (the run's best), ``objective, cal_error,
    held_error, fro_error, bits, adapter_params``. ``M_cal``, ``M_held``: dense ``(d_in, d_in)`` fp64
    (:func:`damped_matrix`); the errors are :func:`covsvd.functional_error`'s."""
    ref_cal, ref_held = functional_reference(W, M_cal), functional_reference(W, M_held)  # once, not per iterate
    rows = []
    for (metric, start), res in results.items():
        for k in range(len(res.history)):
            B = iterate_weight(res, k, F64)  # errors of the stored tensors, summed in fp64
            rows.append(dict(layer=name, metric=metric, start=start, k=k, kept=k == res.best,
                             objective=res.errors[k], cal_error=functional_error(W, B, M_cal, reference=ref_cal),
                             held_error=functional_error(W, B, M_held, reference=ref_held), fro_error=res.fro_errors[k],
                             bits=res.bits, adapter_params=0 if (start == "zero" and k == 0)
                             else res.info["adapter_params"]))
    return rows


def random_decoder(seed: int, vocab_size: int, hidden: int = 128, layers: int = 2):
    """A randomly initialised Llama decoder (``transformers.LlamaModel``, eval mode, no gradients): ``hidden``
    wide, FFN ``2.6875 hidden`` (Llama's ratio), 4 query / 2 key-value heads, weights drawn by transformers'
    init (normal, std 0.02) after ``torch.manual_seed(seed)``; ``vocab_size`` the tokenizer's."""
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=int(2.6875 * hidden),
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256)
    model = LlamaModel(config).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model
