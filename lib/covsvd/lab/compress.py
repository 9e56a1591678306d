"""Truncating a model's Linear layers per metric, and measuring what that does to the model's output.

The compression tables of SVD-LLM / ASVD / CorDA in miniature. Per layer, :func:`factor` orients ``W``
at *full* rank ``k = min(d_out, d_in)`` (one :func:`covsvd.orient` call), so every truncation is a
prefix of the same factors::

    W = U diag(S) P  (k components, S descending under the metric's own norm)
    keep_top(o, r)    = U[:, :r] diag(S[:r]) P[:r]     the best rank-r weight under that metric
    drop_bottom(o, r) = keep_top(o, k - r)             the r smallest components removed

``drop_bottom(o, r)`` equals ``orient(W, C, r, components="bottom").W_res`` (the weight *minus* its r
smallest components: CorDA's knowledge-preserving split) and ``keep_top(o, r)`` equals
``orient(W, C, r) .U S P``: one decomposition per layer and metric serves every ratio.

How a "fraction kept" is counted (:func:`rank_for`):

* ``count="params"`` (SVD-LLM's and ASVD's compression ratio): a rank-r layer is stored as two factors,
  ``U_r diag(S_r)`` ``(d_out, r)`` and ``P_r`` ``(r, d_in)``, i.e. ``r (d_out + d_in)`` numbers against
  ``d_out d_in`` for the dense weight. Keeping a fraction ``f`` of the parameters means the largest r with
  ``r (d_out + d_in) <= f d_out d_in``. Biases are not counted (they are kept whole).
* ``count="rank"``: the largest r with ``r <= f min(d_out, d_in)``.

The model-level layer: :func:`factor_layers` (one :class:`~covsvd.Oriented` per target),
:func:`truncated_weights`, and :func:`swapped_weights` (a context manager that puts the truncated weights
in and restores the originals bit for bit). The measures: :func:`reference_outputs` runs the unmodified
model once on held-out batches; :func:`compare_outputs` runs the modified one and returns the relative
error of the final hidden states over real tokens and the cosine between mean-pooled embeddings (how a
sentence-transformers model is used).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from ..algebra.damping import DEFAULT_EPS, DEFAULT_EPS_MODE
from ..algebra.orient import Oriented, orient
from ..data.targets import find_targets, weight_matrix
from .task import mean_pool

COUNTS = ("params", "rank")


# ------------------------------------------------------------------------------------------ ranks


def factored_parameters(d_out: int, d_in: int, r: int) -> int:
    """Numbers stored by a rank-r factored layer: ``r (d_out + d_in)`` (``U_r S_r`` and ``P_r``; no bias)."""
    return r * (d_out + d_in)


def rank_for(d_out: int, d_in: int, keep: float, count: str = "params") -> int:
    """The largest rank that keeps at most a fraction ``keep`` of a ``(d_out, d_in)`` layer, at least 1.

    ``count="params"``: ``r (d_out + d_in) <= keep d_out d_in`` (SVD-LLM / ASVD: factored storage; at
    ``keep = 1`` a square layer gets ``r = d/2``, where factoring stops saving anything).
    ``count="rank"``: ``r <= keep min(d_out, d_in)``. Either way ``r <= min(d_out, d_in)``.
    """
    if count not in COUNTS:
        raise ValueError(f"count={count!r}; expected one of {COUNTS}")
    if not (isinstance(keep, (int, float)) and 0 < keep <= 1):
        raise ValueError(f"keep={keep!r} must be a fraction in (0, 1] (the share of the layer kept)")
    if d_out < 1 or d_in < 1:
        raise ValueError(f"layer shape ({d_out}, {d_in}) must be positive")
    k = min(d_out, d_in)
    # a tiny slack so that e.g. keep=0.6 of 384 gives 230 (not 229 from 0.6*384 = 230.39999...)
    if count == "params":
        r = math.floor(keep * d_out * d_in / (d_out + d_in) + 1e-9)
    else:
        r = math.floor(keep * k + 1e-9)
    return max(1, min(k, r))


# ------------------------------------------------------------------------------------ one layer


def factor(
    W: torch.Tensor,
    C,
    metric: str,
    eps: float = DEFAULT_EPS,
    eps_mode: str = DEFAULT_EPS_MODE,
    *,
    compute_dtype: torch.dtype = torch.float64,
    name: str | None = None,
    **orient_kwargs,
) -> Oriented:
    """All ``k = min(d_out, d_in)`` components of ``W (d_out, d_in)`` under ``metric``: ``orient(W, C, k)``.

    The factors are returned in ``compute_dtype`` (fp64 by default; the decompositions run in it too),
    so truncations formed from them carry no storage rounding. ``C``, ``metric``, ``eps``, ``eps_mode``
    and ``orient_kwargs`` (``solver``, ``alpha``) are :func:`covsvd.orient`'s; as there, a
    :class:`~covsvd.SecondMoment` must have seen at least ``k`` real tokens (orient's ``count >= r`` check,
    at ``r = k``). ``info`` is orient's,
    plus ``"factor_s"`` (wall seconds).
    """
    if orient_kwargs.get("components", "top") != "top":
        raise ValueError("factor() keeps every component in descending order; truncate with keep_top / "
                         "drop_bottom instead of passing components=")
    orient_kwargs.pop("components", None)
    if W.dim() != 2:
        raise ValueError(f"layer {name!r}: W must be (d_out, d_in); got {tuple(W.shape)}")
    k = min(W.shape)
    t0 = time.perf_counter()
    o = orient(W, C, k, metric=metric, eps=eps, eps_mode=eps_mode, compute_dtype=compute_dtype,
               storage_dtype=compute_dtype, name=name, **orient_kwargs)
    o.info["factor_s"] = time.perf_counter() - t0
    return o


def _check_r(o: Oriented, r: int, what: str) -> int:
    k = o.S.shape[0]
    if isinstance(r, bool) or not isinstance(r, int) or not 0 <= r <= k:
        raise ValueError(f"layer {o.info.get('name')!r}: {what} r={r!r} must be an int in [0, {k}] "
                         f"(the layer has k = {k} components)")
    return k


def keep_top(o: Oriented, r: int) -> torch.Tensor:
    """``U[:, :r] diag(S[:r]) P[:r]`` ``(d_out, d_in)`` in the factors' dtype: the r largest components.

    ``o`` must come from :func:`factor` (all components). ``r = 0`` gives zeros, ``r = k`` gives ``W``
    (to the rounding of the factors' dtype).
    """
    _check_r(o, r, "keep_top")
    return (o.U[:, :r] * o.S[:r]) @ o.P[:r]  # (d_out, d_in)


def drop_bottom(o: Oriented, r: int) -> torch.Tensor:
    """``W`` minus its r smallest components under the metric: ``keep_top(o, k - r)`` (CorDA Table 6 style)."""
    k = _check_r(o, r, "drop_bottom")
    return keep_top(o, k - r)


# ---------------------------------------------------------------------------------- whole model


def factor_layers(
    model: nn.Module,
    moments: Mapping | None,
    metric: str,
    targets=None,
    eps: float = DEFAULT_EPS,
    eps_mode: str = DEFAULT_EPS_MODE,
    *,
    compute_dtype: torch.dtype = torch.float64,
    **orient_kwargs,
) -> dict[str, Oriented]:
    """``{name: factor(W, moments[name], metric)}`` for every target (:func:`covsvd.find_targets` spec;
    default: the keys of ``moments``, or every Linear / Conv1D when ``moments`` is None).

    ``metric="identity"`` ignores ``moments``. A target without a moment raises, naming it.
    Decompositions in ``compute_dtype`` (fp64 default).
    """
    if targets is None and moments is not None:
        names = find_targets(model, list(moments))
    else:
        names = find_targets(model, targets)
    out = {}
    for name in names:
        if metric == "identity":
            C = None
        elif moments is None or name not in moments:
            have = [] if moments is None else list(moments)[:3]
            raise ValueError(f"layer {name!r}: metric={metric!r} needs its second moment, but moments has no "
                             f"entry for it (have e.g. {have}); capture it or leave it out of targets")
        else:
            C = moments[name]
        W = weight_matrix(model.get_submodule(name)).detach()  # (d_out, d_in)
        out[name] = factor(W, C, metric, eps, eps_mode, compute_dtype=compute_dtype, name=name, **orient_kwargs)
    return out


def truncated_weights(factors: Mapping[str, Oriented], ranks: Mapping[str, int], mode: str = "keep") -> dict:
    """``{name: (d_out, d_in) weight}``: ``keep_top(o, ranks[name])`` (``mode="keep"``) or
    ``drop_bottom(o, ranks[name])`` (``mode="drop"``) for every layer in ``factors``."""
    if mode not in ("keep", "drop"):
        raise ValueError(f"mode={mode!r}; expected 'keep' (the r largest components) or 'drop' (remove the r smallest)")
    missing = [n for n in factors if n not in ranks]
    if missing:
        raise ValueError(f"no rank for layer(s) {missing[:3]} ({len(missing)} in all); give every factored layer a rank")
    fn = keep_top if mode == "keep" else drop_bottom
    return {n: fn(o, ranks[n]) for n, o in factors.items()}


@contextmanager
def swapped_weights(model: nn.Module, weights: Mapping[str, torch.Tensor]):
    """Within the ``with`` block, the named Linear / Conv1D modules use ``weights[name]`` (``(d_out, d_in)``,
    cast to the module's dtype and device); on exit (also on error) the original weights are restored
    bit for bit. Raises before changing anything on a wrong shape or two names sharing one weight."""
    modules = {n: model.get_submodule(n) for n in weights}
    seen: dict[int, str] = {}
    for n, m in modules.items():
        W = weight_matrix(m)
        if tuple(weights[n].shape) != tuple(W.shape):
            raise ValueError(f"layer {n!r}: replacement weight has shape {tuple(weights[n].shape)}; the layer's "
                             f"(d_out, d_in) is {tuple(W.shape)}")
        ptr = m.weight.data_ptr()
        if ptr in seen:
            raise ValueError(f"layers {seen[ptr]!r} and {n!r} share one weight tensor (tied); swap one of them only")
        seen[ptr] = n
    saved = {n: m.weight.detach().clone() for n, m in modules.items()}
    try:
        with torch.no_grad():
            for n, m in modules.items():
                weight_matrix(m).copy_(weights[n].to(m.weight.dtype))
        yield model
    finally:
        with torch.no_grad():
            for n, m in modules.items():
                m.weight.copy_(saved[n])


# ------------------------------------------------------------------------------------- measures


@dataclass(frozen=True)
class Reference:
    """The unmodified model's outputs on ``batches``: per batch the real-token final hidden states
    ``(n_real, d)`` fp32, and the L2-normalised mean-pooled embeddings ``(n_seq, d)`` fp32."""

    batches: list
    hidden: list
    pooled: torch.Tensor

    @property
    def tokens(self) -> int:
        return sum(h.shape[0] for h in self.hidden)


def _outputs(model: nn.Module, batches: Iterable[dict]) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    """Per batch: ``(real-token hidden (n_real, d), pooled (B, d))``, fp32, under ``torch.no_grad()``."""
    device = next(model.parameters()).device
    with torch.no_grad():
        for b in batches:
            mask = b["attention_mask"].to(device)  # (B, T)
            out = model(input_ids=b["input_ids"].to(device), attention_mask=mask)
            hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]  # (B, T, d)
            yield hidden[mask.bool()].float(), mean_pool(hidden, mask)


def reference_outputs(model: nn.Module, batches: Iterable[dict]) -> Reference:
    """Run ``model`` (unmodified) on ``batches`` (dicts with ``input_ids`` and ``attention_mask``)."""
    batches = list(batches)
    if not batches:
        raise ValueError("reference_outputs: no batches; pass held-out batches (covsvd.calibration_batches(tok, split='heldout'))")
    hidden, pooled = [], []
    for h, p in _outputs(model, batches):
        hidden.append(h)
        pooled.append(p)
    return Reference(batches, hidden, torch.cat(pooled))


def compare_outputs(model: nn.Module, ref: Reference) -> dict[str, float]:
    """The model's outputs on ``ref.batches`` against ``ref``.

    Returns ``hidden_rel_error`` = ``||H - H_ref||_F / ||H_ref||_F`` over every real token's final hidden
    state (sums of squares in fp64), ``cosine_mean`` / ``cosine_min`` of the mean-pooled embeddings
    against the reference ones (one per sequence), ``tokens``, ``sequences`` and ``seconds`` (the forward).
    """
    t0 = time.perf_counter()
    err = ref_sq = 0.0
    cos = []
    for (h, p), h0, i in zip(_outputs(model, ref.batches), ref.hidden, range(len(ref.hidden)), strict=True):
        if h.shape != h0.shape:
            raise ValueError(f"batch {i}: hidden states {tuple(h.shape)} vs reference {tuple(h0.shape)}; "
                             "compare on the reference's own batches")
        err += float(((h.double() - h0.double()) ** 2).sum())
        ref_sq += float((h0.double() ** 2).sum())
        cos.append(p)
    pooled = torch.cat(cos)  # (n_seq, d), unit rows
    c = (pooled.double() * ref.pooled.double()).sum(-1)  # (n_seq,)
    return dict(hidden_rel_error=math.sqrt(err / ref_sq), cosine_mean=float(c.mean()), cosine_min=float(c.min()),
                tokens=ref.tokens, sequences=int(c.shape[0]), seconds=time.perf_counter() - t0)
