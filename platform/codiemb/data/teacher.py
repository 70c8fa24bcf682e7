"""Teacher embeddings for distillation, computed ONCE beside the token shards (issue 16, item 1).

A teacher never runs inside the training step. For each (dataset shard set, teacher) pair this
module embeds every training text once and stores the L2-normalised teacher vectors as float16
``.npy`` files, memory-mapped on read; the step then looks up the vectors of its own rows and
computes the teacher's cosine of every (query, candidate) pair of the batch (in-batch, as the
student's InfoNCE sees them), or of each STS pair. Storing vectors rather than per-row scores is
what makes in-batch distillation possible: batches are drawn at train time, and a row of SciFact
(one positive, no negative) has no candidate of its own to form a distribution over. The teacher
may have any dimension: only similarities reach the loss. Layout::

    <shards root>/teachers/<key>/manifest.json          written last (atomically): the set exists then
    <shards root>/teachers/<key>/parts/<shard>/emb.npy  (texts, D_t) float16, unit rows, the shard's text order
    <shards root>/teachers/<key>/parts/<shard>/row_texts.npy   (rows + 1) int64, texts of each row

The key holds the student shard set's key, the teacher's token shard key (its tokenizer and max
lengths over the same files) and the teacher's identity (its weight and config files' size and
mtime, the pooling). How:

1. the dataset is tokenized for the TEACHER by the ordinary shard build (``data/build.py``: Ray
   Data with ``use_ray``, else in-process), reused like any shard set;
2. its rows must be the student's rows, in the same order (same shards, (file, line) and texts
   per row, else a ``DataError`` names the first differing row);
3. each shard is embedded by :class:`TeacherShardScorer`: on Ray a ``map_batches`` actor pool
   (one GPU per actor where the cluster has GPUs), each actor writing its shards' files straight
   to storage; without Ray the same class in this process. The driver writes the manifest.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.fs as pafs

from codiemb.data.shards import MANIFEST, ShardStore, join, npy_bytes, open_root, shard_key, write_bytes
from codiemb.errors import DataError
from codiemb.train import stop

log = logging.getLogger(__name__)

TEACHER_FORMAT = 1
_MODEL_FILES = ("config.json", "modules.json", "model.safetensors", "pytorch_model.bin", "1_Pooling/config.json",
                "sentence_bert_config.json")


def teacher_identity(model: str, pooling: str | None) -> dict[str, Any]:
    """What a teacher's scores depend on: its folder's weight/config files (name, size, mtime) and pooling."""
    from codiemb.paths import resolve_model

    folder = Path(resolve_model(model))
    files = []
    for name in _MODEL_FILES:
        p = folder / name
        if p.is_file():
            st = p.stat()
            files.append([name, st.st_size, st.st_mtime_ns])
    if not files:
        raise DataError(f"teacher {model!r}: {folder} holds no model files")
    return {"model": str(model), "files": files, "pooling": pooling}


# --------------------------------------------------------------------------- scoring one shard
class TeacherShardScorer:
    """Loads the teacher once, then embeds whole shards of the teacher's token shard set.

    Called by Ray Data with a pyarrow batch of shard names (``map_batches``), or directly with a list.
    """

    def __init__(self, model: str, pooling: str | None, tokens_dir: str, out_dir: str, batch_size: int = 64):
        import torch

        from codiemb.model.encoder import Encoder

        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.encoder = Encoder.load(model, pooling=pooling, device=device).eval()
        self.tokens = ShardStore.open(tokens_dir)
        self.by_name = {s["name"]: k for k, s in enumerate(self.tokens.shards)}
        self.out_dir, self.batch_size = out_dir, int(batch_size)

    def score(self, name: str) -> dict:
        import torch

        from codiemb.train.fast_batches import pad_ids

        a = self.tokens._shard(self.by_name[name])
        off = np.asarray(a["text_offsets"])
        tok = a["tokens"]
        n = len(off) - 1
        order = np.argsort(-(off[1:] - off[:-1]), kind="stable")  # longest first: little padding
        out = np.zeros((n, self.encoder.dim), np.float16)
        dev = self.encoder.device
        autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda"
                    else torch.autocast("cpu", enabled=False))
        with torch.inference_mode(), autocast:
            for lo in range(0, n, self.batch_size):
                stop.check(f"teacher scoring of {name}")  # in a Ray actor never set: the driver checks
                pick = order[lo: lo + self.batch_size]
                feats = pad_ids([np.asarray(tok[off[i]: off[i + 1]]) for i in pick], self.tokens.pad_id)
                emb = self.encoder({k: v.to(dev) for k, v in feats.items()})["embedding"].float()
                out[pick] = torch.nn.functional.normalize(emb, dim=-1).cpu().numpy().astype(np.float16)
        fs, root = open_root(self.out_dir)
        write_bytes(fs, join(root, "parts", name, "emb.npy"), npy_bytes(out))
        write_bytes(fs, join(root, "parts", name, "row_texts.npy"), npy_bytes(np.asarray(a["row_texts"])))
        return {"shard": name, "texts": n, "rows": len(a["row_texts"]) - 1, "dim": int(self.encoder.dim)}

    def __call__(self, batch):
        import pyarrow as pa

        names = batch.column("shard").to_pylist() if hasattr(batch, "column") else list(batch)
        return pa.Table.from_pylist([self.score(n) for n in names])


# --------------------------------------------------------------------------- checks, build, reuse
def check_aligned(student: ShardStore, teacher_tokens: ShardStore, model: str) -> None:
    """The teacher's token shards must hold the student's rows in the student's order."""
    where = student.describe()
    if [s["name"] for s in student.shards] != [s["name"] for s in teacher_tokens.shards] or len(student) != len(teacher_tokens):
        raise DataError(f"{where}: teacher {model!r}'s shards hold {len(teacher_tokens)} rows in "
                        f"{len(teacher_tokens.shards)} shards, the student's {len(student)} in {len(student.shards)}")
    for k in range(len(student.shards)):
        a, b = student._shard(k), teacher_tokens._shard(k)
        for arr in ("file", "line"):
            if not np.array_equal(a[arr], b[arr]):
                j = int(np.nonzero(np.asarray(a[arr]) != np.asarray(b[arr]))[0][0])
                row = int(student._starts[k]) + j
                raise DataError(f"{':'.join(map(str, student.source(row)))}: teacher {model!r} kept other rows "
                                f"than the student (row {row})")
        ta, tb = np.diff(a["row_texts"]), np.diff(b["row_texts"])
        if not np.array_equal(ta, tb):
            row = int(student._starts[k]) + int(np.nonzero(ta != tb)[0][0])
            raise DataError(f"{':'.join(map(str, student.source(row)))}: teacher {model!r} sees another "
                            f"number of texts in this row")


def build_teacher_scores(student: ShardStore, spec, teacher, shards_root: str, *, use_ray: bool = False,
                         concurrency: int = 1) -> "TeacherScores":
    """The teacher's embeddings of every text of ``student`` (computed now, or reused).

    ``spec`` is the dataset's ``ShardSpec`` (the student's), ``teacher`` a ``DistillTeacherConfig``.
    """
    from codiemb.data.build import build_shards

    t0 = time.perf_counter()
    lengths = dict(spec.max_length)
    if teacher.max_length is not None:
        lengths = {"query": teacher.max_length.query, "passage": teacher.max_length.passage,
                   "sts": teacher.max_length.sts}
    tok = build_shards(replace(spec, model=teacher.model, max_length=lengths), shards_root, use_ray=use_ray,
                       concurrency=concurrency)
    key = shard_key({"teacher_scores": TEACHER_FORMAT, "student": student.key, "tokens": tok.store.key,
                     "teacher": teacher_identity(teacher.model, teacher.pooling)})
    out = join(shards_root, "teachers", key)
    fs, root = open_root(out)
    if fs.get_file_info(join(root, MANIFEST)).type == pafs.FileType.File:
        log.info("%s: reusing teacher %s embeddings %s (no scoring)", spec.name, teacher.model, out)
        return TeacherScores.open(out)
    check_aligned(student, tok.store, teacher.model)
    names = [s["name"] for s in tok.store.shards]
    if use_ray:
        results = _score_with_ray(teacher, tok.set_dir, out, names, concurrency)
    else:
        scorer = TeacherShardScorer(teacher.model, teacher.pooling, tok.set_dir, out, teacher.batch_size)
        results = [scorer.score(n) for n in names]
    results.sort(key=lambda r: r["shard"])
    seconds = time.perf_counter() - t0
    manifest = {"format": TEACHER_FORMAT, "key": key, "student": student.key, "tokens": tok.set_dir,
                "teacher": teacher_identity(teacher.model, teacher.pooling), "dim": results[0]["dim"] if results else 0,
                "shards": [{"name": r["shard"], "rows": int(r["rows"]), "texts": int(r["texts"])} for r in results],
                "built_with": "ray" if use_ray else "local", "seconds": round(seconds, 3)}
    write_bytes(fs, join(root, MANIFEST), json.dumps(manifest, indent=1).encode())
    log.info("%s: teacher %s embedded %d texts in %.1f s -> %s", spec.name, teacher.model,
             sum(r["texts"] for r in results), seconds, out)
    return TeacherScores.open(out)


def _score_with_ray(teacher, tokens_dir: str, out: str, names: list[str], concurrency: int) -> list[dict]:
    import ray

    from codiemb.paths import actor_runtime_env

    gpus = ray.cluster_resources().get("GPU", 0) if ray.is_initialized() else 0
    ds = ray.data.from_items([{"shard": n} for n in names])
    res = ds.map_batches(TeacherShardScorer, batch_size=1, batch_format="pyarrow",
                         fn_constructor_args=(teacher.model, teacher.pooling, tokens_dir, out, teacher.batch_size),
                         compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, int(concurrency))),
                         num_gpus=1 if gpus else 0, num_cpus=0 if gpus else 1, **actor_runtime_env())
    out_rows = []
    for b in res.iter_batches(batch_format="pyarrow", batch_size=None):
        stop.check("teacher scoring")  # leaving the iterator stops the Ray Data execution
        out_rows += b.to_pylist()
    return out_rows


class TeacherScores:
    """The stored teacher vectors of one shard set, read by (row id, text position in the row)."""

    def __init__(self, set_dir: str, manifest: dict):
        self.set_dir, self.manifest = set_dir, manifest
        self.shards = manifest["shards"]
        self.dim = int(manifest["dim"])
        self.model = manifest["teacher"]["model"]
        self._starts = np.concatenate([[0], np.cumsum([s["rows"] for s in self.shards])]).astype(np.int64)
        self._open: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    @classmethod
    def open(cls, set_dir: str) -> "TeacherScores":
        fs, root = open_root(set_dir)
        with fs.open_input_stream(join(root, MANIFEST)) as fh:
            manifest = json.loads(fh.readall())
        if manifest.get("format") != TEACHER_FORMAT:
            raise DataError(f"{set_dir}: teacher score format {manifest.get('format')} is not {TEACHER_FORMAT}")
        return cls(set_dir, manifest)

    def __len__(self) -> int:
        return int(self._starts[-1])

    def _shard(self, s: int) -> tuple[np.ndarray, np.ndarray]:
        hit = self._open.get(s)
        if hit is None:
            fs, root = open_root(self.set_dir)
            if fs.type_name != "local":  # small next to the token shards: read once per process
                def load(name):
                    import io

                    with fs.open_input_stream(join(root, "parts", self.shards[s]["name"], name)) as fh:
                        return np.load(io.BytesIO(fh.readall()), allow_pickle=False)
            else:
                def load(name):
                    return np.load(Path(root) / "parts" / self.shards[s]["name"] / name, mmap_mode="r")
            hit = self._open[s] = (load("emb.npy"), load("row_texts.npy"))
        return hit

    def vectors(self, rows: list[int], positions: np.ndarray) -> np.ndarray:
        """(len(rows), K, D) float32: for row ``rows[b]`` the vectors of its texts ``positions[b]``
        (0 = query / sentence1, then the row's texts in stored order; −1 = empty, zeros)."""
        positions = np.asarray(positions, np.int64).reshape(len(rows), -1)
        out = np.zeros(positions.shape + (self.dim,), np.float32)
        for b, i in enumerate(rows):
            s = int(np.searchsorted(self._starts, i, side="right") - 1)
            emb, row_texts = self._shard(s)
            base = int(row_texts[int(i - self._starts[s])])
            ok = positions[b] >= 0
            out[b, ok] = emb[base + positions[b][ok]]
        return out
