"""Pre-tokenized, length-bucketed retrieval batches: tokenize once, collate by padding only.

The per-step path of :func:`codiemb.train.loop.retrieval_loss` calls the tokenizer on every
step. Here the data pipeline's tokenize step (:func:`codiemb.data.tokenize.tokenize_batch`, the
same function Ray Data runs in ``map_batches``) runs ONCE over all rows, and a step only
gathers id lists and pads them into tensors:

- **pad to the batch maximum** (dynamic padding), never to ``max_length``: a batch of short
  queries costs its own length, not 64 or 256 positions;
- **length bucketing** (:func:`bucketed_order`): rows are sorted by length inside windows of
  ``bucket_size`` batches, the batches are cut from the sorted runs and then shuffled, so each
  batch holds rows of similar length (less padding) while batch order stays random;
- the result equals ``Encoder.tokenize(texts, max_length)`` (right padding with the pad id,
  truncation at ``max_length``) token for token; ``tests/unit/test_benchmarks_smoke.py`` checks it.

Instruction prefixes (``pool_mask``) are not handled here: rows with an instruction need
``Encoder.tokenize`` (see ``retrieval_loss``).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch

from codiemb.data.tokenize import tokenize_batch


def pad_ids(seqs: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad id lists to the longest one: ``{"input_ids", "attention_mask"}`` (int64, B x L_max)."""
    lengths = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
    width = int(lengths.max()) if len(seqs) else 0
    ids = np.full((len(seqs), width), pad_id, dtype=np.int64)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = s
    mask = (np.arange(width)[None, :] < lengths[:, None]).astype(np.int64)
    return {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)}


def _pick_indices(count: int, k: int, rng: random.Random) -> list[int]:
    """Same choice rule as ``loop._pick``: all when there are at most ``k``, else a sample of ``k``."""
    if count <= k:
        return list(range(min(count, k)))
    return rng.sample(range(count), k)


@dataclass
class PretokenizedRetrieval:
    """Token ids of every row of one retrieval dataset, tokenized once.

    ``query[i]`` is the id list of row i's query; ``positives[i]`` / ``negatives[i]`` the id lists
    of its passages. Build with :meth:`build`; cut step batches with :meth:`batch`.
    """

    query: list[list[int]]
    positives: list[list[list[int]]]
    negatives: list[list[list[int]]]
    pad_id: int
    num_positives: int = 1
    num_negatives: int = 0

    @classmethod
    def build(cls, tokenizer, records: list[dict], max_length, *, num_positives: int = 1, num_negatives: int = 0,
              chunk: int = 1024) -> "PretokenizedRetrieval":
        """Tokenize ``records`` (``query``, ``positives``, ``negatives``) with ``tokenize_batch``.

        ``max_length`` holds ``query`` and ``passage`` (a dict or the config's ``max_length``).
        """
        if any(r.get("instruction") for r in records):
            raise ValueError("PretokenizedRetrieval does not handle instruction prefixes; use Encoder.tokenize")
        q, pos, neg = [], [], []
        for start in range(0, len(records), chunk):
            part = records[start: start + chunk]
            cols = {"query": [r["query"] for r in part], "positives": [r["positives"] for r in part],
                    "negatives": [r.get("negatives") or [] for r in part]}
            lengths = {"query": _get(max_length, "query"), "passage": _get(max_length, "passage"), "sts": 1}
            out = tokenize_batch(tokenizer, cols, "retrieval", lengths)
            q += out["query_input_ids"]
            pos += out["positives_input_ids"]
            neg += out["negatives_input_ids"]
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        return cls(q, pos, neg, int(pad_id), num_positives, num_negatives)

    def __len__(self) -> int:
        return len(self.query)

    def passage_ids(self, idx: list[int], rng: random.Random | None = None) -> list[list[int]]:
        """Per row: its m positives then its n negatives (``loop.retrieval_loss``'s order)."""
        rng = rng or random.Random(0)
        out: list[list[int]] = []
        for i in idx:
            p, n = self.positives[i], self.negatives[i]
            out += [p[j] for j in _pick_indices(len(p), self.num_positives, rng)]
            out += [n[j] for j in _pick_indices(len(n), self.num_negatives, rng)]
        return out

    def batch(self, idx: list[int], rng: random.Random | None = None) -> tuple[dict, dict]:
        """Padded query and passage features for rows ``idx`` (passages: B·(m+n), row-major)."""
        return pad_ids([self.query[i] for i in idx], self.pad_id), pad_ids(self.passage_ids(idx, rng), self.pad_id)

    def row_length(self, i: int) -> int:
        """Tokens of row i (query + its first passages): the key for length bucketing."""
        return len(self.query[i]) + sum(len(p) for p in self.positives[i][: self.num_positives]) + \
            sum(len(p) for p in self.negatives[i][: self.num_negatives])


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
