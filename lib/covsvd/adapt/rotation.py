"""The trainable rotation arm of the bounded-gain adapter: a block-diagonal Cayley rotation as an ``nn.Module``
(the map itself, pure tensors, is :mod:`covsvd.algebra.rotation`)."""

from __future__ import annotations

import torch
from torch import nn

from ..algebra.rotation import (
    a_limit,
    apply_blocks,
    block_diag_matrix,
    block_sizes,
    n_rotation_params,
    rotation_blocks,
)


class BlockCayley(nn.Module):
    """Trainable block-diagonal Cayley rotation of ``r`` directions; ``theta`` zeros, so ``R = I`` at init.

    ``forward()`` returns the blocks ``(n_blocks, b, b)``; :meth:`matrix` the dense ``(r, r)``;
    :meth:`rotate` multiplies along the last axis without forming it.
    """

    def __init__(self, r: int, block_size: int = 4, max_angle: float = 0.5, dtype: torch.dtype = torch.float32,
                 device=None) -> None:
        super().__init__()
        a_limit(max_angle)  # validate now, not at the first forward
        self.r, self.block_size, self.max_angle = int(r), int(block_size), float(max_angle)
        self.sizes = block_sizes(r, block_size)
        self.theta = nn.Parameter(torch.zeros(n_rotation_params(r, block_size), dtype=dtype, device=device))

    def forward(self) -> torch.Tensor:
        return rotation_blocks(self.theta, self.r, self.block_size, self.max_angle)  # (n_blocks, b, b)

    def matrix(self) -> torch.Tensor:
        return block_diag_matrix(self(), self.r)  # (r, r)

    def rotate(self, h: torch.Tensor, transpose: bool = False) -> torch.Tensor:
        """``h @ R.T`` (``h @ R`` with ``transpose``), ``h`` ``(..., r)``. Not ``apply``: nn.Module owns that name."""
        return apply_blocks(h, self(), transpose=transpose)

    def extra_repr(self) -> str:
        return (f"r={self.r}, block_size={self.block_size}, blocks={self.sizes if len(set(self.sizes)) > 1 else len(self.sizes)}"
                f", params={self.theta.numel()}, max_angle={self.max_angle}")
