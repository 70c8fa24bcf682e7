"""Fast dev scoring of merged state dicts: seconds per merge, not minutes.

A merge-coefficient trial (``tune/merge_search.py``) only changes weights, so everything that does
not depend on the weights is done once, in :func:`build_dev_set`, and shipped to every trial:

- **STS-B dev** (or any STS JSONL): the distinct sentences, tokenized once, batched longest first
  (little padding); optionally a fixed, seeded sample of ``sts_max_pairs`` pairs.
  Score: Spearman ρ × 100 of the cosines against the gold scores (same as ``evaluate_sts``).
- **Retrieval dev** (SciFact ``qrels/dev.tsv``): instead of embedding the 5,183-document corpus in
  every trial, the documents are restricted to a fixed **candidate pool**, mined once:

      pool = ⋃_q  relevant(q) ∪ BM25-top-k_bm25(q) ∪ ⋃_{m ∈ miners} dense-top-k_dense(q; m)

  (the miners are the base and optionally the merged models, embedding the full corpus once at
  ``mine_max_length``; the pool is cached on disk). A trial embeds the pool and the dev queries
  and computes nDCG@10 × 100 by exact search over the pool (trec_eval tie order, as
  ``evaluate_retrieval``). This is a *re-ranking approximation* of full-corpus nDCG@10: every
  relevant document is in the pool, so a merged model can only be scored too high, by exactly the
  non-pool documents it would have ranked above a relevant one. For a miner whose top
  ``dense_candidates >= 10`` entered the pool at the same document length the pool nDCG@10 equals
  the full-corpus value; :func:`pool_fidelity` measures the gap for any other model.

The module imports torch (and the project's evaluate/data helpers) only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import torch
from torch import Tensor

from codiemb.errors import DataError

log = logging.getLogger(__name__)

SCORE_KEYS = ("sts_spearman", "retrieval_ndcg_at_10")


# --------------------------------------------------------------------------- pre-tokenized text
@dataclass
class TokenizedTexts:
    """Texts tokenized once: batches sorted longest first, and ``order`` to restore input order."""

    batches: list[dict[str, Tensor]]
    order: list[int]  # position in the sorted sequence -> index of the input text
    n: int
    tokens: int  # non-padding tokens, for the cost estimate

    @classmethod
    def build(cls, tokenizer, texts: Sequence[str], max_length: int, batch_size: int) -> "TokenizedTexts":
        texts = [str(t) for t in texts]
        if not texts:
            return cls([], [], 0, 0)
        ids = tokenizer(texts, truncation=True, max_length=max_length, add_special_tokens=True)["input_ids"]
        order = sorted(range(len(texts)), key=lambda i: -len(ids[i]))
        pad = tokenizer.pad_token_id or 0
        batches = []
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            width = max(len(ids[i]) for i in idx)
            input_ids = torch.full((len(idx), width), pad, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for r, i in enumerate(idx):
                input_ids[r, :len(ids[i])] = torch.tensor(ids[i])
                mask[r, :len(ids[i])] = 1
            batches.append({"input_ids": input_ids, "attention_mask": mask})
        return cls(batches, order, len(texts), sum(len(x) for x in ids))


@torch.inference_mode()
def embed(encoder, texts: TokenizedTexts) -> Tensor:
    """L2-normalised embeddings (N, D), float32, in input order."""
    was_training = encoder.training
    encoder.eval()
    device = encoder.device
    try:
        chunks = [encoder({k: v.to(device) for k, v in b.items()})["embedding"].float().cpu() for b in texts.batches]
    finally:
        encoder.train(was_training)
    if not chunks:
        return torch.empty(0, encoder.dim)
    emb = torch.nn.functional.normalize(torch.cat(chunks), p=2, dim=-1)
    out = torch.empty_like(emb)
    out[torch.tensor(texts.order)] = emb
    return out


# --------------------------------------------------------------------------- BM25
_TOKEN = re.compile(r"\w+")


def _terms(text: str) -> list[str]:
    return _TOKEN.findall(text.lower())


def bm25_topk(corpus: Mapping[str, str], queries: Mapping[str, str], k: int, k1: float = 1.2,
              b: float = 0.75) -> dict[str, list[str]]:
    """Okapi BM25 (Robertson et al.; idf = ln(1 + (N − df + 0.5)/(df + 0.5)), Lucene's form):
    the top ``k`` document ids per query, ties by doc id; documents sharing no term are never returned.

    Scoring is the ``bm25s`` library's (``method="lucene"``: a sparse term-document matrix, so the
    index holds no Python object per posting); terms are lower-cased ``\w+`` runs, each query term
    counted once. On SciFact's 300 test queries the top-10 lists equal the plain-Python postings
    implementation this replaced, order included.
    """
    import bm25s
    import numpy as np

    if k <= 0:
        return {q: [] for q in queries}
    doc_ids = list(corpus)
    index = bm25s.BM25(k1=k1, b=b, method="lucene")
    index.index([_terms(corpus[d]) for d in doc_ids], show_progress=False)
    vocab = index.vocab_dict
    out = {}
    for qid, text in queries.items():
        terms = [t for t in set(_terms(text)) if t in vocab]
        if not terms:
            out[qid] = []
            continue
        scores = index.get_scores(terms)
        cand = np.nonzero(scores > 0)[0]
        if len(cand) > k:  # keep every candidate tied with the k-th score, then break ties by id
            kth = np.partition(scores[cand], len(cand) - k)[len(cand) - k]
            cand = cand[scores[cand] >= kth]
        best = sorted(cand.tolist(), key=lambda i: (-float(scores[i]), doc_ids[i]))[:k]
        out[qid] = [doc_ids[i] for i in best]
    return out


# --------------------------------------------------------------------------- the dev set
@dataclass
class DevSet:
    """Everything a trial needs besides the weights (picklable; ships to Ray trials)."""

    sts_texts: TokenizedTexts | None = None
    sts_a: list[int] = field(default_factory=list)  # per pair: index of sentence1 in sts_texts
    sts_b: list[int] = field(default_factory=list)
    sts_gold: list[float] = field(default_factory=list)
    query_texts: TokenizedTexts | None = None
    query_ids: list[str] = field(default_factory=list)
    doc_texts: TokenizedTexts | None = None
    doc_ids: list[str] = field(default_factory=list)  # the candidate pool
    qrels: dict[str, dict[str, int]] = field(default_factory=dict)
    info: dict = field(default_factory=dict)

    @property
    def has_sts(self) -> bool:
        return self.sts_texts is not None

    @property
    def has_retrieval(self) -> bool:
        return self.query_texts is not None


def _read_sts(path: str | os.PathLike) -> list[dict]:
    from codiemb.evaluate.sts import read_sts_pairs

    return read_sts_pairs(path)


def _fingerprint(state_dict: Mapping[str, Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(state_dict):
        t = state_dict[key]
        h.update(key.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def mine_dense(encoder, state_dict: Mapping[str, Tensor] | None, corpus: Mapping[str, str],
               queries: Mapping[str, str], k: int, doc_max_length: int, query_max_length: int,
               batch_size: int = 64) -> dict[str, list[str]]:
    """Top-``k`` documents per query over the whole corpus, with ``state_dict`` loaded in ``encoder``."""
    from codiemb.evaluate.retrieval import rank_documents

    if state_dict is not None:
        encoder.load_state_dict(state_dict)
    doc_ids = list(corpus)
    t0 = time.perf_counter()
    docs = embed(encoder, TokenizedTexts.build(encoder.tokenizer, [corpus[d] for d in doc_ids], doc_max_length,
                                               batch_size))
    qids = list(queries)
    qs = embed(encoder, TokenizedTexts.build(encoder.tokenizer, [queries[q] for q in qids], query_max_length,
                                             batch_size))
    ranked = rank_documents(qs, docs, doc_ids, k, device="cpu")
    log.info("mined top-%d of %d documents for %d queries in %.0f s", k, len(doc_ids), len(qids),
             time.perf_counter() - t0)
    return dict(zip(qids, ranked))


def build_dev_set(
    encoder,
    *,
    sts_path: str | os.PathLike | None = None,
    beir_folder: str | os.PathLike | None = None,
    qrels_split: str = "dev",
    miners: Sequence[Mapping[str, Tensor] | None] = (None,),
    sts_max_pairs: int | None = None,
    bm25_candidates: int = 10,
    dense_candidates: int = 10,
    mine_max_length: int | None = 128,
    sts_max_length: int = 64,
    query_max_length: int = 64,
    doc_max_length: int = 256,
    batch_size: int = 64,
    cache_dir: str | os.PathLike | None = None,
    seed: int = 0,
) -> DevSet:
    """Pre-tokenize the dev texts and mine the retrieval candidate pool (see the module docstring).

    ``miners``: state dicts to load into ``encoder`` for dense mining (``None`` = the encoder's own
    weights). The encoder's weights are restored afterwards. The pool is cached in ``cache_dir``
    under a key of the corpus, qrels, miner fingerprints and k's.
    """
    dev = DevSet()
    tok = encoder.tokenizer
    if sts_path:
        records = _read_sts(sts_path)
        if sts_max_pairs is not None and len(records) > sts_max_pairs:
            records = random.Random(seed).sample(records, sts_max_pairs)
        texts = list(dict.fromkeys(s for r in records for s in (r["sentence1"], r["sentence2"])))
        index = {t: i for i, t in enumerate(texts)}
        dev.sts_texts = TokenizedTexts.build(tok, texts, sts_max_length, batch_size)
        dev.sts_a = [index[r["sentence1"]] for r in records]
        dev.sts_b = [index[r["sentence2"]] for r in records]
        dev.sts_gold = [float(r["score"]) for r in records]
        dev.info.update(sts_pairs=len(records), sts_sentences=len(texts), sts_tokens=dev.sts_texts.tokens)
    if beir_folder:
        from codiemb.data.beir import load_beir

        split = load_beir(beir_folder, qrels_split)
        dev.query_ids = list(split.qrels)
        dev.qrels = {q: dict(split.qrels[q]) for q in dev.query_ids}
        queries = {q: split.queries[q] for q in dev.query_ids}
        own = {k: v.detach().clone() for k, v in encoder.state_dict().items()}
        fps = [_fingerprint(own if m is None else m) for m in miners] if dense_candidates > 0 else []
        key_src = json.dumps({"corpus": str(Path(beir_folder).resolve()), "split": qrels_split,
                              "size": os.path.getsize(Path(beir_folder) / "corpus.jsonl"), "miners": fps,
                              "bm25": bm25_candidates, "dense": dense_candidates, "len": mine_max_length,
                              "qlen": query_max_length}, sort_keys=True)
        key = hashlib.sha256(key_src.encode()).hexdigest()[:20]
        cache = Path(cache_dir) / f"pool-{key}.json" if cache_dir else None
        if cache is not None and cache.is_file():
            pool_ids = json.loads(cache.read_text())["doc_ids"]
            log.info("dev pool: %d documents from cache %s", len(pool_ids), cache)
        else:
            t0 = time.perf_counter()
            pool: dict[str, None] = {}
            for q in dev.query_ids:
                pool.update(dict.fromkeys(sorted(dev.qrels[q])))
            for ranked in bm25_topk(split.corpus, queries, bm25_candidates).values():
                pool.update(dict.fromkeys(ranked))
            if dense_candidates > 0:
                try:
                    for m in miners:
                        mined = mine_dense(encoder, m, split.corpus, queries, dense_candidates,
                                           mine_max_length or doc_max_length, query_max_length, batch_size)
                        for ranked in mined.values():
                            pool.update(dict.fromkeys(ranked))
                finally:
                    encoder.load_state_dict(own)
            pool_ids = [d for d in pool if d in split.corpus]
            log.info("dev pool: %d of %d documents (%d queries) mined in %.0f s", len(pool_ids), len(split.corpus),
                     len(dev.query_ids), time.perf_counter() - t0)
            if cache is not None:
                cache.parent.mkdir(parents=True, exist_ok=True)
                tmp = cache.with_suffix(".tmp")
                tmp.write_text(json.dumps({"key": json.loads(key_src), "doc_ids": pool_ids}))
                os.replace(tmp, cache)
        missing = [d for q in dev.query_ids for d in dev.qrels[q] if d not in split.corpus]
        if missing:
            raise DataError(f"{beir_folder}: qrels {qrels_split} name document {missing[0]!r} missing from the corpus")
        dev.doc_ids = list(pool_ids)
        dev.query_texts = TokenizedTexts.build(tok, [queries[q] for q in dev.query_ids], query_max_length, batch_size)
        dev.doc_texts = TokenizedTexts.build(tok, [split.corpus[d] for d in dev.doc_ids], doc_max_length, batch_size)
        dev.info.update(queries=len(dev.query_ids), pool_docs=len(dev.doc_ids), corpus_docs=len(split.corpus),
                        doc_tokens=dev.doc_texts.tokens, doc_max_length=doc_max_length)
    if not dev.has_sts and not dev.has_retrieval:
        raise DataError("no dev data: give an STS dev file and/or a BEIR folder with a dev qrels split")
    return dev


# --------------------------------------------------------------------------- scoring
def score_encoder(encoder, dev: DevSet) -> dict[str, float]:
    """Dev scores of the encoder's current weights: ``sts_spearman`` and ``retrieval_ndcg_at_10`` (× 100)."""
    from codiemb.evaluate.metrics import ndcg_at_k, spearman
    from codiemb.evaluate.retrieval import rank_documents

    out: dict[str, float] = {}
    t0 = time.perf_counter()
    if dev.has_sts:
        e = embed(encoder, dev.sts_texts)
        cos = (e[dev.sts_a] * e[dev.sts_b]).sum(dim=1).tolist()
        out["sts_spearman"] = 100.0 * spearman(cos, dev.sts_gold)
    if dev.has_retrieval:
        q = embed(encoder, dev.query_texts)
        d = embed(encoder, dev.doc_texts)
        ranked = rank_documents(q, d, dev.doc_ids, 10, device="cpu")
        out["retrieval_ndcg_at_10"] = 100.0 * sum(
            ndcg_at_k(r, dev.qrels[qid], 10) for qid, r in zip(dev.query_ids, ranked)) / len(dev.query_ids)
    out["score_seconds"] = time.perf_counter() - t0
    return out


def score_state_dict(encoder, dev: DevSet, state_dict: Mapping[str, Tensor]) -> dict[str, float]:
    """Load ``state_dict`` into ``encoder`` (in place) and score it on ``dev``."""
    encoder.load_state_dict(state_dict)
    return score_encoder(encoder, dev)


def pool_fidelity(encoder, dev: DevSet, beir_folder: str | os.PathLike, qrels_split: str = "dev",
                  state_dicts: Mapping[str, Mapping[str, Tensor]] | None = None,
                  batch_size: int = 64) -> dict[str, dict[str, float]]:
    """For each named state dict: pool nDCG@10 vs full-corpus nDCG@10 (same doc length), and the gap.

    Slow (embeds the whole corpus per model): a measurement for the docs, not for trials.
    """
    from codiemb.data.beir import load_beir
    from codiemb.evaluate.metrics import ndcg_at_k
    from codiemb.evaluate.retrieval import rank_documents

    split = load_beir(beir_folder, qrels_split)
    doc_max = int(dev.info.get("doc_max_length") or 256)
    doc_ids = list(split.corpus)
    full_texts = TokenizedTexts.build(encoder.tokenizer, [split.corpus[d] for d in doc_ids], doc_max, batch_size)
    pos = {d: i for i, d in enumerate(doc_ids)}
    pool_idx = torch.tensor([pos[d] for d in dev.doc_ids])
    out = {}
    for name, sd in (state_dicts or {"current": None}).items():
        if sd is not None:
            encoder.load_state_dict(sd)
        q = embed(encoder, dev.query_texts)
        d = embed(encoder, full_texts)

        def ndcg(ranked):
            return 100.0 * sum(ndcg_at_k(r, dev.qrels[qid], 10) for qid, r in zip(dev.query_ids, ranked)) / len(ranked)

        full = ndcg(rank_documents(q, d, doc_ids, 10, device="cpu"))
        pooled = ndcg(rank_documents(q, d[pool_idx], dev.doc_ids, 10, device="cpu"))
        out[name] = {"full_ndcg_at_10": full, "pool_ndcg_at_10": pooled, "gap": pooled - full}
        log.info("pool fidelity %s: full %.2f pool %.2f gap %+.2f", name, full, pooled, pooled - full)
    return out
