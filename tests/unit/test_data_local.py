"""The Ray-free reader: counts reconcile, valid rows survive, bad rows are named by file:line."""

from __future__ import annotations

import gzip
import io
import json
import math

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from codiemb.data.local import iter_lines, open_filesystem, read_records
from codiemb.errors import DataError

GOOD = [
    {"sentence1": "A plane is taking off.", "sentence2": "An air plane is taking off.", "score": 5.0},
    {"sentence1": "A man plays a flute.", "sentence2": "A man plays a large flute.", "score": 3.8},
    {"sentence1": "A cat sleeps.", "sentence2": "A dog runs.", "score": 0.2},
    {"sentence1": "Two kids eat.", "sentence2": "Children are eating.", "score": 4},
]


def write_mixed_sts(path):
    """Lines 1..9: good, missing sentence2, good, blank, score 7, non-UTF-8, good, invalid JSON, good."""
    lines = [
        json.dumps(GOOD[0]).encode(),
        b'{"sentence1": "only one", "score": 1.0}',
        json.dumps(GOOD[1]).encode(),
        b"   ",
        b'{"sentence1": "a", "sentence2": "b", "score": 7}',
        b'{"sentence1": "caf\xe9", "sentence2": "b", "score": 1.0}',
        json.dumps(GOOD[2]).encode(),
        b'{"sentence1": "a", "sentence2": ',
        json.dumps(GOOD[3]).encode(),
    ]
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


EXPECTED_BAD = [
    (2, "missing field 'sentence2'"),
    (5, "score 7 is outside the range [0, 5]"),
    (6, "line is not valid UTF-8 (byte 0xe9 at offset 18)"),
    (8, "invalid JSON (Expecting value at column 33)"),
]


def normalized(rows):
    return [{"sentence1": r["sentence1"], "sentence2": r["sentence2"], "score": float(r["score"])} for r in rows]


def test_quarantine_counts_reconcile_and_every_valid_row_is_kept(tmp_path):
    src = write_mixed_sts(tmp_path / "mixed.jsonl")
    qpath = tmp_path / "run" / "quarantine.jsonl"
    res = read_records(src, "sts", on_bad_rows="quarantine", quarantine_path=str(qpath))
    # 8 non-blank lines: 4 good, 4 bad; the blank line 4 is not a row
    assert res.counts == {"read": 8, "valid": 4, "quarantined": 4}
    assert res.counts["read"] == res.counts["valid"] + res.counts["quarantined"]
    assert res.records == normalized(GOOD)
    assert [(e.line, e.reason) for e in res.errors] == EXPECTED_BAD
    written = [json.loads(line) for line in qpath.read_text(encoding="utf-8").splitlines()]
    assert [(w["file"], w["line"], w["reason"]) for w in written] == [(str(src), ln, r) for ln, r in EXPECTED_BAD]
    assert written[2]["raw"] == '{"sentence1": "caf\\xe9", "sentence2": "b", "score": 1.0}'  # bad byte kept visibly
    assert written[0]["raw"] == '{"sentence1": "only one", "score": 1.0}'


def test_quarantine_appends_across_datasets(tmp_path):
    qpath = tmp_path / "q.jsonl"
    for name in ("a.jsonl", "b.jsonl"):
        read_records(write_mixed_sts(tmp_path / name), "sts", on_bad_rows="quarantine", quarantine_path=str(qpath))
    files = [json.loads(line)["file"] for line in qpath.read_text().splitlines()]
    assert files == [str(tmp_path / "a.jsonl")] * 4 + [str(tmp_path / "b.jsonl")] * 4


def test_fail_mode_names_file_line_reason_and_the_total(tmp_path):
    src = write_mixed_sts(tmp_path / "mixed.jsonl")
    with pytest.raises(DataError) as exc:
        read_records(src, "sts")
    msg = str(exc.value)
    assert msg.startswith(f"{src}:2: missing field 'sentence2' (4 bad rows in 8 read;")
    assert "\n" not in msg


def test_max_bad_fraction_gate_names_the_fraction(tmp_path):
    src = write_mixed_sts(tmp_path / "mixed.jsonl")
    qpath = tmp_path / "q.jsonl"
    with pytest.raises(DataError, match=r"4 of 8 rows are bad \(50\.00%\), above max_bad_fraction 10\.00%"):
        read_records(src, "sts", on_bad_rows="quarantine", quarantine_path=str(qpath), max_bad_fraction=0.1)
    assert len(qpath.read_text().splitlines()) == 4  # written before the gate, for inspection
    res = read_records(src, "sts", on_bad_rows="quarantine", max_bad_fraction=0.5)  # 50% is not above 50%
    assert res.counts["valid"] == 4


def test_declared_score_range_and_max_rows(tmp_path):
    src = tmp_path / "s.jsonl"
    src.write_text("".join(json.dumps({"sentence1": "a", "sentence2": "b", "score": s}) + "\n"
                           for s in (-1.0, 0.5, 1.0, 2.0)))
    res = read_records(src, "sts", score_range=(-1, 1), on_bad_rows="quarantine")
    assert [r["score"] for r in res.records] == [-1.0, 0.5, 1.0]
    assert [(e.line, e.reason) for e in res.errors] == [(4, "score 2 is outside the range [-1, 1]")]
    res = read_records(src, "sts", score_range=(-1, 1), max_rows=2)
    assert res.counts == {"read": 2, "valid": 2, "quarantined": 0}


def test_parquet_rows_are_numbered_from_one(tmp_path):
    table = pa.table({
        "sentence1": ["a b", "c", None, "e", "g"],
        "sentence2": ["x", "y", "z", "w", "v"],
        "score": [1.0, math.nan, 2.0, 4.5, 9.0],
        "genre": ["n"] * 5,
    })
    path = tmp_path / "sts.parquet"
    pq.write_table(table, path, row_group_size=2)  # rows span three row groups
    res = read_records(path, "sts", on_bad_rows="quarantine")
    assert res.counts == {"read": 5, "valid": 2, "quarantined": 3}
    assert res.records == [{"sentence1": "a b", "sentence2": "x", "score": 1.0},
                           {"sentence1": "e", "sentence2": "w", "score": 4.5}]
    assert [(e.file, e.line, e.reason) for e in res.errors] == [
        (str(path), 2, "score is NaN"),
        (str(path), 3, "missing field 'sentence1'"),
        (str(path), 5, "score 9 is outside the range [0, 5]"),
    ]


def test_retrieval_jsonl_gzip_and_positive_string(tmp_path):
    rows = [{"query": "q1", "positive": "p1", "negatives": ["n1", "n2"]},
            {"query": "q2", "positives": ["p2", "p3"], "instruction": "Retrieve:", "passage_instruction": None}]
    path = tmp_path / "pairs.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        fh.write("\n".join(json.dumps(r) for r in rows))  # no trailing newline on the last line
    res = read_records(path, "retrieval")
    assert res.records == [
        {"query": "q1", "positives": ["p1"], "negatives": ["n1", "n2"], "instruction": None, "passage_instruction": None},
        {"query": "q2", "positives": ["p2", "p3"], "negatives": [], "instruction": "Retrieve:", "passage_instruction": None},
    ]


def test_folder_of_shards_reads_in_name_order(tmp_path):
    for i, name in enumerate(["part-1.jsonl", "part-0.jsonl"]):
        (tmp_path / name).write_text(json.dumps({"query": f"q{i}", "positive": f"p{i}"}) + "\n")
    (tmp_path / "_SUCCESS").write_text("")
    (tmp_path / "README.md").write_text("not a shard")
    res = read_records(tmp_path, "retrieval")
    assert [r["query"] for r in res.records] == ["q1", "q0"]
    assert read_records(tmp_path, "retrieval", fmt="jsonl").records == res.records
    with pytest.raises(DataError, match="no .jsonl or .parquet files"):
        read_records(tmp_path, "retrieval", fmt="parquet")


def write_tiny_beir(folder):
    (folder / "qrels").mkdir(parents=True)
    corpus = [{"_id": "d1", "title": "Rain", "text": "Clouds release water."},
              {"_id": "d2", "title": "", "text": "The sun is hot."},
              {"_id": "d3", "title": "Cats", "text": "Cats sleep a lot."}]
    queries = [{"_id": "q1", "text": "what causes rain"}, {"_id": "q2", "text": "why do cats sleep"},
               {"_id": "q3", "text": "unjudged query"}]
    (folder / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in corpus))
    (folder / "queries.jsonl").write_text("".join(json.dumps(r) + "\n" for r in queries))
    (folder / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\nq1\td2\t1\nq2\td3\t1\nq2\td2\t0\n")
    (folder / "qrels" / "dev.tsv").write_text("query-id\tcorpus-id\tscore\nq2\td3\t1\n")
    return folder


def test_beir_folder_yields_training_pairs_from_the_chosen_qrels(tmp_path):
    folder = write_tiny_beir(tmp_path / "tiny")
    res = read_records(folder, "retrieval")
    assert res.counts == {"read": 2, "valid": 2, "quarantined": 0}
    assert res.records == [
        {"query": "what causes rain", "positives": ["Rain Clouds release water.", "The sun is hot."], "negatives": [],
         "instruction": None, "passage_instruction": None},
        {"query": "why do cats sleep", "positives": ["Cats Cats sleep a lot."], "negatives": [], "instruction": None, "passage_instruction": None},
    ]
    dev = read_records(folder, "retrieval", qrels="dev")
    assert [r["query"] for r in dev.records] == ["why do cats sleep"]


def test_structural_errors_are_one_line_data_errors(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        read_records(tmp_path / "nope.jsonl", "sts")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="no rows found"):
        read_records(tmp_path / "empty.jsonl", "sts")
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="cannot tell the format"):
        read_records(tmp_path / "data.csv", "sts")


def test_iter_lines_across_chunk_boundaries():
    data = b'{"a": 1}\n\n{"b": "\xe2\x80\xa8"}\r\n{"c": 3}'  # U+2028 must not split a line
    got = list(iter_lines(io.BytesIO(data), chunk_size=3))
    assert got == [(1, b'{"a": 1}'), (3, b'{"b": "\xe2\x80\xa8"}\r'), (4, b'{"c": 3}')]


def test_open_filesystem_s3_endpoint_from_env(monkeypatch, tmp_path):
    monkeypatch.setenv("CODIEMB_S3_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    fs, path = open_filesystem("s3://bucket/some/key.jsonl")
    assert isinstance(fs, pafs.S3FileSystem) and path == "bucket/some/key.jsonl"
    assert fs.region == "us-east-1"
    fs, path = open_filesystem(tmp_path / "x.jsonl")
    assert isinstance(fs, pafs.LocalFileSystem) and path == str(tmp_path / "x.jsonl")
