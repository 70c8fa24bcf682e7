"""The console of ``codiemb train|tune|pipeline|quickstart``: one progress line per stage, the rest to a log.

By default a command prints a first line naming its log file (``<run folder>/console.log``), then
one line per stage (data, train, tune, evaluate, register) with a tqdm bar, its throughput and the
time left, plus codiemb's warnings and any error. Everything else the process and its libraries
write — Ray's and Ray Data's progress, Tune's trial tables, worker output forwarded by Ray, MLflow,
transformers and our own INFO logs — goes to the log file, whole. ``--verbose`` or
``CODIEMB_VERBOSE=1`` keeps today's full output on the terminal instead (and no stage lines).

How: :func:`routed` points file descriptors 1 and 2 at the log file (so C-level writes and
``print`` calls of any library, and Ray's forwarded worker logs, land there too) and keeps a
duplicate of the original stderr as the terminal. Stage bars (:func:`stage`) and a logging handler
for warnings write to that terminal. When the terminal is not a TTY (``ray job submit`` logs in the
dashboard, a pipe), a stage prints whole lines — at most one every ``CODIEMB_PROGRESS_INTERVAL``
seconds (default 60) and one when it ends — instead of redrawing with carriage returns.

Library code calls :func:`stage` unconditionally: outside :func:`routed` (library use, tests,
verbose) it returns a disabled bar whose methods do nothing. ``CODIEMB_NO_PROGRESS=1`` disables the
bars as well (the routing to the log file stays).

Imports the standard library and tqdm only.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

LOG_NAME = "console.log"
_terminal: TextIO | None = None  # set while routed() is active


def verbose_requested(flag: bool = False) -> bool:
    return bool(flag) or os.environ.get("CODIEMB_VERBOSE", "") not in ("", "0", "false", "False")


def active() -> bool:
    """True while :func:`routed` sends library output to a log file."""
    return _terminal is not None


def terminal() -> TextIO:
    """The stream the user sees (the original stderr while routed)."""
    return _terminal or sys.stderr


class _TerminalHandler(logging.Handler):
    """codiemb's warnings and everyone's errors, written to the terminal without breaking a bar."""

    def __init__(self, stream: TextIO) -> None:
        super().__init__(logging.WARNING)
        self.stream = stream
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR or record.name.split(".")[0] == "codiemb"

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # pragma: no cover - logging must never raise
            self.handleError(record)


class _LineBar:
    """tqdm's meter printed as whole lines (for log files and pipes): at most one per ``interval`` s."""

    def __init__(self, desc: str, total: float | None, unit: str, file: TextIO, interval: float) -> None:
        self.desc, self.total, self.unit, self.fp, self.interval = desc, total, unit, file, interval
        self.n = 0
        self.postfix = ""
        self.start = self._last = time.monotonic()
        self.closed = False

    def _line(self) -> str:
        from tqdm import tqdm

        return tqdm.format_meter(self.n, self.total, time.monotonic() - self.start, prefix=self.desc,
                                 unit=self.unit, postfix=self.postfix or None, ncols=100)

    def _print(self) -> None:
        self.fp.write(self._line() + "\n")
        self.fp.flush()
        self._last = time.monotonic()

    def update(self, n: float = 1) -> None:
        self.n += n
        if time.monotonic() - self._last >= self.interval:
            self._print()

    def refresh(self) -> None:
        pass

    def reset(self, total: float | None = None) -> None:
        self.n, self.total = 0, total
        self.start = time.monotonic()

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        self.postfix = s

    def set_description_str(self, desc: str = "", refresh: bool = True) -> None:
        self.desc = desc

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._print()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def stage(name: str, total: float | None = None, unit: str = "it", **kwargs):
    """A progress line for one stage on the terminal (a disabled bar when not routed; see the module docstring)."""
    from tqdm import tqdm

    if _terminal is None or os.environ.get("CODIEMB_NO_PROGRESS") == "1":
        return tqdm(total=total, disable=True)
    desc = f"{name:<16}"
    if not _isatty(_terminal):
        interval = float(os.environ.get("CODIEMB_PROGRESS_INTERVAL", "60"))
        return _LineBar(desc, total, unit, _terminal, interval)
    # a terminal that reports no width (a pty made without a size: some CI runners, `script`)
    # would get empty bars from dynamic_ncols: give those a fixed width
    width = _columns(_terminal)
    return tqdm(total=total, desc=desc, unit=unit, file=_terminal, dynamic_ncols=width > 0,
                ncols=None if width > 0 else 100, leave=True, mininterval=0.5, **kwargs)


def note(message: str) -> None:
    """One line on the terminal (and in the log)."""
    logging.getLogger("codiemb.console").info(message)
    if _terminal is not None:
        from tqdm import tqdm

        tqdm.write(message, file=_terminal)


def _columns(stream) -> int:
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, ValueError, OSError):
        return 0


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


@contextlib.contextmanager
def routed(log_dir: str | os.PathLike, command: str, *, verbose: bool = False) -> Iterator[Path | None]:
    """Send this process's stdout/stderr (fds 1 and 2) to ``<log_dir>/console.log``; see the module docstring.

    With ``verbose`` (or ``CODIEMB_VERBOSE=1``), or when already routed, nothing changes and
    ``None`` is yielded. An exception leaving the block is written (with its traceback) to the log
    file and raised again after the terminal is restored.
    """
    global _terminal
    if verbose_requested(verbose) or _terminal is not None:
        yield None
        return
    log_path = Path(log_dir) / LOG_NAME
    log_path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    term = os.fdopen(os.dup(saved[2]), "w", buffering=1, encoding="utf-8", errors="replace")
    term.write(f"codiemb {command}: full output in {log_path} (--verbose or CODIEMB_VERBOSE=1 shows it here)\n")
    term.flush()
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    handler = _TerminalHandler(term)
    root = logging.getLogger()
    try:
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        _terminal = term
        root.addHandler(handler)
        logging.captureWarnings(True)  # library warnings.warn(...) go to the log, not the terminal
        yield log_path
    except BaseException:
        import traceback

        sys.stderr.flush()
        with open(log_path, "a", encoding="utf-8") as fh:  # the log file itself, not whatever sys.stderr is now
            traceback.print_exc(file=fh)
        raise
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        root.removeHandler(handler)
        logging.captureWarnings(False)
        _terminal = None
        for fd, dup in saved.items():
            os.dup2(dup, fd)
            os.close(dup)
        os.close(log_fd)
        term.close()
