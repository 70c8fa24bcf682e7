"""Named benchmark suites over the shared data folder, and ``evaluate_model`` that runs one.

=============  ===========================================================  =======================
suite          tasks                                                        use
=============  ===========================================================  =======================
``stsb``       STS-B test (sts/stsb/test.jsonl)                             reporting
``scifact``    SciFact test (ir/scifact, qrels/test.tsv)                    reporting
``default``    both of the above                                            reporting
``dev``        STS-B dev (sts/stsb/dev.jsonl) + SciFact qrels/dev.tsv       model selection, tuning
``stsb-dev``   STS-B dev only                                               model selection
``scifact-dev`` SciFact qrels/dev.tsv only                                  model selection
=============  ===========================================================  =======================

Select checkpoints, merges and loss weights on ``dev`` only; the test suites are for reporting.
Task keys are the same in every suite (``stsb``, ``scifact``); each result names its ``split``.

The result of ``evaluate_model`` (JSON-serialisable, stable keys)::

    {"model": "minilm", "suite": "default",
     "results": {"stsb":    {"split": "test", "spearman": 82.03, "pearson": ..., "n": 1379, "seconds": ...},
                 "scifact": {"split": "test", "ndcg@10": 64.51, "mrr@10": ..., "recall@100": ...,
                             "ndcg@100": ..., "mrr@100": ..., "recall@10": ..., "n_queries": 300,
                             "n_docs": 5183, "seconds": ...}},
     "summary": {"stsb_spearman": 82.03, "scifact_ndcg@10": 64.51, "mean": 73.27},
     "max_length": {"sts": 256, "query": 256, "passage": 256}, "seconds": ...}

``summary`` holds each task's main score (``<task>_<metric>``) and their unweighted ``mean``.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

import torch

from codiemb.errors import ConfigError, ModelError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Task:
    name: str   # result key
    kind: str   # "sts" | "retrieval"
    path: str   # under the data folder: a JSONL file (sts) or a BEIR folder (retrieval)
    split: str  # "test" | "dev" (for retrieval: the qrels file name)

    @property
    def main_metric(self) -> str:
        return "spearman" if self.kind == "sts" else "ndcg@10"


STSB_TEST = Task("stsb", "sts", "sts/stsb/test.jsonl", "test")
STSB_DEV = Task("stsb", "sts", "sts/stsb/dev.jsonl", "dev")
SCIFACT_TEST = Task("scifact", "retrieval", "ir/scifact", "test")
SCIFACT_DEV = Task("scifact", "retrieval", "ir/scifact", "dev")

SUITES: dict[str, tuple[Task, ...]] = {
    "stsb": (STSB_TEST,),
    "scifact": (SCIFACT_TEST,),
    "default": (STSB_TEST, SCIFACT_TEST),
    "dev": (STSB_DEV, SCIFACT_DEV),
    "stsb-dev": (STSB_DEV,),
    "scifact-dev": (SCIFACT_DEV,),
}

MAX_LENGTH_KEYS = ("sts", "query", "passage")


def _load_encoder(model, device, token_prepending=None):
    from codiemb.model.encoder import Encoder

    if isinstance(model, Encoder):
        if token_prepending is not None:
            raise ModelError("token_prepending: pass a model name or folder, or build the Encoder with it")
        return model, model.name_or_path or "encoder"
    name = str(model)
    path = name
    if name.startswith("models:/"):
        try:
            from codiemb.tracking.registry import resolve_model_uri  # lazy: tracking imports mlflow
        except ImportError as exc:
            raise ModelError(f"{name}: registry URIs need codiemb.tracking.registry ({exc})") from None
        path = str(resolve_model_uri(name))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if token_prepending is None:
        return Encoder.load(path, device=device), name
    return Encoder.load(path, device=device, pooling="last_token", token_prepending=token_prepending), name


def evaluate_model(model, suite: str = "default", data_dir: str | os.PathLike | None = None,
                   batch_size: int = 64, show_progress: bool = True, max_length: dict | None = None,
                   device=None, retrieval_options: dict | None = None, cache_dir: str | os.PathLike | None = None,
                   progress=None, token_prepending=None) -> dict:
    """Evaluate a model (alias, folder, ``models:/NAME@ALIAS``, or an ``Encoder``) on a named suite.

    ``max_length`` may set ``sts``, ``query`` and ``passage`` token limits; each defaults to the
    model's ``max_seq_length`` (256 for all-MiniLM-L6-v2, as MTEB runs it). Retrieval corpora are
    streamed (never loaded whole); ``retrieval_options`` go to ``evaluate_retrieval`` (``index``,
    ``storage``, ``chunk_size``, ``use_ray``, ``ray_options``).

    ``cache_dir``: corpus embeddings are cached there (``codiemb.evaluate.cache``), so the same
    model on the same corpus (dev and test qrels of one BEIR folder, or a second evaluation) embeds
    it once. ``progress``: a tqdm-like bar; its ``total`` is set to the texts this suite embeds
    (sentences, queries, documents) and it moves as they are embedded (or read from the cache).

    ``token_prepending`` (``model.token_prepending``'s block, a dict, or a ``TokenPrepending``):
    load the model with Token Prepending on (last-token pooling); the cache keys include it.
    """
    from codiemb.data.beir import load_beir
    from codiemb.evaluate.retrieval import evaluate_retrieval
    from codiemb.evaluate.sts import evaluate_sts
    from codiemb.paths import data_dir as resolve_data_dir

    if suite not in SUITES:
        raise ConfigError(f"unknown evaluation suite {suite!r}; choose from {', '.join(SUITES)}")
    unknown = set(max_length or {}) - set(MAX_LENGTH_KEYS)
    if unknown:
        raise ConfigError(f"max_length: unknown key(s) {sorted(unknown)}; allowed: {', '.join(MAX_LENGTH_KEYS)}")
    t0 = time.perf_counter()
    root = resolve_data_dir(data_dir)
    encoder, name = _load_encoder(model, device, token_prepending)
    lengths = {k: int((max_length or {}).get(k) or encoder.max_seq_length) for k in MAX_LENGTH_KEYS}

    cache = None
    if cache_dir is not None:
        from codiemb.evaluate.cache import EmbeddingCache

        cache = EmbeddingCache(cache_dir)
    if progress is not None:
        progress.total = (progress.total or 0) + sum(_texts_to_embed(task, root) for task in SUITES[suite])
        progress.refresh()
    results: dict[str, dict] = {}
    summary: dict[str, float] = {}
    for task in SUITES[suite]:
        logger.info("evaluating %s on %s (%s)", name, task.name, task.split)
        if task.kind == "sts":
            res = evaluate_sts(encoder, root / task.path, batch_size=batch_size, max_length=lengths["sts"],
                               show_progress=show_progress and progress is None, progress=progress)
        else:
            split = load_beir(root / task.path, task.split, corpus=False)
            res = evaluate_retrieval(encoder, split, batch_size=batch_size, query_max_length=lengths["query"],
                                     doc_max_length=lengths["passage"], show_progress=show_progress,
                                     cache=cache, progress=progress, **(retrieval_options or {}))
        results[task.name] = {"split": task.split, **res}
        summary[f"{task.name}_{task.main_metric}"] = res[task.main_metric]
    summary["mean"] = sum(summary.values()) / len(summary)
    return {"model": name, "suite": suite, "results": results, "summary": summary, "max_length": lengths,
            "seconds": round(time.perf_counter() - t0, 3)}


def _texts_to_embed(task: Task, root) -> int:
    """How many texts ``task`` embeds: distinct STS sentences, or queries with qrels plus documents."""
    from codiemb.data.beir import load_beir

    if task.kind == "sts":
        from codiemb.evaluate.sts import read_sts_pairs

        return len({s for r in read_sts_pairs(root / task.path) for s in (r["sentence1"], r["sentence2"])})
    split = load_beir(root / task.path, task.split, corpus=False)
    with open(split.corpus_path, "rb") as fh:
        docs = sum(1 for line in fh if line.strip())
    return len(split.qrels) + docs
