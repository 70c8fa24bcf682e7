"""Build (or reuse) a dataset's token shards in ONE validating pass (DESIGN §2).

:func:`build_shards` is the one entry: it computes the shard set's key (the input files' path,
size and mtime; task, format, score range, row limit, instruction; the tokenizer's files; the max
lengths), reuses ``<shards root>/<key>`` when its manifest is there, and otherwise runs the pass:

- **with Ray** (``use_ray=True``): a Ray Data pipeline reads raw rows (``readers.RawRowsDatasource``:
  file, line, bytes) and ``map_batches`` runs :class:`ShardBlockWriter` on an actor pool (the
  tokenizer loads once per actor). Each actor validates its block (``local.check_raw``, the same
  rule as every reader), tokenizes the valid rows, writes them as one shard straight to storage
  (local or ``s3://``) and returns only a small table: the shard's name and counts, and the bad
  rows. The driver never sees a valid row.
- **without Ray**: the same :func:`process_block` over blocks of the plain reader's raw rows.

The driver streams the bad rows to the quarantine file as blocks finish and keeps only counts and
the first bad row (by file and line), so its memory does not grow with the data. ``read ==
valid + quarantined`` comes from this same pass; the ``on_bad_rows`` gate runs on it before the
manifest is written, so a failing pass leaves no usable shard set behind.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.fs as pafs

from codiemb import console
from codiemb.data import local
from codiemb.data.local import BadRow
from codiemb.data.schemas import RowError, check_score_range
from codiemb.data.shards import (MANIFEST, QUARANTINE, SHARD_FORMAT, ShardStore, encode_rows, file_identity, join,
                                 merge_stats, open_root, shard_key, shard_name, shard_stats, tokenizer_fingerprint,
                                 write_bytes, write_shard)
from codiemb.errors import DataError
from codiemb.train import stop

log = logging.getLogger(__name__)

BLOCK_ROWS = 8192
RESULT_SCHEMA = pa.schema([("shard", pa.string()), ("stats", pa.string()), ("read", pa.int64()),
                           ("bad_file", pa.list_(pa.string())), ("bad_line", pa.list_(pa.int64())),
                           ("bad_reason", pa.list_(pa.string())), ("bad_raw", pa.list_(pa.string()))])


@dataclass
class ShardSpec:
    """What one dataset's shard set is made from (all the parts of its key)."""

    name: str
    path: str  # resolved data path (local or s3://)
    task: str
    model: str  # model name or folder: its tokenizer
    max_length: dict[str, int]
    fmt: str = "auto"
    qrels: str = "train"
    score_range: tuple[float, float] | None = None
    max_rows: int | None = None
    instruction: str | dict | None = None  # the query's (str), or {query, passage, sts} prefixes
    on_bad_rows: str = "fail"
    max_bad_fraction: float = 1.0
    tokenizer_setup: dict | None = None  # load_tokenizer's pooling / append_eos (the model config's)
    text_fields: tuple[str, ...] | None = None  # unsupervised: the fields that are texts (default: text)


@dataclass
class BuildResult:
    store: ShardStore
    counts: dict
    reused: bool
    seconds: float
    set_dir: str
    rows_per_s: float = 0.0


def _lengths(spec: ShardSpec) -> dict[str, int]:
    keys = ("query", "passage") if spec.task == "retrieval" else ("sts",)
    return {k: int(spec.max_length[k]) for k in keys}


# --------------------------------------------------------------------------- one block
def process_block(tokenizer, spec_task: str, files: list[int], names: list[str], lines: list[int], raws: list,
                  *, score_range, max_length: dict[str, int], instruction: str | None, fs, set_dir: str,
                  parsed: list[dict | None] | None = None, text_fields=None) -> dict[str, Any]:
    """Validate, tokenize and write one block of raw rows; returns its result row (see RESULT_SCHEMA).

    ``files`` are file indices (the key's order), ``names`` the files' display names; rows are
    sorted by (file, line) so the shard's name (its first row) fixes its place in the set.
    """
    order = sorted(range(len(lines)), key=lambda k: (files[k], lines[k]))
    good = []
    bad: dict[str, list] = {"file": [], "line": [], "reason": [], "raw": []}

    def reject(k: int, reason: str) -> None:
        bad["file"].append(names[k])
        bad["line"].append(int(lines[k]))
        bad["reason"].append(reason)
        bad["raw"].append(local.raw_text(raws[k]))

    for k in order:
        try:
            if parsed is not None and parsed[k] is not None:
                from codiemb.data.schemas import validate_row

                rec = validate_row(spec_task, parsed[k], score_range, text_fields)
            else:
                rec = local.check_raw(spec_task, raws[k], int(lines[k]), score_range, text_fields)
        except RowError as exc:
            reject(k, exc.reason)
            continue
        good.append((k, rec))
    name, stats = None, None
    if good:
        enc = encode_rows(tokenizer, spec_task, [r for _, r in good], max_length,
                          files=[files[k] for k, _ in good], lines=[lines[k] for k, _ in good],
                          instruction=instruction)
        for pos, reason in enc.rejected:
            reject(good[pos][0], reason)
        if enc.rows:
            k0 = good[0][0]
            name = shard_name(files[k0], int(lines[k0]))
            write_shard(fs, set_dir, name, enc.arrays)
            stats = shard_stats(spec_task, enc.arrays)
    return {"shard": name, "stats": json.dumps(stats) if stats else None, "read": len(lines),
            "bad_file": bad["file"], "bad_line": bad["line"], "bad_reason": bad["reason"], "bad_raw": bad["raw"]}


class ShardBlockWriter:
    """Ray Data callable class: loads the tokenizer once per actor, then runs :func:`process_block`."""

    def __init__(self, model: str, task: str, max_length: dict, score_range, instruction, fs, root: str,
                 file_index: dict[str, int], tokenizer_setup: dict | None = None, text_fields=None):
        from codiemb.data.tokenize import load_tokenizer

        self.tokenizer = load_tokenizer(model, **(tokenizer_setup or {}))
        self.task, self.max_length, self.score_range, self.instruction = task, max_length, score_range, instruction
        # the driver's filesystem object (endpoint, region; no keys: this process resolves its own)
        self.fs, self.root = fs, root
        self.file_index = file_index
        self.text_fields = text_fields

    def __call__(self, batch: pa.Table) -> pa.Table:
        names = batch.column("_file").to_pylist()
        out = process_block(self.tokenizer, self.task, [self.file_index[n] for n in names], names,
                            batch.column("_line").to_pylist(), batch.column("_raw").to_pylist(),
                            score_range=self.score_range, max_length=self.max_length,
                            instruction=self.instruction, fs=self.fs, set_dir=self.root,
                            text_fields=self.text_fields)
        return pa.Table.from_pylist([out], schema=RESULT_SCHEMA)


# --------------------------------------------------------------------------- the pass
def _local_blocks(fs, root: str, found: str, files: list[str], qrels: str, max_rows: int | None
                  ) -> Iterator[tuple[list[int], list[str], list[int], list, list | None]]:
    """Blocks of (file indices, display names, lines, raws, parsed) from the plain reader."""
    idx, names, lines, raws, parsed = [], [], [], [], []
    read = 0

    def rows():
        if found == "beir":
            for file, line, raw, row in local._beir_rows(fs, root, qrels):
                yield 0, file, line, raw, row
            return
        for i, f in enumerate(files):
            disp = local.display_name(fs, f)
            for line, raw in local.iter_raw_rows(fs, f, found):
                yield i, disp, line, raw, None

    for i, disp, line, raw, row in rows():
        if max_rows is not None and read >= max_rows:
            break
        read += 1
        idx.append(i)
        names.append(disp)
        lines.append(line)
        raws.append(raw)
        parsed.append(row)
        if len(lines) >= BLOCK_ROWS:
            yield idx, names, lines, raws, parsed
            idx, names, lines, raws, parsed = [], [], [], [], []
    if lines:
        yield idx, names, lines, raws, parsed


def _ray_results(spec: ShardSpec, fs, files: list[str], found: str, set_dir: str, concurrency: int,
                 score_range) -> Iterator[dict]:
    import ray

    from codiemb.paths import actor_runtime_env

    from codiemb.data.readers import RawRowsDatasource

    prefix = "s3://" if fs.type_name == "s3" else ""
    file_index = {prefix + f: i for i, f in enumerate(files)}
    raw = ray.data.read_datasource(RawRowsDatasource(files, fmt=found, display_prefix=prefix, filesystem=fs,
                                                     rows_per_block=BLOCK_ROWS))
    if spec.max_rows is not None:
        raw = raw.limit(spec.max_rows)
    sfs, sroot = open_root(set_dir)
    out = raw.map_batches(
        ShardBlockWriter, batch_size=None, batch_format="pyarrow",
        fn_constructor_args=(spec.model, spec.task, _lengths(spec), score_range, spec.instruction, sfs, sroot,
                             file_index, spec.tokenizer_setup, spec.text_fields),
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, concurrency)), num_cpus=1,
        udf_modifying_row_count=True, **actor_runtime_env())
    for batch in out.iter_batches(batch_format="pyarrow", batch_size=None):
        yield from batch.to_pylist()


def build_shards(spec: ShardSpec, shards_root: str, *, use_ray: bool = False, quarantine_path: str | None = None,
                 concurrency: int = 2, rebuild: bool = False, ray_min_bytes: int = 0) -> BuildResult:
    """The shard set of ``spec`` under ``shards_root`` (built now, or reused); see the module docstring.

    ``ray_min_bytes``: with ``use_ray``, inputs smaller than this many bytes are built in this process
    instead (same shard set; the actor pool's start-up would cost more than the pass)."""
    from codiemb.data.tokenize import load_tokenizer

    t0 = time.perf_counter()
    local._check_mode(spec.on_bad_rows, spec.max_bad_fraction)
    score_range = check_score_range(spec.score_range) if spec.task == "sts" else None
    fs, root = local.open_filesystem(spec.path)
    source = local.display_name(fs, root)
    found, files = local.resolve_files(fs, root, spec.fmt)
    key_files = [[local.display_name(fs, p), size, mtime] for p, size, mtime in file_identity(
        fs, files if found != "beir" else
        [f"{root}/corpus.jsonl", f"{root}/queries.jsonl", f"{root}/qrels/{spec.qrels}.tsv"])]
    key = shard_key({"files": key_files, "task": spec.task, "fmt": found, "qrels": spec.qrels if found == "beir" else None,
                     "score_range": score_range, "max_rows": spec.max_rows, "instruction": spec.instruction,
                     "tokenizer": tokenizer_fingerprint(spec.model), "max_length": _lengths(spec),
                     **({"tokenizer_setup": spec.tokenizer_setup} if spec.tokenizer_setup else {}),
                     **({"text_fields": list(spec.text_fields)} if spec.text_fields else {})})
    set_uri = join(shards_root, key)
    sfs, set_dir = open_root(set_uri)
    if not rebuild and sfs.get_file_info(join(set_dir, MANIFEST)).type == pafs.FileType.File:
        store = ShardStore.open(set_uri)
        counts = dict(store.manifest["counts"])
        log.info("%s: reusing token shards %s (%d rows; no tokenizing)", source, set_uri, counts["valid"])
        with console.stage(f"data {_short(source)}", total=counts["read"], unit="row") as bar:
            bar.set_postfix_str("token shards reused")
            bar.update(counts["read"])
        _gate(counts, store.manifest.get("first_bad"), spec, source)
        if counts["quarantined"] and spec.on_bad_rows == "quarantine" and quarantine_path:
            _copy_quarantine(sfs, join(set_dir, QUARANTINE), quarantine_path)
        return BuildResult(store, counts, True, time.perf_counter() - t0, set_uri)

    if sfs.type_name == "local" and os.path.isdir(set_dir):
        shutil.rmtree(set_dir)  # a partial earlier build (no manifest)
    total_bytes = sum(size for _, size, _ in key_files)
    if use_ray and found != "beir" and total_bytes < ray_min_bytes:
        log.info("%s: %.1f MB, under data.ray_build_min_mb: tokenized in this process", source, total_bytes / 2**20)
        use_ray = False
    tokenizer = load_tokenizer(spec.model, **(spec.tokenizer_setup or {}))
    counts = {"read": 0, "valid": 0, "quarantined": 0}
    first_bad: BadRow | None = None
    entries: list[tuple[str, dict]] = []
    qfile = tempfile.NamedTemporaryFile("w", suffix=".jsonl", prefix="codiemb-quarantine-", delete=False,
                                        encoding="utf-8")
    try:
        if use_ray and found != "beir":
            results = _ray_results(spec, fs, files, found, set_uri, concurrency, score_range)
        else:
            results = (process_block(tokenizer, spec.task, idx, names, lines, raws, score_range=score_range,
                                     max_length=_lengths(spec), instruction=spec.instruction, fs=sfs,
                                     set_dir=set_dir, parsed=parsed, text_fields=spec.text_fields)
                       for idx, names, lines, raws, parsed in _local_blocks(fs, root, found, files, spec.qrels,
                                                                          spec.max_rows))
        bar = console.stage(f"data {_short(source)}", unit="row")
        bar.set_postfix_str("validate + tokenize")
        for res in results:
            stop.check(f"building the token shards of {source}")  # a partial set has no manifest: rebuilt
            counts["read"] += int(res["read"])
            bar.update(int(res["read"]))
            for f, line, reason, raw in zip(res["bad_file"], res["bad_line"], res["bad_reason"], res["bad_raw"]):
                counts["quarantined"] += 1
                row = BadRow(f, int(line), reason, raw)
                qfile.write(json.dumps(row.to_dict(), ensure_ascii=False) + "\n")
                if first_bad is None or (row.file, row.line) < (first_bad.file, first_bad.line):
                    first_bad = row
            if res["shard"]:
                entries.append((res["shard"], json.loads(res["stats"])))
        bar.set_postfix_str(f"valid {counts['read'] - counts['quarantined']}, quarantined {counts['quarantined']}")
        bar.close()
        qfile.close()
        counts["valid"] = counts["read"] - counts["quarantined"]
        if counts["read"] == 0:
            raise DataError(f"{source}: no rows found")
        if counts["quarantined"] and spec.on_bad_rows == "quarantine" and quarantine_path:
            _copy_quarantine(local.open_filesystem(qfile.name)[0], qfile.name, quarantine_path)
            log.warning("%s: %d bad rows written to %s", source, counts["quarantined"], quarantine_path)
        _gate(counts, first_bad.to_dict() if first_bad else None, spec, source)
        entries.sort(key=lambda e: e[0])  # shard names sort by (file index, first line)
        shards = [{"name": n, **s} for n, s in entries]
        stats = merge_stats(spec.task, [s for _, s in entries])
        if stats.get("source_rows", stats["rows"]) != counts["valid"]:
            raise RuntimeError(f"{source}: shards hold {stats['rows']} rows but {counts['valid']} were valid")
        if counts["quarantined"]:
            _copy_file(qfile.name, sfs, join(set_dir, QUARANTINE))
        manifest = {"format": SHARD_FORMAT, "key": key, "task": spec.task, "source": source, "files": key_files,
                    "counts": counts, "first_bad": first_bad.to_dict() if first_bad else None, "stats": stats,
                    "shards": shards, "max_length": _lengths(spec),
                    "pad_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0,
                    "built_with": "ray" if use_ray and found != "beir" else "local",
                    "seconds": round(time.perf_counter() - t0, 3)}
        write_bytes(sfs, join(set_dir, MANIFEST), json.dumps(manifest, indent=1).encode())
    finally:
        qfile.close()
        os.unlink(qfile.name)
    seconds = time.perf_counter() - t0
    log.info("%s: read=%d valid=%d quarantined=%d; token shards %s built in %.1f s (%d shards, %d tokens)",
             source, counts["read"], counts["valid"], counts["quarantined"], set_uri, seconds, len(shards),
             stats["tokens"])
    return BuildResult(ShardStore.open(set_uri), counts, False, seconds, set_uri,
                       rows_per_s=counts["read"] / max(seconds, 1e-9))


def _short(source: str) -> str:
    """A data source's last path part, for the console's stage line."""
    return source.rstrip("/").rsplit("/", 1)[-1]


def _copy_file(src: str, fs, dest: str) -> None:
    """Copy local file ``src`` to ``dest`` on ``fs`` in blocks."""
    if fs.type_name == "local":
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        shutil.copyfile(src, dest)
        return
    with open(src, "rb") as fin, fs.open_output_stream(dest) as out:
        while chunk := fin.read(1 << 20):
            out.write(chunk)


def _gate(counts: dict, first_bad: dict | None, spec: ShardSpec, source: str) -> None:
    first = BadRow(**first_bad) if first_bad else None
    local.enforce_bad_rows(counts, first, spec.on_bad_rows, spec.max_bad_fraction, source)


def _copy_quarantine(src_fs, src: str, dest: str) -> None:
    """Append the bad rows at ``src`` to the run's quarantine file ``dest`` (local or s3://), in blocks."""
    dfs, dpath = local.open_filesystem(dest)
    if dfs.type_name == "local":
        os.makedirs(os.path.dirname(dpath) or ".", exist_ok=True)
        with src_fs.open_input_stream(src) as fin, open(dpath, "ab") as out:
            while chunk := fin.read(1 << 20):
                out.write(chunk)
        return
    with src_fs.open_input_stream(src) as fin:
        rows = [json.loads(line) for line in fin.readall().decode("utf-8").splitlines() if line.strip()]
    local.write_quarantine(dest, rows)


def spec_for(cfg, ds) -> ShardSpec:
    """The :class:`ShardSpec` of config dataset ``ds``."""
    from codiemb.paths import resolve_data_path

    ml = cfg.model.max_length
    ins = dataset_instructions(cfg, ds)
    setup = {k: v for k, v in (("pooling", cfg.model.pooling), ("append_eos", cfg.model.append_eos)) if v is not None}
    return ShardSpec(name=ds.name, path=resolve_data_path(ds.path, cfg.data.root), task=ds.task, model=cfg.model.name,
                     max_length={"query": ml.query, "passage": ml.passage, "sts": ml.sts}, fmt=ds.format,
                     qrels=ds.qrels, score_range=tuple(ds.score_range) if ds.score_range else (0.0, 5.0),
                     max_rows=ds.max_rows, on_bad_rows=cfg.data.on_bad_rows,
                     instruction=ins if any(ins.values()) else None,
                     max_bad_fraction=cfg.data.max_bad_fraction, tokenizer_setup=setup or None,
                     text_fields=tuple(ds.text_fields) if getattr(ds, "text_fields", None) else None)


def dataset_instructions(cfg, ds) -> dict[str, str | None]:
    """Dataset ``ds``'s instruction prefixes by kind: its own (``instruction`` for queries and STS
    sentences, ``passage_instruction`` for passages), else the model's (``model.instructions``).
    A row's own instruction wins over both (``shards.encode_rows``)."""
    model = cfg.model.instructions
    own = getattr(ds, "instruction", None)
    return {"query": own or model.query, "passage": getattr(ds, "passage_instruction", None) or model.passage,
            "sts": own or model.sts}


def shards_root(cfg) -> str:
    """Where the config's shard sets live: ``data.shards``, else ``$CODIEMB_SHARDS``, else
    ``<storage.path>/shards``."""
    root = getattr(cfg.data, "shards", None) or os.environ.get("CODIEMB_SHARDS")
    if root:
        return root if "://" in root else os.path.abspath(root)
    base = cfg.storage.path
    return join(base, "shards") if "://" in base else os.path.abspath(os.path.join(base, "shards"))
