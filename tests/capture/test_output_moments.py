"""capture_output_moments against independent references: fisher G equals the outer products of per-token gradients
that plain autograd retains on each target's output (fp64 models: Llama with GQA and left padding, GPT-2 Conv1D);
probe G equals J^T V V^T J for the same draws, computed from full Jacobians, and its mean over draws approaches
sum_s J_st^T J_st within a bound derived from the Gaussian variance; the model comes back bit-identical; misuse
raises naming the fix."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_VOCAB, padded_batches, tiny_bert

import covsvd
from covsvd.capture.output import capture_output_moments

TOL = 1e-10  # relative, fp64 sums vs an fp64 brute force (the bound)
F64 = torch.float64
pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_llama_lm():
    """A random 2-layer Llama causal LM in fp64 (d=32, GQA 4/2 heads, untied lm_head)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=TINY_VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False)
    return LlamaForCausalLM(config).to(F64).eval()


def tiny_gpt2_lm():
    """A random 2-layer GPT-2 LM in fp64 (d=32): Conv1D targets, tied lm_head (not a default target)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=TINY_VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=4)
                           ).to(F64).eval()


def labelled(lengths, side, seed=0, prompt=2):
    """Padded batches with labels: the input ids, -100 on padding and on the first ``prompt`` real tokens."""
    out = padded_batches(lengths, side=side, seed=seed)
    for b in out:
        labels = b["input_ids"].clone()
        labels[b["attention_mask"] == 0] = -100
        for i, row in enumerate(b["attention_mask"]):
            first = int(row.nonzero()[0])
            labels[i, first : first + prompt] = -100
        b["labels"] = labels
    return out


def summed_loss(logits, labels, attention):
    """The definition, written out: causal token cross-entropy summed over terms whose label is not -100 and
    whose predicting and predicted tokens are both real."""
    real = attention.bool()
    keep = (labels[:, 1:] != -100) & real[:, 1:] & real[:, :-1]
    return F.cross_entropy(logits[:, :-1][keep], labels[:, 1:][keep], reduction="sum")


def brute_fisher(model, batches, names):
    """``{name: (sum g g^T (d_out, d_out), rows)}``: retain_grad on every target output, one backward per batch."""
    model = copy.deepcopy(model).requires_grad_(True)
    modules = dict(model.named_modules())
    G = {n: 0 for n in names}
    rows = {n: 0 for n in names}
    for b in batches:
        outs = {n: [] for n in names}

        def keep(name, outs=outs):
            def fn(module, args, y):
                y.retain_grad()
                outs[name].append(y)
            return fn

        handles = [modules[n].register_forward_hook(keep(n)) for n in names]
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        for h in handles:
            h.remove()
        summed_loss(logits, b["labels"], b["attention_mask"]).backward()
        for n in names:
            for kept in outs[n]:
                g = kept.grad[b["attention_mask"].bool()]  # (N, d_out) real tokens
                G[n] = G[n] + g.T @ g
                rows[n] += g.shape[0]
    return G, rows


def rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("make, side", [(tiny_llama_lm, "left"), (tiny_llama_lm, "right"), (tiny_gpt2_lm, "right"),
                                        (tiny_gpt2_lm, "left")])
def test_fisher_equals_retained_gradients(make, side):
    model = make()
    batches = labelled([[7, 3, 9], [5, 8]], side=side, seed=1)
    assert any((b["attention_mask"] == 0).any() for b in batches)
    G = capture_output_moments(model, batches, mode="fisher", progress=False)
    ref, rows = brute_fisher(model, batches, list(G))
    assert len(G) == 14 if make is tiny_llama_lm else len(G) == 8
    for n, m in G.items():
        assert m.kind == "full" and m.d_in == covsvd.weight_matrix(model.get_submodule(n)).shape[0], n
        assert m.count == rows[n] == covsvd.count_tokens(batches), n
        assert rel(m.sum_xx, ref[n]) <= TOL, n
    diag = capture_output_moments(model, batches, mode="fisher", kind="diag", progress=False)
    for n, m in diag.items():
        assert rel(m.sum_xx, ref[n].diagonal()) <= TOL, n


def test_the_summed_loss_is_the_models_own_loss_times_its_tokens():
    """With right padding (no padding before a real token) the definition agrees with transformers' own mean loss
    times its label count. transformers computes that loss from fp32-cast logits (``logits.float()``), so the
    agreement is to fp32 rounding of a sum of ~20 terms (1e-6), not fp64."""
    model = tiny_llama_lm()
    b = labelled([[7, 3, 9]], side="right")[0]
    with torch.no_grad():
        own = model(**b).loss
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    n = int(((b["labels"][:, 1:] != -100)).sum())
    assert float(summed_loss(logits, b["labels"], b["attention_mask"])) == pytest.approx(float(own) * n, rel=1e-6)


def snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            {n: p.requires_grad for n, p in model.named_parameters()},
            {n: m.training for n, m in model.named_modules()},
            {n: (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks)) for n, m in
             model.named_modules()})


def assert_restored(model, before):
    state, flags, modes, hooks = snapshot(model)
    assert all(torch.equal(state[k], before[0][k]) for k in state)
    assert flags == before[1] and modes == before[2] and hooks == before[3]
    assert all(p.grad is None for p in model.parameters())


def test_model_restored_bit_identical_after_capture_and_after_failure():
    model = tiny_llama_lm().train()
    model.model.embed_tokens.weight.requires_grad_(False)  # mixed flags must come back as they were
    model.model.layers[1].mlp.train(False)
    before = snapshot(model)
    batches = labelled([[7, 3, 9]], side="left")
    capture_output_moments(model, batches, mode="fisher", progress=False)
    assert_restored(model, before)
    capture_output_moments(model, batches, mode="probe", probes=2, progress=False)
    assert_restored(model, before)
    broken = batches + [{k: v for k, v in batches[0].items() if k != "labels"}]
    with pytest.raises(ValueError, match="needs labels"):
        capture_output_moments(model, broken, mode="fisher", progress=False)
    assert_restored(model, before)


# --------------------------------------------------------------------------------------------- probe
TARGET = "encoder.layer.0.output.dense"


def jacobian(model, batch, name):
    """``J (S, T, d_out)``: d H_s / d y_t for the real output positions s (rows flattened with H's width) and the
    real token positions t of the target ``name``, from torch.autograd.functional.jacobian in fp64."""
    module = model.get_submodule(name)
    real = batch["attention_mask"].bool()
    y0 = {}
    h = module.register_forward_hook(lambda m, a, y: y0.setdefault("y", y.detach()))
    with torch.no_grad():
        model(**batch)
    h.remove()

    def f(y):
        handle = module.register_forward_hook(lambda m, a, out: y)
        try:
            return model(**batch).last_hidden_state
        finally:
            handle.remove()

    J = torch.autograd.functional.jacobian(f, y0["y"])  # (B, T, d, B, T, d_out)
    J = J[real]  # (S, d, B, T, d_out)
    return J.reshape(-1, *J.shape[2:])[:, real]  # (S*d, T_real, d_out)


def probe_reference(model, batch, name, seed, probes):
    """The captured G for these exact draws (V from a CPU fp64 generator, batch-major, probe-minor; zero on
    padding), and sum_s J_st^T J_st, and the exact variance of one draw's estimate (Gaussian quadratic forms)."""
    J = jacobian(model, batch, name)  # (R, T, d_out), R = real outputs x width
    real = batch["attention_mask"].bool()
    g = torch.Generator().manual_seed(seed)
    d = model.config.hidden_size
    G = 0
    for _ in range(probes):
        V = torch.randn((*real.shape, d), generator=g, dtype=F64)[real].reshape(-1)  # (R,)
        gt = torch.einsum("r,rtj->tj", V, J)  # (T_real, d_out) g_t = J_t^T V
        G = G + gt.T @ gt
    JJ = torch.einsum("rti,rtj->ij", J, J)  # sum_t sum_s J_st^T J_st
    # one draw: G_ij = v^T Q_ij v, Q_ij = sum_t a_ti a_tj^T (a_ti = J[:, t, i]); Var = ||Q_ij||^2 + tr(Q_ij^2)
    X = torch.einsum("rti,ruj->ijtu", J, J)  # (d_out, d_out, T, T) a_ti . a_uj
    diag = X.diagonal(dim1=0, dim2=1).permute(2, 0, 1)  # (d_out, T, T) X[i, i]
    var = torch.einsum("itu,jtu->ij", diag, diag) + torch.einsum("jitu,jiut->ij", X, X)
    return G, JJ, float(var.sum())


def test_probe_is_deterministic_per_seed_and_equals_J_transpose_V():
    model = tiny_bert().to(F64)
    batch = padded_batches([[6, 3]], side="left", seed=2)[0]
    targets = [TARGET]
    a = capture_output_moments(model, [batch], mode="probe", targets=targets, probes=3, seed=5, progress=False)
    b = capture_output_moments(model, [batch], mode="probe", targets=targets, probes=3, seed=5, progress=False)
    c = capture_output_moments(model, [batch], mode="probe", targets=targets, probes=3, seed=6, progress=False)
    assert torch.equal(a[TARGET].sum_xx, b[TARGET].sum_xx)
    assert not torch.equal(a[TARGET].sum_xx, c[TARGET].sum_xx)
    assert a[TARGET].count == 3 * 9  # every real token once per probe
    G, _, _ = probe_reference(model, batch, TARGET, seed=5, probes=3)
    assert rel(a[TARGET].sum_xx, G) <= TOL


def test_probe_mean_approaches_the_gauss_newton_matrix():
    """The mean over 4 seeds x 512 probes against sum_s J_st^T J_st. Its expected squared Frobenius error is
    sum_ij Var(G_ij) / K with the exact one-draw variance of the Gaussian quadratic form (probe_reference); the
    bound is 3x that RMS error (3 standard deviations of a deterministic, seeded draw) and at most 0.15, and
    the seeds are pinned, so the test is deterministic."""
    model = tiny_bert().to(F64)
    batch = padded_batches([[6, 3]], side="left", seed=2)[0]
    K, seeds = 512, range(4)
    mean = sum(capture_output_moments(model, [batch], mode="probe", targets=[TARGET], probes=K, seed=s,
                                      progress=False)[TARGET].sum_xx for s in seeds) / (K * len(seeds))
    _, JJ, var = probe_reference(model, batch, TARGET, seed=0, probes=1)
    rms = math.sqrt(var / (K * len(seeds))) / float(JJ.norm())
    err = rel(mean, JJ)
    assert rms <= 0.05  # the bound below is a real check, not a loose one
    assert err <= 3 * rms, (err, rms)
    single = capture_output_moments(model, [batch], mode="probe", targets=[TARGET], probes=1, seed=0,
                                    progress=False)[TARGET].sum_xx
    assert err < rel(single, JJ)  # averaging helps


# --------------------------------------------------------------------------------------------- errors
def test_errors_name_the_fix(bert_tiny):
    llama = tiny_llama_lm()
    batches = labelled([[5, 4]], side="right")
    with pytest.raises(ValueError, match="needs labels.*mode='probe'"):
        capture_output_moments(llama, [{k: v for k, v in batches[0].items() if k != "labels"}], progress=False)
    with pytest.raises(ValueError, match="BertModel is neither.*mode='probe'"):
        capture_output_moments(bert_tiny, batches, mode="fisher", progress=False)
    plain = padded_batches([[5, 4]])
    with pytest.raises(ValueError, match=r"\['pooler.dense'\].*no gradient.*targets="):
        capture_output_moments(bert_tiny, plain, mode="probe", progress=False)
    with pytest.raises(ValueError, match="probes=2 is for mode='probe'"):
        capture_output_moments(llama, batches, mode="fisher", probes=2, progress=False)
    with pytest.raises(ValueError, match="mode='gauss'"):
        capture_output_moments(llama, batches, mode="gauss", progress=False)
    with pytest.raises(ValueError, match="no label token"):
        none = [dict(batches[0], labels=torch.full_like(batches[0]["labels"], -100))]
        capture_output_moments(llama, none, progress=False)
    with pytest.raises(ValueError, match="no batches"):
        capture_output_moments(llama, [], progress=False)


def test_encoder_probe_runs_on_every_target_but_the_pooler(bert_tiny, make_batches):
    batches = make_batches([[7, 2, 10], [4, 4]], side="right")
    G = capture_output_moments(bert_tiny, batches, mode="probe", targets=r"encoder\..*", kind="diag",
                               progress=False)
    assert len(G) == 12 and all(m.kind == "diag" and m.count == 27 for m in G.values())
    assert all(float(m.sum_xx.min()) > 0 for m in G.values())


def test_memory_estimate_covers_output_moments():
    model = tiny_llama_lm()
    batches = labelled([[5, 4]], side="left")
    for kind in ("full", "diag"):
        est = covsvd.estimate_memory(model, kind=kind, side="output")
        G = capture_output_moments(model, batches, kind=kind, progress=False)
        assert est.total_bytes == sum(m.sum_xx.nbytes + m.sum_x.nbytes + m.sum_abs.nbytes for m in G.values())
        assert est.widest == 64 and est.side == "output" and "output moments" in str(est)
    with pytest.raises(ValueError, match="side='output'.*layerwise=False"):
        covsvd.estimate_memory(model, side="output", layerwise=True)
    with pytest.raises(ValueError, match="side='sideways'"):
        covsvd.estimate_memory(model, side="sideways")
