"""covsvd inits in the standard training loop (transformers.Trainer, CPU, a tiny Llama).

(a) the peft model from export_peft and (b) covsvd's own bounded-gain adapters each train a few steps:
the loss falls, only adapter parameters change, the checkpoint Trainer writes reloads to the same outputs;
(b) with adapters disabled gives the original outputs, and export_lora_delta turns (b) into a rank-r LoRA
on the original base. README.md's "Use it with peft" block runs as written in tests/test_readme.py.
"""

from __future__ import annotations

import copy

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

import covsvd
from covsvd.adapt.attach import adapters, attach_adapters, detach_adapters, disable_adapters
from covsvd.algebra.measures import max_relative_error
from covsvd.export.lora_delta import export_lora_delta
from covsvd.export.peft import export_peft

OUTPUT_TOL = 1e-5  # relative, fp32
STEPS = 5
VOCAB = 97

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_llama(seed: int = 0):
    """A random 2-layer Llama causal LM (d=32, GQA 4/2 heads, untied lm_head)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False)
    return LlamaForCausalLM(config).eval()


def token_rows(n: int = 8, length: int = 16, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """A tiny causal-LM dataset: ``n`` fixed random sequences, labels = inputs (no padding)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (n, length), generator=g)  # (n, T)
    return [{"input_ids": row, "attention_mask": torch.ones_like(row), "labels": row.clone()} for row in ids]


def batched(rows) -> dict[str, torch.Tensor]:
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


@pytest.fixture(scope="module")
def case():
    """``(original model, moments, dataset)``; read-only."""
    model = tiny_llama()
    data = token_rows()
    moments = covsvd.capture_moments(model, [batched(data)], progress=False)
    return model, moments, data


def logits(model, batch) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def loss(model, batch) -> float:
    model.eval()
    with torch.no_grad():
        return float(model(**batch).loss)


def train(model, data, out_dir, lr: float) -> None:
    args = TrainingArguments(output_dir=str(out_dir), max_steps=STEPS, per_device_train_batch_size=4,
                             learning_rate=lr, lr_scheduler_type="constant", save_strategy="steps",
                             save_steps=STEPS, logging_strategy="no", report_to=[], use_cpu=True,
                             disable_tqdm=True, seed=0)
    Trainer(model=model, args=args, train_dataset=data).train()


def snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def changed(before: dict, model) -> set[str]:
    return {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}


def test_peft_export_trains_under_trainer(case, tmp_path):
    original, moments, data = case
    batch = batched(data)
    path = export_peft(original, moments, tmp_path / "init", 4, "full", progress=False)
    pm = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(path / "base"), path / "adapter",
                                   is_trainable=True)
    assert max_relative_error(logits(pm, batch), logits(original, batch)) <= OUTPUT_TOL
    before, loss0 = snapshot(pm), loss(pm, batch)

    train(pm, data, tmp_path / "run", lr=1e-2)
    assert loss(pm, batch) < loss0
    moved = changed(before, pm)
    assert moved and all(".lora_A." in k or ".lora_B." in k for k in moved)  # only the adapter trained

    ckpt = tmp_path / "run" / f"checkpoint-{STEPS}"
    again = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(path / "base"), ckpt)
    assert torch.equal(logits(again, batch), logits(pm, batch))


def test_covsvd_adapters_train_under_trainer_and_export_a_rank_r_lora(case, tmp_path):
    original, moments, data = case
    batch = batched(data)
    model = copy.deepcopy(original)
    attach_adapters(model, moments, r=4, metric="full", rotate="V", progress=False)
    before, loss0 = snapshot(model), loss(model, batch)

    train(model, data, tmp_path / "run", lr=5e-2)
    assert loss(model, batch) < loss0
    moved = changed(before, model)
    assert moved and all(k.endswith((".g", ".theta")) for k in moved)  # only gains and rotations trained
    trained = logits(model, batch)
    with disable_adapters(model):  # adapters off: the original model
        assert max_relative_error(logits(model, batch), logits(original, batch)) <= OUTPUT_TOL
    assert torch.equal(logits(model, batch), trained)  # and on again

    # the checkpoint Trainer wrote (the whole state dict, adapters included) reloads to the same outputs
    again = copy.deepcopy(original)
    attach_adapters(again, moments, r=4, metric="full", rotate="V", progress=False)
    again.load_state_dict(load_file(tmp_path / "run" / f"checkpoint-{STEPS}" / "model.safetensors"))
    assert torch.equal(logits(again, batch), trained)

    # back to a plain LoRA (rank r, not 2r) on the untouched original
    lora = export_lora_delta(model, tmp_path / "lora")
    pm = PeftModel.from_pretrained(copy.deepcopy(original), lora)
    assert {m.r["default"] for n, m in pm.base_model.model.named_modules() if hasattr(m, "lora_A")} == {4}
    assert max_relative_error(logits(pm, batch), trained) <= OUTPUT_TOL
    merged = pm.merge_and_unload()
    detach_adapters(model, merge=True)
    for (k, v), (k2, v2) in zip(merged.state_dict().items(), model.state_dict().items(), strict=True):
        assert k == k2 and max_relative_error(v, v2) <= 1e-6, k
    assert not adapters(model)
