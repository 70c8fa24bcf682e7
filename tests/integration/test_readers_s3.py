"""s3:// reads through moto's real server on 127.0.0.1: same rows as the local read, both paths."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from codiemb.data.local import read_records
from codiemb.errors import DataError

pytestmark = pytest.mark.integration

BUCKET = "codiemb-data"


def key(rec: dict) -> str:
    return json.dumps({k: list(v) if isinstance(v, (list, tuple)) or hasattr(v, "tolist") else v
                       for k, v in rec.items()}, sort_keys=True, default=list)


@pytest.fixture(scope="module")
def bucket(s3_endpoint, shared_data, tmp_path_factory):
    """Upload STS-B dev (JSONL), a Parquet of STS-B train with two bad rows, and SciFact pairs."""
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    s3.create_bucket(Bucket=BUCKET)
    s3.upload_file(str(shared_data / "sts" / "stsb" / "dev.jsonl"), BUCKET, "sts/stsb/dev.jsonl")
    s3.upload_file(str(shared_data / "train" / "qp" / "scifact" / "scifact_train_pairs_nodev.jsonl"), BUCKET,
                   "qp/scifact.jsonl")

    rows = read_records(shared_data / "sts" / "stsb" / "train.jsonl", "sts").records[:300]
    rows[10] = {**rows[10], "score": 7.5}
    rows[200] = {**rows[200], "sentence2": "  "}
    local_parquet = tmp_path_factory.mktemp("s3src") / "train.parquet"
    import pyarrow as pa

    pq.write_table(pa.Table.from_pylist(rows), local_parquet, row_group_size=64)
    s3.upload_file(str(local_parquet), BUCKET, "sts/stsb/train.parquet")
    return {"s3": s3, "parquet": local_parquet}


def _ray_build(uri, task, model, root, **kw):
    from codiemb.data.build import ShardSpec, build_shards

    q = kw.pop("quarantine_path", None)
    spec = ShardSpec(name="d", path=uri, task=task, model=str(model), max_length={"query": 32, "passage": 64, "sts": 32},
                     score_range=(0, 5) if task == "sts" else None, **kw)
    return build_shards(spec, str(root), use_ray=True, quarantine_path=q)


def test_jsonl_from_s3_matches_the_local_file(bucket, shared_data, ray_local, tiny_model_dir, tmp_path):

    local = read_records(shared_data / "sts" / "stsb" / "dev.jsonl", "sts")
    remote = read_records(f"s3://{BUCKET}/sts/stsb/dev.jsonl", "sts")
    assert remote.counts == local.counts == {"read": 1500, "valid": 1500, "quarantined": 0}
    assert remote.records == local.records
    res = _ray_build(f"s3://{BUCKET}/sts/stsb/dev.jsonl", "sts", tiny_model_dir, tmp_path)
    assert res.counts == local.counts
    assert [res.store.sts_row(i)[2] for i in range(1500)] == [r["score"] for r in local.records]


def test_retrieval_jsonl_from_s3_via_ray(bucket, shared_data, ray_local, tiny_model_dir, tmp_path):
    local = read_records(shared_data / "train" / "qp" / "scifact" / "scifact_train_pairs_nodev.jsonl", "retrieval")
    res = _ray_build(f"s3://{BUCKET}/qp/scifact.jsonl", "retrieval", tiny_model_dir, tmp_path)
    assert res.counts == local.counts == {"read": 808, "valid": 808, "quarantined": 0}
    assert [res.store.source(i) for i in (0, 807)] == [(f"s3://{BUCKET}/qp/scifact.jsonl", 1),
                                                      (f"s3://{BUCKET}/qp/scifact.jsonl", 808)]


def test_parquet_from_s3_with_quarantine_on_s3(bucket, ray_local, tiny_model_dir, tmp_path):
    uri = f"s3://{BUCKET}/sts/stsb/train.parquet"
    local = read_records(str(bucket["parquet"]), "sts", on_bad_rows="quarantine")
    assert local.counts == {"read": 300, "valid": 298, "quarantined": 2}
    expected_bad = [(11, "score 7.5 is outside the range [0, 5]"), (201, "field 'sentence2' is empty")]
    assert [(e.line, e.reason) for e in local.errors] == expected_bad

    remote = read_records(uri, "sts", on_bad_rows="quarantine", quarantine_path=f"s3://{BUCKET}/runs/a/quarantine.jsonl")
    assert remote.counts == local.counts and remote.records == local.records
    res = _ray_build(uri, "sts", tiny_model_dir, tmp_path, on_bad_rows="quarantine",
                     quarantine_path=f"s3://{BUCKET}/runs/b/quarantine.jsonl")
    assert res.counts == local.counts
    assert [res.store.sts_row(i)[2] for i in range(298)] == [r["score"] for r in local.records]

    for run in ("a", "b"):
        body = bucket["s3"].get_object(Bucket=BUCKET, Key=f"runs/{run}/quarantine.jsonl")["Body"].read().decode()
        got = [json.loads(line) for line in body.splitlines()]
        assert sorted((g["file"], g["line"], g["reason"]) for g in got) == [(uri, ln, r) for ln, r in expected_bad]

    with pytest.raises(DataError, match=rf"^{uri}:11: score 7.5 is outside the range \[0, 5\] \(2 bad rows in 300 read"):
        _ray_build(uri, "sts", tiny_model_dir, tmp_path / "fail")


def test_missing_s3_object_is_a_data_error(bucket):
    with pytest.raises(DataError, match=rf"s3://{BUCKET}/nope.jsonl: file not found"):
        read_records(f"s3://{BUCKET}/nope.jsonl", "sts")
