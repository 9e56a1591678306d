"""Fixtures of the CLI tests: tiny random decoder LLMs saved to disk with the default model's tokenizer, and a
.jsonl calibration file (session-scoped; read-only)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import covsvd

WORDS = "the model reads calibration text and every token counts once unless it is padding".split()


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(covsvd.data.default_model_path(), local_files_only=True)


def save_tiny(directory: Path, config, cls, tokenizer) -> Path:
    torch.manual_seed(0)
    cls(config).eval().save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory, tokenizer) -> Path:
    """A 2-block random Llama with GQA (4 heads / 2 KV heads), the default model's tokenizer beside it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return save_tiny(tmp_path_factory.mktemp("llama"), config, LlamaForCausalLM, tokenizer)


@pytest.fixture(scope="session")
def gpt2_dir(tmp_path_factory, tokenizer) -> Path:
    """A 2-block random GPT-2 LM (Conv1D targets, tied head)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=32, n_layer=2, n_head=4)
    return save_tiny(tmp_path_factory.mktemp("gpt2"), config, GPT2LMHeadModel, tokenizer)


@pytest.fixture(scope="session")
def data(tmp_path_factory) -> Path:
    """A .jsonl calibration file: 12 short records with a prompt field."""
    g = torch.Generator().manual_seed(0)
    path = tmp_path_factory.mktemp("data") / "calib.jsonl"
    with path.open("w") as f:
        for i in range(12):
            pick = torch.randint(len(WORDS), (3 + i % 5,), generator=g).tolist()
            f.write(json.dumps({"prompt": f"question {i}:", "text": " ".join(WORDS[j] for j in pick)}) + "\n")
    return path
