"""Embedding geometry (evaluate/geometry.py): known answers, numpy cross-checks, samples, CLI, MLflow logging."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from codiemb.errors import DataError
from codiemb.evaluate import geometry as g


def _unit(x):
    x = np.asarray(x, dtype=np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


# --------------------------------------------------------------------------- known answers
def test_identical_embeddings_have_anisotropy_one_and_rank_one():
    x = np.tile([[0.3, -1.2, 2.0, 0.5]], (7, 1))
    assert g.anisotropy(x) == pytest.approx(1.0, abs=1e-12)
    assert g.effective_rank(x) == pytest.approx(1.0, abs=1e-6)
    assert g.svd_entropy(x) == pytest.approx(0.0, abs=1e-6)
    assert g.uniformity(x) == pytest.approx(0.0, abs=1e-12)  # every distance 0: log E exp(0)


def test_orthonormal_rows_have_effective_rank_n_and_anisotropy_zero():
    q, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(16, 16)))
    x = q[:5] * 3.0  # scale does not matter: rows are normalised
    assert g.effective_rank(x) == pytest.approx(5.0, rel=1e-9)
    assert g.svd_entropy(x) == pytest.approx(math.log(5), rel=1e-9)
    assert g.anisotropy(x) == pytest.approx(0.0, abs=1e-12)
    # orthonormal pairs are sqrt(2) apart: uniformity = -t * 2 exactly
    assert g.uniformity(x, t=2.0) == pytest.approx(-4.0, rel=1e-9)


def test_antipodal_pair_has_anisotropy_minus_one_and_alignment_four():
    x = np.array([[1.0, 2.0, 0.0]])
    pair = np.vstack([x, -x])
    assert g.anisotropy(pair) == pytest.approx(-1.0)
    assert g.alignment(x, -x) == pytest.approx(4.0)  # ||a - (-a)||^2 = 4 on the unit sphere
    assert g.alignment(x, 5 * x) == pytest.approx(0.0)


# --------------------------------------------------------------------------- against a direct numpy computation
@pytest.fixture
def cloud():
    rng = np.random.default_rng(3)
    return rng.normal(size=(23, 6)) + np.array([2.0, 0, 0, 0, 0, 0])  # anisotropic on purpose


def test_anisotropy_equals_the_mean_over_all_distinct_pairs(cloud):
    x = _unit(cloud)
    cos = x @ x.T
    n = len(x)
    expected = (cos.sum() - np.trace(cos)) / (n * (n - 1))
    assert g.anisotropy(cloud) == pytest.approx(expected, rel=1e-12)
    assert 0.3 < expected < 1.0  # the shifted cloud is anisotropic


def test_effective_rank_matches_numpy_svd(cloud):
    s = np.linalg.svd(_unit(cloud), compute_uv=False)
    p = s / s.sum()
    h = -(p * np.log(p)).sum()
    assert g.svd_entropy(cloud) == pytest.approx(h, rel=1e-10)
    assert g.effective_rank(cloud) == pytest.approx(np.exp(h), rel=1e-10)
    assert 1.0 < g.effective_rank(cloud) < 6.0


def test_uniformity_matches_numpy(cloud):
    x = _unit(cloud)
    n = len(x)
    terms = [np.exp(-2.0 * np.sum((x[i] - x[j]) ** 2)) for i in range(n) for j in range(i + 1, n)]
    assert g.uniformity(cloud, t=2.0) == pytest.approx(np.log(np.mean(terms)), rel=1e-10)


def test_alignment_matches_numpy(cloud):
    a, b = cloud[:11], cloud[11:22] + 0.1
    expected = np.mean(np.sum((_unit(a) - _unit(b)) ** 2, axis=1))
    assert g.alignment(a, b) == pytest.approx(expected, rel=1e-12)
    assert g.alignment(a, b, alpha=1.0) == pytest.approx(np.mean(np.linalg.norm(_unit(a) - _unit(b), axis=1)))
    with pytest.raises(ValueError, match="paired rows"):
        g.alignment(a, b[:5])


def test_histogram_counts_every_value_in_fixed_bins():
    counts = g.histogram([-1.0, -0.99, 0.0, 0.01, 1.0, 1.0000001], bins=4)
    assert counts == [2, 0, 2, 2]  # [-1,-.5) [-.5,0) [0,.5) [.5,1]; 1.0000001 clipped into the last
    assert sum(g.histogram(np.linspace(-1, 1, 101))) == 101


def test_matrix_shape_errors():
    with pytest.raises(ValueError, match="n >= 2"):
        g.anisotropy(np.ones((1, 4)))


# --------------------------------------------------------------------------- samples
def test_derangement_has_no_fixed_point_and_is_seeded():
    for n in (2, 3, 10, 101):
        p = g.derangement(n, np.random.default_rng(n))
        assert sorted(p.tolist()) == list(range(n))
        assert not np.any(p == np.arange(n))
    a = g.derangement(50, np.random.default_rng(7))
    assert np.array_equal(a, g.derangement(50, np.random.default_rng(7)))
    assert not np.array_equal(a, g.derangement(50, np.random.default_rng(8)))


def _write_data(root, n_sts=30, n_q=12):
    rng = np.random.default_rng(0)
    words = "cat dog man woman car house tree water sun moon red blue green big small protein cell gene".split()
    sts = root / "sts" / "stsb"
    sts.mkdir(parents=True)
    rows = [{"sentence1": " ".join(rng.choice(words, 5)) + f" {i}", "sentence2": " ".join(rng.choice(words, 6)),
             "score": float(i % 6)} for i in range(n_sts)]  # 0..5, a third of them >= 4
    (sts / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (sts / "dev.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:10]))
    ir = root / "ir" / "scifact"
    (ir / "qrels").mkdir(parents=True)
    docs = [{"_id": f"d{i}", "title": f"title {i}", "text": " ".join(rng.choice(words, 12))} for i in range(3 * n_q)]
    (ir / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (ir / "queries.jsonl").write_text("".join(json.dumps({"_id": f"q{i}", "text": " ".join(rng.choice(words, 4))}) + "\n"
                                              for i in range(n_q)))
    lines = ["query-id\tcorpus-id\tscore"] + [f"q{i}\td{2 * i}\t1" for i in range(n_q)] + ["q0\td1\t1", "q1\td3\t0"]
    (ir / "qrels" / "test.tsv").write_text("\n".join(lines) + "\n")
    (ir / "qrels" / "dev.tsv").write_text("\n".join(lines[:4]) + "\n")
    return rows


def test_sample_sts_positives_and_random_pairs(tmp_path):
    rows = _write_data(tmp_path)
    path = tmp_path / "sts" / "stsb" / "test.jsonl"
    s = g.sample_sts(path, n_pairs=20, seed=0, positive_score=4.0)
    assert s.meta["pairs"] == 20
    by_pair = {(r["sentence1"], r["sentence2"]): r["score"] for r in rows}
    assert s.positive and all(by_pair[(s.texts[a], s.texts[b])] >= 4.0 for a, b in s.positive)
    n_pos = sum(1 for r in rows if r["score"] >= 4.0)
    assert len(s.positive) <= n_pos
    assert len(s.random) == 20
    assert all((s.texts[a], s.texts[b]) not in by_pair for a, b in s.random)  # never the gold pairing
    again = g.sample_sts(path, n_pairs=20, seed=0)
    assert (again.texts, again.positive, again.random) == (s.texts, s.positive, s.random)
    assert g.sample_sts(path, n_pairs=20, seed=1).texts != s.texts
    with pytest.raises(DataError, match="score >= 9"):
        g.sample_sts(path, n_pairs=20, seed=0, positive_score=9.0)


def test_sample_ir_pairs_queries_with_relevant_documents(tmp_path):
    _write_data(tmp_path)
    s = g.sample_ir(tmp_path / "ir" / "scifact", "test", n_pairs=8, seed=0)
    assert len(s.positive) == len(s.random) == 8
    qtext = {json.loads(line)["text"]: json.loads(line)["_id"] for line in
             (tmp_path / "ir" / "scifact" / "queries.jsonl").read_text().splitlines()}
    for a, b in s.positive:
        qid = int(qtext[s.texts[a]][1:])
        assert s.texts[b].startswith(f"title {2 * qid} ") or (qid == 0 and s.texts[b].startswith("title 1 "))
    assert all(pb != rb for (_, pb), (_, rb) in zip(s.positive, s.random))
    with pytest.raises(DataError, match="at least 2 pairs"):
        g.sample_tasks(tmp_path, ir_pairs=1)
    with pytest.raises(DataError, match="'test' or 'dev'"):
        g.sample_tasks(tmp_path, split="train")


def test_sample_ir_missing_document_names_the_qrels_file(tmp_path):
    _write_data(tmp_path)
    qrels = tmp_path / "ir" / "scifact" / "qrels" / "test.tsv"
    qrels.write_text(qrels.read_text().replace("q2\td4\t1", "q2\tnope\t1"))  # q2's only relevant document
    with pytest.raises(DataError, match=r"test\.tsv: document 'nope'"):
        g.sample_ir(tmp_path / "ir" / "scifact", "test", n_pairs=100, seed=0)


# --------------------------------------------------------------------------- report on a tiny random model
@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("geometry-data")
    _write_data(root)
    return root


def test_geometry_report_table_and_png(tiny_model_dir, tiny_data, tmp_path):
    samples = g.sample_tasks(tiny_data, sts_pairs=25, ir_pairs=10, seed=0)
    rep = g.geometry_report(str(tiny_model_dir), samples, batch_size=8, device="cpu")
    assert set(rep["tasks"]) == {"sts", "ir"}
    json.dumps(rep)  # serialisable for MLflow
    for task, r in rep["tasks"].items():
        assert -1.0 <= r["anisotropy"] <= 1.0
        assert 1.0 <= r["effective_rank"] <= min(r["n_texts"], 32)
        assert 0.0 <= r["alignment"] <= 4.0 and -4.0 <= r["uniformity"] <= 0.0
        assert sum(r["histogram"]["positive"]) == r["n_positive"]
        assert sum(r["histogram"]["random"]) == r["n_random"]
    assert rep["tasks"]["ir"]["n_texts"] == 20  # 10 queries + 10 documents
    # the same texts embedded again give the same numbers (seeded sample, eval-mode encoder)
    again = g.geometry_report(str(tiny_model_dir), g.sample_tasks(tiny_data, sts_pairs=25, ir_pairs=10, seed=0),
                              batch_size=8, device="cpu")
    assert g.flat_metrics(again) == pytest.approx(g.flat_metrics(rep))
    flat = g.flat_metrics(rep)
    assert set(flat) == {f"geometry/{t}/{m}" for t in ("sts", "ir") for m in g.METRICS}
    table = g.geometry_table([rep, {**rep, "model": "other"}])
    assert table.count("\n") == 2 + 4 and "| other | ir | 20 |" in table
    png = g.geometry_png([rep, {**rep, "model": "other"}], tmp_path / "sub" / "geo.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_report_prints_the_table_and_writes_the_png(tiny_model_dir, tiny_data, tmp_path, capsys):
    from codiemb.cli import main

    png = tmp_path / "g.png"
    rc = main(["report", str(tiny_model_dir), str(tiny_model_dir), "--data-dir", str(tiny_data), "--sts-pairs", "20",
               "--ir-pairs", "6", "--png", str(png), "--batch-size", "8"])
    out = capsys.readouterr().out
    assert rc == 0
    assert out.count(f"| {tiny_model_dir} | sts |") == 2 and out.count(f"| {tiny_model_dir} | ir | 12 |") == 2
    assert png.is_file() and f"histograms: {png}" in out
    rc = main(["report", str(tmp_path / "no-such-model"), "--data-dir", str(tiny_data)])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("codiemb: error: model folder not found") and err.count("\n") == 1


def test_pipeline_logs_geometry_to_the_mlflow_run(tiny_model_dir, tiny_data, tmp_path):
    from mlflow.tracking import MlflowClient

    from codiemb.pipeline import log_geometry
    from codiemb.tracking.mlflow_run import SafeLogger

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    logger = SafeLogger(uri, experiment="geometry-test", run_name="geo")
    root = tmp_path / "run"
    root.mkdir()
    rep = log_geometry(logger, str(tiny_model_dir), root, data_dir=tiny_data)
    logger.close()
    client = MlflowClient(uri)
    run = client.get_run(logger.run_id)
    for task in ("sts", "ir"):
        assert run.data.metrics[f"geometry/{task}/anisotropy"] == pytest.approx(rep["tasks"][task]["anisotropy"])
        assert run.data.metrics[f"geometry/{task}/effective_rank"] == pytest.approx(rep["tasks"][task]["effective_rank"])
    names = {a.path for a in client.list_artifacts(logger.run_id)}
    assert {"geometry.md", "geometry.json", "geometry.png"} <= names
    assert (root / "geometry.md").read_text() == g.geometry_table([rep])
