"""covsvd.algebra.measures: functional_error with a known reference is the same number, for every metric form."""

from __future__ import annotations

import pytest
import torch

from covsvd.algebra import damp, functional_error, functional_reference


def test_a_given_reference_gives_the_same_error_bit_for_bit():
    g = torch.Generator().manual_seed(0)
    W, B = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    X = torch.randn(40, 7, generator=g, dtype=torch.float64)
    C = X.T @ X / 40
    for M in (None, C, C.diagonal().clone(), damp(C, 1e-3)):
        ref = functional_reference(W, M)
        assert functional_error(W, B, M, reference=ref) == functional_error(W, B, M)
    # the reference is what it says: ||W M^{1/2}||_F^2
    L = torch.linalg.cholesky(C)
    assert abs(functional_reference(W, C) / float((W.double() @ L).norm() ** 2) - 1) < 1e-12
    # a wrong reference changes the answer (it is used, not ignored)
    assert functional_error(W, B, C, reference=4 * functional_reference(W, C)) != functional_error(W, B, C)

    for bad in (0.0, -1.0, float("nan"), float("inf"), "1"):
        with pytest.raises(ValueError, match="functional_reference"):
            functional_error(W, B, C, reference=bad)
