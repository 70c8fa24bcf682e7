"""benchmarks/sts_by_source.py: per-source STS-B Spearman, checked against the evaluator run on each
source's rows with an uncached encoder (so the embedding cache cannot change a number)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from codiemb.evaluate.sts import evaluate_sts
from codiemb.model.encoder import Encoder

WORDS = ["a cat runs", "the dog sleeps", "a man plays guitar", "rain falls", "the sun is hot", "kids swim",
         "a red car", "an old tree", "birds sing loudly", "water boils"]


def _write(data: Path) -> dict[str, list[dict]]:
    (data / "sts/stsb").mkdir(parents=True)
    rows = {}
    for split, shift in (("dev", 1), ("test", 3)):
        rows[split] = [{"sentence1": WORDS[i], "sentence2": WORDS[(i * shift + 1) % len(WORDS)],
                        "score": float((i * 7 + shift) % 6), "source": "forum" if i % 2 else "news"}
                       for i in range(len(WORDS))]
        (data / f"sts/stsb/{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[split]))
    return rows


def test_each_source_equals_the_evaluator_on_its_rows(load_benchmark, tiny_model_dir, tmp_path):
    bench = load_benchmark("sts_by_source")
    rows = _write(tmp_path / "data")
    got = bench.by_source(str(tiny_model_dir), str(tmp_path / "data"))
    enc = Encoder.load(str(tiny_model_dir))
    for split, split_rows in rows.items():
        assert list(got[split]) == ["all", "forum", "news"]
        for source, cell in got[split].items():
            subset = [r for r in split_rows if source in ("all", r["source"])]
            ref = evaluate_sts(enc, subset)
            assert cell["n"] == len(subset)
            assert cell["spearman"] == pytest.approx(ref["spearman"], abs=1e-6)
    table = bench.table({"m": got})
    assert "| test | forum | 5 |" in table and table.count("\n") == 2 + 6 - 1
