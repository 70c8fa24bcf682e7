"""Silver pairs (codiemb.data.augment, `codiemb data augment`) with the tiny BERT as model and teacher:
the partners are the anchors' BM25 / nearest neighbours (checked against a direct computation),
pairs are unique and never labelled or excluded, the scores are the teacher's cosines mapped as
documented, the file reads back through the STS reader, and bad input is one clear error."""

from __future__ import annotations

import json
import math
import random
import re
from collections import Counter

import numpy as np
import pytest

from codiemb import cli
from codiemb.data.augment import Pool, candidate_pairs, map_scores, pair_key, read_pool
from codiemb.data.hashing import text_hash
from codiemb.data.local import read_records
from codiemb.errors import DataError, UserError
from codiemb.model.encoder import Encoder

WORDS = ("cat dog man woman child car house tree water fire sun moon red blue green big small good bad "
         "runs walks eats plays sleeps reads writes sees hears likes").split()


def _sentences(n: int = 40, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 7))) for _ in range(n)]


def _pool(texts) -> Pool:
    return Pool(texts=list(texts), hashes=[text_hash(t) for t in texts], rows=len(texts))


def _bm25_reference(texts: list[str], a: int, k1: float = 1.2, b: float = 0.75) -> dict[int, float]:
    """Okapi BM25 of every other text for query ``texts[a]``, written out term by term."""
    docs = [re.findall(r"\w+", t.lower()) for t in texts]
    n, avgdl = len(docs), sum(map(len, docs)) / len(docs)
    out = {}
    for j, d in enumerate(docs):
        if j == a:
            continue
        tf, s = Counter(d), 0.0
        for term in set(docs[a]):
            df = sum(term in x for x in docs)
            if tf[term]:
                idf = math.log(1 + (n - df + 0.5) / (df + 0.5))
                s += idf * tf[term] * (k1 + 1) / (tf[term] + k1 * (1 - b + b * len(d) / avgdl))
        out[j] = s
    return out


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def test_bm25_partners_are_the_anchors_top_lexical_neighbours():
    texts = _sentences()
    cand = candidate_pairs(_pool(texts), samplers=["bm25"], k=3)
    by_anchor: dict[int, list[int]] = {}
    for (a, b), s in zip(cand.pairs, cand.samplers):
        assert s == "bm25" and a != b
        by_anchor.setdefault(a, []).append(b)
    assert len(by_anchor) > len(texts) // 2
    for a, partners in by_anchor.items():
        ref = _bm25_reference(texts, a)
        best = sorted(ref.values(), reverse=True)[:3]
        # every partner scores among the anchor's top 3 (a random partner would not: checked below)
        assert all(ref[p] >= best[-1] - 1e-9 for p in partners), (a, partners)
    rng = random.Random(1)
    misses = 0
    for a in by_anchor:
        ref = _bm25_reference(texts, a)
        cut = sorted(ref.values(), reverse=True)[2]
        misses += ref[rng.choice([j for j in range(len(texts)) if j != a])] < cut - 1e-9
    assert misses > len(by_anchor) // 2  # the check above would catch random partners


def test_nn_partners_are_the_models_nearest_neighbours(tiny_model_dir):
    enc = Encoder.load(str(tiny_model_dir))
    texts = _sentences(30, seed=2)
    cand = candidate_pairs(_pool(texts), samplers=["nn"], k=2, anchors=10, seed=0, encoder=enc, index="torch")
    emb = enc.encode(texts, normalize=True).numpy()
    sims = emb @ emb.T
    np.fill_diagonal(sims, -np.inf)
    assert cand.stats["anchors"] == 10 and cand.pairs
    for a, b in cand.pairs:
        assert sims[a, b] >= np.sort(sims[a])[-2] - 1e-5, (a, b)
    # faiss gives the same partners
    assert candidate_pairs(_pool(texts), samplers=["nn"], k=2, anchors=10, seed=0, encoder=enc,
                           index="faiss").pairs == cand.pairs


def test_no_duplicate_no_labelled_no_excluded_pair(tmp_path):
    texts = _sentences()
    free = candidate_pairs(_pool(texts), samplers=["bm25", "random"], k=3, seed=0)
    # BM25 finds pairs both ways (a's neighbour b, b's neighbour a): each is kept once
    assert free.stats["duplicates"] > 0
    keys = [pair_key(texts[a], texts[b]) for a, b in free.pairs]
    assert len(keys) == len(set(keys))
    labelled = [free.pairs[i] for i in range(0, len(free.pairs), 4)]
    # the labelled file has them in the other order: a pair is unordered
    lab = _write(tmp_path / "gold.jsonl", [{"sentence1": texts[b], "sentence2": texts[a], "score": 3.0}
                                            for a, b in labelled])
    banned = texts[free.pairs[1][1]]
    exc = _write(tmp_path / "dev.jsonl", [{"sentence1": banned, "sentence2": "some other dev text", "score": 1}])
    src = tmp_path / "texts.jsonl"
    _write(src, [json.dumps(t) for t in texts] + [{"text": texts[0]}])  # a duplicate text: counted once
    pool = read_pool([str(src)])
    assert pool.texts == texts and pool.rows == len(texts) + 1
    from codiemb.data.augment import labelled_pairs, text_keys

    cand = candidate_pairs(pool, samplers=["bm25", "random"], k=3, seed=0, labelled=labelled_pairs([str(lab)]),
                           exclude=text_keys([str(exc)]))
    got = {pair_key(texts[a], texts[b]) for a, b in cand.pairs}
    assert len(got) == len(cand.pairs)
    assert not got & {pair_key(texts[a], texts[b]) for a, b in labelled}
    assert all(banned not in (texts[a], texts[b]) for a, b in cand.pairs)
    assert cand.stats["labelled"] == len(labelled) and cand.stats["excluded"] > 0
    assert cand.stats["pairs"] == free.stats["pairs"] - len(labelled) - cand.stats["excluded"]
    assert set(cand.pairs) <= set(free.pairs)


def test_written_scores_are_the_teachers_cosine_mapped_and_load_as_sts(tmp_path, tiny_model_dir, capsys):
    texts = _sentences(24, seed=3)
    src = _write(tmp_path / "texts.jsonl", [{"text": t} for t in texts])
    out = tmp_path / "silver.jsonl"
    rc = cli.main(["data", "augment", str(src), "--out", str(out), "--teacher", str(tiny_model_dir),
                   "--samplers", "bm25,nn", "--model", str(tiny_model_dir), "--k", "2", "--local",
                   "--max-pairs", "30"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert summary["pairs"] == len(rows) == 30 and summary["teacher"] == str(tiny_model_dir)
    assert {r["sampler"] for r in rows} == {"bm25", "nn"}
    teacher = Encoder.load(str(tiny_model_dir))
    a = teacher.encode([r["sentence1"] for r in rows], normalize=True, max_length=128)
    b = teacher.encode([r["sentence2"] for r in rows], normalize=True, max_length=128)
    cos = (a * b).sum(-1).numpy()
    np.testing.assert_allclose([r["teacher_score"] for r in rows], cos, atol=1e-5)
    np.testing.assert_allclose([r["score"] for r in rows], 5.0 * np.clip(cos, 0.0, 1.0), atol=5e-5)
    got = read_records(str(out), "sts", score_range=(0, 5))  # the trainer's reader
    assert got.counts == {"read": 30, "valid": 30, "quarantined": 0}
    assert [(r["sentence1"], r["sentence2"]) for r in got.records] == [(r["sentence1"], r["sentence2"]) for r in rows]


def test_mappings_on_small_arrays():
    t = np.array([-0.5, 0.0, 0.3, 1.0, 1.2])
    np.testing.assert_allclose(map_scores(t, "clip"), [0.0, 0.0, 1.5, 5.0, 5.0])
    np.testing.assert_allclose(map_scores(t, "linear"), [1.25, 2.5, 3.25, 5.0, 5.0])
    np.testing.assert_allclose(map_scores(np.array([0.2, 0.9]), "linear", teacher_range=(0, 1),
                                          score_range=(1, 3)), [1.4, 2.8])
    np.testing.assert_allclose(map_scores(np.array([0.0, 4.5]), "raw"), [0.0, 4.5])
    with pytest.raises(UserError, match=r"teacher score 1.2 \(pair 4\) is outside"):
        map_scores(t, "raw", score_range=(-1, 1))
    with pytest.raises(UserError, match="choose from"):
        map_scores(t, "sigmoid")


def test_bad_input_is_one_error_with_file_and_line(tmp_path, tiny_model_dir, capsys):
    bad = _write(tmp_path / "texts.jsonl", [{"text": "a cat"}, {"text": "a dog"}, {"sentence1": "x"}])
    with pytest.raises(DataError, match=r"texts.jsonl:3: missing field 'sentence2'"):
        read_pool([str(bad)])
    _write(bad, [{"text": "a cat"}, '{"text": ""}'])
    with pytest.raises(DataError, match=r"texts.jsonl:2: field 'text' is empty"):
        read_pool([str(bad)])
    _write(bad, [{"text": "a cat"}, {"query": "q"}])
    rc = cli.main(["data", "augment", str(bad), "--out", str(tmp_path / "o.jsonl"), "--teacher",
                   str(tiny_model_dir), "--local"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].endswith("texts.jsonl:2: row has no 'text' field nor "
                                                         "'sentence1'/'sentence2' fields")
    _write(bad, [{"text": "a cat"}, "[1, 2]"])
    with pytest.raises(DataError, match=r":2: row must be a JSON object, got list"):
        read_pool([str(bad)])
    _write(bad, [{"text": t} for t in ("a", "b", "c")])
    with pytest.raises(DataError, match="more than --max-texts 2"):
        read_pool([str(bad)], max_texts=2)
    with pytest.raises(UserError, match="unknown bm26"):
        candidate_pairs(_pool(["a b", "b c"]), samplers=["bm26"])
    assert not (tmp_path / "o.jsonl").exists()


def test_the_benchmarks_silver_arm_is_a_valid_config(load_benchmark, tmp_path):
    from codiemb.config import load_config

    bench = load_benchmark("silver_pairs")
    args = bench.argparse.Namespace(out=str(tmp_path), steps=7, silver=str(tmp_path / "s.jsonl"))
    for arm, names in (("baseline", ["stsb"]), ("silver", ["stsb", "silver"])):
        cmd = bench.train_cmd(args, arm)
        sets = [cmd[i + 1] for i, c in enumerate(cmd) if c == "--set"]
        cfg = load_config(bench.REPO / bench.CONFIG, sets)
        assert [d.name for d in cfg.data.datasets] == names and cfg.train.max_steps == 7
        assert all(d.task == "sts" and tuple(d.score_range) == (0, 5) for d in cfg.data.datasets)


def test_the_ray_actor_class_scores_a_pyarrow_batch_like_the_local_path(tiny_model_dir):
    """What map_batches hands each actor (a pyarrow batch) and gets back; the cluster run itself is
    tests/integration/test_augment_ray.py."""
    import pyarrow as pa

    from codiemb.data.augment import PairScorer, score_pairs

    s1, s2 = ["the cat runs", "a dog eats", "the sun"], ["a cat walks", "the moon", "a big red car"]
    out = PairScorer(str(tiny_model_dir))(pa.table({"i": [7, 3, 5], "sentence1": s1, "sentence2": s2}))
    assert out.column("i").to_pylist() == [7, 3, 5]
    np.testing.assert_allclose(out.column("teacher_score").to_numpy(), score_pairs(str(tiny_model_dir), s1, s2),
                               atol=1e-6)
