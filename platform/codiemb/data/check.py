"""``codiemb data check PATH --task sts|retrieval``: every problem of a data file, one line each.

Reads with :func:`codiemb.data.local.read_records`, collecting ALL bad rows (it never stops at
the first). Prints ``FILE:LINE: reason`` per bad row on stderr (``max_errors`` of them, then
``... N more``), then ``read=N valid=N quarantined=N`` on stdout.

Exit status: 0 when every row is valid; 1 when any row is bad. With ``--quarantine FILE`` the
bad rows are written there (the file is replaced) and the status is 0 if at least one row is
valid. Structural problems (file not found, no rows) raise DataError, which the CLI prints as
one line (exit 2). Never a traceback for bad data.
"""

from __future__ import annotations

import logging
import sys

from codiemb.data.local import read_records, write_quarantine
from codiemb.data.schemas import check_score_range
from codiemb.errors import DataError


def run_check(path: str, task: str, score_range: tuple[float, float] | None = None, quarantine: str | None = None,
              max_errors: int = 20) -> int:
    if task == "sts":
        try:
            score_range = check_score_range(score_range)
        except ValueError as exc:
            raise DataError(str(exc)) from None
    reader_log = logging.getLogger("codiemb.data.local")
    level = reader_log.level
    reader_log.setLevel(logging.WARNING)  # the counts line below replaces the reader's log line
    try:
        result = read_records(path, task, score_range=score_range, on_bad_rows="quarantine", max_bad_fraction=1.0)
    finally:
        reader_log.setLevel(level)
    shown = result.errors[:max(max_errors, 0)]
    for bad in shown:
        print(bad.location(), file=sys.stderr)
    if len(result.errors) > len(shown):
        print(f"... {len(result.errors) - len(shown)} more", file=sys.stderr)
    if quarantine:
        write_quarantine(quarantine, result.errors, append=False)
    c = result.counts
    print(f"read={c['read']} valid={c['valid']} quarantined={c['quarantined']}")
    if quarantine:
        if c["quarantined"]:
            print(f"{c['quarantined']} bad rows written to {quarantine}", file=sys.stderr)
        return 0 if c["valid"] > 0 else 1
    return 1 if result.errors else 0
