"""Exact inner-product search over a corpus embedded chunk by chunk.

:class:`ExactIndex` holds the document embeddings once, in fixed-size **blocks** that are filled
as chunks arrive (so a growing corpus never reallocates and copies the whole matrix: the extra
memory while adding is at most one block). Each block is a faiss ``IndexFlatIP`` (exact; the
default), a faiss ``IndexScalarQuantizer(QT_fp16)`` for float16 storage (exact search over the
float16-rounded vectors, half the memory), or a torch tensor searched with chunked top-k
(``backend="torch"``; the fallback without faiss, and the fast path on a GPU).

Document ids are kept compactly: one UTF-8 byte buffer plus int64 offsets (not a list of Python
strings), and a 64-bit hash per id to find duplicates.

**Ranking is exact, ties included.** The result order is trec_eval's: score descending, then doc
id descending. Every block returns its top ``f`` candidates; when a block's ``f``-th score is
still >= the ``k``-th score of the merged list, that block may hold more documents tied with the
cut-off (and ids decide who is in), so the query is searched again with ``2f``, until no block can
change the top ``k``. Duplicate documents (identical texts, hence identical scores) are common in
real corpora, so this matters.

Imports numpy and torch; faiss is imported when a faiss backend is used.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch

from codiemb.errors import DataError

logger = logging.getLogger(__name__)

BACKENDS = ("faiss", "torch")
STORAGE = ("float32", "float16")


def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


class _IdStore:
    """Append-only doc ids as one UTF-8 buffer + int64 offsets; a 64-bit hash each for the duplicate check."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self._lens: list[np.ndarray] = []
        self._hashes: list[np.ndarray] = []
        self._joined: bytes | None = None
        self._off: np.ndarray | None = None
        self.n = 0

    def add(self, ids: Sequence[str]) -> None:
        enc = [str(i).encode("utf-8") for i in ids]
        self._parts.append(b"".join(enc))
        self._lens.append(np.fromiter((len(e) for e in enc), dtype=np.int64, count=len(enc)))
        self._hashes.append(np.fromiter((hash(e) for e in enc), dtype=np.int64, count=len(enc)))
        self.n += len(enc)
        self._joined = None

    def _finish(self) -> None:
        if self._joined is None:
            self._joined = b"".join(self._parts)
            self._parts = [self._joined]
            lens = np.concatenate(self._lens) if self._lens else np.zeros(0, np.int64)
            self._lens = [lens]
            self._off = np.zeros(len(lens) + 1, dtype=np.int64)
            np.cumsum(lens, out=self._off[1:])

    def get(self, i: int) -> str:
        self._finish()
        return self._joined[self._off[i]:self._off[i + 1]].decode("utf-8")

    def take(self, idx: np.ndarray) -> np.ndarray:
        """Ids at ``idx`` (any shape) as a numpy unicode array of the same shape."""
        idx = np.asarray(idx)
        self._finish()
        off, joined = self._off, self._joined
        flat = [joined[off[i]:off[i + 1]].decode("utf-8") for i in idx.reshape(-1).tolist()]
        return np.array(flat, dtype=str).reshape(idx.shape) if flat else np.zeros(idx.shape, dtype="<U1")

    @property
    def nbytes(self) -> int:
        self._finish()
        return len(self._joined) + int(self._off.nbytes) + sum(int(h.nbytes) for h in self._hashes)

    def duplicates(self) -> list[str]:
        """Ids that occur more than once (up to 5 examples)."""
        if self.n < 2:
            return []
        h = np.concatenate(self._hashes)
        self._hashes = [h]
        order = np.argsort(h, kind="stable")
        same = np.flatnonzero(h[order][1:] == h[order][:-1])
        out: list[str] = []
        for j in same.tolist():
            a, b = self.get(int(order[j])), self.get(int(order[j + 1]))
            if a == b and a not in out:
                out.append(a)
                if len(out) >= 5:
                    break
        return out


class _Block:
    def __init__(self, dim: int, capacity: int, backend: str, storage: str, device) -> None:
        self.capacity = capacity
        self.n = 0
        self.backend = backend
        if backend == "faiss":
            import faiss

            self.index = (faiss.IndexFlatIP(dim) if storage == "float32" else
                          faiss.IndexScalarQuantizer(dim, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT))
        else:
            dtype = torch.float32 if storage == "float32" else torch.float16
            self.data = torch.empty(capacity, dim, dtype=dtype, device=device)

    def add(self, emb: np.ndarray) -> None:
        if self.backend == "faiss":
            self.index.add(np.ascontiguousarray(emb, dtype=np.float32))
        else:
            self.data[self.n:self.n + len(emb)] = torch.from_numpy(emb).to(self.data.device, self.data.dtype)
        self.n += len(emb)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if self.backend == "faiss":
            s, i = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
            return s, i
        from codiemb.evaluate.metrics import exact_topk

        q = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32)).to(self.data.device)
        s, i = exact_topk(q, self.data[:self.n].float() if self.data.dtype != torch.float32 else self.data[:self.n], k)
        return s.numpy(), i.numpy()

    @property
    def nbytes(self) -> int:
        if self.backend == "faiss":
            return int(self.index.sa_code_size() * self.n)
        return int(self.data.element_size() * self.data.numel())


class ExactIndex:
    """Exact inner-product index, filled chunk by chunk (see the module docstring).

    ``backend``: ``"faiss"`` (default) or ``"torch"``; ``storage``: ``"float32"`` or ``"float16"``;
    ``block_size``: documents per block; ``device``: where the torch backend keeps its blocks.
    """

    def __init__(self, dim: int, *, backend: str = "faiss", storage: str = "float32", block_size: int = 1 << 16,
                 device: torch.device | str | None = None) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"index backend must be one of {BACKENDS}, got {backend!r}")
        if storage not in STORAGE:
            raise ValueError(f"index storage must be one of {STORAGE}, got {storage!r}")
        if backend == "faiss" and not faiss_available():
            raise ImportError("the faiss index backend needs faiss (pip install faiss-cpu), or use backend='torch'")
        self.dim, self.backend, self.storage, self.block_size = int(dim), backend, storage, int(block_size)
        self.device = torch.device(device or "cpu")
        self.blocks: list[_Block] = []
        self.ids = _IdStore()

    def __len__(self) -> int:
        return self.ids.n

    @property
    def nbytes(self) -> int:
        """Bytes held by the embeddings (the blocks) and the ids."""
        return sum(b.nbytes for b in self.blocks) + self.ids.nbytes

    def add(self, ids: Sequence[str], emb) -> None:
        """Append documents ``ids`` with embeddings ``emb`` (N, dim), float32 numpy or torch."""
        if isinstance(emb, torch.Tensor):
            emb = emb.detach().float().cpu().numpy()
        emb = np.asarray(emb, dtype=np.float32)
        if emb.ndim != 2 or emb.shape[1] != self.dim or len(ids) != len(emb):
            raise ValueError(f"expected {len(ids)} x {self.dim} embeddings, got {emb.shape}")
        self.ids.add(ids)
        start = 0
        while start < len(emb):
            if not self.blocks or self.blocks[-1].n >= self.blocks[-1].capacity:
                self.blocks.append(_Block(self.dim, self.block_size, self.backend, self.storage, self.device))
            block = self.blocks[-1]
            take = min(block.capacity - block.n, len(emb) - start)
            block.add(emb[start:start + take])
            start += take

    def check_unique(self, where: str = "corpus") -> None:
        dups = self.ids.duplicates()
        if dups:
            raise DataError(f"{where}: duplicate document id(s) {', '.join(map(repr, dups))}")

    def search(self, queries, k: int, exclude_ids: Sequence[str] | None = None,
               query_chunk: int = 1024) -> list[list[tuple[str, float]]]:
        """Top ``k`` ``(doc id, score)`` per query, in trec_eval order (score desc, doc id desc).

        ``exclude_ids[i]`` (optional) is removed from query ``i``'s results (``ignore_identical_ids``).
        """
        if isinstance(queries, torch.Tensor):
            queries = queries.detach().float().cpu().numpy()
        queries = np.asarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"expected queries of shape (Q, {self.dim}), got {queries.shape}")
        out: list[list[tuple[str, float]]] = [[] for _ in range(len(queries))]
        if len(self) == 0 or k <= 0:
            return out
        for start in range(0, len(queries), query_chunk):
            sel = np.arange(start, min(start + query_chunk, len(queries)))
            fetch = k + (1 if exclude_ids is not None else 0)
            while sel.size:
                again = self._search_pass(queries, sel, k, fetch, exclude_ids, out)
                sel, fetch = again, fetch * 2
        return out

    def _search_pass(self, queries, sel, k, fetch, exclude_ids, out) -> np.ndarray:
        """Search queries ``sel`` with ``fetch`` candidates per block; fill ``out``; return the unsure ones."""
        scores, idx, truncated_last = [], [], []
        offset = 0
        for block in self.blocks:
            f = min(fetch, block.n)
            s, i = block.search(queries[sel], f)
            s = np.where(np.isnan(s), np.float32(-1.0), s)  # as exact_topk: a NaN score ranks low
            scores.append(s)
            idx.append(i + offset)
            # a block that returned fewer than all its documents may hide more at its last score
            truncated_last.append(s[:, -1] if f < block.n else np.full(len(sel), -np.inf, dtype=np.float32))
            offset += block.n
        S = np.concatenate(scores, axis=1)
        I = np.concatenate(idx, axis=1)
        ids = self.ids.take(I)
        order = np.lexsort((ids, S), axis=-1)[:, ::-1]  # score desc, then doc id desc
        S = np.take_along_axis(S, order, 1)
        ids = np.take_along_axis(ids, order, 1)
        worst_hidden = np.max(np.stack(truncated_last, axis=1), axis=1)
        unsure = []
        for row, qi in enumerate(sel):
            skip = exclude_ids[qi] if exclude_ids is not None else None
            kept = [(str(d), float(s)) for d, s in zip(ids[row], S[row]) if d != skip][:k]
            complete = len(kept) == k or np.isneginf(worst_hidden[row])
            if complete and (np.isneginf(worst_hidden[row]) or worst_hidden[row] < kept[-1][1]):
                out[qi] = kept
            else:
                unsure.append(qi)
        return np.asarray(unsure, dtype=np.int64)
