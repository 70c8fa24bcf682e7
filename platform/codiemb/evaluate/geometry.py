"""Embedding geometry: the properties CoDiEmb claims for its models, measured on a sample of texts.

All metrics are computed on **L2-normalised** embeddings (rows of ``X``, shape ``(n, d)``), the
hypersphere on which Wang & Isola define alignment and uniformity and on which cosine is a dot
product.

- **anisotropy** — the expected cosine of two different texts, E_{i≠j}[x_i·x_j] (Ethayarajh 2019,
  "How Contextual are Contextualized Word Representations?", EMNLP; arXiv 1909.00512). Computed
  exactly over all n(n−1) ordered pairs of distinct rows, (‖Σ_i x_i‖² − Σ_i ‖x_i‖²) / (n(n−1)),
  so it is the mean over every random pair without sampling noise. 1: all texts point the same
  way; ≈ 0: isotropic.
- **SVD entropy** and **effective rank** (Roy & Vetterli 2007, "The effective rank: a measure of
  effective dimensionality", EUSIPCO): σ_1..σ_k the singular values of X (not centred, k = min(n, d)),
  p_i = σ_i / Σ_j σ_j, H = −Σ p_i log p_i (nats), erank = exp(H) ∈ [1, k]. Orthonormal rows give
  erank = n; one direction repeated gives 1.
- **alignment** (Wang & Isola 2020, "Understanding Contrastive Representation Learning through
  Alignment and Uniformity on the Hypersphere", ICML; arXiv 2005.10242): over positive pairs
  (x, y), ℓ_align = E ‖x − y‖₂^α, α = 2. Lower: positives closer.
- **uniformity** (same paper): ℓ_uniform = log E_{i<j} exp(−t ‖x_i − x_j‖₂²), t = 2, over all
  pairs of distinct rows. Lower (more negative): spread more evenly; its minimum on the sphere is
  reached by the uniform distribution.
- **similarity histograms**: cosine of positive pairs and of random pairs (the same texts paired
  at random), per task, in fixed bins over [−1, 1].

Samples (:func:`sample_tasks`), seeded and deterministic, from the shared data folder:

- ``sts``: STS-B pairs (``sts/stsb/<split>.jsonl``); positives are pairs with gold score ≥
  ``positive_score`` (4.0 of 0..5); random pairs: sentence1 of pair i with sentence2 of pair π(i),
  π a seeded derangement; the texts are every sentence of the sampled pairs.
- ``ir``: SciFact (``ir/scifact``, ``qrels/<split>.tsv``), one (query, relevant document) pair per
  sampled query; random pairs: a query with another query's document; the texts are the queries
  and documents of the sample. The corpus is streamed; only the sampled documents are kept.

The default split is ``test``: this is a report and chooses nothing (``split="dev"`` measures the
selection split). Like the rest of ``evaluate/`` this module needs torch and numpy only; the PNG
(:func:`geometry_png`) imports matplotlib when it is called.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from codiemb.errors import DataError

logger = logging.getLogger(__name__)

HIST_BINS = 40
METRICS = ("anisotropy", "effective_rank", "svd_entropy", "alignment", "uniformity",
           "positive_cos", "random_cos")


# --------------------------------------------------------------------------- metrics
def _rows(x, min_rows: int) -> torch.Tensor:
    x = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x).double()
    if x.dim() != 2 or x.size(0) < min_rows:
        raise ValueError(f"expected an (n >= {min_rows}, d) embedding matrix, got shape {tuple(x.shape)}")
    return x


def normalize(x, min_rows: int = 2) -> torch.Tensor:
    """Rows scaled to unit L2 norm (float64); fewer than ``min_rows`` rows is a ValueError."""
    return torch.nn.functional.normalize(_rows(x, min_rows), p=2, dim=1)


def anisotropy(x) -> float:
    """E_{i≠j} cos(x_i, x_j), exactly over all ordered pairs of distinct rows."""
    x = normalize(x)
    n = x.size(0)
    total = x.sum(dim=0)
    return float(((total @ total) - (x * x).sum()) / (n * (n - 1)))


def svd_entropy(x) -> float:
    """H = −Σ p_i log p_i (nats), p = σ / Σσ, σ the singular values of the normalised matrix."""
    s = torch.linalg.svdvals(normalize(x))
    p = s / s.sum()
    p = p[p > 0]
    return float(-(p * p.log()).sum())


def effective_rank(x) -> float:
    """exp(SVD entropy) (Roy & Vetterli 2007): between 1 and min(n, d)."""
    return math.exp(svd_entropy(x))


def alignment(x, y, alpha: float = 2.0) -> float:
    """E ‖x_i − y_i‖^α over positive pairs (row i of ``x`` with row i of ``y``), normalised rows."""
    x, y = normalize(x, 1), normalize(y, 1)
    if x.shape != y.shape:
        raise ValueError(f"alignment needs paired rows, got shapes {tuple(x.shape)} and {tuple(y.shape)}")
    return float((x - y).norm(dim=1).pow(alpha).mean())


def uniformity(x, t: float = 2.0) -> float:
    """log E_{i<j} exp(−t ‖x_i − x_j‖²) over normalised rows: Wang & Isola's reference code
    (``torch.pdist``, n(n−1)/2 distances in memory: 16 MB at n = 2000), summed with logsumexp."""
    d2 = torch.pdist(normalize(x), p=2).pow(2)
    return float(torch.logsumexp(-t * d2, dim=0) - math.log(d2.numel()))


def paired_cosine(x, y) -> np.ndarray:
    """cos(x_i, y_i) for every row i."""
    return (normalize(x, 1) * normalize(y, 1)).sum(dim=1).numpy()


def histogram(values: Sequence[float], bins: int = HIST_BINS) -> list[int]:
    """Counts in ``bins`` equal bins over [−1, 1] (values outside are clipped into the end bins)."""
    counts, _ = np.histogram(np.clip(np.asarray(values, dtype=np.float64), -1.0, 1.0), bins=bins, range=(-1.0, 1.0))
    return counts.astype(int).tolist()


def geometry_metrics(texts_emb, pos_a, pos_b, rand_a, rand_b, bins: int = HIST_BINS) -> dict:
    """Every metric of one task: ``texts_emb`` (n, d) the sample's texts, ``pos_a/pos_b`` the
    positive pairs' two sides, ``rand_a/rand_b`` the random pairs' sides."""
    pos, rand = paired_cosine(pos_a, pos_b), paired_cosine(rand_a, rand_b)
    return {
        "n_texts": int(len(texts_emb)), "n_positive": int(len(pos)), "n_random": int(len(rand)),
        "anisotropy": anisotropy(texts_emb), "effective_rank": effective_rank(texts_emb),
        "svd_entropy": svd_entropy(texts_emb), "alignment": alignment(pos_a, pos_b),
        "uniformity": uniformity(texts_emb), "positive_cos": float(pos.mean()), "random_cos": float(rand.mean()),
        "histogram": {"bins": bins, "range": [-1.0, 1.0], "positive": histogram(pos, bins),
                      "random": histogram(rand, bins)},
    }


# --------------------------------------------------------------------------- samples
@dataclass
class TaskSample:
    """Texts and index pairs into them; ``max_length`` per text kind is the model's unless set."""

    name: str
    source: str
    texts: list[str]
    positive: list[tuple[int, int]]
    random: list[tuple[int, int]]
    meta: dict = field(default_factory=dict)


def derangement(n: int, rng: np.random.Generator) -> np.ndarray:
    """A seeded permutation of range(n) with no fixed point (n >= 2): a random cyclic shift of a
    random order, so element order[k] maps to order[k + s], s in 1..n-1."""
    if n < 2:
        raise ValueError("a derangement needs n >= 2")
    order = rng.permutation(n)
    shift = int(rng.integers(1, n))
    out = np.empty(n, dtype=np.int64)
    out[order] = order[(np.arange(n) + shift) % n]
    return out


def _index(texts: list[str], text: str, where: dict[str, int]) -> int:
    if text not in where:
        where[text] = len(texts)
        texts.append(text)
    return where[text]


def sample_sts(path: str | os.PathLike, n_pairs: int, seed: int, positive_score: float = 4.0) -> TaskSample:
    """Up to ``n_pairs`` STS pairs drawn without replacement (seeded); see the module docstring."""
    from codiemb.evaluate.sts import read_sts_pairs

    rows = read_sts_pairs(path)
    rng = np.random.default_rng(seed)
    chosen = sorted(rng.choice(len(rows), size=min(n_pairs, len(rows)), replace=False).tolist())
    texts: list[str] = []
    where: dict[str, int] = {}
    pairs = [(_index(texts, rows[i]["sentence1"], where), _index(texts, rows[i]["sentence2"], where)) for i in chosen]
    positive = [p for p, i in zip(pairs, chosen) if rows[i]["score"] >= positive_score]
    if len(positive) < 2:
        raise DataError(f"{path}: fewer than 2 of the {len(chosen)} sampled pairs have score >= {positive_score}")
    perm = derangement(len(pairs), rng)
    random = [(pairs[k][0], pairs[int(perm[k])][1]) for k in range(len(pairs))]
    return TaskSample("sts", str(path), texts, positive, random,
                      {"kind": "sts", "pairs": len(pairs), "positive_score": positive_score})


def sample_ir(folder: str | os.PathLike, split: str, n_pairs: int, seed: int) -> TaskSample:
    """One (query, relevant document) pair for each of up to ``n_pairs`` sampled queries (seeded)."""
    from codiemb.data.beir import iter_corpus, load_beir

    beir = load_beir(folder, split, corpus=False)
    rng = np.random.default_rng(seed)
    qids = sorted(beir.qrels)
    chosen = [qids[i] for i in sorted(rng.choice(len(qids), size=min(n_pairs, len(qids)), replace=False).tolist())]
    want = {q: sorted(beir.qrels[q])[int(rng.integers(len(beir.qrels[q])))] for q in chosen}
    needed = set(want.values())
    docs: dict[str, str] = {}
    for ids, chunk in iter_corpus(Path(folder) / "corpus.jsonl"):
        docs.update((d, t) for d, t in zip(ids, chunk) if d in needed)
    missing = sorted(needed - set(docs))
    if missing:
        raise DataError(f"{Path(folder) / 'qrels' / (split + '.tsv')}: document {missing[0]!r} is not in corpus.jsonl")
    if len(chosen) < 2:
        raise DataError(f"{folder}: qrels/{split}.tsv has fewer than 2 queries with a relevant document")
    texts: list[str] = []
    where: dict[str, int] = {}
    queries = [_index(texts, beir.queries[q], where) for q in chosen]
    documents = [_index(texts, docs[want[q]], where) for q in chosen]
    positive = list(zip(queries, documents))
    perm = derangement(len(chosen), rng)
    random = [(queries[k], documents[int(perm[k])]) for k in range(len(chosen))]
    return TaskSample("ir", f"{folder}:{split}", texts, positive, random,
                      {"kind": "retrieval", "pairs": len(chosen)})


def sample_tasks(data_dir=None, split: str = "test", sts_pairs: int = 1000, ir_pairs: int = 300,
                 seed: int = 0) -> list[TaskSample]:
    """The STS-B and SciFact samples of ``split`` (``test`` or ``dev``) from the shared data folder."""
    from codiemb.paths import data_dir as resolve_data_dir

    if split not in ("test", "dev"):
        raise DataError(f"geometry split must be 'test' or 'dev', got {split!r}")
    if min(sts_pairs, ir_pairs) < 2:
        raise DataError(f"geometry samples need at least 2 pairs per task, got sts={sts_pairs} ir={ir_pairs}")
    root = resolve_data_dir(data_dir)
    return [sample_sts(root / "sts" / "stsb" / f"{split}.jsonl", sts_pairs, seed),
            sample_ir(root / "ir" / "scifact", split, ir_pairs, seed + 1)]


# --------------------------------------------------------------------------- report
def geometry_report(model, samples: Sequence[TaskSample], *, batch_size: int = 64, max_length: int | None = None,
                    device=None) -> dict:
    """Embed each sample with ``model`` (alias, folder, ``models:/NAME@ALIAS`` or an ``Encoder``)
    and measure it. Returns ``{"model", "tasks": {name: metrics}, "seconds"}`` (JSON-serialisable)."""
    from codiemb.evaluate.suites import _load_encoder

    t0 = time.perf_counter()
    encoder, name = _load_encoder(model, device)
    tasks = {}
    for sample in samples:
        # queries and documents alike at one max_length (the model's unless set), as the evaluator does
        emb = encoder.encode(sample.texts, batch_size=batch_size, max_length=max_length, normalize=True)
        pa, pb = zip(*sample.positive)
        ra, rb = zip(*sample.random)
        res = geometry_metrics(emb, emb[list(pa)], emb[list(pb)], emb[list(ra)], emb[list(rb)])
        res["source"] = sample.source
        tasks[sample.name] = res
        logger.info("geometry %s %s: %s", name, sample.name,
                    " ".join(f"{k}={res[k]:.3f}" for k in METRICS))
    return {"model": name, "tasks": tasks, "seconds": round(time.perf_counter() - t0, 3)}


def flat_metrics(report: Mapping, prefix: str = "geometry") -> dict[str, float]:
    """``{"geometry/<task>/<metric>": value}`` for MLflow."""
    return {f"{prefix}/{task}/{k}": float(res[k]) for task, res in report["tasks"].items() for k in METRICS}


def geometry_table(reports: Sequence[Mapping]) -> str:
    """A markdown table: one row per (model, task)."""
    head = ["model", "task", "texts", "anisotropy", "eff. rank", "SVD entropy", "alignment", "uniformity",
            "cos pos", "cos rand"]
    lines = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 2)]
    for rep in reports:
        for task, r in rep["tasks"].items():
            lines.append(f"| {rep['model']} | {task} | {r['n_texts']} | {r['anisotropy']:.3f} | "
                         f"{r['effective_rank']:.1f} | {r['svd_entropy']:.3f} | {r['alignment']:.3f} | "
                         f"{r['uniformity']:.3f} | {r['positive_cos']:.3f} | {r['random_cos']:.3f} |")
    return "\n".join(lines) + "\n"


def geometry_png(reports: Sequence[Mapping], path: str | os.PathLike) -> Path:
    """Per-task cosine histograms (one panel per task): each model one colour, positive pairs solid,
    random pairs dashed (densities). Agg canvas, no pyplot."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    tasks = list(dict.fromkeys(t for rep in reports for t in rep["tasks"]))
    fig = Figure(figsize=(5.5 * len(tasks), 4))
    FigureCanvasAgg(fig)
    colours = [f"C{i}" for i in range(10)]
    for col, task in enumerate(tasks):
        ax = fig.add_subplot(1, len(tasks), col + 1)
        for m, rep in enumerate(reports):
            if task not in rep["tasks"]:
                continue
            h = rep["tasks"][task]["histogram"]
            edges = np.linspace(h["range"][0], h["range"][1], h["bins"] + 1)
            width = edges[1] - edges[0]
            for kind, style in (("positive", "-"), ("random", "--")):
                counts = np.asarray(h[kind], dtype=np.float64)
                density = counts / max(counts.sum() * width, 1e-12)
                ax.stairs(density, edges, linestyle=style, color=colours[m % 10],
                          label=f"{rep['model']} {kind}")
        ax.set_title(f"{task}: cosine of positive vs random pairs")
        ax.set_xlabel("cosine")
        ax.set_ylabel("density")
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left", fontsize=7)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    return out
