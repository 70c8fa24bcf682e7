"""Read a training file into validated records without Ray (DESIGN §2-§3).

This is the path the plain-torch training loop and ``codiemb data check`` use on a box without
Ray; the Ray Data reader (:mod:`codiemb.data.readers`) reuses the same pieces (filesystem
resolution, line splitting, Parquet row numbering, quarantine writing and the bad-row gate),
so both paths judge and count every row the same way.

Formats: JSONL (read as bytes, split on ``\\n``, so a non-UTF-8 line is reported with its line
number and the valid lines around it are kept; ``.gz`` is decompressed), Parquet (the "line" is
the 1-based row number), a BEIR folder (pairs from ``qrels/<split>.tsv``), or a folder of
JSONL/Parquet shards. Paths may be local or ``s3://bucket/key``; an S3 endpoint override comes
from ``$CODIEMB_S3_ENDPOINT`` (or ``$AWS_ENDPOINT_URL_S3`` / ``$AWS_ENDPOINT_URL``).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from typing import Iterable, Iterator
from urllib.parse import urlparse

import pyarrow.fs as pafs

from codiemb.data.schemas import RowError, parse_line, validate_row
from codiemb.errors import DataError

log = logging.getLogger(__name__)

JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json", ".jsonl.gz", ".ndjson.gz", ".json.gz")
PARQUET_SUFFIXES = (".parquet", ".pq")
FORMATS = ("auto", "jsonl", "parquet", "beir")
BAD_ROW_MODES = ("fail", "quarantine")


@dataclass
class BadRow:
    """One rejected row: where it is, why, and its raw text (undecodable bytes shown as ``\\xNN``)."""

    file: str
    line: int
    reason: str
    raw: str

    def location(self) -> str:
        return f"{self.file}:{self.line}: {self.reason}"

    def to_dict(self) -> dict:
        return {"file": self.file, "line": self.line, "reason": self.reason, "raw": self.raw}


@dataclass
class ReadResult:
    records: list[dict]
    counts: dict = field(default_factory=lambda: {"read": 0, "valid": 0, "quarantined": 0})
    errors: list[BadRow] = field(default_factory=list)


# --------------------------------------------------------------------------- filesystems
def open_filesystem(uri: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """Resolve a local path or URI to ``(pyarrow filesystem, path inside it)``.

    ``s3://bucket/key`` gives an ``S3FileSystem`` for ``bucket/key``. The endpoint override
    (e.g. ``http://127.0.0.1:9000`` for a local S3 server) comes from ``$CODIEMB_S3_ENDPOINT``,
    ``$AWS_ENDPOINT_URL_S3`` or ``$AWS_ENDPOINT_URL``, the region from the usual AWS variables.
    Credentials are NOT put into the filesystem: pyarrow resolves them from the standard AWS chain
    (environment, shared credentials file, instance profile / IRSA) in whichever process uses it,
    so a filesystem that Ray pickles to another process carries no secret.
    """
    uri = os.fspath(uri)
    if uri.startswith("s3://"):
        kwargs: dict = {}
        endpoint = (os.environ.get("CODIEMB_S3_ENDPOINT") or os.environ.get("AWS_ENDPOINT_URL_S3")
                    or os.environ.get("AWS_ENDPOINT_URL"))
        if endpoint:
            parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
            kwargs["endpoint_override"] = parsed.netloc
            kwargs["scheme"] = parsed.scheme or "https"
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        if region:
            kwargs["region"] = region
        return pafs.S3FileSystem(**kwargs), uri[len("s3://"):].rstrip("/")
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    elif "://" in uri:
        try:
            return pafs.FileSystem.from_uri(uri)
        except (ValueError, OSError) as exc:
            raise DataError(f"{uri}: cannot open ({exc})") from None
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))


def display_name(fs: pafs.FileSystem, path: str) -> str:
    """How a file is named in messages: ``s3://bucket/key`` for S3, the path otherwise."""
    return f"s3://{path}" if fs.type_name == "s3" else path


def _info(fs: pafs.FileSystem, path: str) -> pafs.FileInfo:
    try:
        return fs.get_file_info(path)
    except OSError as exc:
        raise DataError(f"{display_name(fs, path)}: cannot open ({exc})") from None


def _suffix_format(path: str) -> str | None:
    low = path.lower()
    if low.endswith(PARQUET_SUFFIXES):
        return "parquet"
    if low.endswith(JSONL_SUFFIXES):
        return "jsonl"
    return None


def resolve_files(fs: pafs.FileSystem, path: str, fmt: str = "auto") -> tuple[str, list[str]]:
    """Pick the format and list the files: a file, a BEIR folder, or a folder of shards (sorted)."""
    if fmt not in FORMATS:
        raise DataError(f"{display_name(fs, path)}: unknown format {fmt!r} (expected one of {', '.join(FORMATS)})")
    info = _info(fs, path)
    name = display_name(fs, path)
    if info.type == pafs.FileType.NotFound:
        raise DataError(f"{name}: file not found")
    if info.type == pafs.FileType.File:
        if fmt == "beir":
            raise DataError(f"{name}: a BEIR dataset is a folder (corpus.jsonl, queries.jsonl, qrels/)")
        found = fmt if fmt != "auto" else _suffix_format(path)
        if found is None:
            raise DataError(f"{name}: cannot tell the format from the suffix; set format: jsonl or parquet")
        return found, [path]
    # a folder
    try:
        entries = fs.get_file_info(pafs.FileSelector(path, recursive=False))
    except OSError as exc:
        raise DataError(f"{name}: cannot list ({exc})") from None
    base = {e.base_name for e in entries}
    if fmt == "beir" or (fmt == "auto" and {"corpus.jsonl", "queries.jsonl", "qrels"} <= base):
        return "beir", [path]
    files = sorted(e.path for e in entries if e.type == pafs.FileType.File and not e.base_name.startswith((".", "_")))
    # in a folder, a file's suffix decides whether it is a shard (README.md, _SUCCESS are skipped)
    kinds = {f: _suffix_format(f) for f in files}
    kinds = {f: k for f, k in kinds.items() if k is not None and fmt in ("auto", k)}
    if not kinds:
        raise DataError(f"{name}: folder holds no .jsonl or .parquet files and is not a BEIR folder")
    if len(set(kinds.values())) > 1:
        raise DataError(f"{name}: folder mixes JSONL and Parquet files; point at one kind")
    return next(iter(kinds.values())), list(kinds)


# --------------------------------------------------------------------------- raw rows
def iter_lines(stream, chunk_size: int = 1 << 20) -> Iterator[tuple[int, bytes]]:
    """Yield ``(line number, bytes)`` for every non-blank line of a binary stream (1-based).

    Splits on ``\\n`` only (never on Unicode line separators inside JSON strings) and never
    decodes, so one bad byte costs one line.
    """
    lineno = 0
    rest = b""
    while True:
        chunk = stream.read(chunk_size)
        if not chunk:
            break
        parts = (rest + chunk).split(b"\n")
        rest = parts.pop()
        for part in parts:
            lineno += 1
            if part.strip():
                yield lineno, part
    if rest.strip():
        yield lineno + 1, rest


def _json_default(value):
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", errors="backslashreplace")
    return str(value)


def row_to_raw(row: dict) -> bytes:
    """A Parquet row as one JSON line (NaN stays NaN), so every format goes through parse_line."""
    return json.dumps(row, ensure_ascii=False, default=_json_default).encode("utf-8")


def iter_parquet_rows(source, batch_size: int = 8192) -> Iterator[tuple[int, bytes]]:
    """Yield ``(row number, JSON bytes)`` for every row of a Parquet file (1-based)."""
    import pyarrow.parquet as pq

    lineno = 0
    for batch in pq.ParquetFile(source).iter_batches(batch_size=batch_size):
        for row in batch.to_pylist():
            lineno += 1
            yield lineno, row_to_raw(row)


def iter_raw_rows(fs: pafs.FileSystem, path: str, fmt: str) -> Iterator[tuple[int, bytes]]:
    """``(line, raw bytes)`` for one JSONL or Parquet file."""
    try:
        if fmt == "parquet":
            with fs.open_input_file(path) as fh:
                yield from iter_parquet_rows(fh)
        else:
            with fs.open_input_stream(path) as fh:
                yield from iter_lines(fh)
    except OSError as exc:
        raise DataError(f"{display_name(fs, path)}: cannot read ({exc})") from None


def check_raw(task: str, raw: bytes, line: int, score_range=None, text_fields=None) -> dict:
    """Parse and validate one raw line; raises RowError."""
    return validate_row(task, parse_line(raw, first_line=line == 1), score_range, text_fields)


def raw_text(raw: bytes | str) -> str:
    return raw if isinstance(raw, str) else bytes(raw).decode("utf-8", errors="backslashreplace")


# --------------------------------------------------------------------------- the gate
def write_quarantine(path: str, rows: Iterable[BadRow | dict], append: bool = True) -> int:
    """Write bad rows as JSONL ``{"file", "line", "reason", "raw"}``; local or s3://. Returns the count."""
    fs, p = open_filesystem(path)
    lines = [json.dumps(r.to_dict() if isinstance(r, BadRow) else r, ensure_ascii=False) + "\n" for r in rows]
    data = "".join(lines).encode("utf-8")
    try:
        if fs.type_name == "local":
            fs.create_dir(os.path.dirname(p) or ".", recursive=True)
        if append and _info(fs, p).type == pafs.FileType.File:
            with fs.open_input_stream(p, compression=None) as fh:
                data = fh.readall() + data
        with fs.open_output_stream(p, compression=None) as fh:
            fh.write(data)
    except OSError as exc:
        raise DataError(f"{display_name(fs, p)}: cannot write the quarantine file ({exc})") from None
    return len(lines)


def enforce_bad_rows(counts: dict, first: BadRow | None, on_bad_rows: str, max_bad_fraction: float,
                     source: str) -> None:
    """Raise DataError when bad rows are not allowed: any in ``fail`` mode, too many in ``quarantine``."""
    bad, read = counts["quarantined"], counts["read"]
    if first is not None and on_bad_rows == "fail":
        more = f" ({bad} bad rows in {read} read; on_bad_rows: quarantine sets them aside)"
        raise DataError(first.location() + more)
    if read and bad / read > max_bad_fraction:
        raise DataError(
            f"{source}: {bad} of {read} rows are bad ({bad / read:.2%}), above max_bad_fraction "
            f"{max_bad_fraction:.2%}; first: {first.location() if first else '?'}"
        )


def _check_mode(on_bad_rows: str, max_bad_fraction: float) -> None:
    if on_bad_rows not in BAD_ROW_MODES:
        raise DataError(f"on_bad_rows must be one of {', '.join(BAD_ROW_MODES)}, got {on_bad_rows!r}")
    if not 0.0 <= max_bad_fraction <= 1.0:
        raise DataError(f"max_bad_fraction must be in [0, 1], got {max_bad_fraction}")


# --------------------------------------------------------------------------- the reader
def read_records(
    path: str | os.PathLike,
    task: str,
    *,
    score_range: tuple[float, float] | None = None,
    fmt: str = "auto",
    qrels: str = "train",
    on_bad_rows: str = "fail",
    quarantine_path: str | None = None,
    max_bad_fraction: float = 1.0,
    max_rows: int | None = None,
    quarantine_append: bool = True,
    text_fields: list[str] | None = None,
) -> ReadResult:
    """Read and validate every row of ``path``; ``counts`` reconcile: read == valid + quarantined.

    ``on_bad_rows="fail"`` reads the whole input, then raises DataError ``FILE:LINE: reason`` for
    the first bad row (with the total). ``"quarantine"`` keeps the valid rows, appends the bad
    ones to ``quarantine_path`` (when given) and raises only if the bad fraction exceeds
    ``max_bad_fraction``. ``max_rows`` stops after that many rows are read.
    """
    _check_mode(on_bad_rows, max_bad_fraction)
    fs, root = open_filesystem(path)
    source = display_name(fs, root)
    found, files = resolve_files(fs, root, fmt)
    result = ReadResult(records=[])

    def rows() -> Iterator[tuple[str, int, bytes | str, dict | None]]:
        if found == "beir":
            yield from _beir_rows(fs, root, qrels)
            return
        for f in files:
            for line, raw in iter_raw_rows(fs, f, found):
                yield display_name(fs, f), line, raw, None

    for file, line, raw, row in rows():
        if max_rows is not None and result.counts["read"] >= max_rows:
            break
        result.counts["read"] += 1
        try:
            rec = (validate_row(task, row, score_range, text_fields) if row is not None
                   else check_raw(task, raw, line, score_range, text_fields))
        except RowError as exc:
            result.counts["quarantined"] += 1
            result.errors.append(BadRow(file, line, exc.reason, raw_text(raw)))
            continue
        result.records.append(rec)
    result.counts["valid"] = len(result.records)
    if result.counts["read"] == 0:
        raise DataError(f"{source}: no rows found")
    log.info("%s: read=%d valid=%d quarantined=%d", source, result.counts["read"], result.counts["valid"],
             result.counts["quarantined"])
    if result.errors and on_bad_rows == "quarantine" and quarantine_path:
        write_quarantine(quarantine_path, result.errors, append=quarantine_append)
        log.warning("%s: %d bad rows written to %s", source, result.counts["quarantined"], quarantine_path)
    enforce_bad_rows(result.counts, result.errors[0] if result.errors else None, on_bad_rows, max_bad_fraction, source)
    return result


def _beir_rows(fs: pafs.FileSystem, folder: str, qrels: str) -> Iterator[tuple[str, int, str, dict]]:
    """Training pairs of a local BEIR folder; the "line" is the pair's 1-based position."""
    from codiemb.data.beir import beir_training_pairs

    if fs.type_name != "local":
        raise DataError(f"{display_name(fs, folder)}: BEIR folders are read from local disk only")
    file = os.path.join(folder, "qrels", f"{qrels}.tsv")
    for i, pair in enumerate(beir_training_pairs(folder, qrels), 1):
        yield file, i, json.dumps(pair, ensure_ascii=False), pair
