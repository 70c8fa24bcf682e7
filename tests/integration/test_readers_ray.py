"""The Ray Data shard build (validate + tokenize in one pass on the cluster) against the Ray-free
reader and the plain build, on real shared data: same counts, same bad rows, same rows."""

from __future__ import annotations

import json
import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from codiemb.data.build import ShardSpec, build_shards
from codiemb.data.local import read_records
from codiemb.errors import DataError

pytestmark = pytest.mark.integration

LENGTHS = {"query": 32, "passage": 64, "sts": 32}


def rows(store) -> list:
    get = store.sts_row if store.task == "sts" else store.retrieval_row
    out = []
    for i in range(len(store)):
        out.append(json.dumps([x.tolist() if hasattr(x, "tolist") else
                               [y.tolist() for y in x] if isinstance(x, list) else x for x in get(i)]))
    return out


def both(path, task, model, tmp_path, **kw):
    """The Ray Data build and the plain build of ``path`` (separate roots: both really build)."""
    qray, qplain = kw.pop("q_ray", None), kw.pop("q_plain", None)
    spec = ShardSpec(name="d", path=str(path), task=task, model=str(model), max_length=LENGTHS, **kw)
    on_ray = build_shards(spec, str(tmp_path / "ray"), use_ray=True, quarantine_path=qray)
    plain = build_shards(spec, str(tmp_path / "plain"), use_ray=False, quarantine_path=qplain)
    assert on_ray.store.manifest["built_with"] == "ray" and not on_ray.reused
    return on_ray, plain


def test_stsb_train_via_ray_matches_local(ray_local, shared_data, tiny_model_dir, tmp_path):
    path = shared_data / "sts" / "stsb" / "train.jsonl"
    on_ray, plain = both(path, "sts", tiny_model_dir, tmp_path, score_range=(0, 5))
    local = read_records(path, "sts", score_range=(0, 5))
    assert on_ray.counts == plain.counts == local.counts == {"read": 5749, "valid": 5749, "quarantined": 0}
    assert rows(on_ray.store) == rows(plain.store)
    assert [on_ray.store.sts_row(i)[2] for i in range(len(local.records))] == [r["score"] for r in local.records]


def test_retrieval_pairs_via_ray_match_local(ray_local, shared_data, tiny_model_dir, tmp_path):
    path = shared_data / "train" / "qp" / "scifact" / "scifact_train_pairs_nodev.jsonl"
    on_ray, plain = both(path, "retrieval", tiny_model_dir, tmp_path)
    local = read_records(path, "retrieval")
    assert on_ray.counts == local.counts and on_ray.counts["read"] == 808
    assert rows(on_ray.store) == rows(plain.store)


def write_mixed(tmp_path, stsb_lines: list[bytes]):
    """Real STS-B lines with bad ones spliced in at known places (lines 3, 7, 10, 12)."""
    lines = list(stsb_lines)
    lines.insert(2, b'{"sentence1": "A cat.", "score": 2.0}')
    lines.insert(6, b'{"sentence1": "A cat.", "sentence2": "A dog.", "score": 7}')
    lines.insert(9, b'{"sentence1": "A caf\xe9.", "sentence2": "A dog.", "score": 1.0}')
    lines.insert(11, b'{"sentence1": "A cat.", "sentence2": "A dog.", "score": NaN}')
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def _sorted_lines(path):
    return sorted(path.read_text(encoding="utf-8").splitlines())


def test_quarantine_counts_and_rows_via_ray_match_local(ray_local, shared_data, tmp_path, tiny_model_dir):
    stsb = (shared_data / "sts" / "stsb" / "dev.jsonl").read_bytes().splitlines()[:40]
    src = str(write_mixed(tmp_path, stsb))
    q_local, q_ray = tmp_path / "q_local.jsonl", tmp_path / "q_ray.jsonl"
    local = read_records(src, "sts", on_bad_rows="quarantine", quarantine_path=str(q_local))
    on_ray, plain = both(src, "sts", tiny_model_dir, tmp_path, on_bad_rows="quarantine", q_ray=str(q_ray))
    assert on_ray.counts == local.counts == {"read": 44, "valid": 40, "quarantined": 4}
    # the same bad rows (in the order their blocks finished: each names its file and line)
    assert _sorted_lines(q_ray) == _sorted_lines(q_local)
    assert sorted(json.loads(x)["line"] for x in q_ray.read_text().splitlines()) == [3, 7, 10, 12]
    assert rows(on_ray.store) == rows(plain.store) and len(on_ray.store) == 40

    # fail mode names the same first bad row, and the gate the same fraction
    spec = ShardSpec(name="d", path=src, task="sts", model=str(tiny_model_dir), max_length=LENGTHS)
    with pytest.raises(DataError) as ray_err:
        build_shards(spec, str(tmp_path / "fail"), use_ray=True)
    with pytest.raises(DataError) as local_err:
        read_records(src, "sts")
    assert str(ray_err.value) == str(local_err.value)
    assert str(ray_err.value).startswith(f"{src}:3: missing field 'sentence2' (4 bad rows in 44 read")
    with pytest.raises(DataError, match=r"4 of 44 rows are bad \(9\.09%\)"):
        build_shards(ShardSpec(name="d", path=src, task="sts", model=str(tiny_model_dir), max_length=LENGTHS,
                               on_bad_rows="quarantine", max_bad_fraction=0.05), str(tmp_path / "gate"), use_ray=True)


def test_parquet_via_ray_numbers_rows_like_local(ray_local, tmp_path, tiny_model_dir):
    n = 30
    scores = [i / 6 for i in range(n)]
    scores[4], scores[17] = math.nan, 6.5
    table = pa.table({"sentence1": [f"s{i} a" for i in range(n)], "sentence2": [f"t{i}" for i in range(n)],
                      "score": scores})
    path = tmp_path / "sts.parquet"
    pq.write_table(table, path, row_group_size=8)
    local = read_records(str(path), "sts", on_bad_rows="quarantine")
    on_ray, plain = both(path, "sts", tiny_model_dir, tmp_path, on_bad_rows="quarantine",
                         q_ray=str(tmp_path / "q.jsonl"))
    assert on_ray.counts == local.counts == {"read": 30, "valid": 28, "quarantined": 2}
    q = [json.loads(x) for x in (tmp_path / "q.jsonl").read_text().splitlines()]
    assert sorted((r["line"], r["reason"]) for r in q) == [(5, "score is NaN"), (18, "score 6.5 is outside the range [0, 5]")]
    assert rows(on_ray.store) == rows(plain.store)
    assert [on_ray.store.source(i)[1] for i in range(28)] == [i for i in range(1, 31) if i not in (5, 18)]


