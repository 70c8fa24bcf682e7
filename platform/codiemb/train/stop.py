"""SIGTERM stops training at the next step boundary, with a final checkpoint (no Ray here).

Schedulers (Kubernetes, Slurm, spot reclaim, ``ray job stop``) send SIGTERM some seconds before
they kill. While :func:`sigterm_stops_training` is active (``codiemb train`` and the pipeline's
train stage, around both the local loop and the Ray driver), the first SIGTERM only sets a flag:

- local (``--local``): the loop sees :func:`requested` at the end of the step it is in, writes a
  checkpoint at that step and raises :class:`TrainingStopped`;
- Ray: the driver passes the flag to the workers (``train/ray_trainer.py``: a small actor that rank
  0 polls); all ranks agree on it at the same step boundary (one ``all_reduce``), rank 0 writes the
  checkpoint, every rank reports it, and the driver raises :class:`TrainingStopped`.

The CLI prints ``stopped by SIGTERM at step N; rerun the same command to resume`` and exits 143
(128 + SIGTERM, what the process would have returned had it died at once), so a script's
``codiemb train ... && next`` does not go on. A second SIGTERM ends the process at once, as before.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from typing import Iterator

log = logging.getLogger(__name__)

EXIT_CODE = 128 + signal.SIGTERM  # 143

_requested = threading.Event()
_reason: list[str] = []


class TrainingStopped(Exception):
    """Training stopped on request at ``step`` (checkpoint written); rerunning resumes from it.

    ``during``: the stop came in a phase before the first step (building token shards, the
    teacher's scoring): nothing to checkpoint; shard sets and teacher sets already complete (each
    has its manifest) are reused by the rerun, a partial one is built again."""

    def __init__(self, step: int, reason: str = "SIGTERM", during: str | None = None):
        where = f"during {during}, before the first step" if during else f"at step {step}"
        super().__init__(f"stopped by {reason} {where}; rerun the same command to resume")
        self.step = step
        self.reason = reason
        self.during = during


def check(during: str) -> None:
    """Raise :class:`TrainingStopped` if a stop was asked for: the phases before the first step
    (token shards, teacher scoring) call this between blocks, so a scheduler's SIGTERM during an
    hour of teacher scoring stops the run within one block instead of after its grace period."""
    if requested():
        raise TrainingStopped(0, reason(), during=during)


def requested() -> bool:
    """True once a stop was asked for (SIGTERM while :func:`sigterm_stops_training` is active)."""
    return _requested.is_set()


def wait(timeout: float | None = None) -> bool:
    """Block until a stop is asked for (or ``timeout``); True when it was."""
    return _requested.wait(timeout)


def request(reason: str = "SIGTERM") -> None:
    _reason[:] = [reason]
    _requested.set()


def reason() -> str:
    return _reason[0] if _reason else "SIGTERM"


@contextlib.contextmanager
def sigterm_stops_training() -> Iterator[None]:
    """While active, the first SIGTERM asks training to stop at the next step boundary; a second
    one restores the previous handler and re-sends itself (the process ends at once). Outside the
    main thread (signal handlers cannot be set there) this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)

    def handler(signum, frame):
        if requested():
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        log.info("SIGTERM: stopping at the next step boundary with a checkpoint (a second SIGTERM ends at once)")
        request("SIGTERM")

    _requested.clear()
    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
