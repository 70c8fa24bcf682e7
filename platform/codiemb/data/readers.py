"""Read training data with Ray Data so a corpus of any size streams (DESIGN §2).

``read_dataset`` builds a lazy pipeline: a file datasource that yields ``(file, line, raw
bytes)`` per row -> ``map_batches`` that runs the SAME :func:`codiemb.data.schemas.validate_row`
as the local reader. JSONL is split on ``\\n`` from the byte stream (``ray.data.read_json``
would fail a whole file on one non-UTF-8 line, and drop line numbers); Parquet rows are numbered
1..N per file (``ray.data.read_parquet`` cannot say which row was bad), so quarantine records
name the same ``file:line`` on both paths.

Counting takes one streaming pass (no materialization): it sees every row's verdict, writes the
bad rows to the quarantine file and applies the ``on_bad_rows`` gate; the returned dataset holds
only valid, normalized records and re-reads lazily when consumed.
"""

from __future__ import annotations

import logging
from typing import Iterator

import pyarrow as pa
import ray
from ray.data.datasource import FileBasedDatasource

from codiemb.data import local
from codiemb.data.local import BadRow, enforce_bad_rows, write_quarantine
from codiemb.data.schemas import RowError, check_score_range
from codiemb.errors import DataError

log = logging.getLogger(__name__)

#: Arrow schema of the normalized records (fixed, so blocks with all-null fields still agree).
RECORD_SCHEMAS = {
    "retrieval": pa.schema([
        ("query", pa.string()),
        ("positives", pa.list_(pa.string())),
        ("negatives", pa.list_(pa.string())),
        ("instruction", pa.string()),
    ]),
    "sts": pa.schema([("sentence1", pa.string()), ("sentence2", pa.string()), ("score", pa.float64())]),
}
RAW_SCHEMA = pa.schema([("_file", pa.string()), ("_line", pa.int64()), ("_raw", pa.binary())])
AUDIT_SCHEMA = pa.schema([("file", pa.string()), ("line", pa.int64()), ("reason", pa.string()), ("raw", pa.string())])


class RawRowsDatasource(FileBasedDatasource):
    """Every row of JSONL or Parquet files as ``{_file, _line, _raw}``; Parquet rows become JSON lines."""

    def __init__(self, paths: list[str], *, fmt: str, display_prefix: str = "", rows_per_block: int = 8192,
                 **kwargs):
        super().__init__(paths, **kwargs)
        self._fmt = fmt
        self._prefix = display_prefix
        self._rows_per_block = rows_per_block

    def _open_input_source(self, filesystem, path: str, **open_args):
        if self._fmt == "parquet":  # Parquet needs random access
            return filesystem.open_input_file(path)
        return super()._open_input_source(filesystem, path, **open_args)

    def _read_stream(self, f, path: str) -> Iterator[pa.Table]:
        rows = local.iter_parquet_rows(f) if self._fmt == "parquet" else local.iter_lines(f)
        name = self._prefix + path
        lines: list[int] = []
        raws: list[bytes] = []
        for line, raw in rows:
            lines.append(line)
            raws.append(raw)
            if len(lines) >= self._rows_per_block:
                yield _raw_block(name, lines, raws)
                lines, raws = [], []
        if lines:
            yield _raw_block(name, lines, raws)


def _raw_block(name: str, lines: list[int], raws: list[bytes]) -> pa.Table:
    return pa.table({"_file": [name] * len(lines), "_line": lines, "_raw": pa.array(raws, pa.binary())},
                    schema=RAW_SCHEMA)


def validate_batch(batch: pa.Table, task: str, score_range=None, audit: bool = False) -> pa.Table:
    """Validate a batch of raw rows with ``local.check_raw`` (schemas.parse_line + validate_row).

    ``audit=False``: the valid rows as normalized records. ``audit=True``: one row per input
    with ``reason`` (null when valid) and ``raw`` (only for bad rows), for counting.
    """
    files = batch.column("_file").to_pylist()
    lines = batch.column("_line").to_pylist()
    raws = batch.column("_raw").to_pylist()
    records: list[dict] = []
    audit_rows: list[dict] = []
    for file, line, raw in zip(files, lines, raws):
        try:
            rec = local.check_raw(task, raw, line, score_range)
        except RowError as exc:
            if audit:
                audit_rows.append({"file": file, "line": line, "reason": exc.reason, "raw": local.raw_text(raw)})
            continue
        if audit:
            audit_rows.append({"file": file, "line": line, "reason": None, "raw": None})
        else:
            records.append(rec)
    if audit:
        return pa.Table.from_pylist(audit_rows, schema=AUDIT_SCHEMA)
    return pa.Table.from_pylist(records, schema=RECORD_SCHEMAS[task])


def read_dataset(
    path: str,
    task: str,
    *,
    score_range: tuple[float, float] | None = None,
    fmt: str = "auto",
    on_bad_rows: str = "fail",
    quarantine_path: str | None = None,
    max_bad_fraction: float = 1.0,
    qrels: str = "train",
    max_rows: int | None = None,
    batch_size: int = 1024,
) -> tuple[ray.data.Dataset, dict]:
    """A lazy Ray Dataset of valid normalized records, and ``counts`` {read, valid, quarantined}.

    Same contract as :func:`codiemb.data.local.read_records`: ``fail`` raises DataError
    ``FILE:LINE: reason`` (the first bad row by file and line, with the total); ``quarantine``
    appends the bad rows to ``quarantine_path`` and raises when their fraction exceeds
    ``max_bad_fraction``. BEIR folders are small and read locally, then handed to Ray.
    """
    if task not in RECORD_SCHEMAS:
        raise ValueError(f"unknown task {task!r}")
    score_range = check_score_range(score_range) if task == "sts" else None
    local._check_mode(on_bad_rows, max_bad_fraction)
    fs, root = local.open_filesystem(path)
    source = local.display_name(fs, root)
    found, files = local.resolve_files(fs, root, fmt)

    if found == "beir":
        res = local.read_records(path, task, score_range=score_range, fmt="beir", qrels=qrels,
                                 on_bad_rows=on_bad_rows, quarantine_path=quarantine_path,
                                 max_bad_fraction=max_bad_fraction, max_rows=max_rows)
        return ray.data.from_arrow(pa.Table.from_pylist(res.records, schema=RECORD_SCHEMAS[task])), res.counts

    prefix = "s3://" if fs.type_name == "s3" else ""
    raw = ray.data.read_datasource(RawRowsDatasource(files, fmt=found, display_prefix=prefix, filesystem=fs))
    if max_rows is not None:
        raw = raw.limit(max_rows)

    def stage(audit: bool) -> ray.data.Dataset:
        return raw.map_batches(validate_batch, batch_format="pyarrow", batch_size=batch_size,
                               fn_kwargs={"task": task, "score_range": score_range, "audit": audit},
                               udf_modifying_row_count=not audit)

    counts = {"read": 0, "valid": 0, "quarantined": 0}
    bad: list[BadRow] = []
    for batch in stage(audit=True).iter_batches(batch_format="pyarrow", batch_size=None):
        counts["read"] += batch.num_rows
        reasons = batch.column("reason")
        n_bad = batch.num_rows - reasons.null_count
        if n_bad:
            bad_rows = batch.filter(reasons.is_valid())
            bad += [BadRow(**r) for r in bad_rows.to_pylist()]
    bad.sort(key=lambda b: (b.file, b.line))
    counts["quarantined"] = len(bad)
    counts["valid"] = counts["read"] - counts["quarantined"]
    if counts["read"] == 0:
        raise DataError(f"{source}: no rows found")
    log.info("%s: read=%d valid=%d quarantined=%d (Ray Data)", source, counts["read"], counts["valid"],
             counts["quarantined"])
    if bad and on_bad_rows == "quarantine" and quarantine_path:
        write_quarantine(quarantine_path, bad)
        log.warning("%s: %d bad rows written to %s", source, len(bad), quarantine_path)
    enforce_bad_rows(counts, bad[0] if bad else None, on_bad_rows, max_bad_fraction, source)
    return stage(audit=False), counts
