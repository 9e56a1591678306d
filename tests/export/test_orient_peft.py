"""Independent implementations agree (huggingface/peft, installed in the test extras).

* metric ``corda`` vs peft's ``collect_eigens_for_layer`` (peft/tuners/lora/corda.py). peft damps with
  ``C + damp * mean(diag C) * I``, ``damp = 0.01`` (doubled only while ``||M M^{-1} - I|| >= 0.05``), takes
  ``svd(W M)`` and ``V = (Vh M^{-1})^T`` in fp32 with an explicit inverse, no eigenvalue clamp. The same
  arm here is ``metric="corda", eps=0.01, eps_mode="relative"`` (C is PSD, so the clamp is moot). Compared:
  the singular values and the rank-r product ``U_r S_r P_r`` (unique given a gap; vectors carry signs),
  top (peft "ipm") and bottom (peft "kpm", the last r).
* metric ``identity`` vs peft's PiSSA init: peft splits ``sqrt(S)`` into ``lora_B``/``lora_A`` and divides S
  by ``scaling = lora_alpha / r``; what is comparable is the residual it writes into the base weight,
  ``W - scaling * B A = W - U_r S_r Vh_r``, and ``scaling * B A`` itself.

peft computes in fp32, so agreement is to fp32 accuracy (our side runs in fp64).
"""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora.corda import collect_eigens_for_layer
from torch import nn

from covsvd import SecondMoment, orient

F64 = torch.float64


def _data(d_out, d_in, n, seed):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(d_out, d_in, generator=g) / d_in**0.5  # fp32, like a model weight
    scales = torch.logspace(0, -1.5, d_in, dtype=F64)
    X = torch.randn(n, d_in, generator=g, dtype=F64) * scales + 0.2  # anisotropic, uncentered
    m = SecondMoment("full", X.T @ X, X.sum(0), X.abs().sum(0), n)
    return W, m


def _gap_ok(S, r):
    return r == len(S) or float(S[r - 1] - S[r]) > 1e-3 * float(S[0])


@pytest.mark.parametrize("d_out, d_in, r", [(24, 40, 6), (40, 24, 10), (32, 32, 8)])
def test_corda_matches_peft_collect_eigens(d_out, d_in, r):
    W, m = _data(d_out, d_in, 400, seed=d_out + d_in)
    C = m.matrix()
    # precondition: peft's damping loop stops at its first value, 0.01 (else the damping differs)
    M32 = C.float() + 0.01 * C.float().diagonal().mean() * torch.eye(d_in)
    assert float(torch.dist(M32 @ torch.linalg.inv(M32), torch.eye(d_in))) < 0.05

    lin = nn.Linear(d_in, d_out, bias=False)
    with torch.no_grad():
        lin.weight.copy_(W)
    lin.covariance_matrix = C.float()
    ref = collect_eigens_for_layer(lin, LoraConfig())  # S_WC (k,), U_WC (d_out, k), V_WC (d_in, k)
    assert _gap_ok(ref.S_WC, r)

    for comp, sl in (("top", slice(0, r)), ("bottom", slice(-r, None))):
        o = orient(W, m, r, metric="corda", eps=0.01, eps_mode="relative", components=comp,
                   storage_dtype=F64)
        assert o.info["eps"] == pytest.approx(0.01 * float(C.diagonal().mean()), rel=1e-12)
        S_ref = ref.S_WC[sl].double()
        torch.testing.assert_close(o.S, S_ref, rtol=2e-5, atol=2e-5 * float(ref.S_WC[0]))
        B_ref = (ref.U_WC[:, sl].double() * S_ref) @ ref.V_WC[:, sl].double().T
        B = (o.U * o.S) @ o.P
        assert float((B - B_ref).norm() / W.double().norm()) <= 3e-5, comp


@pytest.mark.parametrize("d_out, d_in, r, alpha", [(20, 30, 4, 8), (30, 20, 7, 7), (16, 16, 5, 20)])
def test_identity_residual_matches_peft_pissa(d_out, d_in, r, alpha):
    W, _ = _data(d_out, d_in, 10, seed=r)

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(d_in, d_out)

    model = Tiny()
    with torch.no_grad():
        model.lin.weight.copy_(W)
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=["lin"], init_lora_weights="pissa")
    pm = get_peft_model(model, cfg)
    layer = pm.base_model.model.lin
    res_peft = layer.base_layer.weight.detach().double()  # W - scaling * B A
    scaling = layer.scaling["default"]
    assert scaling == pytest.approx(alpha / r)  # != 1: the split and the scaling are exercised
    BA = scaling * layer.lora_B["default"].weight.detach().double() @ layer.lora_A["default"].weight.detach().double()

    o = orient(W, None, r, metric="identity", storage_dtype=torch.float32)
    assert o.W_res.dtype == torch.float32
    Wn = float(W.double().norm())
    assert float((o.W_res.double() - res_peft).norm()) / Wn <= 1e-5
    assert float(((o.U.double() * o.S.double()) @ o.P.double() - BA).norm()) / Wn <= 1e-5
    # and both are exact splits of W (peft's to fp32 rounding)
    assert float((res_peft + BA - W.double()).norm()) / Wn <= 1e-6
