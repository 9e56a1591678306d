"""The Gram product ``x^T x`` and the O(d) column sums that :class:`~covsvd.capture.moments.MomentAccumulator` adds per
batch: pure tensor functions, ``out`` tensors fp64 and updated in place.

Only the upper block triangle of ``x^T x`` is multiplied (the matrix is symmetric), one GEMM per panel of rows
(:func:`add_gram_upper_`, widths from :func:`gram_block`); the lower blocks are mirrored once at the end
(:func:`mirror_lower_`). Panel widths were chosen by measurement (bench/results/gram_panels.md).
"""

from __future__ import annotations

import torch

ACCUMULATE = ("float64", "float32")
# Panel width of the upper-triangular Gram product (see add_gram_upper_): k panels skip (k - 1) / 2k of the
# multiply-adds, but narrow panels make slower GEMMs; the widths are the measured optimum (bench/results/gram_panels.md).
GRAM_PANEL_NARROW, GRAM_PANEL_WIDE = 128, 256  # below / from d_in 1024


def gram_block(d: int) -> int:
    """Panel width for a ``d``-column Gram product: one panel up to 256 columns, else about 128 (below 1024
    columns) or 256 wide, in equal panels (``ceil(d / k)``, ``k >= 2``)."""
    if d <= 256:
        return d
    k = max(2, round(d / (GRAM_PANEL_NARROW if d < 1024 else GRAM_PANEL_WIDE)))
    return -(-d // k)


def gram_dtype(accumulate: str) -> torch.dtype:
    """The dtype of the per-batch Gram products for ``accumulate`` (``"float64"`` or ``"float32"``)."""
    if accumulate not in ACCUMULATE:
        raise ValueError(f"accumulate={accumulate!r}; expected one of {ACCUMULATE}")
    return torch.float64 if accumulate == "float64" else torch.float32


def block_edges(d: int, block: int) -> list[tuple[int, int]]:
    """``[(start, stop), ...]`` covering ``range(d)`` in blocks of at most ``block`` columns."""
    if block < 1:
        raise ValueError(f"block={block} must be >= 1")
    return [(i, min(i + block, d)) for i in range(0, d, block)]


def add_gram_upper_(out: torch.Tensor, x: torch.Tensor, block: int | None = None) -> None:
    """``out[I, J] += x[:, I]^T x[:, J]`` for the blocks ``I <= J`` of the upper block triangle.

    One GEMM per panel of rows: ``out[I, I_start:] += x[:, I]^T x[:, I_start:]`` (fewer, wider GEMMs than one
    per block; see ``gram_block``). ``out``: ``(d, d)`` fp64. ``x``: ``(N, d)``, fp64 (fp64 GEMM, accumulated
    into ``out`` by ``addmm_``) or fp32 (fp32 GEMM per panel, then added into fp64 ``out``). Blocks below the
    diagonal are not touched: call :func:`mirror_lower_` once at the end.
    """
    for i0, i1 in block_edges(x.shape[1], block or gram_block(x.shape[1])):
        target = out[i0:i1, i0:]  # (b, d - i0) view of the fp64 sum: the diagonal block and those right of it
        if x.dtype == torch.float64:
            target.addmm_(x[:, i0:i1].T, x[:, i0:])
        else:
            target.add_(x[:, i0:i1].T @ x[:, i0:])


def mirror_lower_(out: torch.Tensor, block: int | None = None) -> torch.Tensor:
    """Copy the upper blocks of ``out`` (filled by :func:`add_gram_upper_`) into the lower ones; returns ``out``.

    Diagonal blocks are computed whole by the GEMM; they are symmetrised as ``(B + B^T) / 2`` so that the
    result is exactly symmetric (a GEMM need not return a bitwise-symmetric ``X^T X``).
    """
    edges = block_edges(out.shape[0], block or gram_block(out.shape[0]))
    for bi, (i0, i1) in enumerate(edges):
        diag = out[i0:i1, i0:i1]
        diag.copy_((diag + diag.T) / 2)
        for j0, j1 in edges[bi + 1 :]:
            out[j0:j1, i0:i1] = out[i0:i1, j0:j1].T
    return out


def add_column_sums_(out: torch.Tensor, x: torch.Tensor, ones: torch.Tensor | None = None) -> None:
    """``out += sum over the rows of x`` ``(N, d)``: ``out`` ``(d,)`` fp64.

    fp64 rows: one BLAS matrix-vector product ``x^T 1`` accumulated into ``out`` (``addmv_``, fp64; faster on CPU
    than ``x.sum(0)``, which reduces along the strided dimension); ``ones``: an fp64 vector
    of at least ``N`` ones to reuse. Other dtypes: ``x.sum(0)`` accumulated in fp64.
    """
    if x.dtype == torch.float64:
        n = x.shape[0]
        out.addmv_(x.T, ones[:n] if ones is not None and ones.shape[0] >= n else x.new_ones(n))
    else:
        out += x.sum(0, dtype=torch.float64)


def square_sums(x: torch.Tensor) -> torch.Tensor:
    """``sum x**2`` over the rows of ``x`` ``(N, d)``: ``(d,)``, squares in ``x``'s dtype, summed in fp64."""
    return (x * x).sum(0, dtype=torch.float64)


# ----------------------------------------------------------------------------------------------------
