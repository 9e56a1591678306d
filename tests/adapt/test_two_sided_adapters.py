"""metric="two-sided" through the entry points on random-init Llama (GQA, left padding) and GPT-2 (Conv1D):
attach and init give adapters that are the identity at init although U is not orthonormal; init captures the
output moments itself and matches capture + attach; allocate_ranks with rule="tolerance" / objective="absolute"
reads the two-sided spectra; every missing or mismatched output moment is refused before anything changes."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import padded_batches, tiny_decoder

import covsvd
from covsvd.adapt.allocate import layer_spectra
from covsvd.algebra.budget import allocation_cost, allocation_tolerance, rank_costs, tolerance_ranks
from covsvd.algebra.measures import max_relative_error

OUTPUT_TOL = 1e-5  # relative, fp32 model outputs (the identity-at-init guarantee)
R = 4
pytestmark = pytest.mark.usefixtures("one_thread")


def batches(arch: str, seed: int = 0):
    side = "left" if arch == "llama" else "right"
    return padded_batches([[20, 17, 30, 9], [25, 12, 18, 22]], side=side, seed=seed)


def logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def real(t: torch.Tensor, batch) -> torch.Tensor:
    return t[batch["attention_mask"].bool()]  # (tokens, vocab): padding positions carry no guarantee


CASES = {}


def case(arch: str):
    """``(model, batches, input moments (full), output moments (probe))``, cached; the model is read-only."""
    if arch not in CASES:
        model = tiny_decoder(arch)
        data = batches(arch)
        moments = covsvd.capture_moments(model, data, kind="full", progress=False)
        outputs = covsvd.capture_output_moments(model, data, "probe", progress=False)
        CASES[arch] = model, data, moments, outputs
    return CASES[arch]


def state(model) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def same_state(model, before: dict) -> bool:
    now = model.state_dict()
    return list(now) == list(before) and all(torch.equal(now[k], before[k]) for k in now)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_attach_is_the_identity_at_init_and_detaches_exactly(arch):
    base, data, moments, outputs = case(arch)
    model = copy.deepcopy(base)
    probe = padded_batches([[14, 9, 16]], side="left" if arch == "llama" else "right", seed=7)[0]
    before = logits(model, probe)
    report = covsvd.attach_adapters(model, moments, R, "two-sided", output_moments=outputs, rotate="both",
                                    progress=False, dtype=torch.float64)
    assert max_relative_error(real(logits(model, probe), probe), real(before, probe)) <= OUTPUT_TOL
    found = covsvd.adapters(model)
    assert list(found) == list(outputs)
    for name, m in found.items():
        U = m.U.double()
        gram = U.T @ U
        assert float((gram - torch.eye(R, dtype=gram.dtype)).abs().max()) > 1e-3, name  # U is not orthonormal
        assert m.config["metric"] == "two-sided" and m.config["eps_output"] > 0, name
        G = outputs[name].matrix() + m.config["eps_output"] * torch.eye(U.shape[0], dtype=torch.float64)
        assert max_relative_error(U.T @ G @ U, torch.eye(R, dtype=torch.float64)) <= 1e-8, name  # N-orthonormal
    assert all(row["metric"] == "two-sided" for row in report.rows)
    restored = covsvd.detach_adapters(model)
    assert max(restored.values()) <= 1e-6
    assert max_relative_error(real(logits(model, probe), probe), real(before, probe)) <= OUTPUT_TOL


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_init_captures_the_output_side_and_matches_attach(arch):
    base, data, moments, outputs = case(arch)
    attached, inited = copy.deepcopy(base), copy.deepcopy(base)
    covsvd.attach_adapters(attached, moments, R, "two-sided", output_moments=outputs, progress=False)
    report = covsvd.init_adapters(inited, data, R, "two-sided", progress=False)  # probe, layerwise input side
    a, b = covsvd.adapters(attached), covsvd.adapters(inited)
    assert list(a) == list(b) and len(report.rows) == len(a)
    for name in a:
        W = a[name].dense_weight().double()
        # the same factors: the output moments are the same probe draws, the input moments equal to fp64 rounding
        assert max_relative_error((b[name].U.double() * b[name].S.double()) @ b[name].P.double(),
                                  (a[name].U.double() * a[name].S.double()) @ a[name].P.double()) <= 1e-4, name
        assert max_relative_error(b[name].dense_weight().double(), W) <= 1e-6, name
    probe = data[0]
    assert max_relative_error(real(logits(inited, probe), probe), real(logits(base, probe), probe)) <= OUTPUT_TOL


def test_init_refuses_a_one_shot_iterator_before_anything_runs():
    base, data, _, _ = case("llama")
    model = copy.deepcopy(base)
    before = state(model)
    with pytest.raises(ValueError, match="reads batches twice"):
        covsvd.init_adapters(model, iter(data), R, "two-sided", progress=False)
    with pytest.raises(ValueError, match="output_mode='hessian'"):
        covsvd.init_adapters(model, data, R, "two-sided", output_mode="hessian", progress=False)
    assert same_state(model, before) and not covsvd.adapters(model)


def test_init_takes_given_output_moments():
    base, data, moments, outputs = case("gpt2")
    model = copy.deepcopy(base)
    covsvd.init_adapters(model, data, R, "two-sided", output_moments=outputs, progress=False,
                         capture={"layerwise": False})
    ref = copy.deepcopy(base)
    covsvd.attach_adapters(ref, moments, R, "two-sided", output_moments=outputs, progress=False)
    for name, m in covsvd.adapters(model).items():
        o = covsvd.adapters(ref)[name]
        assert max_relative_error((m.U.double() * m.S.double()) @ m.P.double(),
                                  (o.U.double() * o.S.double()) @ o.P.double()) <= 1e-4, name


def _plan_errors(arch):
    base, data, moments, outputs = case(arch)
    up = next(n for n in outputs if n.endswith(("mlp.up_proj", "mlp.c_fc")))  # d_out (48, 128) != d_in 32
    other = covsvd.capture_output_moments(tiny_decoder(arch, seed=1), data, "probe", progress=False)
    few = copy.deepcopy(outputs[up])
    few.count = R - 1
    return [
        (dict(output_moments=None), "needs the layer's output moment.*not been given"),
        (dict(output_moments={n: g for n, g in outputs.items() if n != up}), f"{up}.*no entry for it"),
        (dict(output_moments=outputs | {up: moments[up]}), "width 32"),  # the input moment, d_in wide
        (dict(output_moments=outputs | {up: few}), f"saw {R - 1} token gradients, fewer than r="),
        (dict(output_moments=other), "output moment"),  # another checkpoint's weights
        (dict(output_moments=outputs, metric="full"), "output_moments were given but metric='full'"),
    ]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_plan_refuses_missing_or_mismatched_output_moments_before_anything_runs(arch, tmp_path):
    base, data, moments, _ = case(arch)
    model = copy.deepcopy(base)
    before = state(model)
    for kwargs, match in _plan_errors(arch):
        call = dict(metric="two-sided") | kwargs
        with pytest.raises(ValueError, match=match):
            covsvd.attach_adapters(model, moments, R, progress=False, **call)
        with pytest.raises(ValueError, match=match):
            covsvd.allocate_ranks(model, moments, 10**6, progress=False, **call)
        with pytest.raises(ValueError, match=match):
            covsvd.export_peft(model, moments, tmp_path / "out", R, progress=False, **call)
        assert same_state(model, before) and not covsvd.adapters(model) and not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="output_moments were given but metric='full'"):
        covsvd.init_adapters(model, data, R, "full", output_moments={}, progress=False)  # one-sided: refused
    assert same_state(model, before) and not covsvd.adapters(model)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_allocate_two_sided_tolerance_and_absolute_end_to_end(arch):
    base, data, moments, outputs = case(arch)
    spectra = layer_spectra(base, moments, "two-sided", output_moments=outputs, progress=False)
    for name, S in spectra.items():  # orient's S at rank 4 is the head of the two-sided spectrum
        W = covsvd.weight_matrix(base.get_submodule(name))
        o = covsvd.orient(W, moments[name], R, "two-sided", output=outputs[name], storage_dtype=torch.float64)
        assert max_relative_error(o.S, S[:R]) <= 1e-10, name
    costs = rank_costs({n: tuple(covsvd.weight_matrix(base.get_submodule(n)).shape) for n in spectra})
    budget = 6 * sum(costs.values())
    kw = dict(metric="two-sided", output_moments=outputs, progress=False)
    tol = covsvd.allocate_ranks(base, moments, budget, rule="tolerance", objective="absolute", **kw)
    assert tol == tolerance_ranks(spectra, costs, budget, objective="absolute")
    assert allocation_cost(tol, costs) <= budget
    opt = covsvd.allocate_ranks(base, moments, budget, objective="absolute", **kw)
    rel = covsvd.allocate_ranks(base, moments, budget, objective="relative", **kw)
    assert len(set(tol.values())) > 1 and opt != rel  # the objectives and rules disagree on these layers
    # tolerance minimises the worst layer's error; optimal the summed one
    assert allocation_tolerance(tol, spectra, "absolute") <= allocation_tolerance(opt, spectra, "absolute")
    model = copy.deepcopy(base)
    covsvd.attach_adapters(model, moments, tol, "two-sided", output_moments=outputs, progress=False)
    assert {n: m.r for n, m in covsvd.adapters(model).items()} == tol
    probe = data[1]
    assert max_relative_error(real(logits(model, probe), probe), real(logits(base, probe), probe)) <= OUTPUT_TOL
    with pytest.raises(ValueError, match="objective='squared'"):
        covsvd.allocate_ranks(base, moments, budget, objective="squared", **kw)


def test_two_sided_adapters_save_and_load(tmp_path):
    base, data, moments, outputs = case("llama")
    model = copy.deepcopy(base)
    covsvd.attach_adapters(model, moments, R, "two-sided", output_moments=outputs, progress=False)
    path = tmp_path / "a.safetensors"
    covsvd.save_adapters(model, path)
    loaded = copy.deepcopy(base)
    covsvd.load_adapters(loaded, path)
    probe = data[0]
    assert torch.equal(logits(loaded, probe), logits(model, probe))
    cfg = next(iter(covsvd.adapters(loaded).values())).config
    assert cfg["metric"] == "two-sided" and cfg["eps_output"] > 0 and cfg["eps_output_arg"] == covsvd.DEFAULT_EPS
