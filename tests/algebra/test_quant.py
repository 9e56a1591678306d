"""Quantizers and the quantized residual (covsvd.algebra.quant, covsvd.algebra.loftq).

* The quantizers are bitsandbytes' own: a ``FourBit`` base dequantizes bit for bit to what a ``bnb.nn.Linear4bit``
  built from the same weight computes with (nf4 / fp4, blocksizes, double quantization, fp32 / bf16, a partial
  last block); ``Int8`` stores what ``bnb.nn.Int8Params`` stores.
* Under the identity metric with ``start="zero"``, iterate k of ``quantize_residual`` is peft's ``loftq_init``
  with ``num_iter=k``: peft's steps written out here (Params4bit nf4 with ``compress_statistics=False``, rank-r
  SVD of the residual) and peft's own function (its one CUDA line pointed at the CPU) agree with each other
  bit for bit, and with covsvd to the rounding of their dtypes.
* The kept iterate is the best under the metric, never worse than iterate 0; iterate 1 is never worse than
  iterate 0; the reported errors equal brute force; bad input raises before anything runs.
"""

from __future__ import annotations

import inspect

import pytest
import torch

import covsvd
from covsvd import SecondMoment, orient
from covsvd.algebra.loftq import QuantizedResidual, quantize_residual
from covsvd.algebra.measures import functional_error
from covsvd.algebra.quant import FourBit, Int8, Quantized, quantizer

bnb = pytest.importorskip("bitsandbytes")
F = bnb.functional
F64 = torch.float64
U32 = torch.finfo(torch.float32).eps / 2  # fp32 unit roundoff


def spread_W(d_out, d_in, seed, dtype=torch.float32):
    """A weight with a decaying spectrum (singular values 1/i), scaled like an LLM weight (entries ~1e-2)."""
    g = torch.Generator().manual_seed(seed)
    U, _, Vh = torch.linalg.svd(torch.randn(d_out, d_in, generator=g, dtype=F64), full_matrices=False)
    s = 1.0 / torch.arange(1, min(d_out, d_in) + 1, dtype=F64)
    return ((U * s) @ Vh).to(dtype)


def moment_of(d_in, n, seed):
    """A SecondMoment of n anisotropic samples (column scales over 2 decades, correlated)."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d_in, generator=g, dtype=F64) * torch.logspace(0, -1, d_in, dtype=F64)
    X = X @ torch.linalg.qr(torch.randn(d_in, d_in, generator=g, dtype=F64)).Q
    return SecondMoment.from_rows(X)


# ----------------------------------------------------------------------------------------- the quantizers
def linear4bit_weight(W, kind, blocksize, double_quant):
    """What a bitsandbytes Linear4bit built from W holds: (packed codes, dequantized weight)."""
    d_out, d_in = W.shape
    lin = bnb.nn.Linear4bit(d_in, d_out, bias=False, compress_statistics=double_quant, quant_type=kind)
    lin.weight = bnb.nn.Params4bit(W.clone(), requires_grad=False, blocksize=blocksize,
                                   compress_statistics=double_quant, quant_type=kind)
    lin = lin.to("cpu")  # quantizes
    return lin, lin.weight.data, F.dequantize_4bit(lin.weight.data, lin.weight.quant_state)


@pytest.mark.parametrize("kind", ["nf4", "fp4"])
@pytest.mark.parametrize("blocksize,double_quant", [(64, False), (64, True), (128, False), (32, True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_four_bit_is_what_linear4bit_computes_with(kind, blocksize, double_quant, dtype):
    W = spread_W(48, 96, seed=1, dtype=dtype)
    q = FourBit(kind, blocksize, double_quant).quantize(W)
    lin, codes, deq = linear4bit_weight(W, kind, blocksize, double_quant)
    assert torch.equal(q.data, codes)
    assert torch.equal(q.dequantize(), deq) and q.dequantize().dtype == dtype
    assert q.shape == (48, 96) and q.kind == kind
    if dtype == torch.float32:  # and the layer's forward uses exactly that weight (fp32 accumulation order aside)
        x = torch.randn(5, 96, generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            y = lin(x)
        ref = x.double() @ deq.double().T
        bound = 96 * U32 * (x.abs().double() @ deq.abs().double().T)  # fp32 dot-product rounding bound
        assert bool(((y.double() - ref).abs() <= bound).all())


def test_partial_last_block_matches_linear4bit():
    W = spread_W(7, 9, seed=3)  # 63 entries: one full block of 32 and a partial one
    q = FourBit("nf4", 32).quantize(W)
    _, codes, deq = linear4bit_weight(W, "nf4", 32, False)
    assert torch.equal(q.data, codes) and torch.equal(q.dequantize(), deq)


def test_bits_per_parameter():
    W = spread_W(64, 256, seed=4)
    assert FourBit("nf4", 64).quantize(W).bits == 4 + 32 / 64
    n = W.numel()  # double quantization: 8-bit absmax per block, fp32 absmax per 256 blocks, one fp32 offset
    blocks = n // 64
    expect = 4 + (8 * blocks + 32 * -(-blocks // 256) + 32) / n
    assert FourBit("nf4", 64, True).quantize(W).bits == pytest.approx(expect, rel=1e-15)
    assert Int8().quantize(W).bits == 8 + 32 / 256


def test_int8_is_int8params():
    W = spread_W(32, 64, seed=5)
    q = Int8().quantize(W)
    p = bnb.nn.Int8Params(W.clone(), requires_grad=False).to("cpu")
    assert torch.equal(q.data, p.data) and torch.equal(q.state, p.SCB)
    assert torch.equal(q.dequantize(), F.int8_vectorwise_dequant(p.data, p.SCB))


def test_quantizer_names_and_config():
    assert quantizer("nf4", double_quant=True) == FourBit("nf4", 64, True)
    assert quantizer("int8") == Int8()
    assert FourBit("nf4", 64, True).config() == dict(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                    bnb_4bit_use_double_quant=True)
    with pytest.raises(ValueError, match="blocksize 64 only"):
        FourBit("nf4", 128).config()


# ----------------------------------------------------------------------------------------- peft's LoftQ
def peft_loftq_on_cpu():
    """peft's own ``loftq_init`` with its compute device (hard-coded "cuda" / "xpu") pointed at the CPU."""
    lu = pytest.importorskip("peft.utils.loftq_utils")
    src = inspect.getsource(lu.loftq_init)
    line = 'compute_device = "xpu" if is_xpu_available() else "cuda"'
    assert src.count(line) == 1, "peft's loftq_init changed: update this test"
    scope = dict(vars(lu))
    exec(compile(src.replace(line, 'compute_device = "cpu"'), lu.__file__, "exec"), scope)  # noqa: S102
    return scope["loftq_init"]


def loftq_steps(W, r, num_iter, svd_dtype=torch.float32):
    """peft's loftq_init written out (nf4): returns (packed codes, quant state, dequant(Q), L, R) of its last
    step. ``svd_dtype=float32`` is peft's arithmetic; float64 runs the same steps with fp64 residuals, SVD and
    products, rounding the quantizer input to fp32 (covsvd's default arithmetic)."""
    W = W.to(torch.float32)
    res = W.clone()
    for i in range(num_iter):
        p = bnb.nn.Params4bit(res, requires_grad=False, compress_statistics=False, quant_type="nf4").to("cpu")
        deq = F.dequantize_4bit(p.data, p.quant_state)
        U, S, Vh = torch.linalg.svd(W.to(svd_dtype) - deq.to(svd_dtype), full_matrices=False)
        L = U[:, :r] @ torch.diag(S[:r]).sqrt()  # (d_out, r)
        R = torch.diag(S[:r]).sqrt() @ Vh[:r]  # (r, d_in)
        if i + 1 == num_iter:
            return p.data, p.quant_state, deq, L, R
        res = (W.to(svd_dtype) - L @ R).to(torch.float32)


def test_written_out_steps_are_pefts_function():
    W, r = spread_W(64, 128, seed=6), 4
    loftq_init = peft_loftq_on_cpu()
    for k in (1, 3):
        deq, lora_A, lora_B = loftq_init(W, 4, r, num_iter=k)
        _, _, deq_ref, L, R = loftq_steps(W, r, k)
        assert torch.equal(deq, deq_ref) and torch.equal(lora_B, L) and torch.equal(lora_A, R)


@pytest.mark.parametrize("k", [1, 2, 5])
def test_identity_zero_start_is_loftq_to_fp64_rounding(k):
    """Same steps, fp64 decompositions in both: the codes agree exactly, the absmax statistics to fp32
    rounding (the quantizer inputs are fp32 roundings of fp64 values that agree to ~1e-15), the reconstructions
    to 1e-13 relative (an fp64 rank-r SVD is accurate to ~u64 ||A|| (1 + 2 s_1 / gap); here
    ``gap = s_r - s_{r+1} > 0.04 s_1`` on every iterate, so ~1e-14 at most)."""
    W, r = spread_W(96, 192, seed=7), 6
    codes, state, deq, L, R = loftq_steps(W, r, k, svd_dtype=F64)
    res = quantize_residual(W, None, r, "identity", "nf4", iters=k, start="zero", keep="last",
                            storage_dtype=F64)  # fp64 factors, as the written-out steps keep them
    assert res.best == k and res.info["quantizations"] == k
    assert torch.equal(res.base.data, codes)
    assert torch.allclose(res.base.state.absmax, state.absmax, rtol=4 * U32, atol=0)
    ref = deq.double() + L @ R
    assert (res.weight(F64) - ref).norm() <= 1e-13 * ref.norm()


@pytest.mark.parametrize("k", [1, 2, 5])
def test_identity_zero_start_is_pefts_loftq_to_fp32_rounding(k):
    """Against peft's own function (fp32 SVD): the codes agree exactly on this weight, and the reconstruction
    and the error to the accuracy of an fp32 rank-r SVD: ``||Delta(L R)|| <~ u32 ||A|| (1 + 2 s_1 / gap)``,
    with A the final residual ``W - dequant(Q)``, s its singular values and ``gap = s_r - s_{r+1}``."""
    W, r = spread_W(96, 192, seed=7), 6
    deq, lora_A, lora_B = peft_loftq_on_cpu()(W, 4, r, num_iter=k)
    res = quantize_residual(W, None, r, "identity", "nf4", iters=k, start="zero", keep="last")
    codes, *_ = loftq_steps(W, r, k)
    assert torch.equal(res.base.data, codes)
    s = torch.linalg.svdvals(W.double() - deq.double())
    bound = 8 * U32 * float(s.norm()) * (1 + 2 * float(s[0] / (s[r - 1] - s[r])))
    ref = deq.double() + lora_B.double() @ lora_A.double()
    diff = float((res.weight(F64) - ref).norm())
    assert diff <= bound
    assert abs(res.fro_errors[-1] - float((W.double() - ref).norm() / W.double().norm())) <= 2 * diff / W.norm()


# ----------------------------------------------------------------------------------------- iterates
def brute_objective(W, res: QuantizedResidual, metric, C):
    """The objective of the returned iterate, computed from scratch in fp64 with the dense damped metric."""
    recon = res.weight(F64)
    if metric == "identity":
        return float((W.double() - recon).norm() / W.double().norm())
    Cm = C.matrix() if metric == "full" else C.diag()
    e = 1e-3 * float(Cm.diagonal().mean() if Cm.dim() == 2 else Cm.mean())
    M = Cm + e * torch.eye(Cm.shape[0], dtype=F64) if Cm.dim() == 2 else Cm + e
    return functional_error(W, recon, M)


@pytest.mark.parametrize("metric", ["identity", "diag", "full"])
@pytest.mark.parametrize("start", ["oriented", "zero"])
def test_errors_are_brute_force_and_best_is_kept(metric, start):
    W, r, k = spread_W(64, 128, seed=8), 5, 4
    C = moment_of(128, 400, seed=9)
    full = quantize_residual(W, C, r, metric, iters=k, start=start, keep="last")
    every = quantize_residual(W, C, r, metric, iters=k, start=start, keep="all")
    assert len(every.history) == k + 1 and every.errors == full.errors
    for j in range(k + 1):  # iterate j alone: the same prefix, and errors that brute force reproduces
        res = quantize_residual(W, C, r, metric, iters=j, start=start, keep="last")
        assert res.errors == full.errors[: j + 1] and res.fro_errors == full.fro_errors[: j + 1]
        U, S, P, base = every.history[j]
        assert torch.equal(U, res.U) and torch.equal(S, res.S) and torch.equal(P, res.P)
        assert torch.equal(base.data, res.base.data)
        assert res.errors[j] == pytest.approx(brute_objective(W, res, metric, C), rel=1e-10)
        frob = float((W.double() - res.weight(F64)).norm() / W.double().norm())
        assert res.fro_errors[j] == pytest.approx(frob, rel=1e-10)
    best = quantize_residual(W, C, r, metric, iters=k, start=start)
    assert best.errors == full.errors and best.errors[best.best] == min(best.errors)
    assert best.errors[best.best] <= best.errors[0] and best.errors[1] <= best.errors[0]
    assert best.errors[best.best] == pytest.approx(brute_objective(W, best, metric, C), rel=1e-10)
    assert best.best == min(range(k + 1), key=lambda j: (best.errors[j], j))
    assert best.best == every.best and torch.equal(best.U, every.U) and best.history == ()


@pytest.mark.parametrize("start", ["oriented", "zero"])
def test_source_requantizes_to_the_base(start):
    """A base stored as ``source`` and quantized again (as transformers does on load) gives the same codes, and
    the factors complete it: ``dequant(quant(source)) + U S P`` is the returned iterate, for every kept iterate."""
    W = spread_W(48, 96, seed=16, dtype=torch.bfloat16)
    for k in range(4):
        res = quantize_residual(W, None, 4, "identity", iters=k, start=start, keep="last")
        assert res.source.dtype == torch.bfloat16 and res.source.shape == W.shape
        again = FourBit().quantize(res.source.clone())
        assert torch.equal(again.data, res.base.data) and torch.equal(again.dequantize(), res.base.dequantize())
        B = again.dequantize().double() + (res.U.double() * res.S.double()) @ res.P.double()
        assert torch.equal(B, res.weight(F64))


def test_later_iterates_help_loftq():
    """LoftQ from a zero adapter: every iteration lowers the Frobenius error on this weight, so the kept
    iterate is the last, beyond iterate 1."""
    W = spread_W(96, 192, seed=7)
    res = quantize_residual(W, None, 6, "identity", iters=5, start="zero")
    assert all(res.errors[j + 1] < res.errors[j] for j in range(5))
    assert res.best == 5 and res.errors[5] < 0.95 * res.errors[1]


def test_iterate_zero_is_orient_then_quantize():
    """QPiSSA under a metric: iterate 0's factors are orient's, its base quant(W - U S P) in the base dtype."""
    W = spread_W(64, 128, seed=10)
    C = moment_of(128, 300, seed=11)
    o = orient(W, C, 5, "full")
    res = quantize_residual(W, C, 5, "full", iters=0)
    assert torch.equal(res.U, o.U) and torch.equal(res.S, o.S) and torch.equal(res.P, o.P)
    W_res = (W.double() - (o.U.double() * o.S.double()) @ o.P.double()).float()
    assert torch.equal(res.base.data, FourBit().quantize(W_res).data)
    assert res.bits == 4.5 and res.info["adapter_params"] == 5 * (64 + 128)


def test_qlora_start_has_zero_adapter_and_int8_runs():
    W = spread_W(32, 64, seed=12)
    res = quantize_residual(W, None, 3, "identity", iters=0, start="zero")
    assert not res.S.any() and torch.equal(res.base.data, FourBit().quantize(W).data)
    i8 = quantize_residual(W, None, 3, "identity", "int8", iters=2)
    assert i8.info["quant"] == "int8" and i8.bits == 8 + 32 / 64 and i8.errors[1] <= i8.errors[0]


def test_a_quantizer_object_joins():
    """Any object with a name and quantize(W) -> (something with dequantize() and bits) works."""

    class Grid:
        name = "grid"

        def quantize(self, W, name=None):
            step = float(W.abs().max()) / 7
            codes = torch.round(W / step).to(torch.int8)
            return Quantized("int8", codes, torch.full((W.shape[0],), step * 127), tuple(W.shape), torch.float32)

    W = spread_W(32, 64, seed=13)
    res = quantize_residual(W, None, 3, "identity", Grid(), iters=1)
    assert res.info["quant"] == "grid" and res.errors[1] <= res.errors[0]


def test_w_untouched_and_bf16_base():
    W = spread_W(32, 64, seed=14, dtype=torch.bfloat16)
    before = W.clone()
    res = quantize_residual(W, None, 3, "identity", iters=2)
    assert torch.equal(W, before) and res.base.dtype == torch.bfloat16 and res.U.dtype == torch.bfloat16


@pytest.mark.parametrize("kwargs,match", [
    (dict(W=torch.ones(8, 16, dtype=torch.int32)), "2-D floating"),
    (dict(quant="nf3"), "unknown quant"),
    (dict(r=17), "exceeds min"),
    (dict(blocksize=100), "blocksize=100"),
    (dict(quant="int8", blocksize=128), "do not apply"),
    (dict(iters=-1), "iters=-1"),
    (dict(start="pissa"), "start="),
    (dict(keep="first"), "keep="),
    (dict(W=torch.ones(16, 32, dtype=F64)), "base_dtype"),
    (dict(metric="full", C=None), "needs a second moment"),
    (dict(metric="full", C=torch.eye(8)), "expected"),
    (dict(quant=object()), "quant="),
])
def test_bad_input_raises(kwargs, match):
    args = dict(W=spread_W(16, 32, seed=15), C=None, r=2, metric="identity")
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        quantize_residual(**args)


def test_two_sided_quantized_residual_minimises_the_two_sided_error():
    """metric="two-sided": every iterate's objective is the two-sided error ||N^1/2 (W - dequant Q - U S P) M^1/2||
    relative to ||N^1/2 W M^1/2|| (brute force with eigh square roots), the first re-fit never raises it, and
    G = c I gives exactly the full metric's run."""
    g = torch.Generator().manual_seed(3)
    W = torch.randn(48, 64, generator=g, dtype=torch.float32)
    X = torch.randn(400, 64, generator=g, dtype=torch.float64) * torch.logspace(0, -1, 64, dtype=torch.float64)
    Y = torch.randn(300, 48, generator=g, dtype=torch.float64) * torch.logspace(0, -1.5, 48, dtype=torch.float64)
    C, G = X.T @ X / 400, Y.T @ Y / 300
    res = covsvd.quantize_residual(W, C, 6, "two-sided", iters=3, keep="all", output=G, eps=1e-3, eps_output=1e-3)

    def root(M, eps):
        lam, Q = torch.linalg.eigh(M + eps * M.diagonal().mean() * torch.eye(M.shape[0], dtype=M.dtype))
        return (Q * lam.clamp_min(0).sqrt()) @ Q.T

    Nh, Mh = root(G, 1e-3), root(C, 1e-3)
    ref = float(torch.linalg.matrix_norm(Nh @ W.double() @ Mh))
    for k, (U, S, P, q) in enumerate(res.history):
        E = W.double() - q.dequantize().double() - (U.double() * S.double()) @ P.double()
        assert res.errors[k] == pytest.approx(float(torch.linalg.matrix_norm(Nh @ E @ Mh)) / ref, rel=1e-9)
    assert res.errors[1] <= res.errors[0] + 1e-12
    same = covsvd.quantize_residual(W, C, 6, "two-sided", iters=2, output=4.0 * torch.eye(48, dtype=torch.float64),
                                    eps=1e-3, eps_output=0.0, eps_mode="absolute")
    full = covsvd.quantize_residual(W, C, 6, "full", iters=2, eps=1e-3, eps_mode="absolute")
    assert same.errors == pytest.approx(full.errors, rel=1e-9)
    with pytest.raises(ValueError, match="two-sided"):
        covsvd.quantize_residual(W, C, 6, "two-sided")
