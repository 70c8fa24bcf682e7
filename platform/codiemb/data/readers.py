"""Raw rows for Ray Data: the datasource of the shard build (``data/build.py``, DESIGN §2).

:class:`RawRowsDatasource` yields ``(file, line, raw bytes)`` per row; the shard build's
``map_batches`` step then runs the SAME :func:`codiemb.data.schemas.validate_row` as the local
reader, tokenizes the valid rows and writes them to storage, in one pass. JSONL is split on
``\\n`` from the byte stream (``ray.data.read_json`` would fail a whole file on one non-UTF-8
line, and drop line numbers); Parquet rows are numbered 1..N per file (``ray.data.read_parquet``
cannot say which row was bad), so quarantine records name the same ``file:line`` on both paths.
"""

from __future__ import annotations

import logging
from typing import Iterator

import pyarrow as pa
from ray.data.datasource import FileBasedDatasource

from codiemb.data import local

log = logging.getLogger(__name__)

RAW_SCHEMA = pa.schema([("_file", pa.string()), ("_line", pa.int64()), ("_raw", pa.binary())])


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
