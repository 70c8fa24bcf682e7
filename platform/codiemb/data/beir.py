"""BEIR folders: ``corpus.jsonl`` (_id, title, text), ``queries.jsonl`` (_id, text), ``qrels/<split>.tsv``.

Plain Python (no Ray): the evaluator and the training core both use it. Document text is
``title + " " + text`` (stripped), as sentence-transformers and MTEB embed it.

Queries and qrels are small and are loaded into dicts. The corpus may be millions of documents:
:func:`iter_corpus` streams it in chunks of ``(ids, texts)``, and ``load_beir(..., corpus=False)``
returns a split that streams its corpus from the file when it is read with
:meth:`BeirSplit.iter_corpus` (what the evaluator does). ``load_beir`` with the default
``corpus=True`` still holds the whole corpus in a dict, for small sets (merge re-ranking pools,
training pairs).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
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
    streamed: bool = False  # True: ``corpus`` is empty and iter_corpus reads folder/corpus.jsonl

    @property
    def corpus_path(self) -> Path:
        return Path(self.folder) / "corpus.jsonl"

    def iter_corpus(self, chunk_size: int = 16384) -> Iterator[tuple[list[str], list[str]]]:
        """The corpus as ``(doc ids, texts)`` chunks of at most ``chunk_size`` documents, in file order.

        From memory when the split holds its corpus, else streamed from ``corpus.jsonl``.
        """
        if not self.streamed:
            ids = list(self.doc_ids or self.corpus)
            for start in range(0, len(ids), chunk_size):
                part = ids[start:start + chunk_size]
                yield part, [self.corpus[d] for d in part]
            return
        yield from iter_corpus(self.corpus_path, chunk_size)


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


def parse_corpus_line(raw: bytes, where: str) -> tuple[str, str]:
    """``(doc id, title + " " + text)`` of one corpus.jsonl line; a bad line is a DataError naming ``where``."""
    row = parse_corpus_row(raw, where)
    return str(row["_id"]), doc_text(row)


def parse_corpus_row(raw: bytes, where: str) -> dict:
    """One corpus.jsonl line as a checked dict (``_id`` present, ``title`` / ``text`` strings when set)."""
    try:
        row = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise DataError(f"{where}: line is not valid UTF-8") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{where}: invalid JSON ({exc.msg})") from None
    if not isinstance(row, dict) or row.get("_id") is None:
        raise DataError(f"{where}: a corpus row needs an '_id' field")
    for key in ("title", "text"):
        if row.get(key) is not None and not isinstance(row[key], str):
            raise DataError(f"{where}: field {key!r} must be a string")
    return row


def iter_corpus(path: str | Path, chunk_size: int = 16384) -> Iterator[tuple[list[str], list[str]]]:
    """Stream a BEIR ``corpus.jsonl`` as ``(doc ids, texts)`` chunks of at most ``chunk_size`` rows.

    Only one chunk of text is held at a time. Blank lines are skipped; a bad line is a DataError
    naming file and line. Duplicate ids are not detected here (the evaluator checks them).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: BEIR file not found")
    ids: list[str] = []
    texts: list[str] = []
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            if not raw.strip():
                continue
            doc_id, text = parse_corpus_line(raw, f"{path}:{lineno}")
            ids.append(doc_id)
            texts.append(text)
            if len(ids) >= chunk_size:
                yield ids, texts
                ids, texts = [], []
    if ids:
        yield ids, texts


def _read_jsonl(path: Path) -> list[dict]:
    return [row for _, row in read_jsonl(path)]


def load_beir(folder: str | Path, split: str = "test", corpus: bool = True) -> BeirSplit:
    """Load a BEIR folder; keeps only queries that have qrels in ``split`` with relevance > 0.

    ``corpus=False`` leaves the corpus on disk: ``split.corpus`` is empty and
    ``split.iter_corpus()`` streams ``corpus.jsonl`` (for corpora of any size).
    """
    folder = Path(folder)
    qrels_path = folder / "qrels" / f"{split}.tsv"
    for p in (folder / "corpus.jsonl", folder / "queries.jsonl", qrels_path):
        if not p.is_file():
            raise DataError(f"{p}: BEIR file not found")
    docs: dict[str, str] = {}
    if corpus:
        for ids, texts in iter_corpus(folder / "corpus.jsonl"):
            docs.update(zip(ids, texts))
    all_queries = {str(r["_id"]): r["text"] for r in _read_jsonl(folder / "queries.jsonl")}
    qrels = {q: {d: s for d, s in docs.items() if s > 0} for q, docs in read_qrels(qrels_path).items()}
    qrels = {q: docs for q, docs in qrels.items() if docs}
    missing = [q for q in qrels if q not in all_queries]
    if missing:
        raise DataError(f"{qrels_path}: query id {missing[0]!r} is not in queries.jsonl ({len(missing)} missing)")
    queries = {q: all_queries[q] for q in qrels}
    return BeirSplit(corpus=docs, queries=queries, qrels=qrels, folder=str(folder), split=split,
                     doc_ids=list(docs), streamed=not corpus)


def beir_training_pairs(folder: str | Path, split: str = "train") -> list[dict]:
    """One retrieval record per query: its relevant documents as positives, no hard negatives."""
    b = load_beir(folder, split)
    return [
        {"query": b.queries[q], "positives": [b.corpus[d] for d in docs if d in b.corpus], "negatives": []}
        for q, docs in b.qrels.items()
    ]
