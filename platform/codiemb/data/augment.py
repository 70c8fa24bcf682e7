"""Silver STS pairs from a teacher: Augmented SBERT (Thakur et al., NAACL 2021, arXiv 2010.08240),
as PatentSBERTa (Bekamiri et al. 2021) uses it. ``codiemb data augment`` writes them.

1. **Pool.** Unlabeled texts are streamed from JSONL/Parquet files, one text per row (a JSON
   string, or an object with ``text``) or two (an STS / pairs file: ``sentence1`` and
   ``sentence2``, e.g. STS-B or SNLI pairs). Identical texts count once (64-bit text hash). The pool
   keeps every distinct text as a Python string, so it is bounded by ``max_texts`` (default
   200,000, about 30 MB of short sentences); a file with more distinct texts is an error, not a
   silent cut. Each of ``anchors`` texts (all, or a seeded sample) gets partners from the pool.
2. **Candidates.** Random pairs are nearly all dissimilar, so the paper samples by similarity;
   the samplers (any combination, ``samplers``):
   - ``bm25``: the anchor's top ``k`` lexical neighbours in the pool
     (:func:`codiemb.merge.evaluate_merge.bm25_topk`: Okapi BM25, Lucene's idf, k1 1.2, b 0.75,
     scored by the ``bm25s`` library over a sparse term-document matrix; each anchor costs one
     scoring pass over the pool, so ``anchors`` bounds the time (2,000 anchors over 36,274 texts:
     3.0 s with bm25s, 211 s with the earlier plain-Python postings on a loaded machine; reading included),
   - ``nn``: the anchor's top ``k`` neighbours by the current model's cosine (the pool embedded
     chunk by chunk into :class:`codiemb.evaluate.index.ExactIndex`, faiss or chunked torch top-k),
   - ``random``: ``k`` random partners (seeded), the paper's dissimilar share.
   The anchor itself (same text) is never its own partner.
3. **Filtering.** A pair is unordered: (a, b) and (b, a) are one pair, kept once (first sampler
   wins, the order is anchors then samplers then rank). Pairs of a ``labelled`` set (STS or pairs
   files: their (sentence1, sentence2)) are dropped, and so is every pair with a text of
   ``exclude_texts`` (e.g. the dev and test splits, so silver data cannot leak evaluation
   sentences). ``max_pairs`` keeps a seeded sample of what remains, in the same order.
4. **Teacher.** :func:`codiemb.data.negatives.load_teacher`: a bi-encoder (alias or folder: the
   cosine of the two L2-normalised embeddings) or a cross-encoder folder (its activated output).
   With Ray the pairs are scored by Ray Data ``map_batches`` on an actor pool (one teacher per
   actor, one GPU each where the cluster has GPUs), else by the same class in this process.
5. **Mapping** of a teacher score ``t`` to the STS range ``[lo, hi]`` (``score_range``, default
   STS-B's ``[0, 5]``), ``how``:
   - ``clip`` (default): ``lo + (hi − lo) · clamp(t, 0, 1)``: a cosine of 1 is ``hi``, a cosine
     ≤ 0 is ``lo`` (a bi-encoder's unrelated pairs sit near 0; STS-B's 0 is "unrelated"). For a
     cross-encoder with one sigmoid output (in [0, 1]) it is the plain linear stretch.
   - ``linear``: ``lo + (hi − lo) · (clamp(t, a, b) − a) / (b − a)`` for a teacher range
     ``[a, b]`` (``teacher_range``, default ``[−1, 1]``; a sigmoid cross-encoder: ``[0, 1]``).
   - ``raw``: ``t`` as it is; it must lie in ``score_range`` (else an error names the pair).
6. **Output**: JSONL rows ``{"sentence1", "sentence2", "score", "teacher_score", "sampler"}``
   written through a temporary file and renamed, readable by the project's STS reader with the
   same ``score_range`` (extra fields are ignored), so a config adds it as one more dataset::

       - {name: silver, task: sts, path: runs/data/stsb_silver.jsonl, score_range: [0, 5], batch_size: 32}

   codiemb data augment sts/stsb/train.jsonl train/nli/snli/snli_dev_test_pairs.jsonl \\
       --labelled sts/stsb/train.jsonl --exclude-texts sts/stsb/dev.jsonl --exclude-texts sts/stsb/test.jsonl \\
       --samplers bm25 --k 2 --anchors 2000 --teacher mpnet --out runs/data/stsb_silver.jsonl
"""

from __future__ import annotations

import json
import logging
import os
import random
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from codiemb.data.hashing import text_hash
from codiemb.errors import DataError, UserError

log = logging.getLogger(__name__)

SAMPLERS = ("bm25", "nn", "random")
MAPPINGS = ("clip", "linear", "raw")
DEFAULT_MAX_TEXTS = 200_000


# --------------------------------------------------------------------------- reading
def iter_texts(path: str | os.PathLike) -> Iterator[tuple[str, int, list[str]]]:
    """``(file, line, texts)`` for every row of a JSONL/Parquet file or folder of them: a JSON string
    or ``{"text"}`` gives one text, ``{"sentence1", "sentence2"}`` two. A bad row raises
    ``DataError("FILE:LINE: reason")``."""
    from codiemb.data.local import display_name, iter_raw_rows, open_filesystem, resolve_files
    from codiemb.data.schemas import RowError, parse_line

    fs, root = open_filesystem(path)
    fmt, files = resolve_files(fs, root)
    if fmt == "beir":
        raise DataError(f"{display_name(fs, root)}: a BEIR folder is not a text file; point at its corpus.jsonl")
    for f in files:
        name = display_name(fs, f)
        for line, raw in iter_raw_rows(fs, f, fmt):
            try:
                row = _json_or_string(raw, line, parse_line)
                yield name, line, _row_texts(row)
            except RowError as exc:
                raise DataError(f"{name}:{line}: {exc.reason}") from None


def _json_or_string(raw: bytes, line: int, parse_line):
    from codiemb.data.schemas import RowError

    try:
        return parse_line(raw, first_line=line == 1)
    except RowError as exc:
        if exc.reason.endswith("got string"):  # a bare JSON string is one text
            return {"text": json.loads(bytes(raw).decode("utf-8").lstrip("\ufeff"))}
        raise


def _row_texts(row: dict) -> list[str]:
    from codiemb.data.schemas import RowError, _text

    if "text" in row:
        return [_text(row, "text")]
    if "sentence1" in row or "sentence2" in row:
        return [_text(row, "sentence1"), _text(row, "sentence2")]
    raise RowError("row has no 'text' field nor 'sentence1'/'sentence2' fields")


def pair_key(a: str | int, b: str | int) -> tuple[int, int]:
    """The unordered pair's key: its two text hashes, smaller first."""
    ha = a if isinstance(a, int) else text_hash(a)
    hb = b if isinstance(b, int) else text_hash(b)
    return (ha, hb) if ha <= hb else (hb, ha)


def labelled_pairs(paths: Sequence[str]) -> set[tuple[int, int]]:
    """Keys of the (sentence1, sentence2) pairs of STS / pairs files (hashes only, not texts)."""
    out: set[tuple[int, int]] = set()
    for p in paths:
        for name, line, texts in iter_texts(p):
            if len(texts) != 2:
                raise DataError(f"{name}:{line}: a labelled file holds pairs (sentence1, sentence2)")
            out.add(pair_key(*texts))
    return out


def text_keys(paths: Sequence[str]) -> set[int]:
    """Hashes of every text of the files (to exclude pairs that touch them)."""
    return {text_hash(t) for p in paths for _, _, texts in iter_texts(p) for t in texts}


@dataclass
class Pool:
    """The distinct texts of the unlabeled input, in first-seen order, with their hashes."""

    texts: list[str] = field(default_factory=list)
    hashes: list[int] = field(default_factory=list)
    rows: int = 0


def read_pool(paths: Sequence[str], max_texts: int = DEFAULT_MAX_TEXTS) -> Pool:
    pool, seen = Pool(), set()
    for p in paths:
        for name, line, texts in iter_texts(p):
            pool.rows += 1
            for t in texts:
                h = text_hash(t)
                if h in seen:
                    continue
                if len(pool.texts) >= max_texts:
                    raise DataError(f"{name}:{line}: the pool holds more than --max-texts {max_texts} distinct "
                                    "texts; raise it (memory: the pool is kept as strings) or pass fewer files")
                seen.add(h)
                pool.texts.append(t)
                pool.hashes.append(h)
    if len(pool.texts) < 2:
        raise DataError(f"{', '.join(map(str, paths))}: need at least 2 distinct texts, found {len(pool.texts)}")
    return pool


# --------------------------------------------------------------------------- candidates
def bm25_neighbours(texts: Sequence[str], anchors: Sequence[int], k: int) -> list[list[int]]:
    """Per anchor (a position in ``texts``), its top ``k`` BM25 neighbours' positions, itself left out."""
    from codiemb.merge.evaluate_merge import bm25_topk

    corpus = {str(i): t for i, t in enumerate(texts)}
    ranked = bm25_topk(corpus, {str(a): texts[a] for a in anchors}, k + 1)
    return [[int(d) for d in ranked[str(a)] if int(d) != a][:k] for a in anchors]


def nn_neighbours(encoder, texts: Sequence[str], anchors: Sequence[int], k: int, *, batch_size: int = 64,
                  max_length: int | None = None, index: str = "faiss", chunk_size: int = 16384) -> list[list[int]]:
    """Per anchor, its top ``k`` neighbours by the encoder's cosine (exact search), itself left out."""
    from codiemb.data.negatives import EncoderScorer
    from codiemb.evaluate.index import ExactIndex, faiss_available

    if index == "faiss" and not faiss_available():
        index = "torch"
    scorer = EncoderScorer(encoder, batch_size=batch_size, doc_max_length=max_length)
    store, where = None, {a: n for n, a in enumerate(anchors)}
    q = None
    for start in range(0, len(texts), chunk_size):
        chunk = list(texts[start:start + chunk_size])
        emb = scorer.embed_docs(chunk)
        if store is None:
            store = ExactIndex(emb.shape[1], backend=index)
            q = np.zeros((len(anchors), emb.shape[1]), np.float32)
        store.add([str(start + j) for j in range(len(chunk))], emb)
        mine = [(where[start + j], j) for j in range(len(chunk)) if start + j in where]
        if mine:
            q[[n for n, _ in mine]] = emb[[j for _, j in mine]].numpy()
    hits = store.search(q, k + 1)
    return [[int(d) for d, _ in hit if int(d) != a][:k] for a, hit in zip(anchors, hits)]


def random_neighbours(n_texts: int, anchors: Sequence[int], k: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed + 1)
    out = []
    for a in anchors:
        picks: list[int] = []
        while len(picks) < min(k, n_texts - 1):
            j = rng.randrange(n_texts)
            if j != a and j not in picks:
                picks.append(j)
        out.append(picks)
    return out


@dataclass
class Candidates:
    pairs: list[tuple[int, int]]  # positions in the pool: (anchor, partner)
    samplers: list[str]
    stats: dict


def candidate_pairs(pool: Pool, *, samplers: Sequence[str] = ("bm25",), k: int = 2, anchors: int | None = None,
                    seed: int = 0, encoder=None, labelled: set[tuple[int, int]] | None = None,
                    exclude: set[int] | None = None, max_pairs: int | None = None, batch_size: int = 64,
                    max_length: int | None = None, index: str = "faiss") -> Candidates:
    """Candidate pairs of the pool (module docstring, steps 2-3)."""
    bad = [s for s in samplers if s not in SAMPLERS]
    if bad or not samplers:
        raise UserError(f"--samplers: unknown {', '.join(bad) or '(none given)'}; choose from {', '.join(SAMPLERS)}")
    if k < 1:
        raise UserError(f"--k must be >= 1, got {k}")
    if "nn" in samplers and encoder is None:
        raise UserError("the nn sampler needs a model (--model)")
    n = len(pool.texts)
    rng = random.Random(seed)
    if anchors is None or anchors >= n:
        anchor_pos = list(range(n))
    else:
        if anchors < 1:
            raise UserError(f"--anchors must be >= 1, got {anchors}")
        anchor_pos = sorted(rng.sample(range(n), anchors))
    found: dict[str, list[list[int]]] = {}
    for s in samplers:
        if s == "bm25":
            found[s] = bm25_neighbours(pool.texts, anchor_pos, k)
        elif s == "nn":
            found[s] = nn_neighbours(encoder, pool.texts, anchor_pos, k, batch_size=batch_size,
                                     max_length=max_length, index=index)
        else:
            found[s] = random_neighbours(n, anchor_pos, k, seed)
    labelled, exclude = labelled or set(), exclude or set()
    seen: set[tuple[int, int]] = set()
    pairs: list[tuple[int, int]] = []
    names: list[str] = []
    stats = {"texts": n, "anchors": len(anchor_pos), "sampled": 0, "duplicates": 0, "labelled": 0, "excluded": 0}
    for row, a in enumerate(anchor_pos):
        for s in samplers:
            for b in found[s][row]:
                stats["sampled"] += 1
                key = pair_key(pool.hashes[a], pool.hashes[b])
                if key in seen:
                    stats["duplicates"] += 1
                    continue
                seen.add(key)
                if key in labelled:
                    stats["labelled"] += 1
                    continue
                if pool.hashes[a] in exclude or pool.hashes[b] in exclude:
                    stats["excluded"] += 1
                    continue
                pairs.append((a, b))
                names.append(s)
    if max_pairs is not None and len(pairs) > max_pairs:
        keep = sorted(rng.sample(range(len(pairs)), max_pairs))
        pairs, names = [pairs[i] for i in keep], [names[i] for i in keep]
    stats["pairs"] = len(pairs)
    stats["by_sampler"] = {s: names.count(s) for s in samplers}
    return Candidates(pairs, names, stats)


# --------------------------------------------------------------------------- teacher
class PairScorer:
    """Loads the teacher once (:func:`codiemb.data.negatives.load_teacher`), then scores batches of
    pairs: a dict/pyarrow batch with ``i``, ``sentence1``, ``sentence2`` -> ``i``, ``teacher_score``.
    The Ray Data actor class, and the local path's scorer."""

    def __init__(self, teacher: str, batch_size: int = 64, max_length: int | None = None):
        import torch

        from codiemb.data.negatives import load_teacher

        device = "cuda" if torch.cuda.is_available() else None
        # STS is symmetric: both sides get the same length limit
        self.scorer = load_teacher(teacher, batch_size=batch_size, query_max_length=max_length,
                                   doc_max_length=max_length, device=device)

    def score(self, s1: Sequence[str], s2: Sequence[str]) -> np.ndarray:
        return self.scorer.score(list(s1), [None] * len(s1), list(s2))

    def __call__(self, batch):
        import pyarrow as pa

        get = (lambda c: batch.column(c).to_pylist()) if hasattr(batch, "column") else (lambda c: list(batch[c]))
        scores = self.score(get("sentence1"), get("sentence2"))
        return pa.table({"i": pa.array(get("i"), pa.int64()), "teacher_score": pa.array(scores, pa.float32())})


def score_pairs(teacher: str, s1: Sequence[str], s2: Sequence[str], *, use_ray: bool = False,
                batch_size: int = 64, max_length: int | None = None, concurrency: int = 1,
                chunk: int = 1024) -> np.ndarray:
    """Teacher scores of ``(s1[i], s2[i])``: Ray Data batch inference, or this process in chunks."""
    if not len(s1):
        return np.zeros(0, np.float32)
    if use_ray:
        return _score_with_ray(teacher, s1, s2, batch_size, max_length, concurrency, chunk)
    scorer, parts = PairScorer(teacher, batch_size, max_length), []
    for i in range(0, len(s1), chunk):
        parts.append(scorer.score(s1[i:i + chunk], s2[i:i + chunk]))
        log.info("teacher %s: %d of %d pairs scored", teacher, min(i + chunk, len(s1)), len(s1))
    return np.concatenate(parts)


def _score_with_ray(teacher, s1, s2, batch_size, max_length, concurrency, chunk) -> np.ndarray:
    import ray

    from codiemb.paths import actor_runtime_env

    gpus = ray.cluster_resources().get("GPU", 0) if ray.is_initialized() else 0
    ds = ray.data.from_items([{"i": i, "sentence1": a, "sentence2": b} for i, (a, b) in enumerate(zip(s1, s2))])
    res = ds.map_batches(PairScorer, batch_size=min(chunk, max(1, -(-len(s1) // max(1, int(concurrency))))),
                         batch_format="pyarrow", fn_constructor_args=(teacher, batch_size, max_length),
                         compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, int(concurrency))),
                         num_gpus=1 if gpus else 0, num_cpus=0 if gpus else 1, **actor_runtime_env())
    out = np.full(len(s1), np.nan, np.float32)
    for b in res.iter_batches(batch_format="pyarrow", batch_size=None):
        out[np.asarray(b.column("i"))] = np.asarray(b.column("teacher_score"), np.float32)
    if np.isnan(out).any():
        raise RuntimeError(f"Ray scoring returned {int(np.isnan(out).sum())} of {len(out)} pairs without a score")
    return out


# --------------------------------------------------------------------------- mapping, writing
def map_scores(t: np.ndarray, how: str = "clip", *, score_range: tuple[float, float] = (0.0, 5.0),
               teacher_range: tuple[float, float] = (-1.0, 1.0)) -> np.ndarray:
    """Teacher scores to the STS range (module docstring, step 5)."""
    lo, hi = (float(x) for x in score_range)
    if not lo < hi:
        raise UserError(f"--score-range needs LOW < HIGH, got {score_range}")
    t = np.asarray(t, np.float64)
    if how == "clip":
        return lo + (hi - lo) * np.clip(t, 0.0, 1.0)
    if how == "linear":
        a, b = (float(x) for x in teacher_range)
        if not a < b:
            raise UserError(f"--teacher-range needs LOW < HIGH, got {teacher_range}")
        return lo + (hi - lo) * (np.clip(t, a, b) - a) / (b - a)
    if how == "raw":
        out = ~((t >= lo) & (t <= hi))
        if out.any():
            j = int(np.flatnonzero(out)[0])
            raise UserError(f"--map raw: teacher score {t[j]:g} (pair {j}) is outside --score-range "
                            f"[{lo:g}, {hi:g}]; use --map linear with --teacher-range, or --map clip")
        return t
    raise UserError(f"--map {how!r}: choose from {', '.join(MAPPINGS)}")


def write_pairs(path: str | os.PathLike, pool: Pool, cand: Candidates, teacher_scores: np.ndarray,
                scores: np.ndarray) -> None:
    """The STS-style JSONL, through a temporary file in the same folder, renamed at the end."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            for (a, b), s, t, name in zip(cand.pairs, scores.tolist(), teacher_scores.tolist(), cand.samplers):
                fh.write(json.dumps({"sentence1": pool.texts[a], "sentence2": pool.texts[b], "score": round(s, 6),
                                     "teacher_score": round(t, 6), "sampler": name}, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def augment(inputs: Sequence[str], out: str, *, teacher: str, samplers: Sequence[str] = ("bm25",), k: int = 2,
            anchors: int | None = None, max_texts: int = DEFAULT_MAX_TEXTS, max_pairs: int | None = None,
            labelled: Sequence[str] = (), exclude_texts: Sequence[str] = (), model: str | None = None,
            how: str = "clip", score_range: tuple[float, float] = (0.0, 5.0),
            teacher_range: tuple[float, float] = (-1.0, 1.0), seed: int = 0, batch_size: int = 64,
            max_length: int | None = 128, use_ray: bool = False, concurrency: int = 1,
            index: str = "faiss") -> dict:
    """The whole of ``codiemb data augment``; returns its summary (counts, teacher, mapping)."""
    import time

    if how not in MAPPINGS:
        raise UserError(f"--map {how!r}: choose from {', '.join(MAPPINGS)}")
    t0 = time.perf_counter()
    pool = read_pool(inputs, max_texts)
    encoder = None
    if "nn" in samplers:
        from codiemb.model.encoder import Encoder

        encoder = Encoder.load(model or "minilm")
    cand = candidate_pairs(pool, samplers=samplers, k=k, anchors=anchors, seed=seed, encoder=encoder,
                           labelled=labelled_pairs(labelled), exclude=text_keys(exclude_texts),
                           max_pairs=max_pairs, batch_size=batch_size, max_length=max_length, index=index)
    t1 = time.perf_counter()
    log.info("augment: %d texts, %d anchors, %d candidate pairs (%s) in %.1f s", len(pool.texts),
             cand.stats["anchors"], len(cand.pairs), cand.stats["by_sampler"], t1 - t0)
    if not cand.pairs:
        raise DataError(f"{', '.join(map(str, inputs))}: no candidate pair is left after deduplication and "
                        f"filtering ({json.dumps(cand.stats)})")
    t = score_pairs(teacher, [pool.texts[a] for a, _ in cand.pairs], [pool.texts[b] for _, b in cand.pairs],
                    use_ray=use_ray, batch_size=batch_size, max_length=max_length, concurrency=concurrency)
    scores = map_scores(t, how, score_range=score_range, teacher_range=teacher_range)
    write_pairs(out, pool, cand, t, scores)
    t2 = time.perf_counter()
    return {"out": str(out), "rows": pool.rows, **cand.stats, "teacher": teacher, "map": how,
            "score_range": list(score_range), "teacher_range": list(teacher_range) if how == "linear" else None,
            "scored_with": "ray" if use_ray else "local", "score_mean": round(float(scores.mean()), 4),
            "candidates_s": round(t1 - t0, 1), "scoring_s": round(t2 - t1, 1)}
