"""Helpers of notebook 10 (the output side): full-rank factors of every arm that weighs the output, the model's
output error of truncating one layer at a time, and disjoint calibration subsets as seeds.

Arms (:data:`ARMS`), each a :func:`covsvd.orient` call at full rank (so every truncation is a prefix, as in
:mod:`covsvd.lab.compress`):

* ``identity``, ``diag``, ``full``: the one-sided metrics (input moment C only);
* ``two-sided``: ``N^{1/2} W M^{1/2}`` with the full output moment ``G`` and the full input moment ``C``;
* ``diag-G``: two-sided with ``G``'s diagonal only and the full ``C`` (FWSVD weighs W's rows by a diagonal Fisher
  with ``C = I``; keeping the full C here isolates what G's off-diagonal part adds to ``two-sided``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from ..algebra.damping import DEFAULT_EPS, DEFAULT_EPS_MODE
from ..algebra.orient import Oriented
from ..capture.moments import SecondMoment
from ..data.targets import weight_matrix
from .compress import Reference, compare_outputs, factor, keep_top, swapped_weights

#: The arms of notebook 10: ``{arm: (metric, output side)}`` with the output side ``None`` (one-sided),
#: ``"full"`` or ``"diag"`` (module doc).
ARMS = {"identity": ("identity", None), "diag": ("diag", None), "full": ("full", None),
        "two-sided": ("two-sided", "full"), "diag-G": ("two-sided", "diag")}


def arm_factors(model: nn.Module, moments: Mapping[str, SecondMoment], outputs: Mapping[str, SecondMoment] | None,
                arm: str, names: Sequence[str], *, eps: float = DEFAULT_EPS, eps_mode: str = DEFAULT_EPS_MODE,
                eps_output: float = DEFAULT_EPS) -> dict[str, Oriented]:
    """``{name: orient(W, C, k, ...)}`` at full rank ``k`` for ``arm`` (:data:`ARMS`), fp64 factors.

    ``moments``: full input moments; ``outputs``: full output moments (:func:`covsvd.capture_output_moments`),
    needed by the output arms (``diag-G`` takes their diagonal). Raises ``ValueError`` for an unknown arm and
    as :func:`covsvd.orient` does (naming the layer)."""
    if arm not in ARMS:
        raise ValueError(f"arm={arm!r}; expected one of {list(ARMS)}")
    metric, side = ARMS[arm]
    if side is not None and outputs is None:
        raise ValueError(f"arm={arm!r} weighs the output: pass outputs (covsvd.capture_output_moments)")
    out = {}
    for n in names:
        W = weight_matrix(model.get_submodule(n)).detach()  # (d_out, d_in)
        C = None if metric == "identity" else moments[n]
        kw = {}
        if side is not None:
            kw = dict(output=outputs[n] if side == "full" else outputs[n].to_diag(), eps_output=eps_output)
        out[n] = factor(W, C, metric, eps, eps_mode, name=n, **kw)
    return out


def layer_at_a_time(model: nn.Module, factors: Mapping[str, Oriented], r: int, ref: Reference) -> dict[str, float]:
    """``{name: hidden_rel_error}``: the model's output error (:func:`covsvd.lab.compress.compare_outputs` on
    ``ref``) with only that layer truncated to rank ``r`` (the others original), one forward pass per layer."""
    errs = {}
    for n, o in factors.items():
        with swapped_weights(model, {n: keep_top(o, r)}):
            errs[n] = compare_outputs(model, ref)["hidden_rel_error"]
    return errs


def disjoint_subsets(batches: Sequence, n: int) -> list[list]:
    """``n`` disjoint calibration subsets of ``batches`` (every n-th batch from offset i): the notebook's seeds.
    Raises ``ValueError`` for fewer batches than subsets."""
    batches = list(batches)
    if n < 1 or len(batches) < n:
        raise ValueError(f"cannot split {len(batches)} batches into {n} non-empty subsets")
    return [batches[i::n] for i in range(n)]


def output_eigenvalues(outputs: Mapping[str, SecondMoment]) -> dict[str, torch.Tensor]:
    """``{name: eigenvalues of E[g g^T]}`` ``(d_out,)`` fp64, descending (``eigvalsh`` of the full moment)."""
    return {n: torch.linalg.eigvalsh(G.matrix()).flip(0) for n, G in outputs.items()}
