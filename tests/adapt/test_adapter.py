"""The bounded-gain adapter: identity at init on real and random models, gradients, detach, files, validation."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import covsvd
from covsvd import (
    AttachReport,
    BoundedGainLinear,
    adapters,
    attach_adapters,
    detach_adapters,
    load_adapters,
    save_adapters,
    trainable_parameters,
)
from covsvd.adapt import adapter_parameters
from covsvd.algebra.rotation import block_diag_matrix, n_rotation_params
from covsvd.capture.moments import SecondMoment
from covsvd.data.targets import Conv1D, weight_matrix

METRICS = ("identity", "diag", "asvd", "full", "corda")
ARMS = (None, "V", "U", "both")
IDENTITY_TOL = 1e-5  # relative, fp32


pytestmark = pytest.mark.usefixtures("one_thread")  # small matrices: see conftest.one_thread


# ----------------------------------------------------------------------------------------------- helpers


def tiny_llama(seed: int = 0):
    """A randomly initialised 2-layer Llama (d=32, GQA 4/2 heads, SwiGLU 64): plain nn.Linear targets."""
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaModel(config).eval()


def tiny(kind: str, seed: int = 0):
    from conftest import tiny_gpt2

    return tiny_gpt2(seed) if kind == "gpt2" else tiny_llama(seed)


def token_batches(n_batches=3, batch=4, length=24, vocab=97, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, vocab, (batch, length), generator=g),
             "attention_mask": torch.ones(batch, length, dtype=torch.long)} for _ in range(n_batches)]


def moments_of(model, batches, names=None) -> dict[str, SecondMoment]:
    """Reference moments by brute force (every real input row, fp64), independent of covsvd.capture.hooked."""
    from conftest import brute_force

    names = names or covsvd.find_targets(model)
    return {n: SecondMoment("full", X.T @ X, X.sum(0), X.abs().sum(0), X.shape[0])
            for n, X in brute_force(model, batches, names).items()}


def output(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).last_hidden_state


def rel(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


def snapshot(model) -> dict:
    """Everything attach/load could change: module types, state (values), requires_grad flags."""
    return {
        "types": [(n, type(m)) for n, m in model.named_modules()],
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "attrs": sorted(k for k in vars(model) if k.startswith("_covsvd")),
    }


def assert_untouched(model, snap) -> None:
    now = snapshot(model)
    assert now["types"] == snap["types"]
    assert now["grad"] == snap["grad"]
    assert now["attrs"] == snap["attrs"]
    assert now["state"].keys() == snap["state"].keys()
    for k, v in snap["state"].items():
        assert torch.equal(now["state"][k], v), k


def svd_factors(W: torch.Tensor, r: int):
    """Top-r SVD factors of W (fp64 decomposition, fp32 storage) and the residual from the stored factors."""
    U, S, Vh = torch.linalg.svd(W.double(), full_matrices=False)
    U, S, P = U[:, :r].float(), S[:r].float(), Vh[:r].float()
    W_res = (W.double() - (U.double() * S.double()) @ P.double()).float()
    return U, S, P, W_res


def randomize(model, scale=0.3, seed=1):
    """Move every adapter's g and rotation parameters away from zero (a stand-in for training)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter_parameters(model):
            p.copy_(scale * torch.randn(p.shape, generator=g))


# ----------------------------------------------------------------------------------------------- the module


@pytest.mark.parametrize("rotate", ARMS)
@pytest.mark.parametrize("layout", ["linear", "conv1d"])
def test_module_identity_at_init(rotate, layout):
    torch.manual_seed(0)
    d_out, d_in, r = 24, 40, 12
    W, b = torch.randn(d_out, d_in), torch.randn(d_out)
    m = BoundedGainLinear(*svd_factors(W, r), b, rotate=rotate, block_size=4, layout=layout)
    x = torch.randn(3, 5, d_in)
    ref = F.linear(x, W, b)
    assert rel(m(x), ref) <= IDENTITY_TOL
    plain = BoundedGainLinear(*svd_factors(W, r), b, layout=layout)
    assert torch.equal(m(x), plain(x))  # R = I exactly: the rotation arms add nothing at init
    assert m.in_features == d_in and m.out_features == d_out and m.r == r


def test_forward_equals_the_stated_formula_when_trained():
    """y = x W_res^T + ((x (R_V P)^T) * S_eff) (U R_U^T)^T + b, with R from dense block matrices."""
    torch.manual_seed(0)
    d_out, d_in, r = 20, 30, 10  # r % block_size != 0: a smaller last block
    W, b = torch.randn(d_out, d_in), torch.randn(d_out)
    U, S, P, W_res = svd_factors(W, r)
    m = BoundedGainLinear(U, S, P, W_res, b, coeff=0.7, rotate="both", block_size=4, max_angle=0.8)
    randomize(m, scale=1.0)
    R_V, R_U = m.rot_V.matrix().detach(), m.rot_U.matrix().detach()
    s_eff = S * (1 + F.elu(0.7 * m.g.detach()))
    W_eff = W_res + (U @ R_U.T) @ torch.diag(s_eff) @ (R_V @ P)
    x = torch.randn(7, d_in)
    torch.testing.assert_close(m(x), x @ W_eff.T + b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(m.dense_weight(trained=True).float(), W_eff, atol=1e-5, rtol=1e-5)
    # and the rotations are the ones the rotation module builds
    torch.testing.assert_close(R_V, block_diag_matrix(m.rot_V(), r))


@settings(max_examples=30, deadline=None)
@given(g=st.lists(st.floats(-1e3, 1e3), min_size=4, max_size=4), coeff=st.floats(0.0, 10.0))
def test_gain_is_bounded_below_and_identity_at_zero(g, coeff):
    """1 + ELU(coeff g) > 0: a gain can shrink a direction towards 0, never flip its sign."""
    m = BoundedGainLinear(*svd_factors(torch.randn(6, 5), 4))
    with torch.no_grad():
        m.g.copy_(torch.tensor(g))
    s = m.s_eff().detach()
    assert torch.all(s >= 0) and torch.all(torch.isfinite(s))
    m.coeff = 0.0
    assert torch.equal(m.s_eff().detach(), m.S)


def test_module_rejects_inconsistent_shapes():
    U, S, P, W_res = svd_factors(torch.randn(6, 5), 3)
    with pytest.raises(ValueError, match="W_res has shape"):
        BoundedGainLinear(U, S, P, W_res.T)
    with pytest.raises(ValueError, match="bias has shape"):
        BoundedGainLinear(U, S, P, W_res, torch.zeros(5))
    with pytest.raises(ValueError, match="rotate="):
        BoundedGainLinear(U, S, P, W_res, rotate="X")


# ----------------------------------------------------------------------------------------------- tiny models


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def tiny_case(request):
    """(kind, model, moments, held-out batch) for a tiny random-init model. Read-only."""
    model = tiny(request.param)
    moments = moments_of(model, token_batches())
    return request.param, model, moments, token_batches(1, seed=99)[0]


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("rotate", ARMS)
def test_identity_at_init_tiny_models(tiny_case, metric, rotate):
    kind, base, moments, batch = tiny_case
    model = copy.deepcopy(base)
    report = attach_adapters(model, moments, r=8, metric=metric, rotate=rotate, progress=False)
    found = adapters(model)
    assert len(found) == len(moments) and isinstance(report, AttachReport)
    if kind == "gpt2":
        assert all(a.layout == "conv1d" for a in found.values())
    assert rel(output(model, batch), output(base, batch)) <= IDENTITY_TOL
    assert max(row["identity_error"] for row in report.rows) < 1e-6
    per_arm = {None: 0, "V": 1, "U": 1, "both": 2}[rotate]
    assert trainable_parameters(model) == len(found) * (8 + per_arm * n_rotation_params(8, 4))


def test_gradient_reaches_only_adapters_and_a_gain_step_moves_the_output(tiny_case):
    kind, base, moments, batch = tiny_case
    model = copy.deepcopy(base)
    attach_adapters(model, moments, r=8, metric="full", rotate="both", progress=False)
    trainable = {id(p) for p in adapter_parameters(model)}
    assert trainable == {id(p) for p in model.parameters() if p.requires_grad}
    y0 = output(model, batch)
    target = torch.randn_like(y0)
    loss = ((model(**batch).last_hidden_state - target) ** 2).mean()
    loss.backward()
    for name, p in model.named_parameters():
        if id(p) in trainable:
            assert p.grad is not None and p.grad.abs().max() > 0, name
        else:
            assert p.grad is None and not p.requires_grad, name
    for name, buf in model.named_buffers():
        assert not buf.requires_grad, name
    with torch.no_grad():  # one plain SGD step on the gains only
        for a in adapters(model).values():
            a.g -= 0.5 * a.g.grad
    y1 = output(model, batch)
    assert rel(y1, y0) > 1e-4
    assert ((y1 - target) ** 2).mean() < ((y0 - target) ** 2).mean()


def test_detach_restores_the_original_weights(tiny_case):
    kind, base, moments, batch = tiny_case
    model = copy.deepcopy(base)
    model.get_submodule(covsvd.find_targets(model)[0]).weight.requires_grad_(False)  # a custom flag survives
    snap = snapshot(model)
    attach_adapters(model, moments, r=8, metric="full", rotate="V", progress=False)
    randomize(model)  # detach (merge=False) ignores training: it restores W = W_res + U S P
    errors = detach_adapters(model)
    assert not adapters(model)
    now = snapshot(model)
    assert now["types"] == snap["types"] and now["grad"] == snap["grad"] and not now["attrs"]
    assert now["state"].keys() == snap["state"].keys()
    worst = 0.0
    for k, v in snap["state"].items():
        err = ((now["state"][k] - v).abs().max() / v.abs().max().clamp_min(1e-30)).item()
        worst = max(worst, err)
        if k.rpartition(".")[0] in errors and k.endswith(".weight"):
            assert err == pytest.approx(errors[k.rpartition(".")[0]], abs=1e-12)  # the reported number
        elif not k.endswith(".weight") or k.rpartition(".")[0] not in errors:
            assert err == 0, k  # everything else is bitwise the same
    assert worst < 1e-6
    assert rel(output(model, batch), output(base, batch)) < 1e-6


def test_detach_merge_keeps_the_trained_function(tiny_case):
    kind, base, moments, batch = tiny_case
    model = copy.deepcopy(base)
    attach_adapters(model, moments, r=8, metric="diag", rotate="both", coeff=2.0, progress=False)
    randomize(model)
    y = output(model, batch)
    moved = detach_adapters(model, merge=True)
    assert rel(output(model, batch), y) <= IDENTITY_TOL
    assert min(moved.values()) > 0  # training moved every layer


# ----------------------------------------------------------------------------------------------- files


def _attached(kind, seed=0, r=8, rotate="both", targets=None, metric="full"):
    model = tiny(kind, seed)
    attach_adapters(model, moments_of(model, token_batches()), r=r, metric=metric, rotate=rotate,
                    targets=targets, progress=False)
    return model


def test_save_load_round_trip_is_exact(tmp_path):
    batch = token_batches(1, seed=5)[0]
    src = _attached("gpt2")
    randomize(src)
    y = output(src, batch)
    meta = save_adapters(src, tmp_path / "a.safetensors")
    assert meta["metric"] == "full" and meta["r"] == "8" and meta["rotate"] == "both"
    assert "fingerprint" in meta["model_identity"] and meta["covsvd_version"] == covsvd.__version__

    plain = tiny("gpt2")  # same seed: the same base weights, no adapters, no moments needed
    names = load_adapters(plain, tmp_path / "a.safetensors")
    assert names == list(adapters(src))
    assert torch.equal(output(plain, batch), y)
    assert trainable_parameters(plain) == trainable_parameters(src)

    other = _attached("gpt2")  # adapters attached already: a full file overwrites all their tensors
    load_adapters(other, tmp_path / "a.safetensors")
    assert torch.equal(output(other, batch), y)

    detach_adapters(plain)  # and a loaded model detaches back to its base weights
    assert rel(output(plain, batch), output(tiny("gpt2"), batch)) < 1e-6


def test_trainable_only_file(tmp_path):
    batch = token_batches(1, seed=5)[0]
    src = _attached("llama")
    randomize(src)
    save_adapters(src, tmp_path / "t.safetensors", contents="trainable")
    same = _attached("llama")  # same moments and settings: the same frozen factors
    load_adapters(same, tmp_path / "t.safetensors")
    assert torch.equal(output(same, batch), output(src, batch))
    plain = tiny("llama")
    snap = snapshot(plain)
    with pytest.raises(ValueError, match="trainable-only file needs the same adapters attached"):
        load_adapters(plain, tmp_path / "t.safetensors")
    assert_untouched(plain, snap)
    diff = _attached("llama", metric="diag")  # other frozen factors
    snap = snapshot(diff)
    with pytest.raises(ValueError, match="frozen_digest"):
        load_adapters(diff, tmp_path / "t.safetensors")
    assert_untouched(diff, snap)


@pytest.mark.parametrize("case", ["other model", "other weights", "other targets", "other r", "other rotate",
                                  "not covsvd"])
def test_mismatched_file_raises_and_leaves_the_model_alone(tmp_path, case):
    path = tmp_path / "a.safetensors"
    save_adapters(_attached("gpt2"), path)
    make, match = {
        "other model": (lambda: tiny("llama"), "different model"),
        "other weights": (lambda: tiny("gpt2", seed=1), "other weights of the same architecture"),
        "other targets": (lambda: _attached("gpt2", targets=r".*c_attn"), "only in file"),
        "other r": (lambda: _attached("gpt2", r=4), "'r'"),
        "other rotate": (lambda: _attached("gpt2", rotate="V"), "'rotate'"),
        "not covsvd": (lambda: tiny("gpt2"), "not a covsvd adapter file"),
    }[case]
    model = make()
    if case == "not covsvd":
        from safetensors.torch import save_file

        save_file({"x": torch.zeros(2)}, path)
    snap = snapshot(model)
    with pytest.raises(ValueError, match=match):
        load_adapters(model, path)
    assert_untouched(model, snap)


# ----------------------------------------------------------------------------------------------- validation


def _tied_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=97, n_positions=64, n_embd=32, n_layer=1, n_head=4)).eval()


def _fails_in_orient(monkeypatch):
    import sys

    orient_module = sys.modules["covsvd.adapt.attach"]  # attach calls orient through its own module namespace
    real, calls = orient_module.orient, []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise FloatingPointError("injected failure")
        return real(*args, **kwargs)

    monkeypatch.setattr(orient_module, "orient", flaky)


VALIDATION = {
    # case: (kwargs change, how moments change, expected message)
    "unknown target": (dict(targets=["h.0.attn.c_nope"]), None, "not a module"),
    "r too large": (dict(r=33), None, "exceeds min"),
    "too few tokens": ({}, lambda m, n: setattr(m[n], "count", 5), "fewer than r"),
    "non-finite C": ({}, lambda m, n: m[n].sum_xx.__setitem__((0, 0), float("nan")), "non-finite"),
    "missing moment": ({}, "drop-one", "no entry"),  # explicit targets name a layer moments lack
    "moment of another layer": ({}, lambda m, n: m.__setitem__(n, SecondMoment.zeros(7)), "d_in=7"),
    "diag moment for full metric": ({}, lambda m, n: m.__setitem__(n, SecondMoment(
        "diag", m[n].sum_xx.diagonal().clone(), m[n].sum_x, m[n].sum_abs, m[n].count)), "kind='diag'"),
    "bad metric": (dict(metric="pca"), None, "metric="),
    "bad rotate": (dict(rotate="W"), None, "rotate="),
    "bad max_angle": (dict(max_angle=4.0), None, "max_angle"),
    "no moments": (dict(moments=None), None, "needs moments"),
    "tied weights": (dict(model="tied"), None, "tied"),
    "already attached": (dict(model="attached"), None, "already carry"),
    "orient fails mid-way": (dict(fail=True), None, "injected failure"),
}


@pytest.mark.parametrize("case", list(VALIDATION))
def test_every_validation_error_leaves_the_model_untouched(case, monkeypatch):
    change, edit, match = VALIDATION[case]
    change = dict(change)
    which = change.pop("model", None)
    model = _tied_gpt2() if which == "tied" else tiny("gpt2")
    # the tied lm_head is never a default target (LLM convention): an explicit spec still selects it
    names = covsvd.find_targets(model, r".*" if which == "tied" else None)
    assert which != "tied" or names[-1] == "lm_head"
    moments = moments_of(model, token_batches(), names)
    kwargs = dict(moments=moments, r=8, metric="full", rotate="both", progress=False)
    if change.pop("fail", False):
        _fails_in_orient(monkeypatch)
    kwargs.update(change)
    last = names[-1]
    if edit == "drop-one":
        kwargs["targets"] = list(names)
        moments.pop(last)
    elif edit is not None:
        edit(moments, last)
    if which == "attached":  # the last layer carries an adapter already
        attach_adapters(model, None, r=4, metric="identity", targets=[last], progress=False)
    model.get_submodule(names[0]).bias.requires_grad_(False)
    snap = snapshot(model)
    with pytest.raises((ValueError, RuntimeError), match=match) as info:
        attach_adapters(model, **kwargs)
    assert_untouched(model, snap)
    if case not in ("bad metric", "bad rotate", "bad max_angle", "no moments", "orient fails mid-way"):
        assert "layer" in str(info.value) or "target" in str(info.value)  # the error names the layer


# ----------------------------------------------------------------------------------------------- the default model


@pytest.fixture(scope="module")
def bert_case(default_model):
    """The embedded all-MiniLM-L6-v2, brute-force moments of its first layer's six Linear targets, a batch."""
    model, tok = default_model
    names = covsvd.find_targets(model, r"encoder\.layer\.0\..*")
    calib = covsvd.calibration_batches(tok, seq_len=64, batch_size=8, max_tokens=1024)
    held = covsvd.calibration_batches(tok, split="heldout", seq_len=32, batch_size=4, max_tokens=96)[0]
    return model, moments_of(model, calib, names), held


@pytest.mark.slow
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("rotate", ARMS)
def test_identity_at_init_default_model(bert_case, metric, rotate):
    base, moments, batch = bert_case
    model = copy.deepcopy(base)
    report = attach_adapters(model, moments, r=16, metric=metric, rotate=rotate, progress=False)
    assert len(adapters(model)) == 6
    assert rel(output(model, batch), output(base, batch)) <= IDENTITY_TOL
    assert all(math.isfinite(row["eps"]) for row in report.rows)


@pytest.mark.slow
def test_identity_at_init_default_model_every_layer(default_model):
    """All 37 Linear layers (metric identity, no moments needed), both rotations, bf16 storage."""
    base, tok = default_model
    batch = covsvd.calibration_batches(tok, split="heldout", seq_len=32, batch_size=4, max_tokens=96)[0]
    model = copy.deepcopy(base)
    report = attach_adapters(model, None, r=32, metric="identity", rotate="both", dtype=torch.bfloat16, progress=False)
    assert len(report.rows) == 37 == len(adapters(model))
    assert all(a.U.dtype == torch.bfloat16 and a.W_res.dtype == torch.float32 for a in adapters(model).values())
    assert rel(output(model, batch), output(base, batch)) <= IDENTITY_TOL
    errors = detach_adapters(model)
    assert max(errors.values()) < 1e-6
    for (k, v), (k0, v0) in zip(model.state_dict().items(), base.state_dict().items(), strict=True):
        assert k == k0 and (v - v0).abs().max() <= 1e-6 * v0.abs().max(), k


@pytest.mark.slow
def test_bf16_tight_residual_beats_the_naive_one(bert_case):
    """Rounding U, S, P to bf16 *before* forming W_res keeps W_res + U S P == W to fp32 rounding; forming
    W_res from the unrounded factors and rounding afterwards (naive) leaves the bf16 error in."""
    base, moments, _ = bert_case
    model = copy.deepcopy(base)
    report = attach_adapters(model, moments, r=16, metric="full", dtype=torch.bfloat16, progress=False)
    for row in report.rows:
        name = row["name"]
        W = weight_matrix(base.get_submodule(name)).detach().double()
        o = covsvd.orient(W.float(), moments[name], 16, metric="full", eps=row["eps"], eps_mode="absolute",
                          storage_dtype=torch.float64)
        U, S, P = (t.to(torch.bfloat16).double() for t in (o.U, o.S, o.P))
        naive_res = (W - (o.U.double() * o.S.double()) @ o.P.double()).float().double()
        naive = ((naive_res + (U * S) @ P - W).abs().max() / W.abs().max()).item()
        assert row["identity_error"] < naive, name
        assert row["identity_error"] < 1e-6 < naive


def test_conv1d_class_is_restored():
    model = tiny("gpt2")
    attach_adapters(model, None, r=4, metric="identity", targets=r".*c_fc", progress=False)
    assert all(isinstance(m, BoundedGainLinear) for n, m in model.named_modules() if n.endswith("c_fc"))
    detach_adapters(model)
    assert all(type(m) is Conv1D for n, m in model.named_modules() if n.endswith("c_fc"))


def test_detach_without_adapters_raises():
    with pytest.raises(ValueError, match="no covsvd adapters"):
        detach_adapters(nn.Sequential(nn.Linear(3, 3)))


# ----------------------------------------------------------------------------------------------- per-layer r


def test_dict_r_gives_each_layer_its_rank(tmp_path):
    base = tiny("gpt2")
    moments = moments_of(base, token_batches())
    ranks = {n: 2 + 3 * i for i, n in enumerate(moments)}  # 2, 5, 8, ...: every layer its own
    model = copy.deepcopy(base)
    report = attach_adapters(model, moments, r=ranks, metric="full", rotate="V", progress=False)
    assert {row["name"]: row["r"] for row in report.rows} == ranks
    assert {n: a.r for n, a in adapters(model).items()} == ranks
    assert report.settings["r"] == ranks and report.settings["r"] is not ranks  # a copy is recorded
    assert "per layer 2.." in str(report)
    assert trainable_parameters(model) == sum(r + n_rotation_params(r, 4) for r in ranks.values())
    batch = token_batches(1, seed=99)[0]
    assert rel(output(model, batch), output(base, batch)) <= IDENTITY_TOL
    randomize(model)
    save_adapters(model, tmp_path / "a.safetensors")  # mixed ranks round-trip through a file
    plain = copy.deepcopy(base)
    load_adapters(plain, tmp_path / "a.safetensors")
    assert {n: a.r for n, a in adapters(plain).items()} == ranks
    assert torch.equal(output(plain, batch), output(model, batch))


def test_dict_r_keys_are_the_default_targets():
    model = tiny("gpt2")
    moments = moments_of(model, token_batches())
    ranks = {n: 3 for n in list(moments)[2:5]}  # three of the eight layers
    report = attach_adapters(model, moments, r=ranks, metric="full", progress=False)
    assert list(adapters(model)) == list(ranks) and [row["r"] for row in report.rows] == [3, 3, 3]


@pytest.mark.parametrize("explicit, edit, match", [
    (True, lambda r, names: r.pop(names[1]), r"without an entry for 1 target layer\(s\): \['h\.0\.attn\.c_proj'\]"),
    (True, lambda r, names: r.__setitem__("h.1.mlp.c_fc2", 4), r"not targets: \['h\.1\.mlp\.c_fc2'\]"),
    (False, lambda r, names: r.__setitem__("h.1.mlp.c_fc2", 4), r"target 'h\.1\.mlp\.c_fc2' is not a module"),
    (False, lambda r, names: r.__setitem__(names[2], 0), r"layer 'h\.0\.mlp\.c_fc': r=0 must be a positive int"),
    (False, lambda r, names: r.__setitem__(names[0], 97), r"layer 'h\.0\.attn\.c_attn'.*r=97 exceeds min"),
])
def test_dict_r_errors_name_the_layers_and_leave_the_model_untouched(explicit, edit, match):
    model = tiny("gpt2")
    moments = moments_of(model, token_batches())
    names = list(moments)
    ranks = dict.fromkeys(names, 4)
    edit(ranks, names)
    snap = snapshot(model)
    with pytest.raises(ValueError, match=match):
        attach_adapters(model, moments, r=ranks, metric="full", targets=names if explicit else None, progress=False)
    assert_untouched(model, snap)


def test_attach_warns_once_when_calibration_is_rank_deficient():
    """count < d_in: C has rank < d_in and eps alone orders the rest; attach says so (full metrics only), once."""
    import warnings

    model = tiny("llama")
    few = moments_of(model, token_batches(1, batch=1, length=20))  # 20 tokens < d_in 32 (and 64 for down_proj)
    with pytest.warns(covsvd.InsufficientCalibrationWarning, match="fewer real tokens than their input width") as rec:
        attach_adapters(copy.deepcopy(model), few, r=4, metric="full", progress=False)
    assert len(rec) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error", covsvd.InsufficientCalibrationWarning)
        attach_adapters(copy.deepcopy(model), few, r=4, metric="diag", progress=False)  # no rank to lose
        enough = moments_of(model, token_batches())  # 288 tokens > 64
        attach_adapters(copy.deepcopy(model), enough, r=4, metric="full", progress=False)
