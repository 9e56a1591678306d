"""covsvd inits as peft LoRA adapters (export_peft), and trained adapters back (export_lora_delta).

Cross-checked against peft itself (installed in the test extras):
* ``PeftModel.from_pretrained(base, adapter)`` reproduces the original model (BERT default model, GPT-2 Conv1D,
  Llama GQA with per-layer ranks);
* metric ``identity``: B A equals the product of peft's ``init_lora_weights="pissa"`` (exact SVD);
* metric ``corda``: B A equals peft's CorDA init given the same covariance: peft's own collection over one
  unpadded sequence per call with its per-sequence ``1 / max(x)`` scaling neutralised (as bench/capture.py
  does), damped as peft damps (``eps=0.01`` relative, tests/algebra/test_orient_peft.py);
* peft's module matching (target_modules, rank_pattern) selects exactly the exported layers.
"""

from __future__ import annotations

import copy
import json
import re
import types

import pytest
import torch
from conftest import padded_batches, tiny_bert, tiny_gpt2
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.tuners_utils import check_target_module_exists
from safetensors.torch import load_file
from torch import nn

import covsvd
from covsvd.adapt.attach import attach_adapters, detach_adapters
from covsvd.algebra.measures import max_relative_error
from covsvd.data.targets import Conv1D, weight_matrix
from covsvd.export.lora_delta import export_lora_delta
from covsvd.export.peft import check_peft_names, export_peft
from covsvd.util.digest import state_digest

F64 = torch.float64
OUTPUT_TOL = 1e-5  # relative, fp32
PEFT_TOL = 1e-4  # B A vs peft's own init (peft factors in fp32)

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------------------------- helpers


def tiny_llama(seed: int = 0, layers: int = 2):
    """A random 2-layer Llama causal LM (d=32, GQA 4/2 heads, untied lm_head): plain nn.Linear targets."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False)
    return LlamaForCausalLM(config).eval()


def calibration(seed: int = 0):
    return padded_batches([[20, 17, 30, 9]] * 3, seed=seed)


def probe():
    return padded_batches([[12, 9, 16]], seed=99)[0]


def outputs(model, batch) -> torch.Tensor:
    """Every floating output of one forward, flattened into one fp64 vector."""
    with torch.no_grad():
        out = model(**batch)
    parts = [v for v in out.values() if isinstance(v, torch.Tensor) and v.is_floating_point()]
    return torch.cat([p.reshape(-1).double() for p in parts])


def adapter_factors(adapter_dir) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{name: (B, A)}`` read back from an adapter_model.safetensors."""
    t = load_file(adapter_dir / "adapter_model.safetensors")
    names = {k.removeprefix("base_model.model.").rsplit(".lora_", 1)[0] for k in t}
    return {n: (t[f"base_model.model.{n}.lora_B.weight"], t[f"base_model.model.{n}.lora_A.weight"]) for n in names}


def peft_products(pm) -> dict[str, torch.Tensor]:
    """``{name: scaling * B A}`` (fp64) of every LoRA layer of a peft model, and its residual base weights."""
    out = {}
    for name, m in pm.base_model.model.named_modules():
        if hasattr(m, "lora_A") and "default" in m.lora_A:
            BA = m.lora_B["default"].weight.double() @ m.lora_A["default"].weight.double()
            out[name] = m.scaling["default"] * BA.detach()
    return out


def has_gap(W: torch.Tensor, r: int, M: torch.Tensor | None = None, bottom: bool = False) -> bool:
    """The rank-r product is unique (the singular values of W M kept and dropped are separated), so two codes
    may agree on it: the top r (or the bottom r) against the rest."""
    S = torch.linalg.svdvals(W.double() if M is None else W.double() @ M)
    cut = len(S) - r if bottom else r
    return cut in (0, len(S)) or float(S[cut - 1] - S[cut]) > 1e-3 * float(S[0])


# ----------------------------------------------------------------------------------------------- equality 1: outputs


def check_round_trip(model, moments, tmp_path, r, auto_class, batch, **kw):
    before = state_digest(model)
    path = export_peft(model, moments, tmp_path / "out", r, progress=False, **kw)
    assert state_digest(model) == before  # the model itself is not changed
    assert (path / "base" / "model.safetensors").is_file() and (path / "adapter" / "adapter_config.json").is_file()
    base = auto_class.from_pretrained(path / "base").eval()
    alone = outputs(base, batch)
    pm = PeftModel.from_pretrained(base, path / "adapter").eval()
    want = outputs(model, batch)
    assert max_relative_error(outputs(pm, batch), want) <= OUTPUT_TOL
    assert max_relative_error(alone, want) > 100 * OUTPUT_TOL  # the adapter does the work, not the base alone
    record = json.loads((path / "covsvd.json").read_text())
    assert max(row["identity_error"] for row in record["layers"]) <= 1e-6
    return path, pm


@pytest.mark.slow
def test_default_model_round_trip(default_model, tmp_path):
    from transformers import AutoModel, AutoTokenizer

    model, tok = default_model
    names = covsvd.find_targets(model, r"encoder\.layer\.[05]\..*|pooler\.dense")  # 13 of 37: orient is fp64
    calib = covsvd.calibration_batches(tok, seq_len=64, batch_size=8, max_tokens=1024)
    moments = covsvd.capture_moments(model, calib, targets=names, progress=False)
    batch = covsvd.calibration_batches(tok, split="heldout", seq_len=32, batch_size=4, max_tokens=96)[0]
    path, pm = check_round_trip(model, moments, tmp_path, 16, AutoModel, batch, metric="full", tokenizer=tok)
    assert set(peft_products(pm)) == set(names)
    assert AutoTokenizer.from_pretrained(path / "base")("a b c")["input_ids"] == tok("a b c")["input_ids"]


def test_gpt2_conv1d_round_trip(gpt2_tiny, tmp_path):
    from transformers import AutoModel

    moments = covsvd.capture_moments(gpt2_tiny, calibration(), progress=False)
    path, pm = check_round_trip(gpt2_tiny, moments, tmp_path, 6, AutoModel, probe(), metric="full")
    config = json.loads((path / "adapter" / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is True and all(isinstance(gpt2_tiny.get_submodule(n), Conv1D)
                                                    for n in config["target_modules"])


def test_llama_gqa_per_layer_ranks(tmp_path):
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    model = tiny_llama()
    names = covsvd.find_targets(model, lambda n, m: True)  # lm_head included (untied)
    moments = covsvd.capture_moments(model, calibration(), targets=names, progress=False)
    ranks = {n: 2 + i % 4 for i, n in enumerate(names)}
    batch = {"input_ids": probe()["input_ids"][:, :9]}
    path, pm = check_round_trip(model, moments, tmp_path, ranks, AutoModelForCausalLM, batch, metric="corda")
    for name, k in ranks.items():
        assert pm.base_model.model.get_submodule(name).r["default"] == k, name
        assert pm.base_model.model.get_submodule(name).scaling["default"] == 1.0
    auto = AutoPeftModelForCausalLM.from_pretrained(path / "adapter").eval()  # finds path/base by itself
    assert max_relative_error(outputs(auto, batch), outputs(model, batch)) <= OUTPUT_TOL


# ----------------------------------------------------------------------------------------------- equalities 2 and 3: peft's own inits


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(r=st.integers(1, 12))
def test_identity_equals_peft_pissa(bert_tiny, tmp_path_factory, r):
    names = covsvd.find_targets(bert_tiny)
    assume(all(has_gap(weight_matrix(bert_tiny.get_submodule(n)).detach(), r) for n in names))
    path = export_peft(bert_tiny, None, tmp_path_factory.mktemp("pissa") / "out", r, "identity", progress=False)
    ours = adapter_factors(path / "adapter")
    pm = get_peft_model(copy.deepcopy(bert_tiny), LoraConfig(r=r, lora_alpha=2 * r, target_modules=names,
                                                             init_lora_weights="pissa"))
    theirs = peft_products(pm)  # scaling 2: exercises peft's S / scaling split
    assert set(theirs) == set(ours) == set(names)
    base = load_file(path / "base" / "model.safetensors")
    for n in names:
        B, A = ours[n]
        assert max_relative_error(B.double() @ A.double(), theirs[n]) <= PEFT_TOL, n
        peft_res = pm.base_model.model.get_submodule(n).base_layer.weight
        assert max_relative_error(base[f"{n}.weight"], peft_res) <= PEFT_TOL, n


class _NoMaxScaling(types.ModuleType):
    """``torch`` for peft's CorDA hook with ``torch.max(x)`` -> 1: it then sums plain ``x^T x``."""

    def __init__(self):
        super().__init__("torch")

    def __getattr__(self, name):
        if name == "max":
            return lambda x, *a, **k: torch.ones((), dtype=x.dtype, device=x.device)
        return getattr(torch, name)


@pytest.mark.parametrize("r, method", [(2, "ipm"), (3, "ipm"), (29, "kpm")])  # ranks with a gap (has_gap)
def test_corda_equals_peft_corda(bert_tiny, tmp_path, monkeypatch, r, method):
    import peft.tuners.lora.corda as corda
    from peft.tuners.lora.config import CordaConfig

    names = covsvd.find_targets(bert_tiny, r"encoder\..*")  # not the pooler: peft's hook squeezes (1, d) away
    batches = calibration()
    moments = covsvd.capture_moments(bert_tiny, batches, targets=names, progress=False)
    for n in names:  # preconditions: peft's damping stops at its first value, 0.01; the product is unique
        C = moments[n].matrix()
        M = C + 0.01 * C.diagonal().mean() * torch.eye(C.shape[0], dtype=F64)
        assert float(torch.dist(M @ torch.linalg.inv(M), torch.eye(C.shape[0], dtype=F64))) < 0.05
        assert has_gap(weight_matrix(bert_tiny.get_submodule(n)).detach(), r, M, bottom=method == "kpm"), n

    model = copy.deepcopy(bert_tiny)
    config = LoraConfig(r=r, lora_alpha=r, target_modules=names, init_lora_weights="corda",
                        corda_config=CordaConfig(corda_method=method))

    def run_model():  # one unpadded sequence per call, as peft's hook expects
        for b in batches:
            for row, keep in zip(b["input_ids"], b["attention_mask"].bool(), strict=True):
                model(input_ids=row[keep][None])

    monkeypatch.setattr(corda, "torch", _NoMaxScaling())
    corda.preprocess_corda(model, config, run_model=run_model)
    monkeypatch.undo()
    theirs = peft_products(get_peft_model(model, config))

    components = "top" if method == "ipm" else "bottom"
    path = export_peft(bert_tiny, moments, tmp_path / "out", r, "corda", eps=0.01, eps_mode="relative",
                       components=components, progress=False)
    ours = adapter_factors(path / "adapter")
    assert set(theirs) == set(ours) == set(names)
    for n in names:
        B, A = ours[n]
        W = weight_matrix(bert_tiny.get_submodule(n)).detach().double()
        assert float((B.double() @ A.double() - theirs[n]).norm() / W.norm()) <= PEFT_TOL, n


# ----------------------------------------------------------------------------------------------- exactness, any metric


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(r=st.integers(1, 16), metric=st.sampled_from(covsvd.METRICS), eps=st.sampled_from([1e-4, 1e-3, 1e-2]),
       eps_mode=st.sampled_from(["absolute", "relative"]))
@example(r=5, metric="two-sided", eps=1e-3, eps_mode="relative")  # the output-weighted metric, every run
def test_split_is_exact_for_every_metric(bert_tiny, tmp_path_factory, r, metric, eps, eps_mode):
    """``W_res + B A == W`` (fp32 rounding), ``B A == U_r S_r P_r`` of orient, scaling 1, ``B = U diag(sqrt S)``."""
    moments = _moments(bert_tiny)  # the pooler saw 12 sequences: r <= 12 there, so r up to 16 needs fewer targets
    moments = {n: m for n, m in moments.items() if m.count >= r}
    two = dict(output_moments=_output_moments(bert_tiny), eps_output=eps) if metric == "two-sided" else {}
    if two:  # probe gradients reach every target but the pooler (last_hidden_state does not read it)
        moments = {n: m for n, m in moments.items() if n in two["output_moments"]}
    path = export_peft(bert_tiny, moments, tmp_path_factory.mktemp("x") / "out", r, metric, eps=eps,
                       eps_mode=eps_mode, progress=False, **two)
    config = json.loads((path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == r and not config["rank_pattern"]
    base = load_file(path / "base" / "model.safetensors")
    for n, (B, A) in adapter_factors(path / "adapter").items():
        W = weight_matrix(bert_tiny.get_submodule(n)).detach()
        G = two["output_moments"][n] if two else None
        o = covsvd.orient(W, moments[n], r, metric, eps=eps, eps_mode=eps_mode, storage_dtype=F64, output=G,
                          eps_output=eps)
        assert B.dtype == A.dtype == base[f"{n}.weight"].dtype == torch.float32
        assert max_relative_error(base[f"{n}.weight"].double() + B.double() @ A.double(), W) <= 1e-6, n
        assert max_relative_error(B.double(), o.U * o.S.sqrt()) <= 1e-6, n  # B = U diag(sqrt S)
        assert max_relative_error(A.double(), o.S.sqrt()[:, None] * o.P) <= 1e-6, n  # A = diag(sqrt S) P


_MOMENTS = {}


def _moments(model):
    if id(model) not in _MOMENTS:
        _MOMENTS[id(model)] = covsvd.capture_moments(model, calibration(), progress=False)
    return _MOMENTS[id(model)]


def _output_moments(model):
    """Probe output moments of every target but the pooler (no gradient reaches it), cached per model."""
    key = ("output", id(model))
    if key not in _MOMENTS:
        _MOMENTS[key] = covsvd.capture_output_moments(model, calibration(), "probe", targets=r"encoder\..*",
                                                      progress=False)
    return _MOMENTS[key]


# ----------------------------------------------------------------------------------------------- peft's name matching


def test_rank_pattern_keys_match_one_layer_each(tmp_path):
    """``layers.1.*`` and ``layers.11.*`` get their own ranks; peft's matcher selects exactly the targets."""
    from transformers import AutoModelForCausalLM

    model = tiny_llama(layers=12)
    names = covsvd.find_targets(model, r"model\.layers\.1{1,2}\.self_attn\.[qv]_proj")
    ranks = {n: (2 if ".1." in n else 3) for n in names}
    path = export_peft(model, None, tmp_path / "out", ranks, "identity", progress=False)
    config = LoraConfig.from_pretrained(path / "adapter")
    for key, _ in model.named_modules():
        assert bool(check_target_module_exists(config, key)) == (key in names), key
    pm = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(path / "base"), path / "adapter")
    wrapped = {n: m.r["default"] for n, m in pm.base_model.model.named_modules() if hasattr(m, "lora_A")}
    assert wrapped == ranks
    assert all("\\." in k for k in config.rank_pattern)  # escaped: a regex key


def test_a_name_peft_would_match_twice_is_refused():
    model = nn.ModuleDict({"a": nn.Linear(4, 4), "b": nn.ModuleDict({"a": nn.Linear(4, 4)})})
    check_peft_names(model, ["b.a"])
    with pytest.raises(ValueError, match=r"'a' is also a suffix of module 'b\.a'"):
        check_peft_names(model, ["a"])


# ----------------------------------------------------------------------------------------------- bad input


def _mha_model():
    from transformers import PretrainedConfig, PreTrainedModel

    class Config(PretrainedConfig):
        model_type = "covsvd-test-mha"

    class MHA(PreTrainedModel):
        config_class = Config

        def __init__(self, config):
            super().__init__(config)
            self.attn = nn.MultiheadAttention(8, 2)
            self.post_init()

    return MHA(Config())


def _bad(case, tmp_path):
    """``(model, moments, kwargs)`` of one bad call."""
    model, moments, kw = copy.deepcopy(tiny_bert()), None, dict(r=4, metric="identity")
    q = "encoder.layer.0.attention.self.query"
    if case == "quantised":
        model.get_submodule(q).weight = nn.Parameter(torch.zeros(32, 32, dtype=torch.int8), requires_grad=False)
    elif case == "meta":
        model.get_submodule(q).weight = nn.Parameter(torch.empty(32, 32, device="meta"))
    elif case == "not a transformers model":
        model = nn.Sequential(nn.Linear(4, 4))
    elif case == "mha out_proj":
        model, kw = _mha_model(), dict(r=2, metric="identity", targets=["attn.out_proj"])
    elif case == "another model's moments":
        from transformers import BertConfig, BertModel

        other = BertModel(BertConfig(**{**model.config.to_dict(), "num_hidden_layers": 3})).eval()
        moments, kw = covsvd.capture_moments(other, calibration(), targets=[q], progress=False), dict(r=4)
    elif case == "tied weights":
        from transformers import GPT2Config, GPT2LMHeadModel

        model = GPT2LMHeadModel(GPT2Config(vocab_size=97, n_positions=64, n_embd=32, n_layer=1, n_head=4))
        kw["targets"] = ["lm_head"]
    elif case == "missing moments":
        kw = dict(r=4, metric="full", targets=[q])
        moments = {}
    elif case == "r too large":
        kw["r"] = 33
    elif case == "r dict mismatch":
        kw = dict(r={q: 4}, metric="identity", targets=[q, q.replace("query", "key")])
    elif case == "adapters attached":
        attach_adapters(model, None, r=2, metric="identity", targets=[q], progress=False)
    elif case == "quantized model":
        model.hf_quantizer = types.SimpleNamespace(quantization_config=types.SimpleNamespace(quant_method="bnb"))
    elif case == "storage_dtype":
        kw["storage_dtype"] = torch.bfloat16
    return model, moments, kw


BAD = {
    "quantised": r"query.*\(Linear W \(32, 32\)\).*quantised",
    "meta": r"query.*meta device",
    "not a transformers model": "PreTrainedModel",
    "mha out_proj": r"attn\.out_proj.*MultiheadAttention",
    "another model's moments": r"query.*different model",
    "tied weights": r"lm_head.*\(Linear W \(97, 32\)\).*tied",
    "missing moments": r"query.*capture_moments",
    "r too large": r"r=33 must be an int in \[1, min\(d_out, d_in\)\] = \[1, 32\]",
    "r dict mismatch": r"r is a dict without an entry.*self\.key",
    "adapters attached": "export_lora_delta",
    "quantized model": r"BertModel is quantized \(bnb\).*unquantized",
    "storage_dtype": "storage_dtype",
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_raises_and_writes_nothing(case, tmp_path):
    model, moments, kw = _bad(case, tmp_path)
    with pytest.raises(ValueError, match=BAD[case]):
        export_peft(model, moments, tmp_path / "out", progress=False, **kw)
    assert list(tmp_path.iterdir()) == []


def test_existing_path_is_refused_and_left_untouched(bert_tiny, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        export_peft(bert_tiny, None, out, 4, "identity", progress=False)
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and [p.name for p in out.iterdir()] == ["keep.txt"]
    export_peft(bert_tiny, None, out, 4, "identity", overwrite=True, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["adapter", "base", "covsvd.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary left beside it


def test_failure_while_orienting_leaves_nothing(bert_tiny, tmp_path):
    """The second target's C has rank 5 < d_in = 32: Cholesky with eps=0 fails inside the write, after the first
    target was oriented. No path is left, and no temporary beside it."""
    q, k = (f"encoder.layer.0.attention.self.{x}" for x in ("query", "key"))
    moments = covsvd.capture_moments(bert_tiny, calibration(), targets=[q], progress=False)
    moments[k] = covsvd.capture_moments(bert_tiny, padded_batches([[5]]), targets=[k], progress=False)[k]
    with pytest.raises(ValueError, match="not positive definite"):
        export_peft(bert_tiny, moments, tmp_path / "out", 4, "full", eps=0.0, progress=False)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------------------- export_lora_delta


@pytest.mark.parametrize("kind, rotate", [("bert", "both"), ("gpt2", "V"), ("bert", None)])
def test_lora_delta_reproduces_the_trained_adapters(kind, rotate, tmp_path):
    """Random gains and rotations stand in for training: the rank-r LoRA on the original reproduces it."""
    original = tiny_bert() if kind == "bert" else tiny_gpt2()
    model = copy.deepcopy(original)
    moments = covsvd.capture_moments(original, calibration(), progress=False)
    attach_adapters(model, moments, r=8, metric="full", rotate=rotate, progress=False)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in covsvd.adapt.adapter_parameters(model):
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
    for m in covsvd.adapters(model).values():  # the change is U K P, rank <= r
        torch.testing.assert_close((m.U.double() @ m.delta_core()) @ m.P.double(),
                                   m.delta_weight(True) - m.delta_weight(False), rtol=0, atol=1e-12)

    path = export_lora_delta(model, tmp_path / "lora")
    factors = adapter_factors(path)
    assert set(factors) == set(covsvd.adapters(model))
    assert all(B.shape[1] == A.shape[0] == 8 for B, A in factors.values())
    batch = probe()
    pm = PeftModel.from_pretrained(copy.deepcopy(original), path).eval()
    trained = outputs(model, batch)
    assert max_relative_error(outputs(pm, batch), trained) <= OUTPUT_TOL
    assert max_relative_error(outputs(original, batch), trained) > 100 * OUTPUT_TOL  # training did change it

    merged = pm.merge_and_unload()
    detach_adapters(model, merge=True)
    for (k, v), (k2, v2) in zip(merged.state_dict().items(), model.state_dict().items(), strict=True):
        assert k == k2 and max_relative_error(v, v2) <= 1e-6, k


def test_lora_delta_bad_input(bert_tiny, tmp_path):
    with pytest.raises(ValueError, match="no covsvd adapters"):
        export_lora_delta(bert_tiny, tmp_path / "x")
    model = copy.deepcopy(bert_tiny)
    attach_adapters(model, None, r=2, metric="identity", targets=r".*query", progress=False)
    (tmp_path / "x").mkdir()
    with pytest.raises(FileExistsError):
        export_lora_delta(model, tmp_path / "x")
    assert list((tmp_path / "x").iterdir()) == []
    config = json.loads((export_lora_delta(model, tmp_path / "x", overwrite=True) / "adapter_config.json").read_text())
    assert config["target_modules"] == list(covsvd.adapters(model)) and config["r"] == 2
    assert re.escape("encoder.layer.0.attention.self.query") not in config["rank_pattern"]


@pytest.mark.parametrize("arch", ["gpt2", "bert"])
def test_per_layer_ranks_export_beyond_llama(arch, tmp_path):
    """Per-layer ranks (rank_pattern / alpha_pattern) on Conv1D (GPT-2, fan_in_fan_out) and BERT (names with
    dotted numeric parts: layer.1.x must not also match layer.11.x)."""
    from transformers import AutoModel

    model = tiny_gpt2() if arch == "gpt2" else tiny_bert()
    batch = padded_batches([[7, 5]], seed=3)[0]
    moments = covsvd.capture_moments(model, padded_batches([[9, 12, 6], [8]], seed=2), progress=False)
    ranks = {n: 1 + i % 3 for i, n in enumerate(moments)}
    path, pm = check_round_trip(model, moments, tmp_path, ranks, AutoModel, batch, metric="full")
    for name, k in ranks.items():
        assert pm.base_model.model.get_submodule(name).r["default"] == k, name
    config = json.loads((path / "adapter" / "adapter_config.json").read_text())
    assert config["alpha_pattern"] == config["rank_pattern"] and config["rank_pattern"]
    card = (path / "adapter" / "README.md").read_text()
    assert "residual base" in card and "never onto the original" in card
    assert config["base_model_name_or_path"] == str(tmp_path / "out" / "base")
