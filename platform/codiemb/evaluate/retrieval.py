"""Retrieval evaluation on a BEIR split: dense exact search, nDCG@k / MRR@k / Recall@k × 100.

Protocol (matches MTEB's ``RetrievalEvaluator`` with ``DenseRetrievalExactSearch``, which SciFact
uses with its defaults):

- documents are ``title + " " + text`` (see ``codiemb.data.beir``), queries as they are;
- both sides embedded with the same encoder, L2-normalised; score = cosine; exact search;
- a document whose id equals the query id is **not** removed (MTEB's ``ignore_identical_ids``
  is False by default and for SciFact; it is True only for tasks like ArguAna / Quora);
- ranking ties are broken as trec_eval does (score descending, then doc id descending);
- metrics per query (``codiemb.evaluate.metrics``) averaged over every query that has a
  relevant document in the qrels.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import torch

from codiemb.evaluate.metrics import exact_topk, mrr_at_k, ndcg_at_k, recall_at_k

logger = logging.getLogger(__name__)


def rank_documents(query_emb: torch.Tensor, doc_emb: torch.Tensor, doc_ids: Sequence[str], k: int,
                   query_ids: Sequence[str] | None = None, ignore_identical_ids: bool = False,
                   device: torch.device | str | None = None) -> list[list[str]]:
    """Top-``k`` document ids per query by inner product (exact), ties by doc id descending."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    extra = 1 if ignore_identical_ids else 0
    scores, idx = exact_topk(query_emb.to(device), doc_emb.to(device), k + extra)
    ranked: list[list[str]] = []
    for qi in range(scores.size(0)):
        cand = [(s, doc_ids[j]) for s, j in zip(scores[qi].tolist(), idx[qi].tolist())]
        if ignore_identical_ids and query_ids is not None:
            cand = [c for c in cand if c[1] != query_ids[qi]]
        # trec_eval order: score descending, then doc id descending (sort twice, stable)
        cand.sort(key=lambda c: c[1], reverse=True)
        cand.sort(key=lambda c: c[0], reverse=True)
        ranked.append([d for _, d in cand[:k]])
    return ranked


def evaluate_retrieval(encoder, split, batch_size: int = 64, query_max_length: int | None = None,
                       doc_max_length: int | None = None, k_values: Sequence[int] = (10, 100), *,
                       query_instruction: str | None = None, ignore_identical_ids: bool = False,
                       show_progress: bool = False) -> dict:
    """Score ``encoder`` on a ``codiemb.data.beir.BeirSplit``.

    Returns ``{"ndcg@k", "mrr@k", "recall@k" for every k in k_values (× 100), "n_queries", "n_docs",
    "seconds"}``; with the default k_values that includes ndcg@10, mrr@10 and recall@100.
    Max lengths default to the model's ``max_seq_length``.
    """
    t0 = time.perf_counter()
    k_values = sorted({int(k) for k in k_values})
    query_ids = list(split.qrels)
    doc_ids = list(split.doc_ids or split.corpus)
    if not query_ids or not doc_ids:
        raise ValueError(f"retrieval split {split.folder}:{split.split} has no queries or no documents")
    logger.info("retrieval: embedding %d documents and %d queries", len(doc_ids), len(query_ids))
    doc_emb = encoder.encode([split.corpus[d] for d in doc_ids], batch_size=batch_size, max_length=doc_max_length,
                             normalize=True, show_progress=show_progress)
    query_emb = encoder.encode([split.queries[q] for q in query_ids], batch_size=batch_size,
                               max_length=query_max_length, instruction=query_instruction, normalize=True,
                               show_progress=show_progress)
    ranked = rank_documents(torch.as_tensor(query_emb), torch.as_tensor(doc_emb), doc_ids, max(k_values),
                            query_ids=query_ids, ignore_identical_ids=ignore_identical_ids)
    result: dict = {}
    n = len(query_ids)
    for k in k_values:
        result[f"ndcg@{k}"] = 100.0 * sum(ndcg_at_k(r, split.qrels[q], k) for q, r in zip(query_ids, ranked)) / n
        result[f"mrr@{k}"] = 100.0 * sum(mrr_at_k(r, split.qrels[q], k) for q, r in zip(query_ids, ranked)) / n
        result[f"recall@{k}"] = 100.0 * sum(recall_at_k(r, split.qrels[q], k) for q, r in zip(query_ids, ranked)) / n
    result.update(n_queries=n, n_docs=len(doc_ids), seconds=round(time.perf_counter() - t0, 3))
    logger.info("retrieval: %s", ", ".join(f"{k} {v:.2f}" for k, v in result.items() if "@" in k))
    return result
