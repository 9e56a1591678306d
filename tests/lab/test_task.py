"""The retrieval task of the ablations: split hygiene, batch sampling, pooling, loss, score, determinism.

The model-level checks use a tiny random BERT with the real tokenizer's vocabulary (fast); the real
default model is exercised by tests/test_ablate.py.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from covsvd.data.corpus import passages
from covsvd.lab.task import (
    RetrievalTask,
    TaskConfig,
    contrastive_loss,
    mean_pool,
    retrieval_ranks,
    retrieval_scores,
    split_passages,
    train_steps,
    update_memory,
)


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    import covsvd

    return AutoTokenizer.from_pretrained(covsvd.data.default_model_path(), local_files_only=True)


@pytest.fixture(scope="module")
def tiny(tokenizer):
    """A random 2-layer BERT (d=32) over the real vocabulary: a stand-in encoder for the task's plumbing."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64)
    return BertModel(cfg).eval()


SMALL = TaskConfig(max_length=24, docs_per_batch=4, prototypes_per_doc=2, max_queries=40, eval_batch_size=16)


@pytest.fixture(scope="module")
def task(tokenizer):
    return RetrievalTask(tokenizer, SMALL)


# ------------------------------------------------------------------------------------------ splits


@pytest.mark.parametrize("holdout", ["heldout", "validation"])
def test_queries_are_never_trained_on_and_validation_never_touches_heldout(holdout):
    train, queries = split_passages(holdout)
    key = lambda p: (p.doc, p.index)  # noqa: E731
    assert train and queries
    assert not {key(p) for p in train} & {key(p) for p in queries}
    heldout = {key(p) for p in passages(split="heldout")}
    if holdout == "heldout":
        assert {key(p) for p in queries} == heldout
    else:  # the pilot split lives inside train: neither side sees a held-out passage
        assert not ({key(p) for p in train} | {key(p) for p in queries}) & heldout
    assert {key(p) for p in train} <= {key(p) for p in passages(split="train")}


def test_task_queries_have_prototypes_and_prototypes_come_from_train(task):
    assert task.labels.shape == (len(task.queries),)
    for p, lab in zip(task.queries, task.labels.tolist(), strict=True):
        assert task.docs[lab] == p.doc
        assert p.split == "heldout"
    for doc, ids in zip(task.docs, task.prototype_ids, strict=True):
        assert 1 <= len(ids) <= SMALL.prototypes_per_doc
        assert all(task.train[i].doc == doc and task.train[i].split == "train" for i in ids)
    full = RetrievalTask(task.tokenizer, TaskConfig())
    d = full.describe()
    assert d["n_eval"] + d["n_dropped_queries"] == len(passages(split="heldout"))
    assert d["n_prototype_passages"] == d["n_train_passages"]  # default: every train passage


def test_task_config_rejects_bad_values():
    for bad in (dict(holdout="test"), dict(docs_per_batch=1), dict(temperature=0.0), dict(max_length=2),
                dict(prototypes_per_doc=0), dict(loss="triplet"), dict(momentum=1.0)):
        with pytest.raises(ValueError):
            TaskConfig(**bad)


# ------------------------------------------------------------------------------------------ batches


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_batches_pair_two_distinct_passages_of_distinct_documents(task, seed):
    a, b = task.sample_pairs(torch.Generator().manual_seed(seed))
    assert len(a) == len(b) == SMALL.docs_per_batch
    docs = [task.train[i].doc for i in a]
    assert len(set(docs)) == len(docs)
    for i, j in zip(a, b, strict=True):
        assert i != j and task.train[i].doc == task.train[j].doc


def test_batches_are_a_function_of_the_seed(task):
    draw = lambda s: list(task.batches(torch.Generator().manual_seed(s), 5))  # noqa: E731
    assert draw(3) == draw(3)
    assert draw(3) != draw(4)


def test_collate_pads_right_and_masks_padding(task):
    rows = [[101, 7, 102], [101, 102]]
    b = task.collate(rows)
    assert b["input_ids"].tolist() == [[101, 7, 102], [101, 102, task.tokenizer.pad_token_id]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]


# ------------------------------------------------------------------------------------------ pooling + loss


@settings(max_examples=30, deadline=None)
@given(lengths=st.lists(st.integers(1, 7), min_size=1, max_size=5), seed=st.integers(0, 1000))
def test_mean_pool_ignores_padding_and_normalises(lengths, seed):
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    hidden = torch.randn(len(lengths), T, 6, generator=g, dtype=torch.float64)  # (B, T, d)
    mask = torch.tensor([[1] * n + [0] * (T - n) for n in lengths])  # (B, T)
    junk = hidden.clone()
    junk[mask == 0] = 1e6  # whatever sits on padding must not matter
    z = mean_pool(junk, mask)
    assert z.dtype == torch.float32
    for i, n in enumerate(lengths):
        want = F.normalize(hidden[i, :n].mean(0), dim=0).float()
        torch.testing.assert_close(z[i], want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(len(lengths)))


def test_mean_pool_rejects_a_row_without_tokens():
    with pytest.raises(ValueError, match="no real token"):
        mean_pool(torch.randn(2, 3, 4), torch.tensor([[1, 1, 0], [0, 0, 0]]))


@settings(max_examples=30, deadline=None)
@given(B=st.integers(2, 6), d=st.integers(2, 8), tau=st.floats(0.02, 2.0), seed=st.integers(0, 1000))
def test_contrastive_loss_equals_the_written_out_sum(B, d, tau, seed):
    g = torch.Generator().manual_seed(seed)
    za = F.normalize(torch.randn(B, d, generator=g, dtype=torch.float64), dim=1)
    zb = F.normalize(torch.randn(B, d, generator=g, dtype=torch.float64), dim=1)
    s = [[float(za[i] @ zb[j]) / tau for j in range(B)] for i in range(B)]
    rows = sum(-s[i][i] + math.log(sum(math.exp(v) for v in s[i])) for i in range(B)) / B
    cols = sum(-s[j][j] + math.log(sum(math.exp(s[i][j]) for i in range(B))) for j in range(B)) / B
    got = contrastive_loss(za, zb, tau)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(0.5 * (rows + cols), rel=1e-5, abs=1e-5)
    assert contrastive_loss(zb, za, tau).item() == pytest.approx(got.item(), rel=1e-6, abs=1e-6)


def test_contrastive_loss_is_small_for_aligned_pairs_and_large_for_swapped_ones():
    z = torch.eye(4)
    assert contrastive_loss(z, z, 0.05).item() < 1e-6
    assert contrastive_loss(z, z.roll(1, dims=0), 0.05).item() > 10
    with pytest.raises(ValueError, match="equal shape"):
        contrastive_loss(torch.zeros(3, 2), torch.zeros(2, 2), 0.1)


# ------------------------------------------------------------------------------------------ score


def test_retrieval_scores_by_hand():
    protos = torch.eye(3)  # (K=3, d=3)
    q = F.normalize(torch.tensor([[1.0, 0.1, 0.0], [0.0, 1.0, 0.5], [0.9, 0.0, 0.3], [0.5, 0.5, 0.0]]), dim=1)
    labels = torch.tensor([0, 1, 2, 1])
    # ranks: 1, 1, 2 (proto 0 beats 2), 2 (a tie with proto 0 counts against the query)
    s = retrieval_scores(q, labels, protos)
    assert s["accuracy"] == pytest.approx(2 / 4)
    assert s["mrr"] == pytest.approx((1 + 1 + 0.5 + 0.5) / 4)
    assert retrieval_ranks(q, labels, protos).tolist() == [1, 1, 2, 2]


def test_evaluate_does_not_depend_on_batching_and_restores_the_mode(tokenizer, tiny):
    from dataclasses import replace

    a = RetrievalTask(tokenizer, SMALL).evaluate(tiny)
    tiny.train()
    try:
        b = RetrievalTask(tokenizer, replace(SMALL, eval_batch_size=5)).evaluate(tiny)
        assert tiny.training
    finally:
        tiny.eval()
    assert a["n_eval"] == b["n_eval"] == SMALL.max_queries
    assert 0.0 <= a["accuracy"] <= a["mrr"] <= 1.0
    # per-query hits: in query order, their mean is the accuracy, independent of the batching
    assert a["correct"].shape == (SMALL.max_queries,) and a["correct"].dtype == torch.bool
    assert a["correct"].double().mean().item() == pytest.approx(a["accuracy"])
    assert torch.equal(a["correct"], b["correct"])
    assert a["accuracy"] == pytest.approx(b["accuracy"]) and a["mrr"] == pytest.approx(b["mrr"], abs=1e-6)


def test_a_passage_embeds_the_same_alone_and_in_a_padded_batch(task, tiny):
    from covsvd.lab.task import embed

    rows = [task._train_ids[i] for i in range(6)]
    with torch.no_grad():
        together = embed(tiny, task.collate(rows))
        alone = torch.cat([embed(tiny, task.collate([r])) for r in rows])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------ training


def _scaled(tiny):
    """``tiny`` with a trainable per-channel scale on its output (a stand-in for an adapter)."""
    import copy

    m = copy.deepcopy(tiny)
    for p in m.parameters():
        p.requires_grad_(False)
    scale = torch.nn.Parameter(torch.zeros(32))
    m.encoder.layer[-1].output.dense.register_forward_hook(lambda mod, i, o: o * (1 + scale))
    return m, scale


def test_training_is_a_function_of_the_seed_and_moves_only_the_trainables(task, tiny):
    runs = []
    for seed in (0, 0, 1):
        m, scale = _scaled(tiny)
        frozen = {k: v.clone() for k, v in m.state_dict().items()}
        losses = train_steps(m, task, [scale], steps=3, lr=0.05, seed=seed)
        assert all(torch.equal(frozen[k], v) for k, v in m.state_dict().items())
        assert scale.detach().abs().max() > 0
        runs.append((losses, scale.detach().clone()))
    assert runs[0][0] == runs[1][0] and torch.equal(runs[0][1], runs[1][1])
    assert runs[0][0] != runs[2][0]


def test_training_without_trainables_raises(task, tiny):
    with pytest.raises(ValueError, match="no trainable parameters"):
        train_steps(tiny, task, [], steps=1, lr=0.1, seed=0)


def test_update_memory_moves_only_the_documents_in_the_batch():
    memory = F.normalize(torch.randn(4, 3, generator=torch.Generator().manual_seed(0)), dim=1)
    old = memory.clone()
    z = F.normalize(torch.randn(3, 3, generator=torch.Generator().manual_seed(1)), dim=1)
    labels = torch.tensor([2, 0, 2])
    update_memory(memory, z, labels, momentum=0.75)
    torch.testing.assert_close(memory[[1, 3]], old[[1, 3]])
    torch.testing.assert_close(memory[0], F.normalize(0.75 * old[0] + 0.25 * z[1], dim=0))
    torch.testing.assert_close(memory[2], F.normalize(0.75 * old[2] + 0.25 * (z[0] + z[2]) / 2, dim=0))


def test_prototype_loss_trains_deterministically_and_leaves_the_given_prototypes_alone(tokenizer, tiny):
    from dataclasses import replace

    task = RetrievalTask(tokenizer, replace(SMALL, loss="prototypes"))
    _, protos = task.evaluate(tiny, return_prototypes=True)
    assert protos.shape == (len(task.docs), 32)
    keep = protos.clone()
    runs = []
    for _ in range(2):
        m, scale = _scaled(tiny)
        runs.append((train_steps(m, task, [scale], steps=3, lr=0.05, seed=0, prototypes=protos), scale.detach()))
    assert torch.equal(protos, keep)
    assert runs[0][0] == runs[1][0] and torch.equal(runs[0][1], runs[1][1])
    assert runs[0][1].abs().max() > 0
    m, scale = _scaled(tiny)
    with pytest.raises(ValueError, match="needs prototypes"):
        train_steps(m, task, [scale], steps=1, lr=0.1, seed=0)
