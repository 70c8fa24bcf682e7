"""Embed a BEIR corpus with Ray Data on the cluster's workers (DESIGN §2: "corpus embedded by Ray Data").

    corpus.jsonl --RawRowsDatasource (file, line, raw bytes; streamed in blocks)
      -> map_batches(parse_rows)                 one task per block: id + "title text", bad line = DataError FILE:LINE
      -> map_batches(EmbedBatches, actor pool)   the encoder, once per actor; num_gpus=1 per actor on a GPU cluster
      -> iter_batches on the driver              (ids, float32 embeddings), straight into the index

Ray Data's streaming executor bounds what is in flight (backpressure on the object store), so
the driver never holds the corpus text and holds each embedding batch only until the index has
copied it. Output order is not the file order; ids travel with their embeddings, and the search
orders ties by id, so the result does not depend on the order.

Imported only when ``evaluate_retrieval(..., use_ray=True)`` runs: this module imports Ray.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import ray

from codiemb.errors import DataError

logger = logging.getLogger(__name__)


def parse_rows(batch: pa.Table) -> pa.Table:
    """``{_file, _line, _raw}`` rows -> ``{_id, text}`` (text = ``title + " " + text``)."""
    from codiemb.data.beir import parse_corpus_line

    files, lines, raws = (batch.column(c).to_pylist() for c in ("_file", "_line", "_raw"))
    parsed = [parse_corpus_line(raw, f"{f}:{n}") for f, n, raw in zip(files, lines, raws)]
    return pa.table({"_id": pa.array([p[0] for p in parsed], pa.string()),
                     "text": pa.array([p[1] for p in parsed], pa.string())})


class EmbedBatches:
    """One encoder per actor; ``__call__`` embeds a batch of ``{_id, text}`` rows."""

    def __init__(self, model, max_length: int | None, batch_size: int, use_gpu: bool, threads: int) -> None:
        import torch

        from codiemb.model.encoder import Encoder

        if threads > 0 and not use_gpu:
            torch.set_num_threads(threads)
        device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        if isinstance(model, list):  # [ObjectRef of an Encoder] (a list, so Ray does not resolve it early)
            model = ray.get(model[0])
        self.encoder = model.to(device) if isinstance(model, Encoder) else Encoder.load(str(model), device=device)
        self.encoder.eval()
        self.max_length = max_length
        self.batch_size = batch_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        emb = self.encoder.encode(list(batch["text"]), batch_size=self.batch_size, max_length=self.max_length,
                                  instruction=self.encoder.instructions.get("passage"),  # the model's own
                                  normalize=True)
        return {"_id": batch["_id"], "emb": emb.numpy().astype(np.float32, copy=False)}


def _model_for_actors(encoder):
    """A path is loaded by each actor; an Encoder goes through the object store once (as a CPU copy)."""
    from codiemb.model.encoder import Encoder

    if not isinstance(encoder, Encoder):
        return str(encoder)
    cpu = encoder if encoder.device.type == "cpu" else copy.deepcopy(encoder).to("cpu")
    return [ray.put(cpu)]


def _data_error(exc: BaseException) -> DataError | None:
    """The DataError inside Ray's task errors (the driver sees the worker's traceback as text)."""
    import re

    seen = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, DataError):
            return DataError(str(cur))
        cur = getattr(cur, "cause", None) or cur.__cause__ or cur.__context__
    found = re.findall(r"codiemb\.errors\.DataError: (.+)", str(exc))
    return DataError(found[-1].strip()) if found else None


def embed_corpus(encoder, corpus_path, *, model: str | None = None, batch_size: int = 64,
                 max_length: int | None = None, num_actors: int | None = None, use_gpu: bool | None = None, cpus_per_actor: float = 1.0,
                 rows_per_task: int = 4096) -> Iterator[tuple[list[str], np.ndarray]]:
    """Yield ``(doc ids, L2-normalised float32 embeddings)`` for every document of ``corpus_path``.

    ``encoder``: an ``Encoder`` (shipped to the actors through the object store once) or a model
    path; ``model``: a path every worker can read, loaded by each actor instead (the same weights). ``use_gpu``: one GPU per actor; default: when the cluster has GPUs.
    ``num_actors``: default one per GPU, else half the cluster's CPUs (at least 1).
    Starts a local Ray instance when none is connected (``RAY_ADDRESS`` picks a cluster).
    """
    from codiemb.data import local
    from codiemb.data.readers import RawRowsDatasource

    if not ray.is_initialized():
        ray.init(log_to_driver=False)
    resources = ray.cluster_resources()
    if use_gpu is None:
        use_gpu = resources.get("GPU", 0) > 0
    if num_actors is None:
        num_actors = int(resources.get("GPU", 1)) if use_gpu else max(1, int(resources.get("CPU", 2) // (2 * cpus_per_actor)))
    fs, path = local.open_filesystem(os.fspath(corpus_path))
    name = local.display_name(fs, path)
    if fs.get_file_info(path).type != pafs.FileType.File:
        raise DataError(f"{name}: BEIR file not found")
    logger.info("embedding %s with Ray Data: %d actor(s), %s", name, num_actors,
                "1 GPU each" if use_gpu else f"{cpus_per_actor:g} CPU each")
    raw = ray.data.read_datasource(RawRowsDatasource([path], fmt="jsonl", filesystem=fs,
                                                     display_prefix="s3://" if fs.type_name == "s3" else "",
                                                     rows_per_block=rows_per_task))
    rows = raw.map_batches(parse_rows, batch_format="pyarrow", batch_size=None, udf_modifying_row_count=False)
    emb = rows.map_batches(
        EmbedBatches,
        fn_constructor_args=(_model_for_actors(model if model is not None else encoder), max_length, batch_size, bool(use_gpu),
                             max(1, int(cpus_per_actor))),
        batch_format="numpy",
        batch_size=rows_per_task,
        compute=ray.data.ActorPoolStrategy(size=num_actors),
        num_gpus=1 if use_gpu else 0,
        num_cpus=cpus_per_actor,
        udf_modifying_row_count=False,
    )
    try:
        for batch in emb.iter_batches(batch_size=None, batch_format="numpy"):
            yield [str(i) for i in batch["_id"].tolist()], np.asarray(batch["emb"], dtype=np.float32)
    except Exception as exc:  # a bad corpus line comes back wrapped in Ray's task errors
        err = _data_error(exc)
        if err is not None:
            raise err from None
        raise
