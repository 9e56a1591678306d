"""Block-diagonal Cayley rotations: orthogonal, identity at zero, bounded, and torch's Cayley map."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils.parametrizations import orthogonal

from covsvd.adapt.rotation import BlockCayley
from covsvd.algebra.rotation import (
    a_limit,
    apply_blocks,
    block_angle_bound,
    block_diag_matrix,
    block_sizes,
    bound_skew,
    cayley,
    n_rotation_params,
    rotation_blocks,
    skew_blocks,
)

FAST = settings(max_examples=25, deadline=None)


pytestmark = pytest.mark.usefixtures("one_thread")  # small matrices: see conftest.one_thread


def _theta(r, b, scale, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(n_rotation_params(r, b), generator=g, dtype=dtype)


def _angles(R_blocks):
    """Rotation angles (radians, >= 0) of each block: the arguments of R's eigenvalues."""
    lam = torch.linalg.eigvals(R_blocks)  # (n_blocks, b) complex
    return torch.atan2(lam.imag, lam.real).abs()


@FAST
@given(r=st.integers(1, 40), b=st.integers(2, 8), scale=st.floats(0.0, 50.0), seed=st.integers(0, 2**16),
       max_angle=st.floats(0.05, 3.0))
def test_orthogonal_with_unit_determinant(r, b, scale, seed, max_angle):
    R = block_diag_matrix(rotation_blocks(_theta(r, b, scale, seed), r, b, max_angle), r)  # (r, r)
    assert R.shape == (r, r)
    torch.testing.assert_close(R.T @ R, torch.eye(r, dtype=R.dtype), atol=1e-12, rtol=0)
    assert abs(torch.linalg.det(R).item() - 1.0) < 1e-10  # a rotation, never a reflection


@pytest.mark.parametrize("r, b", [(8, 4), (10, 4), (9, 4), (3, 8), (1, 4)])
def test_identity_at_zero_exactly(r, b):
    m = BlockCayley(r, b, max_angle=0.5)
    assert torch.equal(m.matrix(), torch.eye(r))
    h = torch.randn(5, r)
    assert torch.equal(m.rotate(h), h) and torch.equal(m.rotate(h, transpose=True), h)


def test_layout_with_a_smaller_last_block():
    assert block_sizes(10, 4) == [4, 4, 2] and n_rotation_params(10, 4) == 6 + 6 + 1
    assert block_sizes(9, 4) == [4, 4, 1] and n_rotation_params(9, 4) == 12
    assert block_sizes(3, 8) == [3] and n_rotation_params(3, 8) == 3  # one dense block
    R = block_diag_matrix(rotation_blocks(_theta(9, 4, 5.0, 0), 9, 4, 1.0), 9)
    # a last block of size 1 has no parameter: that direction is never mixed
    assert R[8, 8] == 1 and torch.all(R[8, :8] == 0) and torch.all(R[:8, 8] == 0)
    # blocks do not mix with each other
    assert torch.all(R[:4, 4:] == 0) and torch.all(R[4:8, :4] == 0)


@FAST
@given(r=st.integers(1, 30), b=st.integers(2, 6), seed=st.integers(0, 2**16), lead=st.integers(1, 3))
def test_blockwise_apply_equals_dense_matrix(r, b, seed, lead):
    Rb = rotation_blocks(_theta(r, b, 2.0, seed), r, b, 1.0)
    R = block_diag_matrix(Rb, r)
    h = torch.randn(*([2] * lead), r, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(apply_blocks(h, Rb), h @ R.T, atol=1e-12, rtol=0)
    torch.testing.assert_close(apply_blocks(h, Rb, transpose=True), h @ R, atol=1e-12, rtol=0)


@FAST
@given(max_angle=st.floats(0.01, 3.1), scale=st.floats(0.0, 1e4), seed=st.integers(0, 2**16))
def test_angle_bound_block_size_two(max_angle, scale, seed):
    """One plane per block: the tanh bound is an exact bound on the rotation angle."""
    Rb = rotation_blocks(_theta(12, 2, scale, seed), 12, 2, max_angle)
    assert _angles(Rb).max().item() <= max_angle * (1 + 1e-9)


@pytest.mark.parametrize("max_angle", [0.1, 0.5, 1.5])
def test_angle_bound_reached_by_one_generator(max_angle):
    """A single saturated generator turns its plane by max_angle (the bound is tight)."""
    for b in (2, 4, 6):
        theta = torch.zeros(n_rotation_params(b, b), dtype=torch.float64)
        theta[0] = 1e6  # tanh saturates: entry = a_limit
        angle = _angles(rotation_blocks(theta, b, b, max_angle)).max().item()
        assert angle == pytest.approx(max_angle, rel=1e-9)


@FAST
@given(b=st.integers(3, 8), max_angle=st.floats(0.05, 1.0), seed=st.integers(0, 2**16))
def test_angle_bound_larger_blocks(b, max_angle, seed):
    """Several generators add: the block's angle stays below block_angle_bound (documented)."""
    theta = _theta(4 * b, b, 1e3, seed).sign() * 1e3  # every entry saturated, random signs
    angles = _angles(rotation_blocks(theta, 4 * b, b, max_angle))
    assert angles.max().item() <= block_angle_bound(b, max_angle) * (1 + 1e-9)


def _torch_cayley(A):
    """torch's orthogonal(orthogonal_map="cayley") parametrization evaluated at the skew matrix A."""
    n = A.shape[-1]
    lin = nn.Linear(n, n, bias=False, dtype=A.dtype)
    with torch.no_grad():
        lin.weight.copy_(torch.eye(n, dtype=A.dtype))  # initial weight I -> trivialization base = I
    orthogonal(lin, "weight", orthogonal_map="cayley")
    assert torch.equal(lin.parametrizations.weight[0].base, torch.eye(n, dtype=A.dtype))
    with torch.no_grad():
        # torch forms A = X.tril() - X.tril().T: its free entries sit below the diagonal
        lin.parametrizations.weight.original.copy_(A.tril())
    return lin.weight.detach()


@FAST
@given(n=st.integers(1, 12), scale=st.floats(0.0, 20.0), seed=st.integers(0, 2**16))
def test_cayley_equals_torch_parametrization(n, scale, seed):
    X = scale * torch.randn(n, n, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    A = X - X.T
    torch.testing.assert_close(cayley(A), _torch_cayley(A), atol=1e-12, rtol=0)


@pytest.mark.parametrize("r, b", [(6, 6), (8, 4), (10, 4)])
def test_full_map_equals_torch_on_the_same_bounded_skew(r, b):
    """Our parameters -> bounded skew -> Cayley, block by block, against torch on each block's skew."""
    theta = _theta(r, b, 3.0, r + b)
    A = bound_skew(skew_blocks(theta, r, b), 0.7)  # (n_blocks, b, b)
    ours = rotation_blocks(theta, r, b, 0.7)
    for blk in range(A.shape[0]):
        torch.testing.assert_close(ours[blk], _torch_cayley(A[blk]), atol=1e-12, rtol=0)
    # our free entries are above the diagonal, torch's below: theta sits at A[i, j], i < j
    i, j = torch.triu_indices(b, b, offset=1)
    torch.testing.assert_close(skew_blocks(theta, r, b)[0, i, j], theta[: len(i)])


def test_gradient_flows_at_zero():
    m = BlockCayley(8, 4, max_angle=0.5, dtype=torch.float64)
    h = torch.randn(16, 8, dtype=torch.float64)
    w = torch.randn(8, dtype=torch.float64)
    ((m.rotate(h) * h * w).sum()).backward()
    assert m.theta.grad is not None and m.theta.grad.abs().max() > 0


def test_first_order_map_at_zero():
    """tanh'(0) = 1 and the Cayley map is I + A + O(A^2): a tiny theta rotates by theta itself."""
    theta = torch.zeros(n_rotation_params(4, 4), dtype=torch.float64)
    theta[2] = 1e-7
    R = block_diag_matrix(rotation_blocks(theta, 4, 4, 0.5), 4)
    A = skew_blocks(theta, 4, 4)[0]
    torch.testing.assert_close(R, torch.eye(4, dtype=torch.float64) + A, atol=1e-13, rtol=0)


def test_a_limit_and_errors():
    assert a_limit(0.5) == pytest.approx(2 * math.tan(0.25))
    for bad in (0.0, -1.0, math.pi, 4.0):
        with pytest.raises(ValueError, match="max_angle"):
            a_limit(bad)
    with pytest.raises(ValueError, match="block_size"):
        block_sizes(8, 1)
    with pytest.raises(ValueError, match="r="):
        block_sizes(0, 4)
    with pytest.raises(ValueError, match="theta has shape"):
        skew_blocks(torch.zeros(5), 8, 4)
    with pytest.raises(ValueError, match="max_angle"):
        BlockCayley(8, 4, max_angle=3.5)


def test_module_repr_states_the_layout():
    assert "blocks=[4, 4, 2]" in repr(BlockCayley(10, 4)) and "params=13" in repr(BlockCayley(10, 4))
