"""Retrieval evaluation on a BEIR split: dense exact search, nDCG@k / MRR@k / Recall@k × 100.

Protocol (matches MTEB's ``RetrievalEvaluator`` with ``DenseRetrievalExactSearch``, which SciFact
uses with its defaults):

- documents are ``title + " " + text`` (see ``codiemb.data.beir``), queries as they are;
- both sides embedded with the same encoder, L2-normalised; score = cosine; exact search;
- a document whose id equals the query id is **not** removed (MTEB's ``ignore_identical_ids``
  is False by default and for SciFact; it is True only for tasks like ArguAna / Quora);
- ranking ties are broken as trec_eval does (score descending, then doc id descending);
- metrics per query (pytrec_eval, ``codiemb.evaluate.metrics.retrieval_metrics``) averaged over
  every query that has a relevant document in the qrels.

At scale (DESIGN §2, scale rule): the corpus is streamed from ``corpus.jsonl`` in chunks of
``chunk_size`` documents (``load_beir(..., corpus=False)``), each chunk is embedded and added to an
:class:`~codiemb.evaluate.index.ExactIndex` (faiss ``IndexFlatIP`` blocks by default, float16
storage or a torch backend as options), so the evaluator holds one copy of the corpus embeddings
and one chunk of text. ``use_ray=True`` embeds the corpus with Ray Data on the cluster's workers
instead (``codiemb.evaluate.retrieval_ray``; imports Ray lazily) and streams the embeddings back
into the same index. ``ctx`` (rank / world_size / device) splits the embedding over the ranks of
a torch.distributed group (``codiemb.evaluate.distributed``): rank 0 searches and scores, and
every rank returns the same result.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import torch

from codiemb.errors import DataError
from codiemb.evaluate.distributed import broadcast_object, encode_texts, world
from codiemb.evaluate.index import ExactIndex
from codiemb.evaluate.metrics import retrieval_metrics

logger = logging.getLogger(__name__)


def rank_documents(query_emb: torch.Tensor, doc_emb: torch.Tensor, doc_ids: Sequence[str], k: int,
                   query_ids: Sequence[str] | None = None, ignore_identical_ids: bool = False,
                   device: torch.device | str | None = None) -> list[list[str]]:
    """Top-``k`` document ids per query by inner product (exact), ties by doc id descending.

    For embeddings already in memory (small sets: the merge search's candidate pools); the
    exact, tie-aware search of :class:`~codiemb.evaluate.index.ExactIndex` with its torch backend.
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    doc_emb = torch.as_tensor(doc_emb)
    index = ExactIndex(doc_emb.size(1), backend="torch", device=device, block_size=max(1, len(doc_ids)))
    index.add(list(doc_ids), doc_emb)
    exclude = list(query_ids) if ignore_identical_ids and query_ids is not None else None
    return [[d for d, _ in r] for r in index.search(torch.as_tensor(query_emb), k, exclude_ids=exclude)]


def evaluate_retrieval(encoder, split, batch_size: int = 64, query_max_length: int | None = None,
                       doc_max_length: int | None = None, k_values: Sequence[int] = (10, 100), *,
                       query_instruction: str | None = None, doc_instruction: str | None = None,
                       ignore_identical_ids: bool = False,
                       show_progress: bool = False, index: str = "faiss", storage: str = "float32",
                       chunk_size: int = 16384, use_ray: bool = False, ray_options: dict | None = None,
                       ctx=None, cache=None, progress=None) -> dict:
    """Score ``encoder`` on a ``codiemb.data.beir.BeirSplit`` (in memory, or streamed: ``load_beir(..., corpus=False)``).

    Returns ``{"ndcg@k", "mrr@k", "recall@k" for every k in k_values (× 100), "n_queries", "n_docs",
    "seconds"}``; with the default k_values that includes ndcg@10, mrr@10 and recall@100.
    Max lengths default to the model's ``max_seq_length``. ``query_instruction`` /
    ``doc_instruction`` default to the model's own (``encoder.instructions``: query, passage).

    ``index``: ``"faiss"`` (exact ``IndexFlatIP``) or ``"torch"`` (chunked exact top-k);
    ``storage``: ``"float32"`` or ``"float16"`` (half the memory; scores of the rounded vectors).
    ``use_ray``: embed the corpus with Ray Data (``ray_options`` go to
    ``codiemb.evaluate.retrieval_ray.embed_corpus``). ``ctx``: a torch.distributed context; every
    rank must call this with the same arguments. ``cache``: an
    :class:`~codiemb.evaluate.cache.EmbeddingCache` (one process, a corpus file): the corpus
    embeddings are read from it, or written to it. ``progress``: a tqdm-like bar moved by one per
    text embedded (queries and documents; a cached document counts when it is read).
    """
    t0 = time.perf_counter()
    k_values = sorted({int(k) for k in k_values})
    rank, size = world(ctx)
    saved = getattr(encoder, "instructions", {})  # the model's own (trained with, saved with it)
    query_instruction = query_instruction or saved.get("query")
    doc_instruction = doc_instruction or saved.get("passage")
    if cache is not None and (size > 1 or not split.folder):
        cache = None  # the cache keys a corpus file embedded by one process
    if use_ray and size > 1:
        raise ValueError("use_ray and a distributed ctx are two ways to spread the work: pick one")
    query_ids = list(split.qrels)
    if not query_ids:
        raise ValueError(f"retrieval split {split.folder}:{split.split} has no queries")
    q_emb = encode_texts(encoder, [split.queries[q] for q in query_ids], batch_size=batch_size,
                         max_length=query_max_length, instruction=query_instruction, ctx=ctx,
                         progress=progress if rank == 0 else None)
    main = rank == 0
    store = ExactIndex(q_emb.shape[1], backend=index, storage=storage) if main else None
    def embed():
        if use_ray:
            from codiemb.evaluate.retrieval_ray import embed_corpus  # lazy: imports ray

            if not split.folder:
                raise ValueError("use_ray needs a split read from a BEIR folder (its corpus.jsonl)")
            if doc_instruction != saved.get("passage"):  # the actors apply the model's own
                raise ValueError("use_ray embeds documents with the model's own passage instruction; "
                                 f"{doc_instruction!r} differs from it")
            return embed_corpus(encoder, split.corpus_path, batch_size=batch_size, max_length=doc_max_length,
                                **(ray_options or {}))
        per_batch[0] = True  # the encoder moves the bar batch by batch
        return ((ids, encode_texts(encoder, texts, batch_size=batch_size, max_length=doc_max_length,
                                   instruction=doc_instruction, ctx=ctx, progress=progress if main else None))
                for ids, texts in split.iter_corpus(chunk_size))

    own_bar = None
    if show_progress and main and progress is None:
        from tqdm.auto import tqdm

        progress = own_bar = tqdm(desc="corpus", unit="doc")
    per_batch = [False]
    batches = (cache.corpus_batches(encoder, split.corpus_path, doc_max_length, embed, instruction=doc_instruction,
                                 chunk_size=chunk_size)
               if cache is not None else embed())
    n_docs = 0
    try:
        for ids, emb in batches:
            n_docs += len(ids)
            if main:
                store.add(ids, emb)
            if progress is not None and main and not per_batch[0]:
                progress.update(len(ids))
    finally:
        if own_bar is not None:
            own_bar.close()
    if n_docs == 0:
        raise ValueError(f"retrieval split {split.folder}:{split.split} has no documents")
    result: dict = {}
    if main:
        try:
            store.check_unique(str(split.corpus_path) if split.folder else "corpus")
            logger.info("retrieval: %d documents (%.0f MB index) and %d queries embedded; searching", n_docs,
                        store.nbytes / 2**20, len(query_ids))
            exclude = query_ids if ignore_identical_ids else None
            run = dict(zip(query_ids, store.search(q_emb, max(k_values), exclude_ids=exclude)))
            result = retrieval_metrics(run, split.qrels, k_values)
            result.update(n_queries=len(query_ids), n_docs=n_docs, seconds=round(time.perf_counter() - t0, 3))
        except (DataError, ValueError) as exc:
            if size <= 1:
                raise
            result = {"__error__": (type(exc).__name__, str(exc))}  # raised on every rank below
    result = broadcast_object(result, ctx)
    if "__error__" in result:
        kind, msg = result["__error__"]
        raise (DataError if kind == "DataError" else ValueError)(msg)
    logger.info("retrieval: %s", ", ".join(f"{k} {v:.2f}" for k, v in result.items() if "@" in k))
    return result
