"""Evaluation metrics: correlations for STS, ranking metrics for retrieval, exact top-k search.

Ranking metrics follow BEIR / MTEB, which use pytrec_eval (trec_eval) per query and average
over queries. Relevances come from the qrels; a document is *relevant* when its grade is > 0.

- nDCG@k (Järvelin & Kekäläinen 2002, trec_eval's linear gain):
  DCG@k = Σ_{i=1..k} rel_i / log2(i + 1), IDCG@k = DCG@k of the qrels' grades sorted descending,
  nDCG@k = DCG@k / IDCG@k (0 when the query has no relevant document).
- MRR@k: 1 / rank of the first relevant document within the top k, else 0.
- Recall@k: |relevant ∩ top k| / |relevant|.

All functions return fractions in [0, 1]; the evaluators report them × 100.

:func:`retrieval_metrics` (what ``evaluate_retrieval`` reports) computes them with pytrec_eval
itself, the trec_eval library BEIR and MTEB use: nDCG@k is ``ndcg_cut.k``, Recall@k ``recall.k``
and MRR@k is ``recip_rank`` on each query's top k. The per-query functions below are the same
definitions in plain Python (checked against pytrec_eval in tests/unit/test_metrics.py); the
merge search's re-ranking scorer uses them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from scipy.stats import rankdata


def pearson(pred: Sequence[float], gold: Sequence[float]) -> float:
    """Pearson correlation r = cov(x, y) / (σx σy); NaN when either side is constant."""
    x = np.asarray(pred, dtype=np.float64)
    y = np.asarray(gold, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"pred and gold must be 1-D and the same length, got {x.shape} and {y.shape}")
    if len(x) < 2:
        raise ValueError("correlation needs at least 2 points")
    x = x - x.mean()
    y = y - y.mean()
    denom = math.sqrt(float((x * x).sum()) * float((y * y).sum()))
    return float((x * y).sum() / denom) if denom > 0 else float("nan")


def spearman(pred: Sequence[float], gold: Sequence[float]) -> float:
    """Spearman ρ: Pearson correlation of the ranks, tied values get their average rank.

    Same definition as ``scipy.stats.spearmanr`` (and hence MTEB's STS evaluator).
    """
    x = np.asarray(pred, dtype=np.float64)
    y = np.asarray(gold, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"pred and gold must be 1-D and the same length, got {x.shape} and {y.shape}")
    return pearson(rankdata(x, method="average"), rankdata(y, method="average"))


def _relevant(qrels_for_query: Mapping[str, int]) -> dict[str, int]:
    return {d: int(r) for d, r in qrels_for_query.items() if r > 0}


def dcg(relevances: Sequence[float]) -> float:
    """Σ_i rel_i / log2(i + 1), i = 1, 2, ... (the first item has discount 1)."""
    return float(sum(r / math.log2(i + 2) for i, r in enumerate(relevances)))


def ndcg_at_k(ranked_doc_ids: Sequence[str], qrels_for_query: Mapping[str, int], k: int) -> float:
    """nDCG@k with graded relevance (BEIR / pytrec_eval ``ndcg_cut``)."""
    rel = _relevant(qrels_for_query)
    if not rel:
        return 0.0
    gains = [rel.get(d, 0) for d in ranked_doc_ids[:k]]
    ideal = sorted(rel.values(), reverse=True)[:k]
    return dcg(gains) / dcg(ideal)


def mrr_at_k(ranked_doc_ids: Sequence[str], qrels_for_query: Mapping[str, int], k: int) -> float:
    """Reciprocal rank of the first relevant document in the top k (0 if none)."""
    rel = _relevant(qrels_for_query)
    for i, d in enumerate(ranked_doc_ids[:k]):
        if d in rel:
            return 1.0 / (i + 1)
    return 0.0


def recall_at_k(ranked_doc_ids: Sequence[str], qrels_for_query: Mapping[str, int], k: int) -> float:
    """Share of the relevant documents found in the top k (0 when there are none)."""
    rel = _relevant(qrels_for_query)
    if not rel:
        return 0.0
    return len(set(ranked_doc_ids[:k]) & rel.keys()) / len(rel)


def retrieval_metrics(run: Mapping[str, Sequence[tuple[str, float]]], qrels: Mapping[str, Mapping[str, int]],
                      k_values: Sequence[int]) -> dict[str, float]:
    """nDCG@k, MRR@k and Recall@k × 100 (pytrec_eval), averaged over every query in ``qrels``.

    ``run[q]`` is query ``q``'s ranked ``(doc id, score)`` list (at least ``max(k_values)`` long
    where the corpus allows); pytrec_eval orders it itself, by score descending then doc id
    descending (trec_eval's rule). A query of ``qrels`` missing from ``run`` scores 0.
    """
    import pytrec_eval

    k_values = sorted({int(k) for k in k_values})
    # relevant = grade > 0, as in _relevant (a query without one still counts, with 0)
    qrels = {q: {d: int(r) for d, r in docs.items() if r > 0} for q, docs in qrels.items()}
    n = len(qrels)
    if n == 0:
        raise ValueError("no queries with relevance judgements")
    cuts = ",".join(map(str, k_values))
    full = {q: {d: float(s) for d, s in run.get(q, ())} for q in qrels}
    per_query = pytrec_eval.RelevanceEvaluator(qrels, {f"ndcg_cut.{cuts}", f"recall.{cuts}"}).evaluate(full)
    rr = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"})
    out: dict[str, float] = {}
    for k in k_values:
        top = {q: {d: float(s) for d, s in _trec_order(run.get(q, ()))[:k]} for q in qrels}
        mrr = rr.evaluate(top)
        out[f"ndcg@{k}"] = 100.0 * sum(per_query.get(q, {}).get(f"ndcg_cut_{k}", 0.0) for q in qrels) / n
        out[f"mrr@{k}"] = 100.0 * sum(mrr.get(q, {}).get("recip_rank", 0.0) for q in qrels) / n
        out[f"recall@{k}"] = 100.0 * sum(per_query.get(q, {}).get(f"recall_{k}", 0.0) for q in qrels) / n
    return out


def _trec_order(ranked: Sequence[tuple[str, float]]) -> list[tuple[str, float]]:
    """Score descending, then doc id descending (trec_eval's order)."""
    out = sorted(ranked, key=lambda c: c[0], reverse=True)
    out.sort(key=lambda c: c[1], reverse=True)
    return out


def exact_topk(queries: torch.Tensor, docs: torch.Tensor, k: int, *, query_chunk: int = 1024,
               doc_chunk: int = 50_000) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact inner-product search: the top ``k`` docs per query, scores sorted descending.

    Scores are ``queries @ docs.T`` (cosine when both are L2-normalised), computed in chunks so
    memory stays at ``query_chunk × doc_chunk`` scores; per-chunk top-k lists are merged.
    Returns (scores (Q, k'), doc indices (Q, k')) with k' = min(k, number of docs).
    """
    n_docs = docs.size(0)
    k = min(k, n_docs)
    all_scores, all_idx = [], []
    for qs in range(0, queries.size(0), query_chunk):
        q = queries[qs:qs + query_chunk]
        best_s = torch.empty(q.size(0), 0, dtype=torch.float32, device=q.device)
        best_i = torch.empty(q.size(0), 0, dtype=torch.long, device=q.device)
        for ds in range(0, n_docs, doc_chunk):
            s = (q @ docs[ds:ds + doc_chunk].T).float()
            s = torch.nan_to_num(s, nan=-1.0)
            kk = min(k, s.size(1))
            v, i = torch.topk(s, kk, dim=1)
            cat_s = torch.cat([best_s, v], dim=1)
            cat_i = torch.cat([best_i, i + ds], dim=1)
            best_s, pos = torch.topk(cat_s, min(k, cat_s.size(1)), dim=1)
            best_i = torch.gather(cat_i, 1, pos)
        all_scores.append(best_s.cpu())
        all_idx.append(best_i.cpu())
    return torch.cat(all_scores), torch.cat(all_idx)
