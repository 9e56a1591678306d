"""Block-diagonal Cayley rotations of an r-dimensional basis, with a bounded angle.

The map (docs/algebra.md, "Rotation arms")::

    A = skew(a_limit * tanh(theta / a_limit))      # (n_blocks, b, b), A^T = -A, one A per block
    R = (I - A/2)^{-1} (I + A/2)                    # torch.linalg.solve, never an explicit inverse
    a_limit = 2 tan(max_angle / 2)

``R`` is orthogonal for every skew ``A`` (``R^T R = I``, ``det R = +1``) and ``R = I`` exactly at
``theta = 0``. The Cayley map turns an eigenvalue ``i*lam`` of ``A`` into the rotation angle
``2 atan(lam / 2)``, so ``|lam| <= a_limit`` gives an angle ``<= max_angle``.

**What the bound bounds.** The ``tanh`` acts on each free parameter, i.e. on each entry of ``A``.
That bounds the angle of every single-plane rotation (one generator on its own) by ``max_angle``
exactly, and so the whole block for ``block_size = 2``. For a larger block several generators add:
the largest eigenvalue of a ``b x b`` skew matrix with entries ``<= a_limit`` is at most
``a_limit * min(b - 1, sqrt(b (b - 1) / 2))`` (Gershgorin; Frobenius), so the block's largest angle is
at most ``2 atan(a_limit * min(b - 1, sqrt(b (b - 1) / 2)) / 2)``: :func:`block_angle_bound`.

**Layout.** The ``r`` directions are cut into consecutive blocks of ``block_size``. When
``block_size`` does not divide ``r`` the last block is smaller (``r % block_size``) and has its own
``k (k - 1) / 2`` parameters; a last block of size 1 has none (a 1 x 1 rotation is the identity), so
that one direction is never mixed. :func:`block_sizes` states the layout; pick a ``block_size``
that divides ``r`` to avoid the small block. ``block_size >= r`` gives one dense ``r x r`` rotation.

**Convention vs torch.** ``torch.nn.utils.parametrizations.orthogonal(..., orthogonal_map="cayley")``
computes the same map ``solve(I - A/2, I + A/2)`` from ``A = X.tril() - X.tril().T`` (its free
parameters sit *below* the diagonal, ours above: ``A[i, j] = theta`` for ``i < j``; no factor 1/2 in
either skew construction), then multiplies by its trivialization ``base`` (``I`` when the initial
weight is ``I``). For the same skew ``A`` both give the same ``R``; tests/test_rotation.py checks it.

Pure tensors (the trainable module is :class:`covsvd.adapt.rotation.BlockCayley`). Dtypes: the rotation is computed in the dtype of ``theta`` (fp32 parameters by default); callers cast
``R`` to their compute dtype.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def a_limit(max_angle: float) -> float:
    """``2 tan(max_angle / 2)``: the bound on each skew entry so one plane turns by ``<= max_angle``."""
    if not (0.0 < float(max_angle) < math.pi):
        raise ValueError(f"max_angle={max_angle!r} must be in (0, pi) radians (a Cayley rotation never reaches pi)")
    return 2.0 * math.tan(float(max_angle) / 2.0)


def block_sizes(r: int, block_size: int) -> list[int]:
    """Sizes of the diagonal blocks over ``r`` directions: full blocks, then ``r % block_size`` if nonzero."""
    if int(r) < 1:
        raise ValueError(f"r={r!r} must be a positive number of directions")
    if int(block_size) < 2:
        raise ValueError(f"block_size={block_size!r} must be >= 2 (a 1 x 1 rotation is the identity)")
    b = min(int(block_size), int(r))
    sizes = [b] * (int(r) // b)
    if int(r) % b:
        sizes.append(int(r) % b)
    return sizes


def n_rotation_params(r: int, block_size: int) -> int:
    """Number of free parameters: ``sum k (k - 1) / 2`` over the blocks of :func:`block_sizes`."""
    return sum(k * (k - 1) // 2 for k in block_sizes(r, block_size))


def block_angle_bound(block_size: int, max_angle: float) -> float:
    """Upper bound on the largest rotation angle of one ``block_size`` block (radians); see module doc."""
    b = int(block_size)
    lam = a_limit(max_angle) * min(b - 1, math.sqrt(b * (b - 1) / 2))
    return 2.0 * math.atan(lam / 2.0)


def _skew_index(r: int, block_size: int, device=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(block, row, col)`` of every free entry (``row < col`` inside its block), in parameter order."""
    blk, row, col = [], [], []
    for n, k in enumerate(block_sizes(r, block_size)):
        i, j = torch.triu_indices(k, k, offset=1)
        blk.append(torch.full_like(i, n))
        row.append(i)
        col.append(j)
    return tuple(torch.cat(t).to(device) for t in (blk, row, col))  # type: ignore[return-value]


def skew_blocks(theta: torch.Tensor, r: int, block_size: int) -> torch.Tensor:
    """Free parameters ``(n_params,)`` -> skew blocks ``(n_blocks, b, b)``, ``b = min(block_size, r)``.

    ``A[n, i, j] = theta`` and ``A[n, j, i] = -theta`` for ``i < j`` in block ``n``. A smaller last block
    sits in the top-left corner of its ``b x b`` slot, zeros elsewhere (so its rotation is
    ``diag(R_small, I)``, and the padded coordinates are never used).
    """
    sizes = block_sizes(r, block_size)
    want = n_rotation_params(r, block_size)
    if theta.shape != (want,):
        raise ValueError(f"theta has shape {tuple(theta.shape)}; r={r}, block_size={block_size} need ({want},)")
    b = sizes[0]
    blk, row, col = _skew_index(r, block_size, theta.device)
    A = theta.new_zeros(len(sizes), b, b).index_put((blk, row, col), theta)  # (n_blocks, b, b), upper part
    return A - A.transpose(-1, -2)


def bound_skew(A: torch.Tensor, max_angle: float) -> torch.Tensor:
    """``a_limit * tanh(A / a_limit)`` entrywise: odd, so a skew ``A`` stays skew; ``|entry| < a_limit``."""
    lim = a_limit(max_angle)
    return lim * torch.tanh(A / lim)


def cayley(A: torch.Tensor) -> torch.Tensor:
    """``(I - A/2)^{-1} (I + A/2)`` for skew ``A`` ``(..., n, n)`` by ``torch.linalg.solve``; orthogonal.

    ``I - A/2`` is always invertible for real skew ``A`` (its eigenvalues are ``1 - i lam/2``). Computed
    in ``A``'s dtype.
    """
    n = A.shape[-1]
    eye = torch.eye(n, dtype=A.dtype, device=A.device)
    return torch.linalg.solve(eye - A / 2, eye + A / 2)


def rotation_blocks(theta: torch.Tensor, r: int, block_size: int, max_angle: float) -> torch.Tensor:
    """Free parameters ``(n_params,)`` -> rotation blocks ``(n_blocks, b, b)``; the bound is applied first.

    ``tanh`` is odd, so bounding the parameters and then forming the skew matrix equals
    ``bound_skew(skew_blocks(theta))``.
    """
    return cayley(skew_blocks(bound_skew(theta, max_angle), r, block_size))


def block_diag_matrix(R_blocks: torch.Tensor, r: int) -> torch.Tensor:
    """Dense ``(r, r)`` block-diagonal matrix from ``(n_blocks, b, b)`` blocks (the padding cropped)."""
    return torch.block_diag(*R_blocks.unbind(0))[:r, :r]


def apply_blocks(h: torch.Tensor, R_blocks: torch.Tensor, transpose: bool = False) -> torch.Tensor:
    """``h @ R.T`` (or ``h @ R`` with ``transpose=True``) along the last axis, block by block.

    ``h`` is ``(..., r)``; ``R`` is the block-diagonal ``(r, r)`` matrix of ``R_blocks`` ``(n_blocks, b, b)``.
    Costs ``O(r * b)`` per row, never forms the ``(r, r)`` matrix. Runs in ``h``'s dtype (``R_blocks`` is
    cast to it).
    """
    n, b, _ = R_blocks.shape
    r = h.shape[-1]
    pad = n * b - r
    if not 0 <= pad < b:
        raise ValueError(f"h has {r} directions; {n} blocks of {b} cover {n * b - b + 1}..{n * b}")
    R = R_blocks.to(h.dtype)
    hb = F.pad(h, (0, pad)).unflatten(-1, (n, b))  # (..., n_blocks, b)
    eq = "...nb,nbc->...nc" if transpose else "...nb,ncb->...nc"
    return torch.einsum(eq, hb, R).flatten(-2)[..., :r]  # (..., r)
