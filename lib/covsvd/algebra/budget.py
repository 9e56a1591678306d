"""Ranks from spectra and costs under a budget: the pure part of :mod:`covsvd.adapt.allocate` (no modules, fp64).

Notation as in :mod:`covsvd.adapt.allocate`: ``e_l(r)`` the dropped energy of layer l at rank r, ``c_l`` its cost per rank.

Objectives (:data:`OBJECTIVES`), what ``e_l(r)`` measures from the singular values ``S_l`` of ``W_l T_l``:

* ``"relative"``: ``e_l(r) = sum_{i >= r} S_{l,i}^2 / sum_i S_{l,i}^2``, the squared relative error of the layer
  (between 0 and 1 in every layer: not commensurable across layers).
* ``"absolute"``: ``e_l(r) = sum_{i >= r} S_{l,i}^2``, the unnormalised squared error. Under the two-sided metric
  (``S`` of ``N^{1/2} W M^{1/2}``, docs/algebra.md) it is ``||N^{1/2} (W - B) M^{1/2}||_F^2``, twice the
  per-token estimate of the change of the loss (fisher) or of ``E||H(B) - H(W)||^2`` (probe): every layer in
  the same units, so a sum over layers means something.

Every rule below takes ``objective=``; only the gains ``gamma_{l,i}`` (relative: ``S^2 / sum S^2``; absolute:
``S^2``) change, and the arguments hold for both (they need only ``gamma`` non-negative and non-increasing in i).

Rules (:data:`RULES`):

* ``"optimal"`` (:func:`optimal_ranks`): minimise ``sum_l e_l(r_l)`` subject to
  ``sum_l c_l r_l <= budget`` and ``r_min <= r_l <= r_max``. Exact, by this argument:

  1. Write ``e_l(r) = 1 - sum_{i < r} gamma_{l,i}`` with ``gamma_{l,i} = S_{l,i}^2 / sum S_l^2``. Because ``S_l``
     is sorted, ``gamma_{l,i}`` is non-increasing in ``i`` (e_l is convex in r). A rank vector is a set of
     "items" ``(l, i)``, a prefix ``i < r_l`` of each layer, each item costing ``c_l``. The items below
     ``r_min`` are forced (their cost comes off the budget); those from ``r_max`` on are not offered.
  2. Group the layers by cost ``c``. Given how many items ``k_c`` a cost class takes, its cost ``k_c c`` is
     fixed, so the best choice is the ``k_c`` largest gammas of the class. Sorted stably (ties keep layer
     order, then index order), those ``k_c`` items are a prefix of each layer: a valid rank vector. So the
     problem is exactly ``max sum_c G_c(k_c)`` s.t. ``sum_c c k_c <= budget``, with ``G_c(k)`` the sum of the
     class's k largest gammas. (With one class, e.g. ``cost="gain"``, that is the greedy top-k: exact.)
  3. That is solved exactly by dynamic programming over the classes on the budget lattice of
     ``g = gcd(costs)``: every attainable cost is a multiple of g, so ``floor(budget / g)`` units lose
     nothing. ``D_c(b) = max_k D_prev(b - k c/g) + G_c(k)``, fp64; backtracking gives each ``k_c``.
  4. Then, while some layer's next rank fits in what is left, the one with the largest gamma is added
     (gammas are >= 0, so the objective does not rise). Hence the budget is respected and no layer can take
     one more rank within it ("within one rank step"), unless every layer is at ``r_max``.

  Greedy by ``gamma / c`` (largest ratio first) is optimal only for the fractional relaxation when the
  costs differ; it can leave a cheap improvement unused, which the DP does not. Cost: the DP is
  ``O(sum_c K_c * budget / g)`` time and ``O(n_classes * budget / g)`` memory (``K_c`` the items class c
  can afford); for transformers n_classes is 1-3 (one per distinct ``d_in + d_out``).

* ``"tolerance"`` (:func:`tolerance_ranks`, PGSVD-like): one error tolerance for every layer. For ``tau >= 0``
  let ``r_l(tau)`` be the smallest ``r`` in ``[r_min, r_max_l]`` with ``e_l(r) <= tau`` (``r_max_l`` when none
  is: the layer is clipped) (:func:`ranks_at_tolerance`), and ``cost(tau) = sum_l c_l r_l(tau)``, non-increasing
  in tau. The rule returns ``r(tau*)`` with ``tau* = min {tau in T : cost(tau) <= budget}`` over the finite set
  ``T = {e_l(r) : r_min <= r <= r_max_l}`` (``cost`` changes only there; ``tau*`` exists, since at
  ``max_l e_l(r_min)`` every layer sits at r_min). Equivalently (without clipping), ``tau*`` is the minimax
  value ``min over rank vectors within the budget of max_l e_l(r_l)``, and ``r(tau*)`` is the componentwise
  smallest rank vector attaining it: the tightest tolerance the budget affords, with no parameter spent
  beyond what it needs. It may leave budget unspent (less than what lowering tau to the next value in T
  would cost); it does not fill it, or the tolerance would no longer be one. Found by bisection on sorted T:
  ``O(log |T|)`` evaluations of ``O(sum_l k_l)``.

* ``"threshold"`` (:func:`threshold_ranks`, EVA-like): per layer the smallest r whose kept energy
  ``1 - e_l(r)`` reaches ``energy``, clipped to ``[r_min, r_max]``. The budget does not shape it: when a
  budget is given, :func:`allocate_ranks` raises if the allocation costs more (lower ``energy``, raise the
  budget, or use ``"optimal"``); ``budget=None`` skips the check.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from ..util.checks import check_choice, check_count

#: Parameters one rank costs: ``"lora"`` ``d_in + d_out`` (a LoRA A/B pair), ``"gain"`` 1 (the gain ``g``).
COSTS = ("lora", "gain")
#: ``"optimal"``: the exact budgeted minimum (:func:`optimal_ranks`); ``"threshold"``: an energy fraction per layer
#: (:func:`threshold_ranks`); ``"tolerance"``: one error tolerance for every layer (:func:`tolerance_ranks`).
RULES = ("optimal", "threshold", "tolerance")
#: What ``e_l(r)`` measures: ``"relative"`` or ``"absolute"`` squared error (module doc).
OBJECTIVES = ("relative", "absolute")
F64 = torch.float64


def _gammas(S: torch.Tensor, name: str, objective: str = "relative") -> torch.Tensor:
    """``S_i^2 / sum S^2`` (relative) or ``S_i^2`` (absolute), (k,) fp64, after checking ``S`` is a finite,
    non-negative, descending spectrum (relative: not all zero)."""
    if not isinstance(S, torch.Tensor) or S.dim() != 1 or S.numel() == 0:
        raise ValueError(f"layer {name!r}: a spectrum must be a non-empty 1-D tensor of singular values; got "
                         f"{getattr(S, 'shape', type(S).__name__)}")
    check_choice("objective", objective, OBJECTIVES, "unknown ")
    s = S.detach().to(F64)
    if not bool(torch.isfinite(s).all()) or bool((s < 0).any()) or bool((s[1:] > s[:-1]).any()):
        raise ValueError(f"layer {name!r}: the spectrum {tuple(s.shape)} must be finite, >= 0 and descending "
                         "(torch.linalg.svdvals order)")
    if objective == "absolute":
        return s * s
    if float(s[0]) == 0.0:
        raise ValueError(f"layer {name!r}: W T is zero (all {s.numel()} singular values are 0), so its relative "
                         "error is undefined; leave the layer out of targets")
    s2 = (s / s[0]) ** 2  # scaled by the largest first: no underflow / overflow in the squares
    return s2 / s2.sum()


def dropped_energy(S: torch.Tensor, objective: str = "relative") -> torch.Tensor:
    """``e(r)`` for ``r = 0..k``: ``(k + 1,)`` fp64, non-increasing, down to 0.

    ``"relative"``: ``sum_{i >= r} S_i^2 / sum S^2`` (from 1; ``1 -`` the cumulative kept share); ``"absolute"``:
    ``sum_{i >= r} S_i^2`` (summed from the tail, smallest first). ``S`` ``(k,)``: singular values, descending
    (e.g. :func:`metric_spectrum`). For the ``full`` metric the relative ``e(r)`` is the squared relative
    functional error of the rank-r orientation; for ``two-sided`` the absolute one is its squared error.
    """
    gam = _gammas(S, "spectrum", objective)
    if objective == "absolute":
        return torch.cat([gam.flip(0).cumsum(0).flip(0), gam.new_zeros(1)])  # (k + 1,)
    kept = torch.cat([gam.new_zeros(1), gam.cumsum(0)])  # (k + 1,)
    return (1.0 - kept).clamp_min(0.0)



def rank_costs(shapes: Mapping[str, tuple[int, int]], cost: str = "lora") -> dict[str, int]:
    """``{name: parameters per rank}`` from ``{name: (d_out, d_in)}``: ``d_in + d_out`` (``"lora"``) or 1 (``"gain"``)."""
    check_choice("cost", cost, COSTS, "unknown ")
    return {n: (int(d_out) + int(d_in) if cost == "lora" else 1) for n, (d_out, d_in) in shapes.items()}


def allocation_cost(ranks: Mapping[str, int], costs: Mapping[str, int]) -> int:
    """``sum_l r_l c_l``: the parameters an allocation spends (``costs`` from :func:`rank_costs`)."""
    missing = [n for n in ranks if n not in costs]
    if missing:
        raise ValueError(f"no cost for layer(s) {missing[:5]} ({len(missing)} in all)")
    return sum(int(r) * int(costs[n]) for n, r in ranks.items())


def allocation_error(ranks: Mapping[str, int], spectra: Mapping[str, torch.Tensor], objective: str = "relative"
                     ) -> float:
    """``sum_l e_l(r_l)``: the objective of :func:`optimal_ranks` (summed squared relative or absolute errors), fp64."""
    missing = [n for n in ranks if n not in spectra]
    if missing:
        raise ValueError(f"no spectrum for layer(s) {missing[:5]} ({len(missing)} in all)")
    total = 0.0
    for n, r in ranks.items():
        e = dropped_energy(spectra[n], objective)  # (k + 1,)
        if isinstance(r, bool) or not isinstance(r, int) or not 0 <= r < e.numel():
            raise ValueError(f"layer {n!r}: r={r!r} must be an int in [0, {e.numel() - 1}]")
        total += float(e[r])
    return total


def check_rank_bounds(r_min, r_max, least: int) -> None:
    check_count("r_min", r_min, least)
    if r_max is not None and (isinstance(r_max, bool) or not isinstance(r_max, int) or r_max < r_min):
        raise ValueError(f"r_max={r_max!r} must be None or an int >= r_min={r_min}")


def _bounds(spectra: Mapping[str, torch.Tensor], r_min: int, r_max: int | None) -> dict[str, tuple[int, int]]:
    """``{name: (lo, hi)}``: ``r_min`` and ``r_max`` (default: each layer's k), checked against every layer."""
    if not spectra:
        raise ValueError("no layers to allocate ranks to (spectra is empty)")
    check_rank_bounds(r_min, r_max, 0)
    out = {}
    for n, S in spectra.items():
        k = int(S.numel())
        hi = k if r_max is None else r_max
        if hi > k or r_min > k:
            raise ValueError(f"layer {n!r}: r_min={r_min} / r_max={r_max} beyond min(d_out, d_in) = {k} "
                             f"(its number of singular values); use r_max <= {k} or leave the layer out")
        out[n] = (r_min, hi)
    return out


def _check_costs(costs: Mapping[str, int], names) -> dict[str, int]:
    out = {}
    for n in names:
        c = costs.get(n)
        if isinstance(c, bool) or not isinstance(c, int) or c < 1:
            raise ValueError(f"layer {n!r}: cost per rank {c!r} must be an int >= 1 (see rank_costs)")
        out[n] = c
    return out


def _class_dp(picked: list, left: int) -> list[int]:
    """Items taken per cost class: ``argmax sum_c G_c(k_c)`` s.t. ``sum_c c k_c <= left`` (module doc, step 3).

    ``picked``: per class ``(cost, owner, gains sorted descending (N,) fp64)``. The table ``best[b]`` (the most
    gain within ``b`` units of ``g = gcd(costs)``, fp64) is built class by class; the last class needs no table
    (it is evaluated at ``b = units`` alone), so the class that can afford the most items goes last. Ties take
    more items (less left for the fill).
    """
    if not picked or left <= 0:
        return [0] * len(picked)
    unit = math.gcd(*(cost for cost, _, _ in picked))
    units = left // unit
    afford = [min(g.numel(), units // (cost // unit)) for cost, _, g in picked]
    order = sorted(range(len(picked)), key=afford.__getitem__)
    best = torch.zeros(units + 1, dtype=F64)  # (units + 1,)
    taken = [0] * len(picked)
    tables = []  # (class index, argmax table (units + 1,)) for every class but the last
    for j in order[:-1]:
        step, K = picked[j][0] // unit, afford[j]
        G = torch.cat([best.new_zeros(1), picked[j][2][:K].cumsum(0)])  # (K + 1,) fp64
        new, arg = best.clone(), torch.zeros(units + 1, dtype=torch.long)
        for k in range(1, K + 1):
            off = k * step
            cand = best[: units + 1 - off] + G[k]
            better = cand >= new[off:]
            new[off:] = torch.where(better, cand, new[off:])
            arg[off:] = torch.where(better, k, arg[off:])
        best = new
        tables.append((j, arg))
    j = order[-1]
    step, K = picked[j][0] // unit, afford[j]
    G = torch.cat([best.new_zeros(1), picked[j][2][:K].cumsum(0)])  # (K + 1,)
    value = best[units - step * torch.arange(K + 1)] + G  # (K + 1,)
    taken[j] = K - int(torch.argmax(value.flip(0)))
    b = units - taken[j] * step
    for j, arg in reversed(tables):
        taken[j] = int(arg[b])
        b -= taken[j] * (picked[j][0] // unit)
    return taken


def optimal_ranks(
    spectra: Mapping[str, torch.Tensor],
    costs: Mapping[str, int],
    budget: int,
    r_min: int = 1,
    r_max: int | None = None,
    objective: str = "relative",
) -> dict[str, int]:
    """The ranks minimising ``sum_l e_l(r_l)`` with ``sum_l c_l r_l <= budget``, exactly (module docstring).

    Args:
        spectra: ``{name: S (k_l,)}`` singular values, descending (:func:`metric_spectrum`).
        costs: ``{name: parameters per rank}`` (:func:`rank_costs`), positive ints.
        budget: parameters to spend (an int).
        r_min, r_max: every layer's rank lies in ``[r_min, r_max]`` (``r_max=None``: up to its k).
        objective: ``"relative"`` (default) or ``"absolute"`` errors (module docstring).

    Returns ``{name: r}`` in ``spectra``'s order. Among optimal allocations it returns one where no layer's
    next rank fits in the budget left (unless all are at ``r_max``).

    Raises:
        ValueError: ``budget`` below ``sum_l r_min c_l`` (it names that minimum), ``r_max`` or ``r_min``
            beyond a layer's ``k`` (naming it), a spectrum that is not finite / non-negative / descending or
            all zero, a missing or non-positive cost.
    """
    bounds = _bounds(spectra, r_min, r_max)
    c = _check_costs(costs, bounds)
    check_count("budget", budget, 0)
    forced = sum(lo * c[n] for n, (lo, _) in bounds.items())
    if forced > budget:
        raise ValueError(f"budget={budget} is below the {forced} parameters that r_min={r_min} costs over "
                         f"{len(bounds)} layers; raise the budget or lower r_min")
    left = budget - forced
    gam = {n: _gammas(S, n, objective) for n, S in spectra.items()}
    names = list(bounds)
    ranks = {n: lo for n, (lo, _) in bounds.items()}

    # step 2: per cost class, its items sorted by gamma (stable: ties in layer order, then index order)
    classes: dict[int, list[str]] = {}
    for n in names:
        if bounds[n][1] > bounds[n][0]:
            classes.setdefault(c[n], []).append(n)
    picked = []  # per class: (cost, owner (N,) layer index into names, gains sorted (N,))
    for cost, members in classes.items():
        g = torch.cat([gam[n][bounds[n][0]:bounds[n][1]] for n in members])  # (N,)
        owner = torch.cat([torch.full((bounds[n][1] - bounds[n][0],), names.index(n)) for n in members])
        order = torch.sort(g, descending=True, stable=True).indices
        picked.append((cost, owner[order], g[order]))

    # step 3: the DP over the classes, then each class's k largest items
    for (_, owner, _), k in zip(picked, _class_dp(picked, left), strict=True):
        for i, cnt in enumerate(torch.bincount(owner[:k], minlength=len(names)).tolist()):
            ranks[names[i]] += cnt

    # step 4: fill what is left while a next rank fits (gammas >= 0: never worse)
    spare = left - sum((ranks[n] - bounds[n][0]) * c[n] for n in names)
    while True:
        fits = [n for n in names if ranks[n] < bounds[n][1] and c[n] <= spare]
        if not fits:
            break
        n = max(fits, key=lambda m: float(gam[m][ranks[m]]))  # first of the largest: deterministic
        ranks[n] += 1
        spare -= c[n]
    return ranks


def threshold_ranks(
    spectra: Mapping[str, torch.Tensor],
    energy: float = 0.9,
    r_min: int = 1,
    r_max: int | None = None,
) -> dict[str, int]:
    """Per layer the smallest r with kept energy ``1 - e_l(r) >= energy``, clipped to ``[r_min, r_max]``.

    ``spectra`` as in :func:`optimal_ranks`; ``energy`` in ``(0, 1]``. The kept energy is the fp64 cumulative
    sum of the gammas; if rounding keeps it just under ``energy = 1``, the layer gets its k. Raises
    ``ValueError`` for an energy outside ``(0, 1]`` and as :func:`optimal_ranks` for the bounds and spectra.
    """
    if isinstance(energy, bool) or not isinstance(energy, (int, float)) or not 0 < energy <= 1:
        raise ValueError(f"energy={energy!r} must be a fraction in (0, 1] (the share of each layer's energy kept)")
    bounds = _bounds(spectra, r_min, r_max)
    out = {}
    for n, (lo, hi) in bounds.items():
        kept = _gammas(spectra[n], n).cumsum(0)  # (k,) kept[r - 1] = 1 - e(r)
        r = min(int(torch.searchsorted(kept, torch.tensor([float(energy)], dtype=F64))[0]) + 1, kept.numel())
        out[n] = min(max(r, lo), hi)
    return out


def ranks_at_tolerance(
    spectra: Mapping[str, torch.Tensor],
    tolerance: float,
    r_min: int = 1,
    r_max: int | None = None,
    objective: str = "relative",
) -> dict[str, int]:
    """``r_l(tau)``: per layer the smallest ``r`` in ``[r_min, r_max]`` with ``e_l(r) <= tolerance`` (the layer's
    ``r_max``, or its k, when none is: clipped). ``spectra``, bounds and ``objective`` as in :func:`optimal_ranks`;
    ``tolerance`` a finite number ``>= 0`` in the objective's units (relative: a squared relative error)."""
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not 0 <= tolerance < math.inf:
        raise ValueError(f"tolerance={tolerance!r} must be a finite number >= 0 (a squared {objective} error)")
    bounds = _bounds(spectra, r_min, r_max)
    drops = {n: dropped_energy(S, objective) for n, S in spectra.items()}  # (k + 1,) each, non-increasing
    return {n: _at(drops[n], float(tolerance), lo, hi) for n, (lo, hi) in bounds.items()}


def _at(e: torch.Tensor, tau: float, lo: int, hi: int) -> int:
    """Smallest r in [lo, hi] with e[r] <= tau, else hi; ``e`` non-increasing, so ``{r : e[r] > tau}`` is a prefix."""
    return min(max(int((e > tau).sum()), lo), hi)


def tolerance_ranks(
    spectra: Mapping[str, torch.Tensor],
    costs: Mapping[str, int],
    budget: int,
    r_min: int = 1,
    r_max: int | None = None,
    objective: str = "relative",
) -> dict[str, int]:
    """The tolerance rule (module docstring, ``"tolerance"``): ``r(tau*)``, the ranks of the smallest common error
    tolerance ``tau*`` whose ranks cost at most ``budget``. Arguments as in :func:`optimal_ranks`.

    Returns ``{name: r}`` in ``spectra``'s order; ``max_l e_l(r_l)`` over the layers not clipped at ``r_max`` is
    ``tau*`` (:func:`allocation_tolerance`). Raises ``ValueError`` as :func:`optimal_ranks` (a budget below what
    ``r_min`` costs names that minimum).
    """
    bounds = _bounds(spectra, r_min, r_max)
    c = _check_costs(costs, bounds)
    check_count("budget", budget, 0)
    forced = sum(lo * c[n] for n, (lo, _) in bounds.items())
    if forced > budget:
        raise ValueError(f"budget={budget} is below the {forced} parameters that r_min={r_min} costs over "
                         f"{len(bounds)} layers; raise the budget or lower r_min")
    drops = {n: dropped_energy(S, objective) for n, S in spectra.items()}
    T = torch.unique(torch.cat([drops[n][lo:hi + 1] for n, (lo, hi) in bounds.items()]))  # ascending candidates

    def cost(tau: float) -> int:
        return sum(c[n] * _at(drops[n], tau, lo, hi) for n, (lo, hi) in bounds.items())

    lo_i, hi_i = 0, T.numel() - 1  # cost(T[-1]) == forced <= budget: the answer lies in [lo_i, hi_i]
    while lo_i < hi_i:
        mid = (lo_i + hi_i) // 2
        if cost(float(T[mid])) <= budget:
            hi_i = mid
        else:
            lo_i = mid + 1
    tau = float(T[hi_i])
    return {n: _at(drops[n], tau, lo, hi) for n, (lo, hi) in bounds.items()}


def allocation_tolerance(ranks: Mapping[str, int], spectra: Mapping[str, torch.Tensor], objective: str = "relative"
                         ) -> float:
    """``max_l e_l(r_l)``: the largest per-layer error of an allocation (the tolerance it meets), fp64."""
    missing = [n for n in ranks if n not in spectra]
    if missing:
        raise ValueError(f"no spectrum for layer(s) {missing[:5]} ({len(missing)} in all)")
    return max(float(dropped_energy(spectra[n], objective)[r]) for n, r in ranks.items())
