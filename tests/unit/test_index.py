"""ExactIndex: exact top-k in trec_eval order (score desc, doc id desc), ties across blocks included."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from codiemb.errors import DataError
from codiemb.evaluate.index import ExactIndex, faiss_available
from codiemb.evaluate.retrieval import rank_documents

BACKENDS = ["torch"] + (["faiss"] if faiss_available() else [])


def _data(n=600, d=8, seed=0):
    """Integer-valued vectors (exact in float16 and float32, so every kernel gives the same scores),
    drawn from 30 distinct rows: lots of identical documents, hence tied scores."""
    rng = np.random.default_rng(seed)
    base = rng.integers(-3, 4, (30, d)).astype(np.float32)
    emb = base[rng.integers(0, 30, n)]
    ids = [f"d{rng.integers(0, 10**6)}-{i}" for i in range(n)]
    q = rng.integers(-3, 4, (20, d)).astype(np.float32)
    return emb, ids, q


def _reference(q, emb, ids, k, exclude=None):
    s = q @ emb.T
    out = []
    for qi in range(len(q)):
        cand = [(ids[j], float(s[qi, j])) for j in range(len(ids)) if exclude is None or ids[j] != exclude[qi]]
        cand.sort(key=lambda c: c[0], reverse=True)
        cand.sort(key=lambda c: c[1], reverse=True)
        out.append(cand[:k])
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("storage", ["float32", "float16"])
@pytest.mark.parametrize("block_size", [50, 256, 10_000])
def test_search_equals_full_sort_with_ties(backend, storage, block_size):
    emb, ids, q = _data()
    index = ExactIndex(emb.shape[1], backend=backend, storage=storage, block_size=block_size)
    for s in range(0, len(ids), 97):  # chunks that do not line up with the blocks
        index.add(ids[s:s + 97], emb[s:s + 97])
    assert len(index) == len(ids) and len(index.blocks) == -(-len(ids) // block_size)
    exclude = [ids[3 * i] for i in range(len(q))]
    for k in (1, 10, 100, 1000):
        assert index.search(q, k) == _reference(q, emb, ids, k)
        assert index.search(q, k, exclude_ids=exclude) == _reference(q, emb, ids, k, exclude)


def test_index_bytes_and_duplicates():
    emb, ids, _ = _data(n=100)
    index = ExactIndex(8, backend="torch", storage="float16", block_size=100)
    index.add(ids, emb)
    assert 100 * 8 * 2 <= index.nbytes < 100 * 8 * 2 + 100 * 40
    index.check_unique()
    index.add([ids[5]], emb[:1])
    with pytest.raises(DataError, match=f"duplicate document id.*{ids[5]}"):
        index.check_unique("corpus.jsonl")


def test_rank_documents_breaks_ties_by_doc_id_descending():
    docs = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    q = torch.tensor([[1.0, 0.0]])
    assert rank_documents(q, docs, ["a", "c", "z", "b"], 2, device="cpu") == [["c", "b"]]
    assert rank_documents(q, docs, ["a", "c", "z", "b"], 2, query_ids=["c"], ignore_identical_ids=True,
                          device="cpu") == [["b", "a"]]
