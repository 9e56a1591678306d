"""A small, real fine-tuning task for the ablations: topic retrieval with sentence embeddings.

The embedded corpus (``pydoc_data.topics``) is cut into passages by :func:`covsvd.data.corpus.passages`, each
belonging to one *document* (a pydoc topic), with a deterministic train / held-out split by hash. The task:

* **Embedding** of a passage: the encoder's last hidden state, mean-pooled over real tokens (mask == 1),
  then L2-normalised, exactly as sentence-transformers uses all-MiniLM-L6-v2. Passages are truncated to
  ``max_length`` tokens (special tokens included). Pooling and normalisation accumulate in fp32.
* **Batches**: ``docs_per_batch`` distinct documents with two distinct *train* passages each. Documents
  are drawn uniformly (among those with >= 2 train passages), so large topics do not dominate.
* **Training loss** (``TaskConfig.loss``), both at cosine / ``temperature``:
  ``"pairs"``: in-batch contrastive (InfoNCE / "multiple negatives ranking"), symmetric: passage a of
  document i must pick passage b of document i among the batch's b passages, and vice versa.
  ``"prototypes"``: every passage of the batch must pick its own document among *all* documents'
  prototypes, held in a memory initialised with the untrained model's prototypes (the score's own) and
  updated after each step, per document in the batch, to ``normalise(momentum * old + (1 - momentum) *
  mean of the batch's embeddings)`` (detached). The same 78-way choice as the score, for the cost of
  the batch's forward pass.
* **Score**: held-out retrieval. Each document with >= 1 train passage gets a prototype: the normalised
  mean of the embeddings of its first ``prototypes_per_doc`` train passages (corpus order; ``None`` = all).
  Each query passage is assigned to the document whose prototype has the highest cosine; *accuracy* is the
  fraction assigned to their own document, *MRR* the mean of 1 / (rank of the own document). Queries are
  the held-out passages whose document has a prototype (a held-out passage of a document with no train
  passage cannot be retrieved and is dropped, counted in :attr:`RetrievalTask.n_dropped`).

``holdout="validation"`` carves a validation split out of the *train* passages (by a second hash) and uses
it as the queries, training and prototypes coming from the rest: hyper-parameters are piloted on it so
the held-out score is never used to choose them. Calibration moments for the adapters come from the
train split only (see :mod:`covsvd.ablate`); held-out passages are never calibrated or trained on.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..data.corpus import Passage, passages

HOLDOUTS = ("heldout", "validation")
LOSSES = ("pairs", "prototypes")
VALIDATION_PERCENT = 20  # of train passages, by a second hash, when holdout="validation"


@dataclass(frozen=True)
class TaskConfig:
    """Everything that defines the task and its score (part of an ablation's config hash)."""

    max_length: int = 64  # tokens per passage, special tokens included (truncation)
    docs_per_batch: int = 16  # a training batch is this many documents x 2 passages
    temperature: float = 0.05  # InfoNCE temperature (sentence-transformers' MNRL uses scale 20 = 1/0.05)
    prototypes_per_doc: int | None = None  # train passages averaged per prototype; None = all of them
    max_queries: int | None = None  # keep the first N queries (corpus order); None = all (quick mode only)
    eval_batch_size: int = 64
    holdout: str = "heldout"  # "heldout" (the score) or "validation" (a split of train, for pilots)
    loss: str = "pairs"  # "pairs" (in-batch InfoNCE) or "prototypes" (every document, from a memory)
    momentum: float = 0.9  # "prototypes": memory <- normalise(momentum * memory + (1 - momentum) * batch mean)

    def __post_init__(self) -> None:
        if self.holdout not in HOLDOUTS:
            raise ValueError(f"TaskConfig.holdout={self.holdout!r}; expected one of {HOLDOUTS}")
        if self.loss not in LOSSES:
            raise ValueError(f"TaskConfig.loss={self.loss!r}; expected one of {LOSSES}")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"TaskConfig.momentum={self.momentum} must be in [0, 1)")
        if self.max_length < 3:
            raise ValueError(f"TaskConfig.max_length={self.max_length} leaves no room for text beside [CLS]/[SEP]")
        if self.docs_per_batch < 2:
            raise ValueError(f"TaskConfig.docs_per_batch={self.docs_per_batch}: in-batch negatives need >= 2 documents")
        if self.temperature <= 0:
            raise ValueError(f"TaskConfig.temperature={self.temperature} must be > 0")
        if self.prototypes_per_doc is not None and self.prototypes_per_doc < 1:
            raise ValueError(f"TaskConfig.prototypes_per_doc={self.prototypes_per_doc}; use None for all, or >= 1")

    def as_dict(self) -> dict:
        return asdict(self)


def _in_validation(p: Passage) -> bool:
    h = zlib.crc32(f"validation\x00{p.doc}\x00{p.index}".encode())
    return h % 100 < VALIDATION_PERCENT


def split_passages(holdout: str = "heldout", texts=None) -> tuple[list[Passage], list[Passage]]:
    """``(train, queries)`` passages for ``holdout`` ("heldout": the corpus split; "validation": a split of train).

    The two lists are disjoint; with ``holdout="validation"`` neither contains a held-out passage.
    """
    if holdout not in HOLDOUTS:
        raise ValueError(f"holdout={holdout!r}; expected one of {HOLDOUTS}")
    train = passages(texts, split="train")
    if holdout == "heldout":
        return train, passages(texts, split="heldout")
    return [p for p in train if not _in_validation(p)], [p for p in train if _in_validation(p)]


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``hidden`` (B, T, d) over positions where ``attention_mask`` (B, T) is 1, L2-normalised; fp32.

    Padding never enters the mean. A row with no real token raises (it has no embedding).
    """
    mask = attention_mask.to(torch.float32).unsqueeze(-1)  # (B, T, 1)
    n = mask.sum(dim=1)  # (B, 1)
    if bool((n == 0).any()):
        raise ValueError(f"mean_pool: {int((n == 0).sum())} row(s) of the (B, T)={tuple(attention_mask.shape)} "
                         "mask have no real token; drop empty passages before embedding")
    pooled = (hidden.to(torch.float32) * mask).sum(dim=1) / n  # (B, d)
    return F.normalize(pooled, dim=-1)


def embed(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Normalised mean-pooled sentence embeddings (B, d) of a tokenised batch, fp32."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]  # (B, T, d)
    return mean_pool(hidden, batch["attention_mask"])


def contrastive_loss(za: torch.Tensor, zb: torch.Tensor, temperature: float) -> torch.Tensor:
    """Symmetric in-batch InfoNCE: row i of ``za`` (B, d) is the positive of row i of ``zb`` (B, d).

    ``logits = za @ zb.T / temperature`` (cosines when the rows are normalised); the loss is the mean of the
    cross-entropy of rows (a -> b) and of columns (b -> a) against the diagonal. fp32.
    """
    if za.shape != zb.shape or za.ndim != 2:
        raise ValueError(f"contrastive_loss needs two (B, d) tensors of equal shape; got {tuple(za.shape)} and "
                         f"{tuple(zb.shape)}")
    logits = za.to(torch.float32) @ zb.to(torch.float32).T / temperature  # (B, B)
    target = torch.arange(logits.shape[0])
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def retrieval_ranks(queries: torch.Tensor, labels: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """Rank (1 = retrieved first) of each query's own prototype, (Q,) int64; cosines in fp64.

    Args:
        queries: (Q, d) normalised query embeddings.
        labels: (Q,) index of each query's own prototype.
        prototypes: (K, d) normalised prototypes.
    Ties are broken against the query: rank = number of prototypes scoring >= the own one (itself included).
    """
    sims = queries.to(torch.float64) @ prototypes.to(torch.float64).T  # (Q, K)
    own = sims.gather(1, labels.view(-1, 1))  # (Q, 1)
    return (sims >= own).sum(dim=1)  # (Q,) ties count against the query


def retrieval_scores(queries: torch.Tensor, labels: torch.Tensor, prototypes: torch.Tensor) -> dict[str, float]:
    """Accuracy (fraction of rank 1) and MRR (mean of 1 / rank) of :func:`retrieval_ranks`; fp64."""
    rank = retrieval_ranks(queries, labels, prototypes)  # (Q,)
    return {
        "accuracy": float((rank == 1).to(torch.float64).mean()),
        "mrr": float((1.0 / rank.to(torch.float64)).mean()),
    }


class RetrievalTask:
    """The retrieval task on a tokenizer: pre-tokenised passages, batch sampling, loss and score.

    Attributes:
        train: passages used for training and prototypes. queries: passages scored (never trained on).
        docs: the documents with a prototype, in corpus order; ``labels[i]`` is query i's document index.
        pair_docs: documents with >= 2 train passages (the ones a training batch can draw).
    """

    def __init__(self, tokenizer, config: TaskConfig | None = None, texts=None) -> None:
        self.config = config or TaskConfig()
        self.tokenizer = tokenizer
        cfg = self.config
        train, queries = split_passages(cfg.holdout, texts)
        self.train = train
        by_doc: dict[str, list[int]] = {}
        for i, p in enumerate(train):
            by_doc.setdefault(p.doc, []).append(i)
        self.docs = list(by_doc)
        doc_index = {d: k for k, d in enumerate(self.docs)}
        kept = [p for p in queries if p.doc in doc_index]
        self.n_dropped = len(queries) - len(kept)
        if cfg.max_queries is not None:
            kept = kept[: cfg.max_queries]
        if not kept:
            raise ValueError(f"the {cfg.holdout} split has no query whose document has a train passage")
        self.queries = kept
        self.labels = torch.tensor([doc_index[p.doc] for p in kept])  # (Q,)
        self.train_labels = torch.tensor([doc_index[p.doc] for p in train])  # (N_train,)
        self._by_doc = by_doc
        self.pair_docs = [d for d, ids in by_doc.items() if len(ids) >= 2]
        if len(self.pair_docs) < cfg.docs_per_batch:
            raise ValueError(f"docs_per_batch={cfg.docs_per_batch} but only {len(self.pair_docs)} documents have "
                             ">= 2 train passages; lower docs_per_batch")
        k = cfg.prototypes_per_doc
        self.prototype_ids = [ids if k is None else ids[:k] for ids in by_doc.values()]
        self._train_ids = self._tokenize([p.text for p in train])
        self._query_ids = self._tokenize([p.text for p in kept])

    # ------------------------------------------------------------------ tokens
    def _tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        enc = self.tokenizer(list(texts), truncation=True, max_length=self.config.max_length, verbose=False)
        return [list(ids) for ids in enc["input_ids"]]

    def collate(self, rows: Sequence[list[int]]) -> dict[str, torch.Tensor]:
        """Right-padded ``{"input_ids": (B, T), "attention_mask": (B, T)}`` for token id lists."""
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        width = max(map(len, rows))
        ids = torch.full((len(rows), width), pad, dtype=torch.long)  # (B, T)
        mask = torch.zeros((len(rows), width), dtype=torch.long)  # (B, T)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, : len(r)] = 1
        return {"input_ids": ids, "attention_mask": mask}

    # ------------------------------------------------------------------ training
    def sample_pairs(self, generator: torch.Generator) -> tuple[list[int], list[int]]:
        """Indices into :attr:`train` of one batch: ``(a, b)``, ``a[i]`` and ``b[i]`` two distinct passages of
        the i-th of ``docs_per_batch`` distinct documents. Deterministic given the generator's state."""
        order = torch.randperm(len(self.pair_docs), generator=generator)[: self.config.docs_per_batch]
        a, b = [], []
        for j in order.tolist():
            ids = self._by_doc[self.pair_docs[j]]
            two = torch.randperm(len(ids), generator=generator)[:2].tolist()
            a.append(ids[two[0]])
            b.append(ids[two[1]])
        return a, b

    def loss(self, model: nn.Module, a: Sequence[int], b: Sequence[int],
             memory: torch.Tensor | None = None) -> torch.Tensor:
        """Loss of one batch (``TaskConfig.loss``), both halves in one forward pass (padded to the longer).

        ``memory`` (K, d): the prototype memory, required by ``loss="prototypes"`` and updated in place
        (no gradient flows into it).
        """
        idx = list(a) + list(b)
        z = embed(model, self.collate([self._train_ids[i] for i in idx]))  # (2B, d)
        if self.config.loss == "pairs":
            return contrastive_loss(z[: len(a)], z[len(a) :], self.config.temperature)
        if memory is None:
            raise ValueError("TaskConfig.loss='prototypes' needs the prototype memory (K, d): pass "
                             "memory=task.evaluate(model, return_prototypes=True)[1].clone()")
        labels = self.train_labels[idx]  # (2B,)
        targets = memory.clone()  # (K, d) the autograd graph keeps this copy; the memory moves on below
        loss = F.cross_entropy(z @ targets.T / self.config.temperature, labels)
        with torch.no_grad():
            update_memory(memory, z.detach(), labels, self.config.momentum)
        return loss

    def batches(self, generator: torch.Generator, steps: int) -> Iterator[tuple[list[int], list[int]]]:
        for _ in range(steps):
            yield self.sample_pairs(generator)

    # ------------------------------------------------------------------ score
    @torch.no_grad()
    def _embed_rows(self, model: nn.Module, rows: Sequence[list[int]]) -> torch.Tensor:
        bs = self.config.eval_batch_size
        # Sort by length so batches carry little padding; restore the order afterwards.
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
        chunks = []
        for s in range(0, len(order), bs):
            chunks.append(embed(model, self.collate([rows[i] for i in order[s : s + bs]])))
        z = torch.cat(chunks)  # (N, d) in sorted order
        out = torch.empty_like(z)
        out[torch.tensor(order)] = z
        return out

    def evaluate(self, model: nn.Module, return_prototypes: bool = False):
        """``{"accuracy", "mrr", "n_eval", "correct"}`` of nearest-prototype retrieval (module docstring).

        ``correct`` is a (Q,) bool tensor in :attr:`queries` order (query i retrieved its own document
        first), so two models can be compared query by query (paired). Runs the model in eval mode without gradients (its mode is restored afterwards). With
        ``return_prototypes``: ``(scores, prototypes)``, the (K, d) normalised prototypes in :attr:`docs` order.
        """
        was_training = model.training
        model.eval()
        try:
            flat = [i for ids in self.prototype_ids for i in ids]
            z_train = self._embed_rows(model, [self._train_ids[i] for i in flat])  # (P, d)
            z_query = self._embed_rows(model, self._query_ids)  # (Q, d)
        finally:
            model.train(was_training)
        protos, start = [], 0
        for ids in self.prototype_ids:
            protos.append(z_train[start : start + len(ids)].mean(dim=0))
            start += len(ids)
        prototypes = F.normalize(torch.stack(protos), dim=-1)  # (K, d)
        rank = retrieval_ranks(z_query, self.labels, prototypes)  # (Q,)
        scores = {"accuracy": float((rank == 1).to(torch.float64).mean()),
                  "mrr": float((1.0 / rank.to(torch.float64)).mean()), "n_eval": len(self.queries),
                  "correct": rank == 1}
        return (scores, prototypes) if return_prototypes else scores

    def describe(self) -> dict[str, int]:
        """Sizes, for reports: train passages, queries, documents, pair documents, prototype passages."""
        return {
            "n_train_passages": len(self.train),
            "n_eval": len(self.queries),
            "n_dropped_queries": self.n_dropped,
            "n_docs": len(self.docs),
            "n_pair_docs": len(self.pair_docs),
            "n_prototype_passages": sum(map(len, self.prototype_ids)),
        }


def update_memory(memory: torch.Tensor, z: torch.Tensor, labels: torch.Tensor, momentum: float) -> None:
    """In place: for each document k in ``labels`` (N,), ``memory[k] <- normalise(momentum * memory[k] +
    (1 - momentum) * mean of z[labels == k])``. ``memory`` (K, d), ``z`` (N, d); fp32."""
    K = memory.shape[0]
    sums = torch.zeros_like(memory).index_add_(0, labels, z.to(memory.dtype))  # (K, d)
    counts = torch.bincount(labels, minlength=K).to(memory.dtype)  # (K,)
    seen = counts > 0
    mean = sums[seen] / counts[seen, None]
    memory[seen] = F.normalize(momentum * memory[seen] + (1 - momentum) * mean, dim=-1)


def train_steps(
    model: nn.Module,
    task: RetrievalTask,
    params: Sequence[torch.nn.Parameter],
    steps: int,
    lr: float,
    seed: int,
    on_step: Callable[[int, float], None] | None = None,
    prototypes: torch.Tensor | None = None,
) -> list[float]:
    """Adam on ``params`` for ``steps`` batches drawn with ``torch.Generator().manual_seed(seed)``.

    The model stays in eval mode (dropout off: the only trainables are the adapters' small vectors, and the
    run is then a deterministic function of the seed). Constant learning rate, no weight decay, fp32.
    ``prototypes`` (K, d): the memory's initial value for ``loss="prototypes"`` (copied, never modified;
    the untrained model's prototypes from :meth:`RetrievalTask.evaluate`).
    ``on_step(step, loss)`` is called after every optimiser step (progress bars, interruption in tests).
    Returns the loss of every step.
    """
    params = list(params)
    if not params:
        raise ValueError("train_steps: no trainable parameters (attach adapters first, or check requires_grad)")
    memory = None
    if task.config.loss == "prototypes":
        if prototypes is None or prototypes.shape[0] != len(task.docs):
            raise ValueError(f"loss='prototypes' needs prototypes of shape ({len(task.docs)}, d): pass "
                             "prototypes=task.evaluate(untrained_model, return_prototypes=True)[1]")
        memory = prototypes.detach().to(torch.float32).clone()  # (K, d)
    model.eval()
    opt = torch.optim.Adam(params, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for step, (a, b) in enumerate(task.batches(gen, steps)):
        loss = task.loss(model, a, b, memory)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if on_step is not None:
            on_step(step, losses[-1])
    return losses
