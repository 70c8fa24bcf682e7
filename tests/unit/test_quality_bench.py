"""benchmarks/quality.py: the rows it derives from the recipe, the naive-joint data file, the verdict
lines and the BENCHMARKS.md block it rewrites (training itself is what the benchmark measures)."""

from __future__ import annotations

import json

import pytest

from codiemb.config import config_from_dict


@pytest.fixture(scope="module")
def quality(load_benchmark):
    return load_benchmark("quality")


@pytest.fixture()
def recipe(tmp_path):
    sts = tmp_path / "sts.jsonl"
    sts.write_text("\n".join(json.dumps(r) for r in [
        {"sentence1": "a", "sentence2": "b", "score": 5.0},
        {"sentence1": "c", "sentence2": "d", "score": 3.9},
        {"sentence1": "e", "sentence2": "f", "score": 4.0},
    ]) + "\n")
    ir = tmp_path / "ir.jsonl"
    ir.write_text("\n".join(json.dumps(r) for r in [
        {"query": "q1", "positive": "p1"},
        {"query": "q2", "positive": "p2", "negatives": ["n2"]},
        {"query": "q3", "positive": "p3"},
    ]) + "\n")
    return config_from_dict({"data": {"root": str(tmp_path), "datasets": [
        {"name": "stsb", "task": "sts", "path": "sts.jsonl", "score_range": [0, 5], "batch_size": 4},
        {"name": "ir", "task": "retrieval", "path": "ir.jsonl", "batch_size": 2, "max_rows": 2},
    ]}})


def test_rows_cut_the_recipe(quality, recipe, tmp_path):
    assert [d.name for d in quality._row_config("ir-only", recipe, tmp_path).data.datasets] == ["ir"]
    assert [d.name for d in quality._row_config("sts-only", recipe, tmp_path).data.datasets] == ["stsb"]
    assert quality._row_config("codiemb-joint", recipe, tmp_path).data.datasets == recipe.data.datasets
    naive = quality._row_config("naive-joint", recipe, tmp_path).data.datasets
    assert len(naive) == 1 and naive[0].task == "retrieval" and naive[0].batch_size == 32
    assert [d.name for d in recipe.data.datasets] == ["stsb", "ir"]  # the recipe itself is untouched


def test_naive_data_keeps_paraphrases_and_the_recipe_rows(quality, recipe, tmp_path):
    path = quality._naive_jsonl(recipe, tmp_path / "naive.jsonl")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    # STS pairs scored >= 4 of 5 (5.0 and 4.0, not 3.9), then the first max_rows=2 retrieval rows
    assert [r["query"] for r in rows] == ["a", "e", "q1", "q2"]
    assert rows[0]["positive"] == "b" and rows[3]["negatives"] == ["n2"]


def test_verdict_and_benchmarks_block(quality, tmp_path):
    def r(sts, ir):
        return {"stsb_test": sts, "scifact_test": ir, "mean_test": (sts + ir) / 2}

    by = {"codiemb-joint": r(86.0, 70.0), "peer": r(85.0, 69.0), "ir-only": r(82.0, 70.3), "sts-only": r(86.8, 61.0)}
    lines = quality.verdict(by)
    assert "78.00 vs 77.00 (ahead by 1.00)" in lines[0]
    assert "86.00 vs 86.80 (gap +0.80" in lines[1] and "70.00 vs 70.30 (gap +0.30" in lines[2]

    doc = tmp_path / "B.md"
    doc.write_text("# B\n\nintro\n")
    quality.write_benchmarks("table one", doc)
    quality.write_benchmarks("table two", doc)
    text = doc.read_text()
    start, _ = quality.markers()
    assert start == "<!-- quality:start -->"
    assert text.count(start) == 1 and "table two" in text and "table one" not in text
    assert text.startswith("# B\n\nintro\n")
    # a second named block is replaced on its own and leaves the first alone
    doc.write_text(text + "\n<!-- quality-old:start -->\nold one\n<!-- quality-old:end -->\ntail\n")
    quality.write_benchmarks("old two", doc, block="old")
    text = doc.read_text()
    assert "old two" in text and "old one" not in text and "table two" in text and text.endswith("tail\n")
