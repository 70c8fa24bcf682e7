"""One training per run folder (tracking/run_folder_lock.py): a second one is refused with the
holder named, and a SIGKILLed holder frees the folder at once (the resume path)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from codiemb.errors import UserError
from codiemb.tracking.run_folder_lock import run_folder_lock

HOLD = """
import sys, time
from pathlib import Path
from codiemb.tracking.run_folder_lock import run_folder_lock
with run_folder_lock(Path(sys.argv[1])):
    print("held", flush=True)
    time.sleep(120)
"""


def _holder(folder: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_second_lock_in_the_same_process_is_refused_and_freed_after(tmp_path):
    with run_folder_lock(tmp_path / "run"):
        with pytest.raises(UserError, match=rf"run folder in use by pid {os.getpid()}"):
            with run_folder_lock(tmp_path / "run"):
                pass
    with run_folder_lock(tmp_path / "run"):  # released on exit
        pass


def test_sigkilled_holder_frees_the_folder(tmp_path):
    proc = _holder(tmp_path / "run")
    try:
        with pytest.raises(UserError, match=rf"pid {proc.pid}"):
            with run_folder_lock(tmp_path / "run"):
                pass
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    with run_folder_lock(tmp_path / "run"):
        assert (tmp_path / "run" / ".lock").read_text().startswith(f"pid {os.getpid()}")


def test_train_is_refused_before_any_work_while_another_holds_the_folder(tmp_path, monkeypatch):
    from codiemb.config import load_config
    from codiemb.tracking import train_run

    cfg = load_config("configs/codiemb-minilm.yaml", [f"train.output={tmp_path / 'run'}", "tracking.enabled=false"])
    started = []
    monkeypatch.setattr(train_run, "_train", lambda *a, **k: started.append(1))
    proc = _holder(tmp_path / "run")
    try:
        t0 = time.perf_counter()
        with pytest.raises(UserError, match="run folder in use"):
            train_run.train_tracked(cfg, local=True)
        assert not started and time.perf_counter() - t0 < 5
    finally:
        proc.kill()
        proc.wait(timeout=30)
    train_run.train_tracked(cfg, local=True)  # free again: the training starts
    assert started == [1]
