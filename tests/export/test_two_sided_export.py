"""The peft exports under metric="two-sided" (U not orthonormal) on random-init Llama and GPT-2: export_peft's
residual base + LoRA reproduces the model; after a gain and rotation step, export_lora_delta's rank-r LoRA on the
original model computes the trained adapters."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import padded_batches, tiny_decoder

import covsvd
from covsvd.adapt import adapter_parameters
from covsvd.algebra.measures import max_relative_error
from covsvd.export.lora_delta import delta_factors

peft = pytest.importorskip("peft")
from peft import PeftModel  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

OUTPUT_TOL = 1e-5  # relative, fp32 model outputs
R = 4
pytestmark = pytest.mark.usefixtures("one_thread")


def setup(arch: str):
    model = tiny_decoder(arch)
    side = "left" if arch == "llama" else "right"
    data = padded_batches([[20, 17, 30, 9], [25, 12, 18, 22]], side=side)
    moments = covsvd.capture_moments(model, data, kind="full", progress=False)
    outputs = covsvd.capture_output_moments(model, data, "probe", progress=False)
    probe = padded_batches([[14, 9, 16]], side=side, seed=7)[0]
    return model, moments, outputs, probe


def logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return out[batch["attention_mask"].bool()]  # (real tokens, vocab)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_export_peft_reproduces_the_model(arch, tmp_path):
    model, moments, outputs, probe = setup(arch)
    path = covsvd.export_peft(model, moments, tmp_path / "out", R, "two-sided", output_moments=outputs,
                              eps_output=1e-3, progress=False)
    pm = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(path / "base"), path / "adapter").eval()
    assert max_relative_error(logits(pm, probe), logits(model, probe)) <= OUTPUT_TOL
    name = next(iter(outputs))
    W = covsvd.weight_matrix(model.get_submodule(name))
    o = covsvd.orient(W, moments[name], R, "two-sided", output=outputs[name], eps_output=1e-3,
                      storage_dtype=torch.float64)
    B = pm.base_model.model.get_submodule(name).lora_B["default"].weight.detach().double()  # (d_out, r)
    assert max_relative_error(B, o.U * o.S.sqrt()) <= 1e-6  # B = U diag(sqrt S), U the G-orthonormal factor
    gram = B.T @ B
    assert float((gram - torch.diag(gram.diagonal())).abs().max()) > 1e-3 * float(gram.abs().max())  # not orthogonal


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_lora_delta_after_a_gain_step_computes_the_trained_adapters(arch, tmp_path):
    base, moments, outputs, probe = setup(arch)
    model = copy.deepcopy(base)
    covsvd.attach_adapters(model, moments, R, "two-sided", output_moments=outputs, rotate="both", progress=False)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in adapter_parameters(model):
            p.copy_(0.3 * torch.randn(p.shape, generator=g))  # a gain and rotation step
    trained = logits(model, probe)
    assert max_relative_error(trained, logits(base, probe)) > 1e-3  # the step changed the model
    path = covsvd.export_lora_delta(model, tmp_path / "delta")
    for name, m in covsvd.adapters(model).items():
        B, A = delta_factors(m)
        delta = m.delta_weight(True) - m.delta_weight(False)
        assert max_relative_error(B.double() @ A.double(), delta) <= 1e-6, name
    pm = PeftModel.from_pretrained(copy.deepcopy(base), path).eval()
    assert max_relative_error(logits(pm, probe), trained) <= OUTPUT_TOL
    merged = copy.deepcopy(model)
    covsvd.detach_adapters(merged, merge=True)
    assert max_relative_error(logits(merged, probe), trained) <= OUTPUT_TOL
