"""BEIR folders: ``corpus.jsonl`` (_id, title, text), ``queries.jsonl`` (_id, text), ``qrels/<split>.tsv``.

Plain Python (no Ray): the evaluator and the training core both use it. Document text is
``title + " " + text`` (stripped), as sentence-transformers and MTEB embed it.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

from codiemb.errors import DataError


@dataclass
class BeirSplit:
    corpus: dict[str, str]
    queries: dict[str, str]
    qrels: dict[str, dict[str, int]]  # query id -> {doc id: relevance}
    folder: str = ""
    split: str = ""
    doc_ids: list[str] = field(default_factory=list)


def doc_text(row: dict) -> str:
    title = (row.get("title") or "").strip()
    text = (row.get("text") or "").strip()
    return f"{title} {text}".strip() if title else text


def read_jsonl(path: Path) -> list[tuple[int, dict]]:
    """(line number, object) for each non-blank line; a bad line is a DataError naming file and line."""
    rows = []
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            if not raw.strip():
                continue
            try:
                rows.append((lineno, json.loads(raw.decode("utf-8"))))
            except UnicodeDecodeError:
                raise DataError(f"{path}:{lineno}: line is not valid UTF-8") from None
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: invalid JSON ({exc.msg})") from None
    return rows


def read_qrels(path: Path) -> dict[str, dict[str, int]]:
    qrels: dict[str, dict[str, int]] = {}
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh, delimiter="\t")
        for lineno, row in enumerate(reader, 1):
            if not row or (lineno == 1 and row[0] == "query-id"):
                continue
            if len(row) != 3:
                raise DataError(f"{path}:{lineno}: expected 3 tab-separated fields (query-id corpus-id score), got {len(row)}")
            qid, did, score = row
            try:
                qrels.setdefault(qid, {})[did] = int(float(score))
            except ValueError:
                raise DataError(f"{path}:{lineno}: score {score!r} is not a number") from None
    return qrels


def _read_jsonl(path: Path) -> list[dict]:
    return [row for _, row in read_jsonl(path)]


def load_beir(folder: str | Path, split: str = "test") -> BeirSplit:
    """Load a BEIR folder; keeps only queries that have qrels in ``split`` with relevance > 0."""
    folder = Path(folder)
    qrels_path = folder / "qrels" / f"{split}.tsv"
    for p in (folder / "corpus.jsonl", folder / "queries.jsonl", qrels_path):
        if not p.is_file():
            raise DataError(f"{p}: BEIR file not found")
    corpus = {str(r["_id"]): doc_text(r) for r in _read_jsonl(folder / "corpus.jsonl")}
    all_queries = {str(r["_id"]): r["text"] for r in _read_jsonl(folder / "queries.jsonl")}
    qrels = {q: {d: s for d, s in docs.items() if s > 0} for q, docs in read_qrels(qrels_path).items()}
    qrels = {q: docs for q, docs in qrels.items() if docs}
    missing = [q for q in qrels if q not in all_queries]
    if missing:
        raise DataError(f"{qrels_path}: query id {missing[0]!r} is not in queries.jsonl ({len(missing)} missing)")
    queries = {q: all_queries[q] for q in qrels}
    return BeirSplit(corpus=corpus, queries=queries, qrels=qrels, folder=str(folder), split=split,
                     doc_ids=list(corpus))


def beir_training_pairs(folder: str | Path, split: str = "train") -> list[dict]:
    """One retrieval record per query: its relevant documents as positives, no hard negatives."""
    b = load_beir(folder, split)
    return [
        {"query": b.queries[q], "positives": [b.corpus[d] for d in docs if d in b.corpus], "negatives": []}
        for q, docs in b.qrels.items()
    ]
