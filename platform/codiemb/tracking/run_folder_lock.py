"""One training per run folder: ``codiemb train`` holds an exclusive lock on ``<run folder>/.lock``.

Two trainings writing one folder would interleave their checkpoints and ``metrics.jsonl`` and each
would resume from the other's steps. The lock is ``fcntl.flock`` (advisory, on the open file), so
the kernel drops it when the holder exits in any way, SIGKILL included: a killed run's folder is
free at once and the next ``codiemb train`` resumes from it. The holder's pid and command are
written into the file so the refusal can name them.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sys
from pathlib import Path
from typing import Iterator

from codiemb.errors import UserError

LOCK_FILE = ".lock"


@contextlib.contextmanager
def run_folder_lock(root: Path) -> Iterator[Path]:
    """Hold the run folder's lock for the ``with`` body; a UserError naming the holder when taken."""
    root.mkdir(parents=True, exist_ok=True)
    path = root / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "another process"
            raise UserError(f"{root}: run folder in use by {holder}; wait for it, stop it, or pass "
                            "another --output") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}: {' '.join(sys.argv)[:400]}\n".encode(), 0)
        yield path
    finally:
        os.close(fd)  # closing the descriptor releases the flock
