"""Hard-negative mining (codiemb.data.negatives, `codiemb data mine-negatives`) with the tiny BERT:
the negatives come from the asked rank window of the encoder's own ranking, never a positive,
existing negatives are kept, the draw is seeded, and bad input is one clear error."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
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


def _scored_window(enc, query: str, positive: str, low: int, high: int):
    """(positive's cosine, [(doc, cosine)] of the rank window without the positive), by ``enc``."""
    docs = enc.encode(DOCS, normalize=True)
    q = enc.encode([query], normalize=True)
    s = (q @ docs.T)[0]
    order = torch.argsort(s, descending=True).tolist()
    pos = float((q @ enc.encode([positive], normalize=True).T)[0, 0])
    return pos, [(DOCS[j], float(s[j])) for j in order[low:high] if DOCS[j] != positive]


def _cut(values: list[float]) -> float:
    """A threshold inside ``values`` (middle third), halfway across their widest gap there, so that
    float noise between two ways of embedding cannot move a candidate across it."""
    v = sorted(values)
    lo, hi = len(v) // 3, 2 * len(v) // 3
    i = max(range(lo, hi), key=lambda k: v[k + 1] - v[k])
    return (v[i] + v[i + 1]) / 2


def test_false_negative_filter_drops_candidates_near_the_positive_and_writes_scores(tiny_model_dir):
    enc = Encoder.load(str(tiny_model_dir))
    rows = _rows()
    windows = [_scored_window(enc, r["query"], r["positives"][0], 0, 12) for r in rows]
    # a ratio that cuts inside the windows: the median candidate/positive ratio
    ratio = _cut([s / p for p, w in windows for _, s in w])
    stats: dict = {}
    out = mine_hard_negatives(enc, rows, DOCS, num=3, ranks=(0, 12), seed=0, max_score_ratio=ratio, scores=True,
                              stats=stats)
    assert 0 < stats["filtered"] < stats["candidates"]
    for r, (p, w) in zip(out, windows):
        kept = {d: s for d, s in w if s <= ratio * p}
        assert set(r["negatives"]) <= set(kept) and len(r["negatives"]) == min(3, len(kept))
        assert r["positive_scores"] == pytest.approx([p], abs=1e-4)
        assert r["negative_scores"] == pytest.approx([kept[d] for d in r["negatives"]], abs=1e-4)
        assert all(s <= ratio * p + 1e-5 for s in r["negative_scores"])
    # the absolute margin: candidates within `margin` of the positive are dropped
    margin = _cut([p - s for p, w in windows for _, s in w])
    for r, (p, w) in zip(mine_hard_negatives(enc, rows, DOCS, num=3, ranks=(0, 12), seed=0, absolute_margin=margin,
                                             scores=True), windows):
        kept = {d for d, s in w if s <= p - margin}
        assert set(r["negatives"]) <= kept and len(r["negatives"]) == min(3, len(kept))
    # without a filter nothing is dropped, and the draw is the one of the plain window
    assert mine_hard_negatives(enc, rows, DOCS, num=3, ranks=(0, 12), seed=0, stats=stats) and stats["filtered"] == 0
    with pytest.raises(UserError, match="--max-score-ratio"):
        mine_hard_negatives(enc, rows, DOCS, max_score_ratio=0.0)


def test_existing_negatives_are_scored_and_the_torch_index_agrees(tiny_model_dir):
    enc = Encoder.load(str(tiny_model_dir))
    rows = _rows()
    rows[2]["negatives"] = [DOCS[5]]
    out = mine_hard_negatives(enc, rows, DOCS, num=2, ranks=(1, 9), seed=3, scores=True)
    q = enc.encode([rows[2]["query"]], normalize=True)
    assert out[2]["negatives"][0] == DOCS[5]
    assert out[2]["negative_scores"][0] == pytest.approx(float((q @ enc.encode([DOCS[5]], normalize=True).T)[0, 0]),
                                                         abs=1e-4)
    def same(a, b):  # same rows; scores equal up to float summation order
        strip = [{k: v for k, v in r.items() if not k.endswith("_scores")} for r in a]
        assert strip == [{k: v for k, v in r.items() if not k.endswith("_scores")} for r in b]
        for x, y in zip(a, b):
            assert x["negative_scores"] == pytest.approx(y["negative_scores"], abs=1e-5)

    same(mine_hard_negatives(enc, rows, DOCS, num=2, ranks=(1, 9), seed=3, scores=True, index="torch"), out)
    # a streamed corpus (chunks on each call) mines the same rows as the list
    same(mine_hard_negatives(enc, rows, lambda: iter([DOCS[:7], DOCS[7:15], DOCS[15:]]), num=2, ranks=(1, 9),
                             seed=3, scores=True), out)


def test_a_teacher_rescores_and_its_scores_decide(tiny_model_dir, tmp_path):
    from tests.conftest import build_tiny_bert

    from codiemb.data.negatives import CrossEncoderScorer, EncoderScorer, load_teacher

    enc = Encoder.load(str(tiny_model_dir))
    teacher_dir = build_tiny_bert(tmp_path / "teacher", seed=5)
    teacher = load_teacher(str(teacher_dir))
    assert isinstance(teacher, EncoderScorer)
    tenc = teacher.encoder
    rows = _rows()
    out = mine_hard_negatives(enc, rows, DOCS, num=3, ranks=(0, 12), seed=0, teacher=teacher, max_score_ratio=1.0,
                              scores=True)
    for r in out:
        q = tenc.encode([r["query"]], normalize=True)
        for text, s in zip(r["positives"] + r["negatives"], r["positive_scores"] + r["negative_scores"]):
            assert s == pytest.approx(float((q @ tenc.encode([text], normalize=True).T)[0, 0]), abs=1e-4)
        assert all(s <= r["positive_scores"][0] + 1e-5 for s in r["negative_scores"])
        # the candidates still come from the student's window
        assert set(r["negatives"]) <= {d for d, _ in _scored_window(enc, r["query"], r["positives"][0], 0, 12)[1]}

    # a folder with a sequence-classification head is a cross-encoder teacher
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    ce_dir = tmp_path / "ce"
    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    tok.save_pretrained(ce_dir)
    torch.manual_seed(0)
    BertForSequenceClassification(BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=1,
                                             num_attention_heads=2, intermediate_size=64, num_labels=1,
                                             max_position_embeddings=128)).save_pretrained(ce_dir)
    ce = load_teacher(str(ce_dir))
    assert isinstance(ce, CrossEncoderScorer)
    s = ce.score(["cats and houses", "rain"], [None, None], [DOCS[0], DOCS[7]])
    assert s.shape == (2,) and np.isfinite(s).all() and s[0] != s[1]
    out = mine_hard_negatives(enc, rows, DOCS, num=2, ranks=(0, 12), seed=0, teacher=ce, scores=True)
    assert all(len(r["negatives"]) == 2 and len(r["negative_scores"]) == 2 for r in out)
