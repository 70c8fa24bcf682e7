"""STS evaluation: Spearman (and Pearson) correlation of cosine similarity with the gold score, × 100.

This is MTEB's STS protocol (``STSEvaluator``: cosine of the two embeddings, ``scipy.stats.spearmanr``
against the gold scores); the main score is the Spearman correlation.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Iterable
from pathlib import Path

import torch

from codiemb.errors import DataError
from codiemb.evaluate.metrics import pearson, spearman

logger = logging.getLogger(__name__)


def read_sts_pairs(path: str | os.PathLike) -> list[dict]:
    """Read a JSONL file of ``{"sentence1", "sentence2", "score"}`` rows; a bad row is a DataError."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: STS file not found")
    from codiemb.data.beir import read_jsonl

    rows = [_check_pair(row, f"{path}:{lineno}") for lineno, row in read_jsonl(path)]
    if len(rows) < 2:
        raise DataError(f"{path}: needs at least 2 STS pairs, found {len(rows)}")
    return rows


def _check_pair(row, where: str) -> dict:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object")
    for key in ("sentence1", "sentence2"):
        if not isinstance(row.get(key), str) or not row[key].strip():
            raise DataError(f"{where}: field {key!r} is missing or empty")
    score = row.get("score")
    if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
        raise DataError(f"{where}: field 'score' must be a finite number, got {score!r}")
    return {"sentence1": row["sentence1"], "sentence2": row["sentence2"], "score": float(score)}


def evaluate_sts(encoder, pairs: str | os.PathLike | Iterable[dict], batch_size: int = 64,
                 max_length: int | None = None, show_progress: bool = False, ctx=None,
                 instruction: str | None = None, progress=None) -> dict:
    """Score ``encoder`` on STS pairs (a JSONL path or records).

    Each distinct sentence is embedded once (at ``max_length``, default the model's
    ``max_seq_length``), L2-normalised; the prediction is the cosine of the two sentences.
    Returns ``{"spearman": ρ×100, "pearson": r×100, "n": pairs, "seconds": wall time}``.
    ``instruction`` (default: the model's own ``sts`` one) prefixes both sentences.
    ``ctx`` (rank / world_size / device): the ranks of a torch.distributed group share the
    embedding (``codiemb.evaluate.distributed.encode_texts``); every rank gets the same result.
    ``progress``: a tqdm-like bar moved by the number of sentences embedded.
    """
    from codiemb.evaluate.distributed import encode_texts

    t0 = time.perf_counter()
    if isinstance(pairs, (str, os.PathLike)):
        records = read_sts_pairs(pairs)
    else:
        records = [_check_pair(r, f"record {i}") for i, r in enumerate(pairs)]
        if len(records) < 2:
            raise DataError(f"needs at least 2 STS pairs, got {len(records)}")
    texts = list(dict.fromkeys(s for r in records for s in (r["sentence1"], r["sentence2"])))
    index = {t: i for i, t in enumerate(texts)}
    instruction = instruction or getattr(encoder, "instructions", {}).get("sts")
    emb = encode_texts(encoder, texts, batch_size=batch_size, max_length=max_length, ctx=ctx,
                       show_progress=show_progress, instruction=instruction, progress=progress)
    emb = torch.as_tensor(emb, dtype=torch.float32)
    a = emb[[index[r["sentence1"]] for r in records]]
    b = emb[[index[r["sentence2"]] for r in records]]
    cos = (a * b).sum(dim=1).tolist()
    gold = [r["score"] for r in records]
    result = {"spearman": 100.0 * spearman(cos, gold), "pearson": 100.0 * pearson(cos, gold), "n": len(records),
              "seconds": round(time.perf_counter() - t0, 3)}
    logger.info("STS: spearman %.2f pearson %.2f over %d pairs", result["spearman"], result["pearson"], result["n"])
    return result
