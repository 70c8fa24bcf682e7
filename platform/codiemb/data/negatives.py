"""Hard-negative mining for retrieval rows, as FlagEmbedding's ``hn_mine`` and sentence-transformers'
``mine_hard_negatives`` do it: embed a corpus once, rank it for every query with an encoder, and
sample the negatives from a window of ranks that skips the very top (where unlabelled positives
sit).

For each row: candidates are the documents at ranks ``[low, high)`` (0-based) that are neither one
of its positives nor already one of its negatives (compared as text); ``num`` minus the row's
existing negatives of them are drawn at random (seeded), so a row ends with ``num`` negatives when
enough candidates exist (rows that already have ``num`` or more keep theirs). The rows' order and
every other field are kept.

    codiemb data mine-negatives train/qp/scifact/scifact_train_pairs_nodev.jsonl --corpus ir/scifact \\
        --model minilm --num 3 --ranks 10:100 --out runs/data/scifact_train_hn.jsonl
"""

from __future__ import annotations

import json
import logging
import os
import random
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

import torch

from codiemb.errors import UserError

log = logging.getLogger(__name__)


def parse_ranks(text: str) -> tuple[int, int]:
    """``"10:100"`` -> (10, 100): the rank window, 0-based, ``high`` excluded."""
    try:
        low, high = (int(x) for x in text.split(":"))
    except ValueError:
        raise UserError(f"--ranks {text!r}: expected LOW:HIGH, e.g. 10:100") from None
    if not 0 <= low < high:
        raise UserError(f"--ranks {text!r}: need 0 <= LOW < HIGH")
    return low, high


def mine_hard_negatives(encoder, records: Sequence[dict[str, Any]], corpus: Sequence[str], *, num: int = 3,
                        ranks: tuple[int, int] = (10, 100), seed: int = 0, batch_size: int = 64,
                        query_max_length: int | None = None, doc_max_length: int | None = None) -> list[dict]:
    """New rows with mined negatives (see the module docstring); ``records`` are left as they are."""
    from codiemb.evaluate.metrics import exact_topk

    if num < 1:
        raise UserError(f"num must be >= 1, got {num}")
    low, high = ranks
    docs = list(dict.fromkeys(corpus))  # unique texts, first occurrence order
    if not docs:
        raise UserError("the corpus is empty")
    high = min(high, len(docs))
    doc_emb = encoder.encode(docs, batch_size=batch_size, max_length=doc_max_length, normalize=True)
    # queries grouped by instruction, so each is embedded the way training embeds it
    by_instruction: dict[str | None, list[int]] = defaultdict(list)
    for i, r in enumerate(records):
        by_instruction[r.get("instruction") or None].append(i)
    query_emb = torch.empty(len(records), doc_emb.shape[1])
    for instruction, rows in by_instruction.items():
        query_emb[rows] = encoder.encode([records[i]["query"] for i in rows], batch_size=batch_size,
                                         max_length=query_max_length, instruction=instruction, normalize=True)
    _, idx = exact_topk(query_emb, doc_emb, high)
    rng = random.Random(seed)
    out, short = [], 0
    for r, top in zip(records, idx.tolist()):
        have = list(r.get("negatives") or [])
        want = num - len(have)
        row = dict(r)
        if want > 0:
            taken = set(r["positives"]) | set(have)
            window = [docs[j] for j in top[low:high] if docs[j] not in taken]
            picked = rng.sample(window, min(want, len(window)))
            short += len(picked) < want
            row["negatives"] = have + picked
        out.append(row)
    if short:
        log.warning("%d of %d rows got fewer than %d negatives (the rank window %d:%d held too few candidates)",
                    short, len(records), num, low, high)
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


def corpus_texts(path: str | os.PathLike) -> list[str]:
    """Documents to mine from: a BEIR folder's corpus (title and text, as training pairs join them),
    or a retrieval JSONL's positives and negatives."""
    from codiemb.data.beir import doc_text, read_jsonl
    from codiemb.data.local import read_records
    from codiemb.errors import DataError

    p = Path(path)
    if p.is_dir():
        if not (p / "corpus.jsonl").is_file():
            raise DataError(f"{p / 'corpus.jsonl'}: BEIR file not found")
        return [doc_text(row) for _, row in read_jsonl(p / "corpus.jsonl")]
    texts: list[str] = []
    for r in read_records(p, "retrieval").records:
        texts += r["positives"] + list(r.get("negatives") or [])
    return texts
