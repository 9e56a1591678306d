"""Shared fixtures: the embedded default model, tiny random transformers models, padded batches, and an
independent brute-force reference for captured second moments.

Session-scoped models are shared by every test in a worker: treat them as read-only (a test that
changes a model must copy it, e.g. ``copy.deepcopy``), and restore any mode you change.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

import covsvd

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY_VOCAB = 97


def pytest_collection_modifyitems(config, items):
    """Every test that loads the real default model is ``slow`` (``make test-fast`` leaves them out)."""
    for item in items:
        if "default_model" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def default_model():
    """``(model, tokenizer)``: the embedded all-MiniLM-L6-v2 (fp32, eval mode). Read-only."""
    import covsvd

    return covsvd.load_default_model()


def tiny_bert(seed: int = 0):
    """A randomly initialised 2-layer BERT (d=32, FFN 64, pooler): q/k/v share an input, the pooler reads (B, d)."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=TINY_VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    return BertModel(config).eval()


def tiny_gpt2(seed: int = 0):
    """A randomly initialised 2-layer GPT-2 (d=32): every target is a transformers ``Conv1D``."""
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=TINY_VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=4)
    return GPT2Model(config).eval()


@pytest.fixture(scope="session")
def bert_tiny():
    """Session-scoped :func:`tiny_bert` (seed 0). Read-only."""
    return tiny_bert()


@pytest.fixture(scope="session")
def gpt2_tiny():
    """Session-scoped :func:`tiny_gpt2` (seed 0). Read-only."""
    return tiny_gpt2()


def padded_batches(
    lengths: list[list[int]], side: str = "right", vocab: int = TINY_VOCAB, seed: int = 0
) -> list[dict[str, torch.Tensor]]:
    """Random-token batches: ``lengths[b][i]`` real tokens in row i of batch b, padded to the batch's longest
    on ``side`` (mask 0 on padding; pad id 0)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for batch in lengths:
        width = max(batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)  # (B, T)
        mask = torch.zeros(len(batch), width, dtype=torch.long)  # (B, T)
        for i, n in enumerate(batch):
            sl = slice(0, n) if side == "right" else slice(width - n, width)
            ids[i, sl] = torch.randint(1, vocab, (n,), generator=g)
            mask[i, sl] = 1
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


@pytest.fixture(scope="session")
def make_batches():
    """The :func:`padded_batches` function, for tests that cannot import conftest."""
    return padded_batches


def brute_force(model, batches, names) -> dict[str, torch.Tensor]:
    """``{name: (N, d_in) fp64}``: every real input row of each named module, stored whole.

    Independent of covsvd's capture: plain forward pre-hooks; a (B, T, d) input keeps ``x[mask.bool()]``,
    a (B, d) input keeps every row. ``X.T @ X / len(X)`` is then the reference second moment.
    """
    modules = dict(model.named_modules())
    rows: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    mask = None

    def hook(name):
        def fn(module, args):
            x = args[0]
            if x.dim() == 3 and mask is not None:
                x = x[mask.bool()]
            rows[name].append(x.reshape(-1, x.shape[-1]).double())

        return fn

    handles = [modules[n].register_forward_pre_hook(hook(n)) for n in names]
    try:
        with torch.no_grad():
            for b in batches:
                mask = b.get("attention_mask")
                model(**b)
    finally:
        for h in handles:
            h.remove()
    return {n: torch.cat(r) for n, r in rows.items()}


@pytest.fixture(scope="session")
def brute_force_rows():
    """The :func:`brute_force` function (every real input row of each module, fp64)."""
    return brute_force


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread while a module runs (restored after); modules opt in with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``. For small matrices on a shared 2-core machine
    torch's default thread pool oversubscribes (its threads spin-wait), which slows these modules many times."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def random_orthogonal(d: int, g: torch.Generator) -> torch.Tensor:
    """A (d, d) random orthogonal matrix in fp64 (QR of a Gaussian), drawn from ``g``."""
    return torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64)).Q


def make_W(d_out: int, d_in: int, seed: int, spread: float = 3.0) -> torch.Tensor:
    """W = U diag(s) V^T (fp64) with random orthonormal U, V and singular values over ``spread`` decades."""
    g = torch.Generator().manual_seed(seed)
    k = min(d_out, d_in)
    s = torch.logspace(0, -spread, k, dtype=torch.float64)
    return (random_orthogonal(d_out, g)[:, :k] * s) @ random_orthogonal(d_in, g)[:, :k].T  # (d_out, d_in)


# ------------------------------------------------------------------------ tiny decoders (layerwise, LLM tests)

TOL = 1e-12  # layerwise == default capture, relative, fp64: the same products in the same order, so in practice 0


def tiny_decoder(arch: str, seed: int = 0, layers: int = 3):
    """A random causal LM (d=32, FFN 48, GQA 4/2 heads): Llama (untied head), Qwen2 (tied, with one
    sliding-window layer: its attention mask differs from the others'), or GPT-2 (Conv1D, tied)."""
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    torch.manual_seed(seed)
    common = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    if arch == "llama":
        return LlamaForCausalLM(LlamaConfig(**common)).eval()
    if arch == "qwen2":
        types = ["full_attention", "sliding_attention"] * layers
        return Qwen2ForCausalLM(Qwen2Config(**common, tie_word_embeddings=True, use_sliding_window=True,
                                            sliding_window=4, layer_types=types[:layers])).eval()
    return GPT2LMHeadModel(GPT2Config(vocab_size=97, n_positions=64, n_embd=32, n_layer=layers, n_head=4,
                                      bos_token_id=1, eos_token_id=2)).eval()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def assert_same(layerwise: dict, default: dict) -> None:
    assert list(layerwise) == list(default)
    for name, m in default.items():
        got = layerwise[name]
        assert got.count == m.count, name
        for field in ("sum_xx", "sum_x", "sum_abs"):
            assert rel(getattr(got, field).to(m.sum_xx.device), getattr(m, field)) <= TOL, (name, field)
    ids = {id(m) for m in default.values()}
    assert len({id(m) for m in layerwise.values()}) == len(ids)  # the same sharing


# ------------------------------------------------ saved checkpoints and a .jsonl calibration file (CLI tests)

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
