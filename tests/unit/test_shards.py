"""Token shards: one validating pass, the rows equal the tokenizer's output, reuse by key, quarantine."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from codiemb.data import build as build_mod
from codiemb.data.build import ShardSpec, build_shards
from codiemb.data.local import read_records
from codiemb.data.shards import ShardStore
from codiemb.errors import DataError

LENGTHS = {"query": 20, "passage": 12, "sts": 10}


def _retrieval_file(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


ROWS = [
    {"query": "the cat sleeps", "positive": "a cat is sleeping on the house", "negatives": ["dog", "a red car"]},
    {"query": "water is blue", "positives": ["blue water", "the sea"], "negatives": []},
    {"query": "protein in cells", "positives": ["cell protein study shows high risk"], "negatives": ["moon"],
     "instruction": "query: "},
]


def _spec(path, model, **kw):
    return ShardSpec(name="r", path=str(path), task=kw.pop("task", "retrieval"), model=str(model),
                     max_length=dict(LENGTHS), **kw)


def test_rows_equal_the_tokenizer_and_keep_their_source(tmp_path, tiny_model_dir):
    from codiemb.model.encoder import Encoder

    data = _retrieval_file(tmp_path / "r.jsonl", ROWS)
    res = build_shards(_spec(data, tiny_model_dir), str(tmp_path / "shards"))
    store = res.store
    assert res.counts == {"read": 3, "valid": 3, "quarantined": 0} and not res.reused
    assert len(store) == 3
    assert store.stats["max_negatives"] == 2 and store.stats["min_negatives"] == 0
    enc = Encoder.load(str(tiny_model_dir))
    records = read_records(data, "retrieval").records
    for i, rec in enumerate(records):
        q, pos, neg, start = store.retrieval_row(i)
        ins = rec.get("instruction")
        ref = enc.tokenize([rec["query"]], LENGTHS["query"], instruction=ins)
        assert q.tolist() == ref["input_ids"][0].tolist()
        if ins:  # the pool start reproduces Encoder.tokenize's pool_mask
            assert start > 0 and ref["pool_mask"][0].tolist() == [int(k >= start) for k in range(len(q))]
        else:
            assert start == 0
        for got, text in zip(pos + neg, rec["positives"] + rec["negatives"]):
            assert got.tolist() == enc.tokenize([text], LENGTHS["passage"])["input_ids"][0].tolist()
        assert store.source(i) == (str(data), i + 1)


def test_second_build_reuses_without_tokenizing_and_the_key_follows_inputs(tmp_path, tiny_model_dir, monkeypatch):
    data = _retrieval_file(tmp_path / "r.jsonl", ROWS)
    first = build_shards(_spec(data, tiny_model_dir), str(tmp_path / "shards"))
    calls = []
    real = build_mod.encode_rows
    monkeypatch.setattr(build_mod, "encode_rows", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = build_shards(_spec(data, tiny_model_dir), str(tmp_path / "shards"))
    assert again.reused and again.set_dir == first.set_dir and calls == []
    assert again.counts == first.counts
    # other max lengths, or a changed file: another shard set, tokenized again
    other = build_shards(_spec(data, tiny_model_dir, ), str(tmp_path / "shards2"))
    assert not other.reused
    longer = ShardSpec(name="r", path=str(data), task="retrieval", model=str(tiny_model_dir),
                       max_length={**LENGTHS, "query": 18})
    assert build_shards(longer, str(tmp_path / "shards")).set_dir != first.set_dir
    _retrieval_file(data, ROWS + ROWS[:1])
    os.utime(data, ns=(1, 1))
    changed = build_shards(_spec(data, tiny_model_dir), str(tmp_path / "shards"))
    assert changed.set_dir != first.set_dir and len(changed.store) == 4 and calls


def test_bad_rows_fail_with_file_and_line_or_stream_to_quarantine(tmp_path, tiny_model_dir):
    lines = [json.dumps(ROWS[0]), "{not json", json.dumps({"query": "q", "positives": []}), json.dumps(ROWS[1])]
    data = tmp_path / "bad.jsonl"
    data.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"bad\.jsonl:2: .*2 bad rows in 4 read"):
        build_shards(_spec(data, tiny_model_dir), str(tmp_path / "s"))
    # nothing usable was left behind by the failing pass: the next build starts over
    q = tmp_path / "run" / "quarantine.jsonl"
    res = build_shards(_spec(data, tiny_model_dir, on_bad_rows="quarantine", max_bad_fraction=0.5),
                       str(tmp_path / "s"), quarantine_path=str(q))
    assert res.counts == {"read": 4, "valid": 2, "quarantined": 2}
    bad = [json.loads(x) for x in q.read_text().splitlines()]
    assert sorted(b["line"] for b in bad) == [2, 3] and all(b["file"].endswith("bad.jsonl") for b in bad)
    assert len(res.store) == 2
    # reuse replays the quarantine rows into the new run's file, with the same counts
    q2 = tmp_path / "run2" / "quarantine.jsonl"
    again = build_shards(_spec(data, tiny_model_dir, on_bad_rows="quarantine", max_bad_fraction=0.5),
                         str(tmp_path / "s"), quarantine_path=str(q2))
    assert again.reused and again.counts == res.counts and len(q2.read_text().splitlines()) == 2
    with pytest.raises(DataError, match="above max_bad_fraction"):
        build_shards(_spec(data, tiny_model_dir, on_bad_rows="quarantine", max_bad_fraction=0.1), str(tmp_path / "s"))


def test_sts_shards_and_many_blocks_keep_file_order(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setattr(build_mod, "BLOCK_ROWS", 7)  # many shards from one file
    rows = [{"sentence1": f"cat {i}", "sentence2": f"dog {i % 5}", "score": i % 6} for i in range(40)]
    data = tmp_path / "s.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = build_shards(_spec(data, tiny_model_dir, task="sts", score_range=(0, 5)), str(tmp_path / "sh"))
    store = res.store
    assert len(store.shards) == 6 and len(store) == 40
    assert [store.sts_row(i)[2] for i in range(40)] == [float(i % 6) for i in range(40)]
    assert [store.source(i)[1] for i in range(40)] == list(range(1, 41))
    # memory-mapped: the arrays are views of files, not loaded copies
    arrays = store._shard(0)
    assert isinstance(arrays["tokens"], np.memmap)


def test_store_reopened_elsewhere_gives_the_same_rows(tmp_path, tiny_model_dir):
    data = _retrieval_file(tmp_path / "r.jsonl", ROWS)
    res = build_shards(_spec(data, tiny_model_dir), str(tmp_path / "shards"))
    other = ShardStore.open(res.set_dir)
    for i in range(len(other)):
        a, b = res.store.retrieval_row(i), other.retrieval_row(i)
        assert a[0].tolist() == b[0].tolist() and [x.tolist() for x in a[1]] == [x.tolist() for x in b[1]]


def test_a_small_input_on_ray_is_built_in_the_driver_and_equals_the_plain_build(tmp_path, tiny_model_dir, monkeypatch):
    """``ray_min_bytes`` (data.ray_build_min_mb): under it, ``use_ray`` builds in this process — no Ray
    Data pipeline starts — and the shard set is the plain build's; at 0 the Ray path is taken."""
    import codiemb.data.build as build

    data = _retrieval_file(tmp_path / "r.jsonl", ROWS)
    plain = build_shards(_spec(data, tiny_model_dir), str(tmp_path / "plain"))

    def no_ray(*a, **k):
        raise AssertionError("the Ray Data pipeline started for a small input")

    monkeypatch.setattr(build, "_ray_results", no_ray)
    small = build_shards(_spec(data, tiny_model_dir), str(tmp_path / "small"), use_ray=True,
                         ray_min_bytes=data.stat().st_size + 1)
    assert small.store.manifest["built_with"] == "local"
    assert small.store.manifest["key"] == plain.store.manifest["key"]
    assert [small.store.retrieval_row(i)[0].tolist() for i in range(3)] == \
        [plain.store.retrieval_row(i)[0].tolist() for i in range(3)]
    with pytest.raises(AssertionError, match="pipeline started"):  # at the size threshold, Ray is used
        build_shards(_spec(data, tiny_model_dir), str(tmp_path / "big"), use_ray=True,
                     ray_min_bytes=data.stat().st_size)


def test_sigterm_while_building_stops_at_a_block_and_the_rerun_builds_whole(tmp_path, tiny_model_dir):
    """A stop asked for (SIGTERM under ``codiemb train``) while token shards are built ends the build
    at the next block with TrainingStopped; the partial set has no manifest and the rerun builds it."""
    import signal

    from codiemb.train import stop

    data = _retrieval_file(tmp_path / "r.jsonl", ROWS * 4)
    try:
        with stop.sigterm_stops_training():
            os.kill(os.getpid(), signal.SIGTERM)
            with pytest.raises(stop.TrainingStopped, match="during building the token shards of .*r.jsonl"):
                build_shards(_spec(data, tiny_model_dir), str(tmp_path / "shards"))
    finally:
        stop._requested.clear()
    assert not list((tmp_path / "shards").glob("*/manifest.json"))
    res = build_shards(_spec(data, tiny_model_dir), str(tmp_path / "shards"))
    assert not res.reused and res.counts["valid"] == 12
