"""Ray Data reader and tokenizer step against the Ray-free path, on real shared data."""

from __future__ import annotations

import json
import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from codiemb.data.local import read_records
from codiemb.errors import DataError

pytestmark = pytest.mark.integration


def key(rec: dict) -> str:
    return json.dumps(rec, sort_keys=True)


def rows_of(ds) -> list[dict]:
    return ds.take_all()


def test_stsb_train_via_ray_matches_local(ray_local, shared_data):
    from codiemb.data.readers import read_dataset

    path = str(shared_data / "sts" / "stsb" / "train.jsonl")
    ds, counts = read_dataset(path, "sts", score_range=(0, 5))
    local = read_records(path, "sts", score_range=(0, 5))
    assert counts == local.counts == {"read": 5749, "valid": 5749, "quarantined": 0}
    got = rows_of(ds)
    assert sorted(map(key, got)) == sorted(map(key, local.records))
    assert {"sentence1": "A plane is taking off.", "sentence2": "An air plane is taking off.", "score": 5.0} in got


def test_retrieval_pairs_via_ray_match_local(ray_local, shared_data):
    from codiemb.data.readers import read_dataset

    path = str(shared_data / "train" / "qp" / "scifact" / "scifact_train_pairs_nodev.jsonl")
    ds, counts = read_dataset(path, "retrieval")
    local = read_records(path, "retrieval")
    assert counts == local.counts and counts["read"] == 808
    got = [{**r, "positives": list(r["positives"]), "negatives": list(r["negatives"])} for r in rows_of(ds)]
    assert sorted(map(key, got)) == sorted(map(key, local.records))


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


def test_quarantine_counts_and_rows_via_ray_match_local(ray_local, shared_data, tmp_path):
    from codiemb.data.readers import read_dataset

    stsb = (shared_data / "sts" / "stsb" / "dev.jsonl").read_bytes().splitlines()[:40]
    src = str(write_mixed(tmp_path, stsb))
    q_local, q_ray = tmp_path / "q_local.jsonl", tmp_path / "q_ray.jsonl"
    local = read_records(src, "sts", on_bad_rows="quarantine", quarantine_path=str(q_local))
    ds, counts = read_dataset(src, "sts", on_bad_rows="quarantine", quarantine_path=str(q_ray))
    assert counts == local.counts == {"read": 44, "valid": 40, "quarantined": 4}
    assert q_ray.read_text(encoding="utf-8") == q_local.read_text(encoding="utf-8")
    assert [json.loads(x)["line"] for x in q_ray.read_text().splitlines()] == [3, 7, 10, 12]
    assert sorted(map(key, rows_of(ds))) == sorted(map(key, local.records))

    # fail mode names the same first bad row, and the gate the same fraction
    with pytest.raises(DataError) as ray_err:
        read_dataset(src, "sts")
    with pytest.raises(DataError) as local_err:
        read_records(src, "sts")
    assert str(ray_err.value) == str(local_err.value)
    assert str(ray_err.value).startswith(f"{src}:3: missing field 'sentence2' (4 bad rows in 44 read")
    with pytest.raises(DataError, match=r"4 of 44 rows are bad \(9\.09%\)"):
        read_dataset(src, "sts", on_bad_rows="quarantine", max_bad_fraction=0.05)


def test_parquet_via_ray_numbers_rows_like_local(ray_local, tmp_path):
    from codiemb.data.readers import read_dataset

    n = 30
    scores = [i / 6 for i in range(n)]
    scores[4], scores[17] = math.nan, 6.5
    table = pa.table({"sentence1": [f"s{i} a" for i in range(n)], "sentence2": [f"t{i}" for i in range(n)],
                      "score": scores})
    path = tmp_path / "sts.parquet"
    pq.write_table(table, path, row_group_size=8)
    local = read_records(str(path), "sts", on_bad_rows="quarantine")
    ds, counts = read_dataset(str(path), "sts", on_bad_rows="quarantine", quarantine_path=str(tmp_path / "q.jsonl"))
    assert counts == local.counts == {"read": 30, "valid": 28, "quarantined": 2}
    q = [json.loads(x) for x in (tmp_path / "q.jsonl").read_text().splitlines()]
    assert [(r["line"], r["reason"]) for r in q] == [(5, "score is NaN"), (18, "score 6.5 is outside the range [0, 5]")]
    assert sorted(map(key, rows_of(ds))) == sorted(map(key, local.records))


def test_tokenize_dataset_matches_the_tokenizer(ray_local, tiny_model_dir, shared_data):
    from transformers import AutoTokenizer

    import ray
    from codiemb.data.tokenize import tokenize_dataset

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    max_length = {"query": 8, "passage": 12, "sts": 10}

    sts = read_records(shared_data / "sts" / "stsb" / "dev.jsonl", "sts").records[:50]
    out = tokenize_dataset(ray.data.from_items(sts), str(tiny_model_dir), "sts", max_length).take_all()
    assert len(out) == 50

    def enc(text):
        e = tok(text, truncation=True, max_length=10)
        return tuple(e["input_ids"]), tuple(e["attention_mask"])

    expected = sorted((*enc(r["sentence1"]), *enc(r["sentence2"]), r["score"]) for r in sts)
    got = sorted((tuple(r["sentence1_input_ids"]), tuple(r["sentence1_attention_mask"]),
                  tuple(r["sentence2_input_ids"]), tuple(r["sentence2_attention_mask"]), r["score"]) for r in out)
    assert got == expected
    assert max(len(g[0]) for g in got) == 10  # some STS-B sentences are longer than the limit

    ir = [{"query": "the cat sleeps", "positives": ["a cat is sleeping on the bed", "cats sleep"],
           "negatives": ["dogs run in the park"], "instruction": "find:"},
          {"query": "red car", "positives": ["the car is red and big and fast and loud today"], "negatives": [],
           "instruction": None}]
    table = pa.Table.from_pylist(ir)
    out = tokenize_dataset(ray.data.from_arrow(table), str(tiny_model_dir), "retrieval", max_length).take_all()
    out = sorted(out, key=lambda r: len(r["positives_input_ids"]), reverse=True)
    for rec, row in zip(ir, out):
        query = f"{rec['instruction']} {rec['query']}" if rec["instruction"] else rec["query"]
        assert list(row["query_input_ids"]) == tok(query, truncation=True, max_length=8)["input_ids"]
        assert [list(x) for x in row["positives_input_ids"]] == [
            tok(p, truncation=True, max_length=12)["input_ids"] for p in rec["positives"]]
        assert [list(x) for x in row["negatives_input_ids"]] == [
            tok(p, truncation=True, max_length=12)["input_ids"] for p in rec["negatives"]]
    assert len(out[1]["positives_input_ids"][0]) == 12  # truncated to the passage limit
