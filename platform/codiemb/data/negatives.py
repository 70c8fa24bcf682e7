"""Hard-negative mining for retrieval rows, as FlagEmbedding's ``hn_mine`` and sentence-transformers'
``mine_hard_negatives`` do it, with NV-Retriever's positive-aware false-negative filter
(Moreira et al. 2024, arXiv 2407.15831, "TopK-PercPos").

1. The corpus is streamed in chunks, embedded and added to an exact inner-product index
   (:class:`codiemb.evaluate.index.ExactIndex`: faiss ``IndexFlatIP`` blocks, or chunked torch
   top-k), so its size is bounded by the index, not by Python objects; each document keeps a
   64-bit hash of its text, not the text.
2. Every query is searched for its top ``high`` documents; documents with the same text count
   once, and the row's positives and existing negatives (compared by text hash) are left out.
   The **candidates** are what remains at ranks ``[low, high)`` (0-based).
3. Optional **teacher** (``teacher=``, any :class:`Scorer`: a bi-encoder or a cross-encoder) rescores
   the candidates and the row's positives; the filter and the written scores then use its scores.
4. **False-negative filter**, against the row's positive score ``s_pos`` (the lowest of its
   positives' scores): a candidate with score ``s`` is kept only if ``s <= max_score_ratio · s_pos``
   (NV-Retriever keeps ``< 95 %`` of the positive) and ``s <= s_pos - absolute_margin``.
5. ``num`` minus the row's existing negatives are drawn at random (seeded) from the kept
   candidates, so a row ends with ``num`` negatives when enough candidates survive (rows that
   already have ``num`` or more keep theirs). A second streamed pass over the corpus fetches the
   texts of the drawn documents.

With ``scores=True`` every row also gets ``positive_scores`` and ``negative_scores`` (one float per
positive / negative, same order; existing negatives are scored too): the scorer's cosine (or
teacher) scores, for MarginMSE-style distillation. The rows' order and every other field are kept.

    codiemb data mine-negatives train/qp/scifact/scifact_train_pairs_nodev.jsonl --corpus ir/scifact \\
        --model minilm --num 3 --ranks 10:100 --max-score-ratio 0.95 --out runs/data/scifact_train_hn.jsonl
"""

from __future__ import annotations

import json
import logging
import os
import random
import tempfile
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from codiemb.data.hashing import text_hash, text_hashes
from codiemb.errors import UserError

log = logging.getLogger(__name__)

#: A corpus: texts in memory, or a function that streams them again (chunks of texts) on each call.
Corpus = Sequence[str] | Callable[[], Iterable[list[str]]]


def parse_ranks(text: str) -> tuple[int, int]:
    """``"10:100"`` -> (10, 100): the rank window, 0-based, ``high`` excluded."""
    try:
        low, high = (int(x) for x in text.split(":"))
    except ValueError:
        raise UserError(f"--ranks {text!r}: expected LOW:HIGH, e.g. 10:100") from None
    if not 0 <= low < high:
        raise UserError(f"--ranks {text!r}: need 0 <= LOW < HIGH")
    return low, high


# --------------------------------------------------------------------------- scorers
class EncoderScorer:
    """Cosine scores of (query, text) pairs by a bi-encoder (:class:`codiemb.model.encoder.Encoder`)."""

    def __init__(self, encoder, *, batch_size: int = 64, query_max_length: int | None = None,
                 doc_max_length: int | None = None) -> None:
        self.encoder, self.batch_size = encoder, batch_size
        self.query_max_length, self.doc_max_length = query_max_length, doc_max_length

    def embed_queries(self, queries: Sequence[str], instructions: Sequence[str | None]) -> torch.Tensor:
        """Queries grouped by instruction, so each is embedded the way training embeds it."""
        groups: dict[str | None, list[int]] = defaultdict(list)
        for i, ins in enumerate(instructions):
            groups[ins or None].append(i)
        out = None
        for ins, rows in groups.items():
            emb = self.encoder.encode([queries[i] for i in rows], batch_size=self.batch_size,
                                      max_length=self.query_max_length, instruction=ins, normalize=True)
            if out is None:
                out = torch.empty(len(queries), emb.shape[1])
            out[rows] = emb
        return out if out is not None else torch.empty(0, 0)

    def embed_docs(self, texts: Sequence[str]) -> torch.Tensor:
        return self.encoder.encode(list(texts), batch_size=self.batch_size, max_length=self.doc_max_length,
                                   normalize=True)

    def score(self, queries: Sequence[str], instructions: Sequence[str | None], texts: Sequence[str]) -> np.ndarray:
        """One score per pair ``(queries[i], texts[i])``."""
        if not len(texts):
            return np.zeros(0, np.float32)
        uq = list(dict.fromkeys(zip(queries, instructions)))
        ut = list(dict.fromkeys(texts))
        qe = self.embed_queries([q for q, _ in uq], [i for _, i in uq])
        te = self.embed_docs(ut)
        qi = {k: n for n, k in enumerate(uq)}
        ti = {k: n for n, k in enumerate(ut)}
        a = qe[[qi[k] for k in zip(queries, instructions)]]
        b = te[[ti[t] for t in texts]]
        return (a * b).sum(-1).numpy().astype(np.float32)


class CrossEncoderScorer:
    """Scores of (query, text) pairs by a sentence-transformers ``CrossEncoder`` (its activation applied)."""

    def __init__(self, name_or_path: str, *, batch_size: int = 32, max_length: int | None = None,
                 device=None) -> None:
        from sentence_transformers import CrossEncoder

        from codiemb.paths import resolve_model

        self.model = CrossEncoder(resolve_model(name_or_path), max_length=max_length, trust_remote_code=False,
                                  device=device)
        self.batch_size = batch_size

    def score(self, queries: Sequence[str], instructions: Sequence[str | None], texts: Sequence[str]) -> np.ndarray:
        if not len(texts):
            return np.zeros(0, np.float32)
        pairs = [[q, t] for q, t in zip(queries, texts)]
        s = self.model.predict(pairs, batch_size=self.batch_size, show_progress_bar=False, convert_to_numpy=True)
        return np.asarray(s, dtype=np.float32).reshape(len(texts), -1)[:, 0]


def load_teacher(name_or_path: str, *, batch_size: int = 64, query_max_length: int | None = None,
                 doc_max_length: int | None = None, device=None):
    """A teacher scorer: a cross-encoder when the folder's ``config.json`` names a
    ``*ForSequenceClassification`` architecture, else a bi-encoder loaded as :class:`Encoder`
    (on ``device``, default the CPU)."""
    from codiemb.model.encoder import Encoder
    from codiemb.paths import resolve_model

    cfg = Path(resolve_model(name_or_path)) / "config.json"
    arch = []
    if cfg.is_file():
        try:
            arch = json.loads(cfg.read_text(encoding="utf-8")).get("architectures") or []
        except (OSError, json.JSONDecodeError):
            arch = []
    if any(str(a).endswith("ForSequenceClassification") for a in arch):
        return CrossEncoderScorer(name_or_path, batch_size=batch_size, max_length=doc_max_length, device=device)
    return EncoderScorer(Encoder.load(name_or_path, device=device), batch_size=batch_size, query_max_length=query_max_length,
                         doc_max_length=doc_max_length)


# --------------------------------------------------------------------------- corpus
def _chunks(corpus: Corpus, chunk_size: int) -> Iterator[list[str]]:
    if callable(corpus):
        yield from corpus()
        return
    texts = list(corpus)
    for start in range(0, len(texts), chunk_size):
        yield texts[start:start + chunk_size]


def _fetch(corpus: Corpus, positions: set[int], chunk_size: int) -> dict[int, str]:
    """Texts of the documents at ``positions`` (one streamed pass)."""
    out: dict[int, str] = {}
    base = 0
    for chunk in _chunks(corpus, chunk_size):
        for j in range(len(chunk)):
            if base + j in positions:
                out[base + j] = chunk[j]
        base += len(chunk)
    return out


# --------------------------------------------------------------------------- mining
def mine_hard_negatives(encoder, records: Sequence[dict[str, Any]], corpus: Corpus, *, num: int = 3,
                        ranks: tuple[int, int] = (10, 100), seed: int = 0, batch_size: int = 64,
                        query_max_length: int | None = None, doc_max_length: int | None = None,
                        max_score_ratio: float | None = None, absolute_margin: float | None = None,
                        teacher=None, scores: bool = False, index: str = "faiss",
                        chunk_size: int = 16384, stats: dict | None = None) -> list[dict]:
    """New rows with mined negatives (see the module docstring); ``records`` are left as they are.

    ``stats`` (a dict, optional) receives counts: documents, unique documents, candidates seen,
    candidates the filter dropped, rows short of ``num``.
    """
    from codiemb.evaluate.index import ExactIndex, faiss_available

    if num < 1:
        raise UserError(f"num must be >= 1, got {num}")
    if max_score_ratio is not None and not max_score_ratio > 0:
        raise UserError(f"--max-score-ratio must be > 0, got {max_score_ratio}")
    if absolute_margin is not None and absolute_margin < 0:
        raise UserError(f"--absolute-margin must be >= 0, got {absolute_margin}")
    if index == "faiss" and not faiss_available():
        index = "torch"
    low, high = ranks
    student = EncoderScorer(encoder, batch_size=batch_size, query_max_length=query_max_length,
                            doc_max_length=doc_max_length)
    # 1. the corpus, chunk by chunk, into the exact index (ids: positions) and a hash per document
    store, hashes, n_docs = None, [], 0
    for chunk in _chunks(corpus, chunk_size):
        if not chunk:
            continue
        emb = student.embed_docs(chunk)
        if store is None:
            store = ExactIndex(emb.shape[1], backend=index)
        store.add([str(n_docs + j) for j in range(len(chunk))], emb)
        hashes.append(text_hashes(chunk))
        n_docs += len(chunk)
    if store is None:
        raise UserError("the corpus is empty")
    doc_hash = np.concatenate(hashes)
    n_unique = int(np.unique(doc_hash).size)
    # 2. search; candidates per row: unique texts at ranks [low, high), no positive, no existing negative
    queries = [r["query"] for r in records]
    instructions = [r.get("instruction") or None for r in records]
    q_emb = student.embed_queries(queries, instructions)
    hits = store.search(q_emb, min(high + (n_docs - n_unique), n_docs)) if records else []
    cands: list[list[tuple[int, float]]] = []
    for r, hit in zip(records, hits):
        taken = {text_hash(t) for t in list(r["positives"]) + list(r.get("negatives") or [])}
        seen: set[int] = set()
        ranked = []
        for doc_id, s in hit:
            pos = int(doc_id)
            h = int(doc_hash[pos])
            if h in seen:
                continue
            seen.add(h)
            ranked.append((pos, h, s))
        cands.append([(pos, s) for pos, h, s in ranked[low:high] if h not in taken])
    # 3. scores of positives (and candidates) by the scorer: the teacher if given, else the model
    scorer = teacher or student
    n_pos = [len(r["positives"]) for r in records]
    pos_scores = scorer.score([q for q, k in zip(queries, n_pos) for _ in range(k)],
                              [i for i, k in zip(instructions, n_pos) for _ in range(k)],
                              [p for r in records for p in r["positives"]])
    pos_split = np.split(pos_scores, np.cumsum(n_pos)[:-1]) if records else []
    texts: dict[int, str] = {}
    if teacher is not None:
        texts = _fetch(corpus, {p for c in cands for p, _ in c}, chunk_size)
        flat = [(i, p) for i, c in enumerate(cands) for p, _ in c]
        t_scores = teacher.score([queries[i] for i, _ in flat], [instructions[i] for i, _ in flat],
                                 [texts[p] for _, p in flat])
        it = iter(t_scores.tolist())
        cands = [[(p, next(it)) for p, _ in c] for c in cands]
    # 4. the false-negative filter, 5. the seeded draw
    rng = random.Random(seed)
    picked_rows: list[list[tuple[int, float]]] = []
    n_cand = n_dropped = short = 0
    for r, c, ps in zip(records, cands, pos_split):
        s_pos = float(np.min(ps))
        limit = np.inf
        if max_score_ratio is not None:
            limit = min(limit, max_score_ratio * s_pos)
        if absolute_margin is not None:
            limit = min(limit, s_pos - absolute_margin)
        kept = [(p, s) for p, s in c if s <= limit]
        n_cand += len(c)
        n_dropped += len(c) - len(kept)
        want = num - len(r.get("negatives") or [])
        picked = rng.sample(kept, min(want, len(kept))) if want > 0 else []
        short += want > 0 and len(picked) < want
        picked_rows.append(picked)
    missing = {p for pr in picked_rows for p, _ in pr} - set(texts)
    if missing:
        texts.update(_fetch(corpus, missing, chunk_size))
    # existing negatives' scores, when asked
    old = [(i, t) for i, r in enumerate(records) for t in (r.get("negatives") or [])] if scores else []
    old_scores = iter(scorer.score([queries[i] for i, _ in old], [instructions[i] for i, _ in old],
                                   [t for _, t in old]).tolist())
    out = []
    for r, picked, ps in zip(records, picked_rows, pos_split):
        row = dict(r)
        have = list(r.get("negatives") or [])
        row["negatives"] = have + [texts[p] for p, _ in picked]
        if scores:
            row["positive_scores"] = [round(float(x), 6) for x in ps]
            row["negative_scores"] = ([round(float(next(old_scores)), 6) for _ in have]
                                      + [round(float(s), 6) for _, s in picked])
        out.append(row)
    if short:
        log.warning("%d of %d rows got fewer than %d negatives (the rank window %d:%d held too few candidates)",
                    short, len(records), num, low, high)
    if max_score_ratio is not None or absolute_margin is not None:
        log.info("false-negative filter (max_score_ratio=%s, absolute_margin=%s) dropped %d of %d candidates",
                 max_score_ratio, absolute_margin, n_dropped, n_cand)
    if stats is not None:
        stats.update(documents=n_docs, unique_documents=n_unique, candidates=n_cand, filtered=n_dropped,
                     short_rows=short)
    return out


def write_jsonl_atomic(rows: Sequence[dict], path: str | os.PathLike) -> None:
    """Write rows as JSONL through a temporary file in the same folder, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def corpus_source(path: str | os.PathLike, chunk_size: int = 16384) -> Callable[[], Iterator[list[str]]]:
    """Documents to mine from, streamed in chunks on each call: a BEIR folder's corpus (title and
    text, as training pairs join them), or a retrieval file's positives and negatives."""
    from codiemb.data.beir import iter_corpus
    from codiemb.data.local import read_records
    from codiemb.errors import DataError

    p = Path(path)
    if p.is_dir():
        if not (p / "corpus.jsonl").is_file():
            raise DataError(f"{p / 'corpus.jsonl'}: BEIR file not found")

        def beir() -> Iterator[list[str]]:
            for _, texts in iter_corpus(p / "corpus.jsonl", chunk_size):
                yield texts

        return beir
    texts: list[str] = []
    for r in read_records(p, "retrieval").records:
        texts += r["positives"] + list(r.get("negatives") or [])
    return lambda: iter([texts[i:i + chunk_size] for i in range(0, len(texts), chunk_size)])


def corpus_texts(path: str | os.PathLike) -> list[str]:
    """All documents of :func:`corpus_source` as one list (small corpora)."""
    return [t for chunk in corpus_source(path)() for t in chunk]
