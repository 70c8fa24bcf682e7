"""Pre-tokenized retrieval batches: tokenize once, then only gather ids (pack or pad) per step.

The training loop's unpadded retrieval step (:func:`codiemb.train.loop.retrieval_loss` with
``train.retrieval_forward`` auto/unpadded) uses :class:`PretokenizedRetrieval`: the data
pipeline's tokenize step (:func:`codiemb.data.tokenize.tokenize_batch`, the same function Ray
Data runs in ``map_batches``) runs ONCE over a dataset's rows, the first time the loop needs it,
and a step only picks rows' positives/negatives (the same ``rng`` calls as ``loop._pick``) and
gathers their ids:

- **packed** (:meth:`PretokenizedRetrieval.packed`): queries then passages as one unpadded
  sequence for :class:`codiemb.train.unpadded.UnpaddedBert` (no compute on padding);
- **padded to the batch maximum** (:meth:`PretokenizedRetrieval.batch`, dynamic padding), never
  to ``max_length``: a batch of short queries costs its own length, not 64 or 256 positions;
- **length bucketing** (:func:`bucketed_order`): rows are sorted by length inside windows of
  ``bucket_size`` batches, the batches are cut from the sorted runs and then shuffled, so each
  batch holds rows of similar length (less padding) while batch order stays random;
- the ids equal ``Encoder.tokenize(texts, max_length)`` (right padding with the pad id,
  truncation at ``max_length``) token for token; ``tests/unit/test_benchmarks_smoke.py`` checks it.

Storage is compact: every text's ids live in ONE flat int32 array with int64 offsets (about 4
bytes a token, against ~36 for Python lists of ints), so a large dataset fits in a worker.

Instruction prefixes (``pool_mask``) are not handled here: rows with an instruction take the
padded path, ``Encoder.tokenize`` (see ``retrieval_loss``).
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass

import numpy as np
import torch

from codiemb.data.tokenize import tokenize_batch
from codiemb.train.unpadded import Packed, pack_lists


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
    """Same choice rule and rng calls as ``loop._pick``: all when there are at most ``k``, else
    ``rng.sample`` of ``k`` (``random.sample`` picks by index, so sampling ``range(count)`` draws
    the same positions as sampling the list itself)."""
    if count <= k:
        return list(range(min(count, k)))
    return rng.sample(range(count), k)


class _RowTexts:
    """Read-only view ``view[i]``: row i's query ids (a list) or its passages' ids (a list of lists)."""

    def __init__(self, pre: "PretokenizedRetrieval", field: str):
        self.pre, self.field = pre, field

    def __len__(self) -> int:
        return len(self.pre)

    def __getitem__(self, i: int):
        pre = self.pre
        if self.field == "query":
            return pre.text(pre.query_text[i]).tolist()
        start, count = (pre.pos_start[i], pre.pos_count[i]) if self.field == "positives" else \
            (pre.neg_start[i], pre.neg_count[i])
        return [pre.text(start + j).tolist() for j in range(count)]


@dataclass
class PretokenizedRetrieval:
    """Token ids of every row of one retrieval dataset, tokenized once.

    Texts are numbered; text ``t``'s ids are ``tokens[offsets[t]:offsets[t+1]]``. Row i's query is
    text ``query_text[i]``, its positives texts ``pos_start[i] + j`` for j < ``pos_count[i]`` (the
    same for negatives). ``query[i]`` / ``positives[i]`` / ``negatives[i]`` give id lists. Build
    with :meth:`build`; cut a step with :meth:`pick` + :meth:`packed`, or :meth:`batch` (padded).
    """

    tokens: np.ndarray  # (total tokens,) int32
    offsets: np.ndarray  # (texts + 1,) int64
    query_text: list[int]
    pos_start: list[int]
    pos_count: list[int]
    neg_start: list[int]
    neg_count: list[int]
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
        lengths = {"query": _get(max_length, "query"), "passage": _get(max_length, "passage"), "sts": 1}
        parts: list[np.ndarray] = []
        text_lengths: list[int] = []
        q_text, p_start, p_count, n_start, n_count = [], [], [], [], []
        for start in range(0, len(records), chunk):
            part = records[start: start + chunk]
            cols = {"query": [r["query"] for r in part], "positives": [r["positives"] for r in part],
                    "negatives": [r.get("negatives") or [] for r in part]}
            out = tokenize_batch(tokenizer, cols, "retrieval", lengths)
            texts: list[list[int]] = []
            for ids in out["query_input_ids"]:
                q_text.append(len(text_lengths) + len(texts))
                texts.append(ids)
            for field, starts, counts in (("positives", p_start, p_count), ("negatives", n_start, n_count)):
                for row_ids in out[f"{field}_input_ids"]:
                    starts.append(len(text_lengths) + len(texts))
                    counts.append(len(row_ids))
                    texts += row_ids
            n_tok = sum(len(t) for t in texts)
            parts.append(np.fromiter(itertools.chain.from_iterable(texts), dtype=np.int32, count=n_tok))
            text_lengths += [len(t) for t in texts]
        offsets = np.zeros(len(text_lengths) + 1, dtype=np.int64)
        np.cumsum(np.asarray(text_lengths, dtype=np.int64), out=offsets[1:])
        tokens = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        return cls(tokens, offsets, q_text, p_start, p_count, n_start, n_count, int(pad_id),
                   num_positives, num_negatives)

    def __len__(self) -> int:
        return len(self.query_text)

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.size)

    @property
    def query(self) -> _RowTexts:
        return _RowTexts(self, "query")

    @property
    def positives(self) -> _RowTexts:
        return _RowTexts(self, "positives")

    @property
    def negatives(self) -> _RowTexts:
        return _RowTexts(self, "negatives")

    def text(self, t: int) -> np.ndarray:
        """Ids of text ``t`` (int32 view into the flat array)."""
        return self.tokens[self.offsets[t]: self.offsets[t + 1]]

    def pick(self, idx: list[int], rng: random.Random | None = None) -> tuple[list[int], list[int]]:
        """Text numbers for rows ``idx``: their queries, and per row its m positives then its n
        negatives (``loop.retrieval_loss``'s order and ``rng`` calls)."""
        rng = rng or random.Random(0)
        passages: list[int] = []
        m, n = self.num_positives, self.num_negatives
        for i in idx:
            ps, ns = self.pos_start[i], self.neg_start[i]
            passages += [ps + j for j in _pick_indices(self.pos_count[i], m, rng)]
            passages += [ns + j for j in _pick_indices(self.neg_count[i], n, rng)]
        return [self.query_text[i] for i in idx], passages

    def packed(self, texts: list[int]) -> Packed:
        """Texts ``texts`` packed into one unpadded sequence (for ``UnpaddedBert``)."""
        return pack_lists([self.text(t) for t in texts])

    def passage_ids(self, idx: list[int], rng: random.Random | None = None) -> list[list[int]]:
        """Per row: its m positives then its n negatives (``loop.retrieval_loss``'s order)."""
        return [self.text(t).tolist() for t in self.pick(idx, rng)[1]]

    def batch(self, idx: list[int], rng: random.Random | None = None) -> tuple[dict, dict]:
        """Padded query and passage features for rows ``idx`` (passages: B·(m+n), row-major)."""
        q, p = self.pick(idx, rng)
        return pad_ids([self.text(t) for t in q], self.pad_id), pad_ids([self.text(t) for t in p], self.pad_id)

    def row_length(self, i: int) -> int:
        """Tokens of row i (query + its first passages): the key for length bucketing."""
        size = lambda t: int(self.offsets[t + 1] - self.offsets[t])  # noqa: E731
        return size(self.query_text[i]) + \
            sum(size(self.pos_start[i] + j) for j in range(min(self.pos_count[i], self.num_positives))) + \
            sum(size(self.neg_start[i] + j) for j in range(min(self.neg_count[i], self.num_negatives)))


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
