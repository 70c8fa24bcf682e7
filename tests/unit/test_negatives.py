"""Hard-negative mining (codiemb.data.negatives, `codiemb data mine-negatives`) with the tiny BERT:
the negatives come from the asked rank window of the encoder's own ranking, never a positive,
existing negatives are kept, the draw is seeded, and bad input is one clear error."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from codiemb import cli
from codiemb.data.negatives import mine_hard_negatives, parse_ranks
from codiemb.errors import UserError
from codiemb.model.encoder import Encoder

DOCS = [f"document {w} about {v}" for w in ("cats", "dogs", "rain", "sun", "tea", "rock", "kids", "cars")
        for v in ("houses", "rivers", "music")]
QUERIES = ["cats and houses", "rain on rivers", "music of cars", "tea for kids"]


def _rows():
    return [{"query": q, "positives": [DOCS[3 * i]], "negatives": [], "instruction": None, "id": i}
            for i, q in enumerate(QUERIES)]


def _ranking(enc, query: str) -> list[str]:
    docs = enc.encode(DOCS, normalize=True)
    q = enc.encode([query], normalize=True)
    order = torch.argsort(q @ docs.T, dim=1, descending=True)[0].tolist()
    return [DOCS[j] for j in order]


def test_negatives_come_from_the_rank_window_and_never_a_positive(tiny_model_dir):
    enc = Encoder.load(str(tiny_model_dir))
    rows = _rows()
    rows[1]["negatives"] = ["an existing negative"]
    out = mine_hard_negatives(enc, rows, DOCS, num=3, ranks=(2, 8), seed=0)
    assert rows[1]["negatives"] == ["an existing negative"]  # the input is left alone
    assert [r["id"] for r in out] == [0, 1, 2, 3]  # order and other fields kept
    for r in out:
        window = set(_ranking(enc, r["query"])[2:8])
        mined = r["negatives"][1:] if r["id"] == 1 else r["negatives"]
        assert len(r["negatives"]) == 3 and len(set(r["negatives"])) == 3
        assert set(mined) <= window - set(r["positives"]), r
    assert out[1]["negatives"][0] == "an existing negative"
    # seeded: the same seed draws the same, and some other seed draws differently
    assert mine_hard_negatives(enc, rows, DOCS, num=3, ranks=(2, 8), seed=0) == out
    assert any(mine_hard_negatives(enc, rows, DOCS, num=3, ranks=(2, 8), seed=s) != out for s in range(1, 6))
    # a window of exactly num candidates (the positive outside it) takes them all
    for r in mine_hard_negatives(enc, _rows(), DOCS, num=2, ranks=(0, 3), seed=0):
        top3 = _ranking(enc, r["query"])[:3]
        window = [d for d in top3 if d not in r["positives"]]
        if len(window) == 2:
            assert sorted(r["negatives"]) == sorted(window)
        else:
            assert len(r["negatives"]) == 2 and set(r["negatives"]) <= set(window)


def test_a_window_too_small_warns_and_rows_with_enough_keep_theirs(tiny_model_dir, caplog):
    enc = Encoder.load(str(tiny_model_dir))
    rows = _rows()
    rows[0]["negatives"] = ["x", "y", "z", "w"]
    with caplog.at_level(logging.WARNING, logger="codiemb.data.negatives"):
        out = mine_hard_negatives(enc, rows, DOCS, num=3, ranks=(0, 2), seed=0)
    assert out[0]["negatives"] == ["x", "y", "z", "w"]
    assert all(1 <= len(r["negatives"]) <= 2 for r in out[1:])
    assert [m for m in caplog.messages if "fewer than 3 negatives" in m] == \
        ["3 of 4 rows got fewer than 3 negatives (the rank window 0:2 held too few candidates)"]


def test_ranks_and_num_are_checked():
    assert parse_ranks("10:100") == (10, 100)
    for bad in ("10", "a:b", "5:5", "-1:3"):
        with pytest.raises(UserError, match="--ranks"):
            parse_ranks(bad)
    with pytest.raises(UserError, match="num must be >= 1"):
        mine_hard_negatives(None, _rows(), DOCS, num=0)


def test_cli_mines_from_a_beir_folder_and_names_a_bad_line(tiny_model_dir, tmp_path, capsys):
    beir = tmp_path / "beir"
    beir.mkdir()
    (beir / "corpus.jsonl").write_text("".join(json.dumps({"_id": str(i), "title": "", "text": d}) + "\n"
                                               for i, d in enumerate(DOCS)))
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"query": r["query"], "positive": r["positives"][0]}) + "\n" for r in _rows()))
    out = tmp_path / "out" / "mined.jsonl"
    # a relative corpus path that is not in the working folder is taken under --data-dir, as in configs
    assert not (Path.cwd() / "beir").exists()
    rc = cli.main(["data", "mine-negatives", str(pairs), "--corpus", "beir", "--data-dir", str(tmp_path),
                   "--model", str(tiny_model_dir), "--num", "2", "--ranks", "1:10", "--out", str(out)])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {k: summary[k] for k in ("out", "rows", "corpus", "negatives")} == \
        {"out": str(out), "rows": 4, "corpus": len(DOCS), "negatives": 8}
    assert summary["filtered"] == 0 and summary["candidates"] >= 8
    mined = [json.loads(line) for line in out.read_text().splitlines()]
    assert [m["query"] for m in mined] == QUERIES
    assert all(len(m["negatives"]) == 2 and m["positives"][0] not in m["negatives"] for m in mined)
    assert not list(out.parent.glob(".*.tmp"))  # the temporary file was renamed, not left behind

    # a bad row: one error naming file and line, and the output file is not touched
    before = out.read_text()
    pairs.write_text(pairs.read_text() + '{"query": "no positive here"}\n')
    rc = cli.main(["data", "mine-negatives", str(pairs), "--corpus", str(beir), "--model", str(tiny_model_dir),
                   "--out", str(out)])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("codiemb: error:")]
    assert rc == 2 and len(err) == 1 and f"{pairs}:5" in err[0], err
    assert out.read_text() == before
