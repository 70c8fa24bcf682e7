"""Batches cut from token shards: pick rows' texts by index, then pad or pack them per step.

The training loop never tokenizes: every dataset is tokenized once into token shards
(:mod:`codiemb.data.shards`, built by :mod:`codiemb.data.build`), and a step only picks its rows'
positives and negatives (:func:`pick_retrieval`, the same ``rng`` calls on every path) and
gathers their ids:

- **packed** (``unpadded.pack_lists``): queries then passages as one unpadded sequence for
  :class:`codiemb.train.unpadded.UnpaddedBert` (no compute on padding);
- **padded to the batch maximum** (:func:`pad_ids`, dynamic padding), never to ``max_length``;
  instruction prefixes become a ``pool_mask`` (:func:`with_pool_mask`) from the row's stored
  pool start, exactly as ``Encoder.tokenize(instruction=...)`` builds it;
- **fixed slots**: every row of a dataset has m positive and n negative slots (the same on every
  rank, so gathered tensors agree in shape); a row with fewer texts leaves slots empty, and the
  loss masks them (``losses.ir.info_nce(mask=...)``);
- **length bucketing** (:func:`bucketed_order`) for the throughput benchmark;
- the ids equal ``Encoder.tokenize(texts, max_length)`` (right padding with the pad id,
  truncation at ``max_length``) token for token; ``tests/unit/test_benchmarks_smoke.py`` checks it.

:class:`PretokenizedRetrieval` is a small view over a store for benchmarks and tests.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch



def pad_ids(seqs, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad id sequences to the longest one: ``{"input_ids", "attention_mask"}`` (int64, B x L_max)."""
    lengths = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
    width = int(lengths.max()) if len(seqs) else 0
    ids = np.full((len(seqs), width), pad_id, dtype=np.int64)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = s
    mask = (np.arange(width)[None, :] < lengths[:, None]).astype(np.int64)
    return {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)}


def _pick_indices(count: int, k: int, rng: random.Random) -> list[int]:
    """All when there are at most ``k``, else ``rng.sample`` of ``k`` (``random.sample`` picks by
    index, so sampling ``range(count)`` draws the same positions as sampling the list itself)."""
    if count <= k:
        return list(range(min(count, k)))
    return rng.sample(range(count), k)


@dataclass
class RetrievalPick:
    """One retrieval batch cut from a store: B queries, and per row m positive then n negative slots.

    ``passages`` holds only the texts that exist, in row-major slot order; ``slots`` (B, m+n) says
    which slots they fill (a row with fewer negatives than n leaves slots empty: padded and
    masked out of the loss, never dropped). ``pool_starts``: each query's first pooled position;
    ``passage_pool_starts``: each passage's (both > 0 after an instruction prefix).
    """

    queries: list[np.ndarray]
    passages: list[np.ndarray]
    slots: np.ndarray  # (B, m+n) bool
    pool_starts: list[int]
    passage_pool_starts: list[int] = None  # type: ignore[assignment]
    positions: np.ndarray | None = None  # (B, m+n) int64: each slot's text position in its row (1.. ; -1 empty)

    def __post_init__(self):
        if self.passage_pool_starts is None:
            self.passage_pool_starts = [0] * len(self.passages)

    @property
    def full(self) -> bool:
        return bool(self.slots.all())


def pick_retrieval(store, idx: list[int], m: int, n: int, rng: random.Random) -> RetrievalPick:
    """Rows ``idx`` of ``store``: their queries, up to m positives and up to n negatives each,
    chosen with ``rng`` (row by row, positives then negatives: the loop's order on every path)."""
    queries, passages, starts, p_starts = [], [], [], []
    slots = np.zeros((len(idx), m + n), dtype=bool)
    positions = np.full((len(idx), m + n), -1, dtype=np.int64)
    for b, i in enumerate(idx):
        q, pos, neg, start = store.retrieval_row(int(i))
        queries.append(q)
        starts.append(start)
        chosen_p = _pick_indices(len(pos), m, rng)
        chosen_n = _pick_indices(len(neg), n, rng)
        passages += [pos[j] for j in chosen_p] + [neg[j] for j in chosen_n]
        if store.stats.get("with_instruction", 0):  # texts 1..p are positives, then negatives
            row = store.pool_starts(int(i))
            p_starts += [row[1 + j] for j in chosen_p] + [row[1 + len(pos) + j] for j in chosen_n]
        else:
            p_starts += [0] * (len(chosen_p) + len(chosen_n))
        slots[b, : len(chosen_p)] = True
        slots[b, m: m + len(chosen_n)] = True
        positions[b, : len(chosen_p)] = [1 + j for j in chosen_p]
        positions[b, m: m + len(chosen_n)] = [1 + len(pos) + j for j in chosen_n]
    return RetrievalPick(queries, passages, slots, starts, p_starts, positions)


def with_pool_mask(features: dict[str, torch.Tensor], pool_starts: list[int]) -> dict[str, torch.Tensor]:
    """Add ``pool_mask`` (attention mask without the instruction prefix) when any query has one."""
    if not any(pool_starts):
        return features
    attn = features["attention_mask"]
    positions = torch.arange(attn.size(1)).expand_as(attn)
    starts = torch.as_tensor(pool_starts, dtype=torch.long).unsqueeze(1)
    return dict(features, pool_mask=attn * (positions >= starts).to(attn.dtype))


class PretokenizedRetrieval:
    """Retrieval rows tokenized once, read by index: a thin view over a :class:`ShardStore`
    (memory-mapped shards on the training path; in memory when built from records here)."""

    def __init__(self, store, num_positives: int = 1, num_negatives: int = 0):
        self.store = store
        self.num_positives, self.num_negatives = int(num_positives), int(num_negatives)
        self.pad_id = store.pad_id

    @classmethod
    def build(cls, tokenizer, records: list[dict], max_length, *, num_positives: int = 1, num_negatives: int = 0,
              instruction: str | None = None) -> "PretokenizedRetrieval":
        """Tokenize ``records`` (``query``, ``positives``, ``negatives``) into an in-memory store.

        ``max_length`` holds ``query`` and ``passage`` (a dict or the config's ``max_length``).
        """
        from codiemb.data.shards import ShardStore

        lengths = {"query": _get(max_length, "query"), "passage": _get(max_length, "passage")}
        return cls(ShardStore.from_records(tokenizer, "retrieval", records, lengths, instruction=instruction),
                   num_positives, num_negatives)

    def __len__(self) -> int:
        return len(self.store)

    @property
    def num_tokens(self) -> int:
        return int(self.store.stats.get("tokens", 0))

    @property
    def query(self):
        return _RowView(lambda i: self.store.retrieval_row(i)[0].tolist(), len(self))

    def pick(self, idx: list[int], rng: random.Random | None = None) -> RetrievalPick:
        return pick_retrieval(self.store, idx, self.num_positives, self.num_negatives, rng or random.Random(0))

    def passage_ids(self, idx: list[int], rng: random.Random | None = None) -> list[list[int]]:
        """Per row: its m positives then its n negatives (the texts that exist)."""
        return [p.tolist() for p in self.pick(idx, rng).passages]

    def batch(self, idx: list[int], rng: random.Random | None = None) -> tuple[dict, dict]:
        """Padded query and passage features for rows ``idx`` (passages: the filled slots, row-major)."""
        pk = self.pick(idx, rng)
        return (with_pool_mask(pad_ids(pk.queries, self.pad_id), pk.pool_starts),
                with_pool_mask(pad_ids(pk.passages, self.pad_id), pk.passage_pool_starts))

    def row_length(self, i: int) -> int:
        """Tokens of row i (query + its first passages): the key for length bucketing."""
        q, pos, neg, _ = self.store.retrieval_row(i)
        return len(q) + sum(len(p) for p in pos[: self.num_positives]) + sum(len(x) for x in neg[: self.num_negatives])


class _RowView:
    def __init__(self, fn, n):
        self.fn, self.n = fn, n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return self.fn(i)


def _get(max_length, key: str) -> int:
    return int(max_length[key] if isinstance(max_length, dict) else getattr(max_length, key))


def bucketed_order(lengths: list[int], batch_size: int, *, bucket_size: int = 16, seed: int = 0) -> list[list[int]]:
    """Batches of row indices with similar lengths, in random batch order.

    Shuffle all rows, cut windows of ``bucket_size * batch_size`` rows, sort each window by length,
    cut it into batches, then shuffle the batches (seeded). ``bucket_size=1`` is a plain shuffle.
    The last incomplete batch is kept. Every row appears exactly once.
    """
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    window = max(1, bucket_size) * batch_size
    batches: list[list[int]] = []
    for start in range(0, len(order), window):
        part = sorted(order[start: start + window], key=lambda i: lengths[i])
        batches += [part[j: j + batch_size] for j in range(0, len(part), batch_size)]
    rng.shuffle(batches)
    return batches


def make_adamw(model: torch.nn.Module, lr: float, weight_decay: float, device: torch.device | str,
               fused: bool | None = None) -> torch.optim.AdamW:
    """AdamW with the loop's parameter groups (no decay on biases and norms).

    ``fused=None`` picks the fused kernel where torch has one for ``device`` (CUDA, and CPU on
    torch >= 2.4), else the default (foreach) implementation.
    """
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "LayerNorm" in name or "norm" in name.lower() else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if fused is None:
        fused = torch.device(device).type in ("cuda", "cpu")
    if fused:
        try:
            return torch.optim.AdamW(groups, lr=lr, fused=True)
        except (RuntimeError, TypeError):  # no fused kernel for this device / torch
            pass
    return torch.optim.AdamW(groups, lr=lr)
