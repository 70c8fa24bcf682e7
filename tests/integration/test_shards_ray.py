"""Token shards built by Ray Data on the cluster equal the plain build; s3:// shards read back on workers."""

from __future__ import annotations

import json

import pytest

from codiemb.data.build import ShardSpec, build_shards
from codiemb.data.shards import ShardStore

pytestmark = pytest.mark.integration

LENGTHS = {"query": 16, "passage": 32, "sts": 16}


def _rows(store):
    if store.task == "sts":
        return [(a.tolist(), b.tolist(), s) for a, b, s in (store.sts_row(i) for i in range(len(store)))]
    return [(q.tolist(), [p.tolist() for p in pos], [n.tolist() for n in neg], st)
            for q, pos, neg, st in (store.retrieval_row(i) for i in range(len(store)))]


def _two_files_with_bad_rows(folder, shared_data):
    """SciFact's training pairs split in two files, with a bad row in each (lines 5 and 9)."""
    lines = (shared_data / "train" / "qp" / "scifact" / "scifact_train_pairs_nodev.jsonl").read_text().splitlines()
    folder.mkdir()
    a, b = lines[:300], lines[300:]
    a[4] = json.dumps({"query": "", "positive": "x"})
    b[8] = "{broken"
    (folder / "part-0.jsonl").write_text("\n".join(a) + "\n")
    (folder / "part-1.jsonl").write_text("\n".join(b) + "\n")
    return len(lines)


def test_ray_build_equals_the_plain_build(ray_local, tmp_path, tiny_model_dir, shared_data, monkeypatch):
    from codiemb.data import build as build_mod

    monkeypatch.setattr(build_mod, "BLOCK_ROWS", 64)  # several blocks per file, spread over the actors
    n = _two_files_with_bad_rows(tmp_path / "data", shared_data)
    spec = ShardSpec(name="sf", path=str(tmp_path / "data"), task="retrieval", model=str(tiny_model_dir),
                     max_length=LENGTHS, on_bad_rows="quarantine", max_bad_fraction=0.1)
    ray_q, plain_q = tmp_path / "ray-q.jsonl", tmp_path / "plain-q.jsonl"
    on_ray = build_shards(spec, str(tmp_path / "ray-shards"), use_ray=True, quarantine_path=str(ray_q))
    plain = build_shards(spec, str(tmp_path / "plain-shards"), use_ray=False, quarantine_path=str(plain_q))
    assert on_ray.store.manifest["built_with"] == "ray" and plain.store.manifest["built_with"] == "local"
    assert on_ray.counts == plain.counts == {"read": n, "valid": n - 2, "quarantined": 2}
    assert len(on_ray.store.shards) > 2
    assert _rows(on_ray.store) == _rows(plain.store)  # same rows, same order (row ids mean the same rows)
    assert [on_ray.store.source(i) for i in range(0, n - 2, 37)] == [plain.store.source(i) for i in range(0, n - 2, 37)]
    bad = lambda p: sorted((r["file"].rsplit("/", 1)[-1], r["line"]) for r in map(json.loads, p.read_text().splitlines()))  # noqa: E731
    assert bad(ray_q) == bad(plain_q) == [("part-0.jsonl", 5), ("part-1.jsonl", 9)]


def test_shards_on_s3_are_built_by_ray_and_read_through_the_cache(ray_local, s3_endpoint, tmp_path, tiny_model_dir,
                                                                   shared_data, monkeypatch):
    import boto3
    import ray

    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="codiemb-shards")
    monkeypatch.setenv("CODIEMB_CACHE", str(tmp_path / "cache"))
    spec = ShardSpec(name="stsb", path=str(shared_data / "sts" / "stsb" / "dev.jsonl"), task="sts",
                     model=str(tiny_model_dir), max_length=LENGTHS, score_range=(0, 5))
    res = build_shards(spec, "s3://codiemb-shards/shards", use_ray=True)
    assert res.set_dir.startswith("s3://codiemb-shards/shards/") and res.counts["valid"] == 1500
    again = build_shards(spec, "s3://codiemb-shards/shards", use_ray=True)
    assert again.reused

    @ray.remote
    def read_on_a_worker(set_dir, cache, endpoint):
        import os

        os.environ["CODIEMB_CACHE"] = cache
        os.environ["CODIEMB_S3_ENDPOINT"] = endpoint  # as ray_trainer's worker_runtime_env passes it
        store = ShardStore.open(set_dir)
        return len(store), store.sts_row(0)[2], store.sts_row(len(store) - 1)[2]

    n, first, last = ray.get(read_on_a_worker.remote(res.set_dir, str(tmp_path / "worker-cache"), s3_endpoint))
    plain = build_shards(spec, str(tmp_path / "plain"))
    assert (n, first, last) == (1500, plain.store.sts_row(0)[2], plain.store.sts_row(1499)[2])
    assert list((tmp_path / "worker-cache" / "shards").rglob("tokens.npy"))  # downloaded once, memory-mapped


def test_teacher_vectors_scored_by_ray_data_equal_the_local_ones(ray_local, tmp_path, tiny_model_dir, shared_data,
                                                                 monkeypatch):
    """loss.distill's teacher vectors: Ray Data's actor pool (one shard per call) writes what the
    in-process scorer writes, for the same rows in the same order; a second build reuses them."""
    import numpy as np

    from codiemb.config import DistillTeacherConfig
    from codiemb.data import build as build_mod
    from codiemb.data.teacher import build_teacher_scores
    from tests.conftest import build_tiny_bert

    monkeypatch.setattr(build_mod, "BLOCK_ROWS", 256)  # several shards
    teacher = DistillTeacherConfig(model=str(build_tiny_bert(tmp_path / "teacher", hidden=48, layers=1, seed=5)))
    spec = ShardSpec(name="sf", path=str(shared_data / "train" / "qp" / "scifact" / "scifact_train_pairs_nodev.jsonl"),
                     task="retrieval", model=str(tiny_model_dir), max_length=LENGTHS)
    out = {}
    for how in ("ray", "local"):
        root = str(tmp_path / f"{how}-shards")
        student = build_shards(spec, root, use_ray=how == "ray").store
        out[how] = build_teacher_scores(student, spec, teacher, root, use_ray=how == "ray", concurrency=2)
    assert out["ray"].manifest["built_with"] == "ray" and len(out["ray"].shards) > 2
    rows = list(range(0, len(out["local"]), 7))
    pos = np.tile(np.array([[0, 1]]), (len(rows), 1))
    assert np.allclose(out["ray"].vectors(rows, pos), out["local"].vectors(rows, pos), atol=2e-3)
    again = build_teacher_scores(student, spec, teacher, str(tmp_path / "local-shards"))
    assert again.set_dir == out["local"].set_dir and again.manifest["seconds"] == out["local"].manifest["seconds"]
