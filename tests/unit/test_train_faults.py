"""Faults as users meet them, on the plain loop (no Ray): checkpoints by time bound what a crash
loses; SIGTERM to `codiemb train --local` stops at a step boundary with a checkpoint, exits 143 with
one line, and the same command resumes with exactly the rows and weights of an uninterrupted run.
(The Ray cases: tests/integration/test_ray_train.py.)"""

from __future__ import annotations

import json
import signal

import pytest
import torch
from safetensors.torch import load_file
from test_train_loop import _cfg

from tests.conftest import sigterm_after

from codiemb.train import checkpoint as ckpt
from codiemb.train.loop import train


def _trace(folder):
    return [json.loads(line) for line in (folder / "rank0.jsonl").read_text().splitlines()]


def test_time_checkpoints_bound_what_a_crash_loses(tmp_path, tiny_model_dir, monkeypatch):
    """No step-count checkpoints; a checkpoint once the (tiny) time since the last one passed, i.e.
    after every step here: a failure at step 6 resumes from step 6 and still ends at the plan."""
    cfg = _cfg(tmp_path, tiny_model_dir, **{"train.checkpoint_every": 0, "train.checkpoint_every_minutes": 1e-6})
    monkeypatch.setenv("CODIEMB_FAIL_AT", "0:6")
    with pytest.raises(RuntimeError, match="injected failure"):
        train(cfg, output_dir=tmp_path / "o")
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "o" / "checkpoints")][-1] == "step-000006"
    res = train(cfg, output_dir=tmp_path / "o")
    assert res.resumed_from == 6
    assert res.steps == sum(res.planned_steps_per_task.values()) and res.steps_per_task == res.planned_steps_per_task

    # the rule is off without the setting: the same failure then loses every step
    plain = _cfg(tmp_path, tiny_model_dir, **{"train.checkpoint_every": 0})
    with pytest.raises(RuntimeError, match="injected failure"):
        train(plain, output_dir=tmp_path / "p", fail_marker_dir=tmp_path / "p-markers")
    assert ckpt.list_checkpoints(tmp_path / "p" / "checkpoints") == []




def test_sigterm_stops_local_train_at_a_step_and_the_same_command_resumes(tmp_path, tiny_model_dir, monkeypatch,
                                                                          capsys):
    from codiemb.cli import main

    handler_before = signal.getsignal(signal.SIGTERM)
    cfg = _cfg(tmp_path, tiny_model_dir, **{"train.checkpoint_every": 0})  # only the stop checkpoints
    monkeypatch.setenv("CODIEMB_ROW_TRACE", str(tmp_path / "trace-whole"))
    whole = train(cfg, output_dir=tmp_path / "whole")

    argv = ["train", str(tmp_path / "cfg.yaml"), "--set", "train.checkpoint_every=0", "--local", "--no-tracking",
            "--output", str(tmp_path / "cli")]
    monkeypatch.setenv("CODIEMB_ROW_TRACE", str(tmp_path / "trace-cli"))
    sender = sigterm_after(tmp_path / "trace-cli" / "rank0.jsonl", 3)
    assert main(argv) == 143
    sender.join(timeout=5)
    err = capsys.readouterr().err.strip().splitlines()
    stopped = [line for line in err if "stopped by SIGTERM" in line]
    assert len(stopped) == 1, err
    step = int(stopped[0].split("at step ")[1].split(";")[0])
    assert stopped[0] == f"codiemb: stopped by SIGTERM at step {step}; rerun the same command to resume"
    assert 3 <= step < whole.steps  # mid-run, at a step boundary
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "cli" / "checkpoints")] == [f"step-{step:06d}"]
    assert not (tmp_path / "cli" / "model").exists()
    assert signal.getsignal(signal.SIGTERM) is handler_before  # the stop handler lives only while training

    assert main(argv) == 0  # the same command
    summary = json.loads((tmp_path / "cli" / "train_summary.json").read_text())
    assert summary["resumed_from"] == step
    assert summary["steps"] == whole.steps and summary["steps_per_task"] == whole.planned_steps_per_task
    # every step ran exactly once, on the rows of the uninterrupted run
    assert _trace(tmp_path / "trace-cli") == _trace(tmp_path / "trace-whole")
    a, b = load_file(str(tmp_path / "whole" / "model" / "model.safetensors")), \
        load_file(str(tmp_path / "cli" / "model" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6, msg=k)
