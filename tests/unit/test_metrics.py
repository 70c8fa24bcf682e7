"""Metrics against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch
from scipy.stats import pearsonr, spearmanr

from codiemb.evaluate.metrics import exact_topk, mrr_at_k, ndcg_at_k, pearson, recall_at_k, spearman


def test_spearman_with_ties_matches_hand_computation():
    # pred ranks (ties averaged): [1, 2.5, 2.5, 4]; gold ranks: [1, 3, 2, 4]
    # deviations from 2.5: dx = [-1.5, 0, 0, 1.5], dy = [-1.5, 0.5, -0.5, 1.5]
    # rho = 4.5 / sqrt(4.5 * 5) = 0.9486832980505138
    pred, gold = [0.1, 0.5, 0.5, 0.9], [1.0, 3.0, 2.0, 4.0]
    assert spearman(pred, gold) == pytest.approx(0.9486832980505138, abs=1e-12)
    assert spearman(pred, gold) == pytest.approx(spearmanr(pred, gold).statistic, abs=1e-12)


def test_spearman_ties_on_both_sides_and_reversal():
    pred = [3.0, 1.0, 1.0, 2.0, 5.0, 5.0]
    gold = [2.0, 2.0, 1.0, 3.0, 4.0, 4.0]
    assert spearman(pred, gold) == pytest.approx(spearmanr(pred, gold).statistic, abs=1e-12)
    assert spearman([1, 2, 3], [30, 20, 10]) == pytest.approx(-1.0)


def test_pearson_hand_value():
    # x = [1,2,3], y = [1,2,5]: dx = [-1,0,1], dy = [-5/3,-2/3,7/3]; r = 4 / sqrt(2 * 26/3)
    assert pearson([1, 2, 3], [1, 2, 5]) == pytest.approx(4 / math.sqrt(2 * 26 / 3), abs=1e-12)
    assert pearson([1, 2, 3], [1, 2, 5]) == pytest.approx(pearsonr([1, 2, 3], [1, 2, 5]).statistic)


def test_pearson_rejects_mismatched_lengths():
    with pytest.raises(ValueError):
        pearson([1, 2], [1, 2, 3])


QRELS = {"a": 2, "b": 1, "c": 2, "z": 1, "n": 0}  # z is never retrieved; n has grade 0 (not relevant)
RANKED = ["x", "a", "y", "b", "c", "n", "p", "q", "r", "s", "t", "z"]


def test_ndcg_at_10_graded_hand_computation():
    # DCG@10 = 2/log2(3) + 1/log2(5) + 2/log2(6)  (a at rank 2, b at 4, c at 5; z is at rank 12)
    # IDCG@10 = 2/log2(2) + 2/log2(3) + 1/log2(4) + 1/log2(5)  (grades 2, 2, 1, 1)
    assert ndcg_at_k(RANKED, QRELS, 10) == pytest.approx(2.4662416796853917 / 4.192536065216308, abs=1e-12)
    assert ndcg_at_k(RANKED, QRELS, 10) == pytest.approx(0.5882457875906547, abs=1e-12)


def test_ndcg_cutoff_uses_top_k_of_ideal():
    # top 3 = x, a, y: DCG = 2/log2(3); IDCG@3 = 2 + 2/log2(3) + 1/log2(4)
    assert ndcg_at_k(RANKED, QRELS, 3) == pytest.approx(0.3354350434265105, abs=1e-12)
    assert ndcg_at_k(["a", "c", "b", "z"], QRELS, 10) == pytest.approx(1.0)
    assert ndcg_at_k(RANKED, {"n": 0}, 10) == 0.0


def test_mrr_and_recall():
    assert mrr_at_k(RANKED, QRELS, 10) == 0.5  # first relevant (a) at rank 2
    assert mrr_at_k(RANKED, QRELS, 1) == 0.0
    assert mrr_at_k(["n", "x", "p", "c"], QRELS, 10) == 0.25  # grade 0 does not count
    assert recall_at_k(RANKED, QRELS, 5) == 3 / 4  # a, b, c of a, b, c, z
    assert recall_at_k(RANKED, QRELS, 2) == 1 / 4
    assert recall_at_k(RANKED, QRELS, 100) == 1.0


def test_exact_topk_chunked_equals_full_sort():
    g = torch.Generator().manual_seed(0)
    q, d = torch.randn(7, 5, generator=g), torch.randn(23, 5, generator=g)
    scores, idx = exact_topk(q, d, 6, query_chunk=3, doc_chunk=4)
    full = q @ d.T
    ref_s, ref_i = torch.sort(full, dim=1, descending=True)
    assert torch.equal(idx, ref_i[:, :6])
    assert torch.allclose(scores, ref_s[:, :6])
    s_all, _ = exact_topk(q, d, 100)  # k larger than the corpus
    assert s_all.shape == (7, 23)


def test_retrieval_metrics_pytrec_eval_equals_the_per_query_definitions():
    """pytrec_eval (what evaluate_retrieval reports) and our plain-Python definitions agree, ties included."""
    import random

    from codiemb.evaluate.metrics import retrieval_metrics

    rng = random.Random(0)
    docs = [f"d{i}" for i in range(40)]
    qrels, run = {}, {}
    for q in range(25):
        qrels[f"q{q}"] = {d: rng.randint(1, 3) for d in rng.sample(docs, rng.randint(1, 5))}
        # scores on a coarse grid: many ties, broken by doc id descending
        run[f"q{q}"] = [(d, rng.randint(0, 8) / 8) for d in rng.sample(docs, 30)]
    qrels["q_unranked"] = {"d1": 1}  # in the qrels, not in the run: scores 0, still averaged
    qrels["q0"] = {**qrels["q0"], "d39": 0}  # grade 0 is not relevant
    qrels["q_none"] = {"d2": 0}  # no relevant document: 0, still averaged
    run["q_none"] = [("d2", 1.0)]
    got = retrieval_metrics(run, qrels, (1, 5, 10))
    for k in (1, 5, 10):
        ndcg = mrr = rec = 0.0
        for q, rels in qrels.items():
            ranked = sorted(run.get(q, []), key=lambda c: c[0], reverse=True)
            ranked.sort(key=lambda c: c[1], reverse=True)
            ids = [d for d, _ in ranked]
            ndcg += ndcg_at_k(ids, rels, k)
            mrr += mrr_at_k(ids, rels, k)
            rec += recall_at_k(ids, rels, k)
        n = len(qrels)
        assert got[f"ndcg@{k}"] == pytest.approx(100 * ndcg / n, abs=1e-9)
        assert got[f"mrr@{k}"] == pytest.approx(100 * mrr / n, abs=1e-9)
        assert got[f"recall@{k}"] == pytest.approx(100 * rec / n, abs=1e-9)
