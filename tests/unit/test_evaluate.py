"""Evaluators on tiny synthetic sets, checked against an independent computation (plain HF + numpy/scipy)."""

from __future__ import annotations

import json
import sys
import types

import numpy as np
import pytest
import torch
from scipy.stats import pearsonr, spearmanr
from transformers import AutoModel, AutoTokenizer

from codiemb.data.beir import BeirSplit
from codiemb.errors import ConfigError, DataError
from codiemb.evaluate.report import markdown_table
from codiemb.evaluate.retrieval import evaluate_retrieval
from codiemb.evaluate.sts import evaluate_sts
from codiemb.evaluate.suites import evaluate_model
from codiemb.model.encoder import Encoder

@pytest.fixture(scope="module")
def tiny_dir(tiny_model_dir):
    return tiny_model_dir


PAIRS = [
    {"sentence1": "the cat sleeps", "sentence2": "a cat sleeps", "score": 4.8},
    {"sentence1": "the dog runs", "sentence2": "a man reads", "score": 0.4},
    {"sentence1": "the red car", "sentence2": "a blue car", "score": 2.5},
    {"sentence1": "water is good", "sentence2": "fire is bad", "score": 1.0},
    {"sentence1": "the child plays", "sentence2": "a child plays in the house", "score": 3.9},
    {"sentence1": "the sun is big", "sentence2": "the moon is small", "score": 1.0},
]

CORPUS = {
    "d1": "protein cell gene", "d2": "cancer risk study", "d3": "the dog runs in the house",
    "d4": "patients treatment effect", "d5": "water fire sun moon", "d6": "the cat sleeps",
    "q2": "high risk of cancer in patients",  # same id as a query: kept unless ignore_identical_ids
}
QUERIES = {"q1": "gene of the cell", "q2": "cancer risk", "q3": "a dog in a house"}
QRELS = {"q1": {"d1": 2, "d4": 1}, "q2": {"d2": 1, "q2": 2}, "q3": {"d3": 1}}


def _reference_embed(folder, texts):
    """Mean-pooled, L2-normalised embeddings straight from transformers, one text at a time."""
    tok = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModel.from_pretrained(str(folder)).eval()
    out = []
    with torch.no_grad():
        for t in texts:
            enc = tok([t], return_tensors="pt", truncation=True, max_length=128)
            h = model(**enc).last_hidden_state[0]
            v = h.mean(0).numpy().astype(np.float64)
            out.append(v / np.linalg.norm(v))
    return np.stack(out)


def _reference_ndcg(ranking, rels, k):
    gains = np.array([rels.get(d, 0) for d in ranking[:k]], dtype=float)
    disc = 1.0 / np.log2(np.arange(2, 2 + k))
    ideal = np.sort(np.array(list(rels.values()), dtype=float))[::-1][:k]
    return float((gains * disc[: len(gains)]).sum() / (ideal * disc[: len(ideal)]).sum())


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return Encoder.load(str(tiny_dir))


def test_evaluate_sts_matches_reference(tiny, tiny_dir, tmp_path):
    a = _reference_embed(tiny_dir, [p["sentence1"] for p in PAIRS])
    b = _reference_embed(tiny_dir, [p["sentence2"] for p in PAIRS])
    cos = (a * b).sum(1)
    gold = [p["score"] for p in PAIRS]
    path = tmp_path / "sts.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in PAIRS))
    for source in (PAIRS, path):
        res = evaluate_sts(tiny, source, batch_size=4)
        assert res["n"] == len(PAIRS)
        assert res["spearman"] == pytest.approx(100 * spearmanr(cos, gold).statistic, abs=1e-6)
        assert res["pearson"] == pytest.approx(100 * pearsonr(cos, gold).statistic, abs=1e-3)


def test_evaluate_sts_bad_row_is_data_error(tiny, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(PAIRS[0]) + "\n" + json.dumps({"sentence1": "x", "sentence2": "y"}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:2: field 'score'"):
        evaluate_sts(tiny, path)


@pytest.mark.parametrize("ignore_identical", [False, True])
def test_evaluate_retrieval_matches_reference(tiny, tiny_dir, ignore_identical):
    split = BeirSplit(corpus=CORPUS, queries=QUERIES, qrels=QRELS, doc_ids=list(CORPUS))
    doc_ids = list(CORPUS)
    d = _reference_embed(tiny_dir, [CORPUS[i] for i in doc_ids])
    q = _reference_embed(tiny_dir, [QUERIES[i] for i in QRELS])
    scores = q @ d.T
    ndcg3, mrr3, rec2 = [], [], []
    for qi, qid in enumerate(QRELS):
        ranking = [doc_ids[j] for j in np.argsort(-scores[qi], kind="stable")]
        if ignore_identical:
            ranking = [x for x in ranking if x != qid]
        rels = QRELS[qid]
        ndcg3.append(_reference_ndcg(ranking, rels, 3))
        first = next((r for r, x in enumerate(ranking[:3], 1) if x in rels), None)
        mrr3.append(1 / first if first else 0.0)
        rec2.append(len(set(ranking[:2]) & set(rels)) / len(rels))
    res = evaluate_retrieval(tiny, split, batch_size=2, k_values=(2, 3), ignore_identical_ids=ignore_identical)
    assert res["n_queries"] == 3 and res["n_docs"] == len(CORPUS)
    assert res["ndcg@3"] == pytest.approx(100 * np.mean(ndcg3), abs=1e-6)
    assert res["mrr@3"] == pytest.approx(100 * np.mean(mrr3), abs=1e-6)
    assert res["recall@2"] == pytest.approx(100 * np.mean(rec2), abs=1e-6)


def _write_data(root):
    (root / "sts" / "stsb").mkdir(parents=True)
    for name in ("dev", "test"):
        (root / "sts" / "stsb" / f"{name}.jsonl").write_text("".join(json.dumps(p) + "\n" for p in PAIRS))
    ir = root / "ir" / "scifact"
    (ir / "qrels").mkdir(parents=True)
    (ir / "corpus.jsonl").write_text("".join(json.dumps({"_id": k, "title": "", "text": v}) + "\n"
                                             for k, v in CORPUS.items()))
    (ir / "queries.jsonl").write_text("".join(json.dumps({"_id": k, "text": v}) + "\n" for k, v in QUERIES.items()))
    lines = ["query-id\tcorpus-id\tscore"] + [f"{q}\t{d}\t{s}" for q, ds in QRELS.items() for d, s in ds.items()]
    (ir / "qrels" / "dev.tsv").write_text("\n".join(lines) + "\n")


def test_evaluate_model_dev_suite_shape_and_report(tiny, tiny_dir, tmp_path):
    _write_data(tmp_path)
    res = evaluate_model(str(tiny_dir), suite="dev", data_dir=tmp_path, batch_size=4, show_progress=False)
    json.dumps(res)  # JSON-serialisable
    assert res["suite"] == "dev" and res["model"] == str(tiny_dir)
    assert set(res["results"]) == {"stsb", "scifact"}
    assert res["results"]["stsb"]["split"] == "dev" and res["results"]["scifact"]["split"] == "dev"
    direct = evaluate_sts(tiny, PAIRS)["spearman"]
    assert res["summary"]["stsb_spearman"] == pytest.approx(direct, abs=1e-6)
    s = res["summary"]
    assert s["mean"] == pytest.approx((s["stsb_spearman"] + s["scifact_ndcg@10"]) / 2)
    assert res["max_length"] == {"sts": 128, "query": 128, "passage": 128}
    table = markdown_table(res)
    assert f"| stsb | dev | spearman | {s['stsb_spearman']:.2f} | 6 |" in table
    assert f"| scifact | dev | ndcg@10 | {s['scifact_ndcg@10']:.2f} | 3 |" in table
    both = markdown_table([res, res])
    assert both.count(f"| {res['model']} | dev | ") == 2


def test_evaluate_model_max_length_changes_scores(tiny, tmp_path):
    _write_data(tmp_path)
    full = evaluate_model(tiny, suite="stsb", data_dir=tmp_path, show_progress=False)
    short = evaluate_model(tiny, suite="stsb", data_dir=tmp_path, show_progress=False, max_length={"sts": 3})
    assert short["max_length"]["sts"] == 3
    assert short["results"]["stsb"]["spearman"] != pytest.approx(full["results"]["stsb"]["spearman"])


def test_evaluate_model_errors(tiny, tmp_path):
    with pytest.raises(ConfigError, match="unknown evaluation suite"):
        evaluate_model(tiny, suite="nope", data_dir=tmp_path)
    with pytest.raises(ConfigError, match="max_length"):
        evaluate_model(tiny, suite="stsb", data_dir=tmp_path, max_length={"doc": 3})
    with pytest.raises(DataError, match="not found"):
        evaluate_model(tiny, suite="scifact", data_dir=tmp_path, show_progress=False)


def test_registry_uri_goes_through_the_registry_hook(tiny_dir, tmp_path, monkeypatch):
    _write_data(tmp_path)
    calls = []
    fake = types.ModuleType("codiemb.tracking.registry")
    fake.resolve_model_uri = lambda uri: calls.append(uri) or str(tiny_dir)
    monkeypatch.setitem(sys.modules, "codiemb.tracking.registry", fake)
    res = evaluate_model("models:/codiemb@champion", suite="stsb-dev", data_dir=tmp_path, show_progress=False)
    assert calls == ["models:/codiemb@champion"]
    assert res["model"] == "models:/codiemb@champion"
    assert res["summary"]["stsb_spearman"] == pytest.approx(
        evaluate_sts(Encoder.load(str(tiny_dir)), PAIRS)["spearman"], abs=1e-6)


def test_streamed_corpus_equals_in_memory_corpus(tiny, tmp_path):
    """load_beir(corpus=False) streams corpus.jsonl in chunks; the scores are those of the in-memory split,
    for every chunk size, index backend and storage (float16: within rounding)."""
    from codiemb.data.beir import iter_corpus, load_beir

    _write_data(tmp_path)
    folder = tmp_path / "ir" / "scifact"
    in_memory = load_beir(folder, "dev")
    streamed = load_beir(folder, "dev", corpus=False)
    assert streamed.corpus == {} and streamed.streamed and in_memory.corpus == CORPUS
    assert [c for c in iter_corpus(folder / "corpus.jsonl", chunk_size=3)] == [
        (["d1", "d2", "d3"], [CORPUS[d] for d in ("d1", "d2", "d3")]),
        (["d4", "d5", "d6"], [CORPUS[d] for d in ("d4", "d5", "d6")]),
        (["q2"], [CORPUS["q2"]])]
    ref = evaluate_retrieval(tiny, in_memory, k_values=(2, 3))
    for chunk in (1, 2, 100):
        for index in ("faiss", "torch"):
            got = evaluate_retrieval(tiny, streamed, k_values=(2, 3), chunk_size=chunk, index=index)
            assert {k: v for k, v in got.items() if k != "seconds"} == {k: v for k, v in ref.items() if k != "seconds"}
    half = evaluate_retrieval(tiny, streamed, k_values=(2, 3), storage="float16")
    assert half["ndcg@3"] == pytest.approx(ref["ndcg@3"], abs=1.0)


def test_streamed_corpus_bad_rows_are_data_errors(tiny, tmp_path):
    from codiemb.data.beir import load_beir

    _write_data(tmp_path)
    folder = tmp_path / "ir" / "scifact"
    corpus = folder / "corpus.jsonl"
    good = corpus.read_text()
    corpus.write_text(good + '{"title": "no id", "text": "x"}\n')
    with pytest.raises(DataError, match=r"corpus.jsonl:8: a corpus row needs an '_id'"):
        evaluate_retrieval(tiny, load_beir(folder, "dev", corpus=False))
    corpus.write_text(good + "\n" + json.dumps({"_id": "d3", "text": "again"}) + "\n")
    with pytest.raises(DataError, match=r"duplicate document id\(s\) 'd3'"):
        evaluate_retrieval(tiny, load_beir(folder, "dev", corpus=False))
    corpus.write_bytes(good.encode() + b'{"_id": "x", "text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"corpus.jsonl:8: line is not valid UTF-8"):
        evaluate_retrieval(tiny, load_beir(folder, "dev", corpus=False))
