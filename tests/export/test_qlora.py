"""export_peft(quantize=...): a covsvd initialisation on a 4-bit base, loaded with transformers + bitsandbytes.

* The export loads (``BitsAndBytesConfig(load_in_4bit=True, ...)``, CPU) into ``dequant(Q) + B A`` per target:
  the loaded codes and dequantized weight are those of ``covsvd.quantize_residual`` called directly (bit for
  bit), ``B A`` is its ``U S P`` to fp32 rounding; the per-layer errors in covsvd.json are quantize_residual's,
  the functional error recomputed from the loaded layer is the recorded one, and the model's outputs are those
  of the same construction built in memory. Llama (nn.Linear) and GPT-2 (Conv1D, stored transposed).
* The base cannot be loaded into another model: any ``quantization_config`` or ``dtype`` passed keeps its codes,
  and without its ``quantization_config`` it does not load at all.
* Bad input is refused before anything is written; quantized models are refused by attach, init, allocate and
  export with a message naming the layer's quantization and the fix, and are left untouched.
* transformers.Trainer trains the 4-bit base + adapter: the loss falls, only the LoRA factors move (the base's
  codes stay), the checkpoint reloads to the same outputs.
"""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
from conftest import padded_batches, tiny_decoder

import covsvd
from covsvd.algebra.loftq import quantize_residual
from covsvd.algebra.measures import functional_error, max_relative_error
from covsvd.algebra.quant import FourBit
from covsvd.data.targets import Conv1D, weight_matrix
from covsvd.export.peft import export_peft
from covsvd.export.qlora import stored_bases
from covsvd.util.digest import state_digest

bnb = pytest.importorskip("bitsandbytes")
pytest.importorskip("peft")
from bitsandbytes.functional import dequantize_4bit  # noqa: E402
from peft import PeftModel  # noqa: E402
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, Trainer, TrainingArguments  # noqa: E402

F64 = torch.float64
FACTOR_TOL = 1e-6  # B A (fp32 factors) vs U S P, relative: fp32 rounding of the split
OUTPUT_TOL = 1e-5  # relative, fp32 logits of two constructions of the same weights
R = 4

pytestmark = pytest.mark.usefixtures("one_thread")


def calibration():
    return padded_batches([[20, 17, 30, 9]] * 2)


def probe():
    return padded_batches([[12, 9, 16]], seed=99)[0]


def logits(model, batch) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def peft_layers(pm) -> dict:
    """``{name: LoRA layer}`` of a PeftModel, names as in the plain model."""
    return {n.removeprefix("base_model.model."): m for n, m in pm.named_modules()
            if hasattr(m, "lora_A") and hasattr(m, "base_layer")}


def load_4bit(path, **config):
    cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", **config)
    return AutoModelForCausalLM.from_pretrained(path / "base", quantization_config=cfg)


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def case(request, tmp_path_factory):
    """``(arch, original model, moments, export path)``: nf4 with double quantization, 2 LoftQ iterations under
    the full metric. Read-only."""
    model = tiny_decoder(request.param)
    moments = covsvd.capture_moments(model, calibration(), progress=False)
    path = tmp_path_factory.mktemp(request.param) / "qlora"
    export_peft(model, moments, path, R, "full", quantize="nf4", loftq_iters=2, double_quant=True, progress=False)
    return request.param, model, moments, path


def direct(model, moments, name):
    """quantize_residual as export_peft calls it, for one target."""
    W = weight_matrix(model.get_submodule(name)).detach()
    return quantize_residual(W, moments[name], R, "full", "nf4", 2, double_quant=True, storage_dtype=torch.float32,
                             name=name)


def test_export_loads_as_dequant_q_plus_lora(case):
    arch, model, moments, path = case
    pm = PeftModel.from_pretrained(load_4bit(path, bnb_4bit_use_double_quant=True), path / "adapter")
    record = json.loads((path / "covsvd.json").read_text())
    rows = {row["name"]: row for row in record["layers"]}
    layers = peft_layers(pm)
    assert sorted(layers) == sorted(moments) == sorted(rows)
    built = copy.deepcopy(model)  # the same construction in memory: W <- dequant(Q) + U S P
    for name, layer in layers.items():
        res = direct(model, moments, name)
        weight = layer.base_layer.weight
        assert isinstance(layer.base_layer, bnb.nn.Linear4bit) and weight.quant_state.nested
        deq = dequantize_4bit(weight.data, weight.quant_state)  # (d_out, d_in): Conv1D's transpose undone
        assert torch.equal(weight.data, res.base.data) and torch.equal(deq, res.base.dequantize()), name
        B, A = layer.lora_B["default"].weight, layer.lora_A["default"].weight  # (d_out, r), (r, d_in)
        usp = (res.U.double() * res.S.double()) @ res.P.double()
        assert layer.scaling["default"] == 1.0
        assert max_relative_error(B.double() @ A.double(), usp) <= FACTOR_TOL, name
        row = rows[name]
        assert row["quant_errors"] == list(res.errors) and row["best"] == res.best and row["bits"] == res.bits
        assert row["rel_error"] == res.errors[res.best] and res.errors[res.best] <= res.errors[0]
        W = weight_matrix(model.get_submodule(name)).detach()
        hat = deq.double() + B.double() @ A.double()
        assert functional_error(W, hat, moments[name].matrix()) == pytest.approx(row["output_error"], rel=1e-6)
        module = built.get_submodule(name)
        with torch.no_grad():
            new = res.weight(F64).to(torch.float32)
            module.weight.copy_(new.T if isinstance(module, Conv1D) else new)
    batch = probe()
    y, y_built, y0 = logits(pm, batch), logits(built, batch), logits(model, batch)
    assert max_relative_error(y, y_built) <= OUTPUT_TOL
    err, err_built = max_relative_error(y, y0), max_relative_error(y_built, y0)
    assert err > 100 * OUTPUT_TOL and err == pytest.approx(err_built, rel=1e-3)  # 4 bits: far from the original
    assert record["quantization"]["bnb_4bit_use_double_quant"] and record["settings"]["loftq_iters"] == 2
    card = (path / "adapter" / "README.md").read_text()
    assert "4-bit" in card and "bnb_4bit_quant_type='nf4'" in card and "bnb_4bit_use_double_quant=True" in card


def test_the_base_loads_only_as_its_own_4bit_codes(case, tmp_path):
    arch, model, moments, path = case
    names = list(moments)
    stored = stored_bases(path / "base", names)
    for kwargs in ({}, dict(quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="fp4")),
                   dict(quantization_config=BitsAndBytesConfig(load_in_8bit=True)), dict(dtype=torch.bfloat16)):
        loaded = AutoModelForCausalLM.from_pretrained(path / "base", **kwargs)
        for name in names:
            weight = loaded.get_submodule(name).weight
            assert weight.quant_state.quant_type == "nf4", kwargs
            assert torch.equal(weight.data, stored[name][0]), (kwargs, name)
    plain = tmp_path / "plain"
    shutil.copytree(path / "base", plain)
    config = json.loads((plain / "config.json").read_text())
    del config["quantization_config"]
    (plain / "config.json").write_text(json.dumps(config))
    with pytest.raises(RuntimeError, match="mismatch"):  # packed (d_out d_in / 2, 1) weights fit no Linear
        AutoModelForCausalLM.from_pretrained(plain)


def test_loftq_zero_start_and_fp4(tmp_path):
    model = tiny_decoder("llama", layers=1)
    path = export_peft(model, None, tmp_path / "loftq", R, "identity", quantize=FourBit("fp4"), loftq_iters=1,
                       quant_start="zero", progress=False)
    record = json.loads((path / "covsvd.json").read_text())
    pm = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(path / "base"), path / "adapter")
    for name, layer in peft_layers(pm).items():
        W = weight_matrix(model.get_submodule(name)).detach()
        res = quantize_residual(W, None, R, "identity", "fp4", 1, start="zero", storage_dtype=torch.float32)
        assert res.best == 1 and layer.base_layer.weight.quant_state.quant_type == "fp4"
        assert torch.equal(layer.base_layer.weight.data, res.base.data), name
    assert {row["best"] for row in record["layers"]} == {1}


def test_bf16_model_and_auto_peft_model(tmp_path, monkeypatch):
    """A bf16 model's base is quantized from its bf16 residual and dequantizes to bf16; AutoPeftModel finds the
    4-bit base from the adapter's relative base_model_name_or_path."""
    from peft import AutoPeftModelForCausalLM

    model = tiny_decoder("llama", layers=1).to(torch.bfloat16)
    monkeypatch.chdir(tmp_path)
    export_peft(model, None, "qlora", R, "identity", quantize="nf4", loftq_iters=1, progress=False)
    pm = AutoPeftModelForCausalLM.from_pretrained("qlora/adapter")
    for name, layer in peft_layers(pm).items():
        W = weight_matrix(model.get_submodule(name)).detach()
        res = quantize_residual(W, None, R, "identity", "nf4", 1, storage_dtype=torch.float32)
        weight = layer.base_layer.weight
        assert weight.quant_state.dtype == torch.bfloat16 and layer.base_layer.compute_dtype == torch.bfloat16
        assert torch.equal(weight.data, res.base.data), name
        assert torch.equal(dequantize_4bit(weight.data, weight.quant_state), res.base.dequantize()), name


def test_bad_input_is_refused_before_anything_is_written(tmp_path):
    model = tiny_decoder("llama", layers=1)
    before = state_digest(model)
    path = tmp_path / "out"
    bad = [
        (dict(quantize="int8"), "quantize"),
        (dict(quantize="nf3"), "quantize"),
        (dict(quantize=FourBit("nf4", blocksize=128)), "blocksize"),
        (dict(quantize=FourBit("nf4"), double_quant=True), "FourBit"),
        (dict(quantize="nf4", loftq_iters=-1), "loftq_iters"),
        (dict(quantize="nf4", quant_start="zero"), "zero adapter"),
        (dict(loftq_iters=2), "quantize='nf4'"),
        (dict(quantize="nf4", targets=["lm_head"]), "floating point when loading in 4-bit"),
    ]
    for kwargs, match in bad:
        with pytest.raises(ValueError, match=match):
            export_peft(model, None, path, R, "identity", progress=False, **kwargs)
        assert not path.exists() and not list(tmp_path.iterdir()), kwargs
    with pytest.raises(ValueError, match="float64"):
        export_peft(copy.deepcopy(model).double(), None, path, R, "identity", quantize="nf4", progress=False)
    assert not path.exists() and state_digest(model) == before


QUANTIZED = {
    "nf4": (dict(load_in_4bit=True, bnb_4bit_quant_type="nf4"), r"Linear4bit W \(32, 32\)\): is a bitsandbytes "
            r"Linear4bit \(nf4, blocksize 64\)"),
    "fp4-double": (dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=True),
                   r"Linear4bit \(fp4, blocksize 64, double quantization\)"),
    "int8": (dict(load_in_8bit=True), r"Linear8bitLt W \(32, 32\)\): is a bitsandbytes Linear8bitLt \(torch.int8"),
}


@pytest.mark.parametrize("kind", list(QUANTIZED))
def test_quantized_models_are_refused_and_left_untouched(kind, tmp_path):
    src = tmp_path / "src"
    tiny_decoder("llama", layers=1).save_pretrained(src)
    config, described = QUANTIZED[kind]
    q = AutoModelForCausalLM.from_pretrained(src, quantization_config=BitsAndBytesConfig(**config))
    before = {k: v.clone() for k, v in q.state_dict().items()}
    modules = dict(q.named_modules())
    match = r"layer 'model\.layers\.0\.self_attn\.q_proj' .*" + described + \
            r".*never decomposes.*export_peft\(model, moments, path, r, quantize='nf4'\).*dequantize"
    calls = [
        lambda: covsvd.attach_adapters(q, None, 2, "identity", progress=False),
        lambda: covsvd.init_adapters(q, calibration(), 2, "full", progress=False),
        lambda: covsvd.allocate_ranks(q, None, 1000, "identity", progress=False),
    ]
    for call in calls:
        with pytest.raises(ValueError, match=match):
            call()
    with pytest.raises(ValueError, match=r"quantized \(bitsandbytes\).*quantize='nf4'"):
        export_peft(q, None, tmp_path / "out", 2, "identity", progress=False)
    assert not (tmp_path / "out").exists()
    assert dict(q.named_modules()).keys() == modules.keys()
    assert all(a is b for a, b in zip(dict(q.named_modules()).values(), modules.values(), strict=True))
    after = q.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


# ----------------------------------------------------------------------------------------------- training

STEPS = 4


def token_rows(n: int = 8, length: int = 16) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 97, (n, length), generator=g)  # (n, T)
    return [{"input_ids": row, "attention_mask": torch.ones_like(row), "labels": row.clone()} for row in ids]


def test_trainer_trains_the_adapter_on_the_4bit_base(tmp_path):
    model = tiny_decoder("llama", layers=2)
    data = token_rows()
    batch = {k: torch.stack([r[k] for r in data]) for k in data[0]}
    moments = covsvd.capture_moments(model, [batch], progress=False)
    path = export_peft(model, moments, tmp_path / "init", R, "full", quantize="nf4", loftq_iters=1, progress=False)
    pm = PeftModel.from_pretrained(load_4bit(path), path / "adapter", is_trainable=True)
    codes = {n: m.base_layer.weight.data.clone() for n, m in peft_layers(pm).items()}
    before = {k: v.detach().clone() for k, v in pm.state_dict().items()}
    pm.eval()
    with torch.no_grad():
        loss0 = float(pm(**batch).loss)

    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=STEPS, per_device_train_batch_size=4,
                             learning_rate=1e-2, lr_scheduler_type="constant", save_strategy="steps",
                             save_steps=STEPS, logging_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
                             seed=0)
    Trainer(model=pm, args=args, train_dataset=data).train()
    pm.eval()
    with torch.no_grad():
        assert float(pm(**batch).loss) < loss0
    moved = {k for k, v in pm.state_dict().items() if not torch.equal(v, before[k])}
    assert moved and all(".lora_A." in k or ".lora_B." in k for k in moved)
    layers = peft_layers(pm)
    for name, layer in layers.items():  # the 4-bit base: the same codes (read in bnb's canonical layout)
        stored = layer.base_layer.state_dict()["weight"]
        assert torch.equal(stored, codes[name]), name

    trained = logits(pm, batch)
    again = PeftModel.from_pretrained(load_4bit(path), tmp_path / "run" / f"checkpoint-{STEPS}")
    assert torch.equal(logits(again, batch), trained)
