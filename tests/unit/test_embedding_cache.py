"""The corpus-embedding cache: a hit for an unchanged model + corpus (same scores, no documents
embedded), a miss when the weights, the corpus file or the max length change; dev and test of one
BEIR folder share one embedding of the corpus."""

from __future__ import annotations

import json
import os

import pytest
import torch

from codiemb.data.beir import load_beir
from codiemb.evaluate.cache import EmbeddingCache, model_fingerprint
from codiemb.evaluate.retrieval import evaluate_retrieval
from codiemb.evaluate.suites import evaluate_model
from codiemb.model.encoder import Encoder

CORPUS = {"d1": "protein cell gene", "d2": "cancer risk study", "d3": "the dog runs in the house",
          "d4": "patients treatment effect", "d5": "water fire sun moon", "d6": "the cat sleeps"}
QUERIES = {"q1": "gene of the cell", "q2": "cancer risk", "q3": "a dog in a house"}
DEV = {"q1": {"d1": 1}, "q2": {"d2": 1}}
TEST = {"q3": {"d3": 1}, "q1": {"d4": 1}}
PAIRS = [{"sentence1": f"s{i} a", "sentence2": f"s{i} b c", "score": float(i % 5)} for i in range(6)]


def _write(root):
    ir = root / "ir" / "scifact"
    (ir / "qrels").mkdir(parents=True)
    (ir / "corpus.jsonl").write_text("".join(json.dumps({"_id": k, "title": "", "text": v}) + "\n"
                                             for k, v in CORPUS.items()))
    (ir / "queries.jsonl").write_text("".join(json.dumps({"_id": k, "text": v}) + "\n" for k, v in QUERIES.items()))
    for split, qrels in (("dev", DEV), ("test", TEST)):
        lines = ["query-id\tcorpus-id\tscore"] + [f"{q}\t{d}\t{s}" for q, ds in qrels.items() for d, s in ds.items()]
        (ir / "qrels" / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    (root / "sts" / "stsb").mkdir(parents=True)
    for split in ("dev", "test"):
        (root / "sts" / "stsb" / f"{split}.jsonl").write_text("".join(json.dumps(p) + "\n" for p in PAIRS))
    return ir


class Counting(Encoder):
    """Counts the texts it embeds (to see whether the corpus was embedded again)."""

    texts = 0

    def encode(self, texts, **kw):
        type(self).texts += len(texts)
        return super().encode(texts, **kw)


@pytest.fixture()
def enc(tiny_model_dir):
    e = Encoder.load(str(tiny_model_dir))
    e.__class__ = Counting
    Counting.texts = 0
    return e


def _scores(res):
    return {k: v for k, v in res.items() if k != "seconds"}


def test_hit_on_unchanged_model_and_corpus(enc, tmp_path):
    folder = _write(tmp_path / "data")
    cache = EmbeddingCache(tmp_path / "cache")
    split = load_beir(folder, "dev", corpus=False)
    fresh = evaluate_retrieval(enc, split, k_values=(2, 3))
    first = evaluate_retrieval(enc, split, k_values=(2, 3), cache=cache)
    assert (cache.hits, cache.misses) == (0, 1)
    before = Counting.texts
    again = evaluate_retrieval(enc, split, k_values=(2, 3), cache=cache, chunk_size=4)
    assert (cache.hits, cache.misses) == (1, 1)
    assert Counting.texts - before == len(DEV)  # only the queries were embedded
    assert _scores(again) == _scores(first) == _scores(fresh)
    # a reloaded copy of the same weights is the same key
    assert EmbeddingCache(tmp_path / "cache").has(cache.key(Encoder.load(enc.name_or_path), split.corpus_path, 128)[0])


def test_miss_when_weights_corpus_or_length_change(enc, tmp_path):
    folder = _write(tmp_path / "data")
    cache = EmbeddingCache(tmp_path / "cache")
    split = load_beir(folder, "dev", corpus=False)
    evaluate_retrieval(enc, split, cache=cache)
    key = cache.key(enc, split.corpus_path, None)[0]
    assert cache.has(key)

    assert not cache.has(cache.key(enc, split.corpus_path, 16)[0])  # another max length
    other = Encoder.load(enc.name_or_path)
    with torch.no_grad():
        next(other.parameters()).add_(1e-3)
    assert model_fingerprint(other) != model_fingerprint(enc)
    assert not cache.has(cache.key(other, split.corpus_path, None)[0])

    corpus = split.corpus_path
    corpus.write_text(corpus.read_text() + json.dumps({"_id": "d7", "title": "", "text": "new doc"}) + "\n")
    st = corpus.stat()
    os.utime(corpus, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert not cache.has(cache.key(enc, corpus, None)[0])
    res = evaluate_retrieval(enc, load_beir(folder, "dev", corpus=False), cache=cache)
    assert res["n_docs"] == len(CORPUS) + 1 and cache.misses == 2


def test_dev_and_test_share_the_corpus_embedding(enc, tmp_path):
    _write(tmp_path / "data")
    cache_dir = tmp_path / "cache"
    evaluate_model(enc, suite="scifact-dev", data_dir=tmp_path / "data", show_progress=False, cache_dir=cache_dir)
    before = Counting.texts
    res = evaluate_model(enc, suite="scifact", data_dir=tmp_path / "data", show_progress=False, cache_dir=cache_dir)
    assert Counting.texts - before == len(TEST)  # the test queries only: the corpus came from the cache
    plain = evaluate_model(enc, suite="scifact", data_dir=tmp_path / "data", show_progress=False)
    assert res["summary"] == plain["summary"]
    assert len([p for p in cache_dir.iterdir() if not p.name.startswith(".")]) == 1


def test_progress_counts_every_text(enc, tmp_path):
    from tqdm import tqdm

    _write(tmp_path / "data")
    bar = tqdm(disable=True)
    bar.total = None
    moved = []
    bar.update = lambda n=1: moved.append(n)
    evaluate_model(enc, suite="dev", data_dir=tmp_path / "data", show_progress=False, progress=bar)
    sentences = len({s for p in PAIRS for s in (p["sentence1"], p["sentence2"])})
    assert bar.total == sum(moved) == sentences + len(DEV) + len(CORPUS)


def test_an_interrupted_write_leaves_no_entry(enc, tmp_path):
    folder = _write(tmp_path / "data")
    cache = EmbeddingCache(tmp_path / "cache")
    split = load_beir(folder, "dev", corpus=False)
    key, parts = cache.key(enc, split.corpus_path, None)

    def broken():
        yield ["d1"], torch.zeros(1, enc.dim)
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        list(cache.write_through(key, parts, broken()))
    assert not cache.has(key) and list((tmp_path / "cache").iterdir()) == []
