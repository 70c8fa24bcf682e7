"""Any MTEB task through the ``mteb`` library (2.x), with a codiemb encoder and local data.

``codiemb evaluate MODEL --mteb TASK [TASK...]`` calls :func:`run_mteb`. The tasks are mteb's own
(``mteb.get_task``): its metadata, splits, evaluator and ``main_score``; codiemb only supplies

- **the model**: :class:`CodiembMtebEncoder`, an ``mteb.models.EncoderProtocol`` around
  :class:`~codiemb.model.encoder.Encoder`. mteb says for each call what it embeds (``prompt_type``:
  ``query`` or ``document`` for retrieval, none for symmetric tasks such as STS); the wrapper maps that
  to the model's instruction kind (``query``, ``passage``, else ``sts``) and embeds with the
  instruction the model was trained with (``encoder.instructions``), exactly as ``evaluate/sts.py`` and
  ``evaluate/retrieval.py`` do. ``prompts`` override it in mteb's own keys and order of precedence
  (``"{task}-{query|document}"``, ``task``, ``"{task type}-{query|document}"``, task type, ``query`` /
  ``document``), e.g. ``{"SciFact-query": "Given a claim, ...: ", "STS": "..."}``. The instruction is a
  prefix that mean pooling leaves out (``Encoder.tokenize``), as the project trains with.
- **the data, without downloading**: each task first loads from the local Hugging Face datasets
  cache, with hub access switched off (as for models in ``codiemb.paths``: the one code path that
  downloads is the user's explicit ``codiemb data fetch-mteb TASK``, :func:`fetch_task_data`, so an
  environment variable left set can never make a test or a pipeline download). When the cache lacks it, a task with a local copy is read from the data folder
  (``codiemb.paths.data_dir``): the standard tasks in :data:`LOCAL_DATA` (STSBenchmark: ``sts/stsb``,
  SciFact: ``ir/scifact``) or any STS / retrieval task the caller maps to a path (``local_data``,
  ``--mteb-data TASK=PATH``). An STS path is a JSONL file (``sentence1, sentence2, score`` on the
  task's score scale) or a folder of ``<split>.jsonl``; a retrieval path is a BEIR folder
  (``corpus.jsonl``, ``queries.jsonl``, ``qrels/<split>.tsv``). With neither, one line says what to
  fetch.

``mteb`` is an optional dependency (the ``mteb`` extra); it is imported only when a task runs.
Scale note: mteb holds a retrieval corpus as one Arrow table (its own design); the local reader
fills it chunk by chunk, so no Python list of the whole corpus exists, but the table does. For
corpora beyond memory use codiemb's own streamed evaluator (``--suite``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from codiemb.errors import DataError, UserError

logger = logging.getLogger(__name__)

# standard MTEB tasks -> their copy under the data folder (DESIGN: the shared STS-B / SciFact files)
LOCAL_DATA: dict[str, str] = {
    "STSBenchmark": "sts/stsb",   # test.jsonl: the 1,379 STS-B test pairs, scores 0..5
    "SciFact": "ir/scifact",      # BEIR folder; qrels/test.tsv: 300 queries, 5,183 documents
}
# an mteb split name -> the file stem to try after the split's own name
_SPLIT_ALIASES = {"validation": "dev", "dev": "validation"}
INSTRUCTION_KIND = {"query": "query", "document": "passage"}  # mteb PromptType -> encoder instruction kind


def _require_mteb():
    try:
        import mteb  # noqa: F401
    except ImportError:
        raise UserError("--mteb needs the mteb library: pip install 'codiemb[mteb]'") from None
    import mteb

    return mteb


def fetch_task_data(name: str) -> str:
    """``codiemb data fetch-mteb TASK``: download ``name``'s data into the local Hugging Face datasets
    cache (the only code path here that uses the network); returns its ``path@revision``. Refused
    under ``HF_HUB_OFFLINE=1`` / ``HF_DATASETS_OFFLINE=1``."""
    from codiemb.paths import hub_fetch

    mteb = _require_mteb()
    try:
        task = mteb.get_task(name)
    except KeyError:
        raise UserError(f"unknown MTEB task {name!r} (names as mteb.get_tasks() lists them)") from None
    ds = task.metadata.dataset
    hub_fetch(f"MTEB task {name!r}", task.load_data, offline_vars=("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"),
              error=UserError)
    return f"{ds.get('path')}@{ds.get('revision')}"


@contextlib.contextmanager
def hub_offline(offline: bool = True):
    """Switch the Hugging Face hub off for ``datasets`` and ``huggingface_hub`` inside the block.

    Both read ``HF_HUB_OFFLINE`` once, at import; an import earlier in the process (transformers
    imports huggingface_hub) has fixed it, so the module constants are set here and restored after.
    """
    if not offline:
        yield
        return
    import datasets.config
    import huggingface_hub.constants as hub_constants

    saved = (hub_constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE)
    hub_constants.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = datasets.config.HF_DATASETS_OFFLINE = True
    try:
        yield
    finally:
        hub_constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE = saved


# --------------------------------------------------------------------------- the model
class CodiembMtebEncoder:
    """An ``mteb.models.EncoderProtocol`` over a codiemb :class:`~codiemb.model.encoder.Encoder`.

    ``prompts``: instruction overrides in mteb's ``model_prompts`` keys (see the module doc);
    ``max_length``: token limits per instruction kind (``query`` / ``passage`` / ``sts``), default
    the model's ``max_seq_length`` (256 for all-MiniLM-L6-v2, as MTEB runs it).
    ``calls`` records ``(task, prompt_type, kind, instruction, n_texts)`` for every encode call.
    """

    def __init__(self, encoder, name: str | None = None, *, prompts: Mapping[str, str] | None = None,
                 max_length: Mapping[str, int] | None = None, show_progress: bool = False) -> None:
        self.encoder = encoder
        self.name = str(name or getattr(encoder, "name_or_path", "") or "encoder")
        self.prompts = {k: v for k, v in (prompts or {}).items() if v}
        self.max_length = dict(max_length or {})
        self.show_progress = show_progress
        self.calls: list[tuple[str, str | None, str, str | None, int]] = []
        self._meta = None

    # mteb reads this to name results and choose the similarity function (cosine, as codiemb scores)
    @property
    def mteb_model_meta(self):
        if self._meta is None:
            from mteb.models.model_meta import ModelMeta, ScoringFunction

            base = Path(self.name.rstrip("/")).name or "encoder"
            self._meta = ModelMeta.create_empty(overwrites={
                "name": f"codiemb/{base}", "revision": "local", "embed_dim": int(self.encoder.dim),
                "max_tokens": int(self.encoder.max_seq_length), "similarity_fn_name": ScoringFunction.COSINE,
                "framework": ["PyTorch"], "modalities": ["text"], "open_weights": True,
                "use_instructions": bool(self.encoder.instructions or self.prompts),
            })
        return self._meta

    def instruction_for(self, task_metadata, prompt_type) -> tuple[str, str | None]:
        """``(instruction kind, prefix)`` for one mteb encode call.

        Kind: ``query`` / ``passage`` from mteb's prompt type, ``sts`` when there is none (STS and the
        other symmetric task types). Prefix: a ``prompts`` entry by mteb's precedence, else the
        model's own instruction of that kind, else none.
        """
        ptype = getattr(prompt_type, "value", prompt_type)
        kind = INSTRUCTION_KIND.get(ptype, "sts") if ptype else "sts"
        if self.prompts:
            from mteb.models.abs_encoder import get_prompt

            prefix = get_prompt(self.prompts, task_metadata, prompt_type)
            if prefix:
                return kind, prefix
        return kind, self.encoder.instructions.get(kind)

    def encode(self, inputs, *, task_metadata, hf_split: str, hf_subset: str, prompt_type=None, **kwargs):
        texts = [str(t) for batch in inputs for t in batch["text"]]
        kind, instruction = self.instruction_for(task_metadata, prompt_type)
        self.calls.append((task_metadata.name, getattr(prompt_type, "value", prompt_type), kind, instruction,
                           len(texts)))
        emb = self.encoder.encode(texts, batch_size=int(kwargs.get("batch_size") or 64),
                                  max_length=self.max_length.get(kind), instruction=instruction,
                                  show_progress=self.show_progress and bool(kwargs.get("show_progress_bar", True)))
        return np.asarray(emb.numpy() if hasattr(emb, "numpy") else emb, dtype=np.float32)

    def similarity(self, embeddings1, embeddings2):
        from mteb.similarity_functions import cos_sim

        return cos_sim(embeddings1, embeddings2)

    def similarity_pairwise(self, embeddings1, embeddings2):
        from mteb.similarity_functions import pairwise_cos_sim

        return pairwise_cos_sim(embeddings1, embeddings2)


# --------------------------------------------------------------------------- the data
def fetch_hint(task) -> str:
    """One line: what to fetch so that ``task`` runs offline."""
    ds = task.metadata.dataset
    name = task.metadata.name
    local = LOCAL_DATA.get(name)
    where = f"put its copy at <data folder>/{local} (see the data README), or " if local else ""
    return (f"MTEB task {name!r}: its data ({ds.get('path')}@{str(ds.get('revision'))[:12]}) is not in the local "
            f"Hugging Face datasets cache; {where}fetch it once with `codiemb data fetch-mteb {name}` (network), "
            f"or map it to local files with --mteb-data {name}=PATH")


def _split_file(folder: Path, split: str) -> Path | None:
    for stem in (split, _SPLIT_ALIASES.get(split)):
        if stem and (folder / f"{stem}.jsonl").is_file():
            return folder / f"{stem}.jsonl"
    return None


def load_local_sts(task, path: str | os.PathLike) -> None:
    """Fill an ``AbsTaskSTS`` from a JSONL file (its only eval split) or a folder of ``<split>.jsonl``."""
    from datasets import Dataset, DatasetDict

    from codiemb.evaluate.sts import read_sts_pairs

    if task.metadata.is_multilingual:
        raise UserError(f"MTEB task {task.metadata.name!r} is multilingual; local files serve monolingual tasks only")
    path = Path(path)
    splits = list(task.eval_splits)
    files: dict[str, Path] = {}
    if path.is_file():
        if len(splits) != 1:
            raise DataError(f"{path}: MTEB task {task.metadata.name!r} evaluates splits {splits}; "
                            "give a folder with one <split>.jsonl per split")
        files[splits[0]] = path
    else:
        for split in splits:
            f = _split_file(path, split) if path.is_dir() else None
            if f is None:
                raise DataError(f"{path / (split + '.jsonl')}: STS file not found (MTEB task {task.metadata.name!r}, "
                                f"split {split!r})")
            files[split] = f
    lo, hi = float(task.min_score), float(task.max_score)
    data = {}
    for split, f in files.items():
        rows = read_sts_pairs(f)
        bad = next((i for i, r in enumerate(rows) if not lo <= r["score"] <= hi), None)
        if bad is not None:
            raise DataError(f"{f}: pair {bad + 1} has score {rows[bad]['score']}, outside MTEB task "
                            f"{task.metadata.name!r}'s range [{lo:g}, {hi:g}]")
        data[split] = Dataset.from_dict({"sentence1": [r["sentence1"] for r in rows],
                                         "sentence2": [r["sentence2"] for r in rows],
                                         "score": [r["score"] for r in rows]})
    task.dataset = DatasetDict(data)
    task.data_loaded = True


def _corpus_table(path: Path, chunk_size: int = 16384):
    """``corpus.jsonl`` as one Arrow table (id, title, text), built chunk by chunk (mteb joins
    title and text itself, as for its hub copy)."""
    import pyarrow as pa

    from codiemb.data.beir import parse_corpus_row

    if not path.is_file():
        raise DataError(f"{path}: BEIR file not found")
    batches, ids, titles, texts = [], [], [], []

    def flush():
        if ids:
            batches.append(pa.record_batch({"id": pa.array(ids, pa.string()), "title": pa.array(titles, pa.string()),
                                            "text": pa.array(texts, pa.string())}))
            ids.clear(), titles.clear(), texts.clear()

    seen: set[str] = set()
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            if not raw.strip():
                continue
            where = f"{path}:{lineno}"
            row = parse_corpus_row(raw, where)  # the evaluator's own check of a corpus line
            doc_id = str(row["_id"])
            if doc_id in seen:
                raise DataError(f"{where}: duplicate document id {doc_id!r}")
            seen.add(doc_id)
            ids.append(doc_id)
            titles.append(row.get("title") or "")
            texts.append(row.get("text") or "")
            if len(ids) >= chunk_size:
                flush()
    flush()
    if not batches:
        raise DataError(f"{path}: the corpus is empty")
    return pa.Table.from_batches(batches)


def load_local_retrieval(task, folder: str | os.PathLike) -> None:
    """Fill an ``AbsTaskRetrieval`` from a BEIR folder: one ``qrels/<split>.tsv`` per eval split."""
    from datasets import Dataset

    from codiemb.data.beir import load_beir

    if task.metadata.is_multilingual:
        raise UserError(f"MTEB task {task.metadata.name!r} is multilingual; local files serve monolingual tasks only")
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: BEIR folder not found (MTEB task {task.metadata.name!r})")
    corpus = Dataset(_corpus_table(folder / "corpus.jsonl"))
    subset: dict = {}
    for split in task.eval_splits:
        qrels_split = split
        if not (folder / "qrels" / f"{split}.tsv").is_file() and _SPLIT_ALIASES.get(split):
            qrels_split = _SPLIT_ALIASES[split]
        beir = load_beir(folder, qrels_split, corpus=False)  # queries with a relevant document; qrels > 0
        qids = list(beir.qrels)
        subset[split] = {"corpus": corpus,
                         "queries": Dataset.from_dict({"id": qids, "text": [beir.queries[q] for q in qids]}),
                         "relevant_docs": beir.qrels, "top_ranked": None}
    task.dataset = {"default": subset}
    task.data_loaded = True


def load_task(name: str, data_dir: str | os.PathLike | None = None, local_path: str | os.PathLike | None = None):
    """An mteb task with its data loaded, and where the data came from.

    Order: ``local_path`` when given (an explicit mapping wins); else the local Hugging Face
    datasets cache (never the hub: :func:`fetch_task_data` fills the cache); else the task's copy under the
    data folder (:data:`LOCAL_DATA`). Returns ``(task, source)``; ``source`` is ``"hf-cache"`` or the
    local path. Raises a one-line ``UserError`` naming what to fetch.
    """
    mteb = _require_mteb()
    from mteb.abstasks.retrieval import AbsTaskRetrieval
    from mteb.abstasks.sts import AbsTaskSTS

    try:
        task = mteb.get_task(name)
    except KeyError:
        raise UserError(f"unknown MTEB task {name!r} (names as mteb.get_tasks() lists them, e.g. STSBenchmark, "
                        "SciFact)") from None

    def from_local(path: Path):
        if isinstance(task, AbsTaskSTS):
            load_local_sts(task, path)
        elif isinstance(task, AbsTaskRetrieval):
            load_local_retrieval(task, path)
        else:
            raise UserError(f"MTEB task {name!r} is a {task.metadata.type} task; local files serve STS and "
                            "retrieval tasks (others load from the Hugging Face datasets cache)")
        return task, str(path)

    if local_path is not None:
        from codiemb.paths import resolve_data_path

        return from_local(Path(resolve_data_path(str(local_path), data_dir)))
    try:
        with hub_offline():
            task.load_data()
        return task, "hf-cache"
    except Exception as exc:  # datasets/hub raise many kinds (ConnectionError, FileNotFoundError, ...)
        logger.info("MTEB task %s: not loadable from the Hugging Face cache (%s: %s)", name, type(exc).__name__,
                    str(exc).splitlines()[0] if str(exc) else "")
        task.data_loaded = False
    rel = LOCAL_DATA.get(name)
    if rel is not None:
        from codiemb.paths import data_dir as resolve_data_dir

        try:
            path = resolve_data_dir(data_dir) / rel
        except UserError:
            path = None
        if path is not None and path.exists():
            return from_local(path)
    raise UserError(fetch_hint(task))


# --------------------------------------------------------------------------- running
def _percent(v):
    return 100.0 * v if isinstance(v, float) else v


def run_tasks(model: CodiembMtebEncoder, tasks: Sequence, batch_size: int = 64) -> list:
    """Run loaded mteb task objects with ``mteb.evaluate`` (no result cache, no CO2 tracker, errors
    raised); returns mteb's ``TaskResult`` list in task order."""
    mteb = _require_mteb()
    with hub_offline():
        result = mteb.evaluate(model, list(tasks), cache=None, co2_tracker=False, raise_error=True,
                               encode_kwargs={"batch_size": int(batch_size), "show_progress_bar": model.show_progress},
                               show_progress_bar=False, overwrite_strategy="always")
    return list(result.task_results)


def task_summary(task, task_result, source: str = "") -> dict:
    """One task's result: main score and every split's scores, ×100 like codiemb's own evaluator."""
    splits = {}
    for split, per_subset in task_result.scores.items():
        rows = [{k: _percent(v) for k, v in s.items() if k not in ("hf_subset", "languages")} for s in per_subset]
        splits[split] = rows[0] if len(rows) == 1 else {s["hf_subset"]: r for s, r in zip(per_subset, rows)}
    mains = [s["main_score"] for per_subset in task_result.scores.values() for s in per_subset]
    return {"task": task.metadata.name, "type": task.metadata.type, "main_metric": task.metadata.main_score,
            "main_score": 100.0 * float(np.mean(mains)), "splits": splits, "data": source,
            "seconds": round(float(task_result.evaluation_time or 0.0), 3)}


def run_mteb(model, task_names: Iterable[str], *, data_dir: str | os.PathLike | None = None,
             local_data: Mapping[str, str] | None = None, prompts: Mapping[str, str] | None = None,
             batch_size: int = 64, max_length: Mapping[str, int] | None = None, device=None,
             show_progress: bool = False) -> dict:
    """Evaluate ``model`` (alias, folder, ``models:/NAME@ALIAS`` or an ``Encoder``) on MTEB tasks by name.

    ``local_data``: task name -> path (relative: under the data folder) read instead of the cache.
    Returns ``{"model", "mteb_version", "results": {task: task_summary}, "summary": {task: main
    score ×100, "mean"}, "seconds"}``.
    """
    from importlib.metadata import version

    from codiemb.evaluate.suites import _load_encoder

    t0 = time.perf_counter()
    names = list(dict.fromkeys(task_names))
    if not names:
        raise UserError("--mteb needs at least one task name")
    unknown_maps = sorted(set(local_data or {}) - set(names))
    if unknown_maps:
        raise UserError(f"--mteb-data names task(s) {unknown_maps} that are not among --mteb {names}")
    loaded = [load_task(n, data_dir, (local_data or {}).get(n)) for n in names]  # data problems before the model
    encoder, name = _load_encoder(model, device)
    wrapper = CodiembMtebEncoder(encoder, name, prompts=prompts, max_length=max_length, show_progress=show_progress)
    results = run_tasks(wrapper, [t for t, _ in loaded], batch_size=batch_size)
    by_name = {r.task_name: r for r in results}
    out = {t.metadata.name: task_summary(t, by_name[t.metadata.name], src) for t, src in loaded}
    summary = {n: r["main_score"] for n, r in out.items()}
    summary["mean"] = float(np.mean(list(summary.values())))
    return {"model": name, "mteb_version": version("mteb"), "results": out, "summary": summary,
            "seconds": round(time.perf_counter() - t0, 3)}


_SHOWN = {"STS": ("cosine_spearman", "cosine_pearson"),
          "Retrieval": ("ndcg_at_10", "mrr_at_10", "recall_at_100")}


def mteb_table(results: Mapping) -> str:
    """Markdown: one row per task and split with the main score and a few familiar metrics."""
    lines = [f"model: `{results.get('model', '?')}`, mteb {results.get('mteb_version', '?')}", "",
             "| task | split | metric | score | data |", "|---|---|---|---:|---|"]
    for task, res in results.get("results", {}).items():
        keys = list(dict.fromkeys([res["main_metric"], *_SHOWN.get(res["type"], ())]))
        for split, scores in res["splits"].items():
            if "main_score" not in scores:  # several subsets: show their main scores
                for sub, s in scores.items():
                    lines.append(f"| {task} | {split}/{sub} | {res['main_metric']} | {s['main_score']:.2f} | {res['data']} |")
                continue
            for k in keys:
                if k in scores:
                    star = " (main)" if k == res["main_metric"] else ""
                    lines.append(f"| {task} | {split} | {k}{star} | {scores[k]:.2f} | {res['data']} |")
    if len(results.get("results", {})) > 1:
        lines.append(f"| **mean** | | main scores | **{results['summary']['mean']:.2f}** | |")
    return "\n".join(lines) + "\n"
