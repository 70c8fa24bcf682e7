"""benchmarks/fusion_bars.py: issue 5's bars from score files, each bar checked at its edge."""

from __future__ import annotations

import json

import pytest


def _score(stsb_dev, scifact_dev, stsb_test, scifact_test) -> dict:
    return {"stsb_dev": stsb_dev, "scifact_dev": scifact_dev, "stsb_test": stsb_test, "scifact_test": scifact_test}


IR = _score(86.0, 71.5, 81.0, 71.0)
STS = _score(88.0, 60.5, 87.0, 63.5)
SOUP = _score(88.0, 67.0, 84.5, 69.5)


def _holds(rows) -> dict[tuple[str, str], bool]:
    return {(r["split"], r["bar"].split()[0] + (" floor" if "least" in r["bar"] else "")): r["holds"] for r in rows}


def test_each_bar_at_its_edge(load_benchmark):
    bars = load_benchmark("fusion_bars")
    # exactly 0.5 below each specialist (on test STS-B that is also the 86.5 floor) holds
    edge = _score(87.5, 71.0, 86.5, 70.5)
    rows = bars.check(IR, STS, edge, SOUP)
    assert all(r["holds"] for r in rows), rows
    assert len(rows) == 3 + 5  # dev: 2 gaps + soup; test: 2 gaps + soup + 2 floors
    # a hundredth further below each flips exactly that bar
    for key, split, bar in (("stsb_dev", "dev", "STS-B"), ("scifact_dev", "dev", "SciFact"),
                            ("stsb_test", "test", "STS-B"), ("scifact_test", "test", "SciFact")):
        worse = dict(edge, **{key: edge[key] - 0.01})
        failed = {k for k, v in _holds(bars.check(IR, STS, worse, SOUP)).items() if not v}
        expected = {(split, bar)}
        if key == "stsb_test":  # 86.49 is also under the 86.5 floor
            expected.add(("test", "STS-B floor"))
        assert failed == expected, (key, failed)


def test_floors_and_soup(load_benchmark):
    bars = load_benchmark("fusion_bars")
    weak_ir = _score(86.0, 67.0, 81.0, 67.9)  # an IR specialist weak enough that the gap bar is easy
    merge = _score(88.0, 66.9, 86.5, 67.5)
    failed = {k for k, v in _holds(bars.check(weak_ir, STS, merge)).items() if not v}
    assert failed == {("test", "SciFact floor")}
    rich_soup = _score(90.0, 70.0, 90.0, 70.0)
    failed = {k for k, v in _holds(bars.check(IR, STS, _score(87.5, 71.0, 86.5, 70.5), rich_soup)).items() if not v}
    assert failed == {("dev", "mean"), ("test", "mean")}


def test_score_files(load_benchmark, tmp_path):
    bars = load_benchmark("fusion_bars")
    (tmp_path / "one.json").write_text(json.dumps([dict(IR, model="m")]))
    (tmp_path / "plain.json").write_text(json.dumps(IR))
    (tmp_path / "two.json").write_text(json.dumps([IR, STS]))
    (tmp_path / "bad.json").write_text(json.dumps({"stsb_dev": 1.0}))
    assert bars.load_score(tmp_path / "one.json")["scifact_test"] == 71.0
    assert bars.load_score(tmp_path / "plain.json") == IR
    with pytest.raises(SystemExit, match="holds 2 scores"):
        bars.load_score(tmp_path / "two.json")
    with pytest.raises(SystemExit, match="missing stsb_test, scifact_dev, scifact_test"):
        bars.load_score(tmp_path / "bad.json")
    table = bars.table(bars.check(IR, STS, STS, SOUP))
    assert table.splitlines()[0] == "| split | bar | merge | needs | holds |"
    assert "| dev | SciFact within 0.5 of the IR specialist | 60.50 | 71.00 | **no** |" in table
