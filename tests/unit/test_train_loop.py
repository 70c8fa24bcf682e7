"""The plain-torch loop on the tiny model: it learns, it resumes exactly, checkpoints are sound."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from codiemb.config import load_config
from codiemb.train import checkpoint as ckpt
from codiemb.train.loop import train

WORDS = "cat dog man woman child car house tree water fire sun moon red blue green big small".split()


def _write_data(tmp_path):
    import random

    rng = random.Random(0)
    sts = tmp_path / "sts.jsonl"
    with open(sts, "w") as fh:
        for i in range(48):
            a = " ".join(rng.sample(WORDS, 4))
            b = " ".join(rng.sample(WORDS, 4))
            fh.write(json.dumps({"sentence1": a, "sentence2": b, "score": round(rng.uniform(0, 5), 1)}) + "\n")
    ret = tmp_path / "ret.jsonl"
    with open(ret, "w") as fh:
        for i in range(40):
            q = " ".join(rng.sample(WORDS, 3))
            fh.write(json.dumps({"query": q, "positive": q + " " + rng.choice(WORDS),
                                 "negatives": [" ".join(rng.sample(WORDS, 4))]}) + "\n")
    return sts, ret


def _cfg(tmp_path, model_dir, **over):
    sts, ret = _write_data(tmp_path)
    f = tmp_path / "cfg.yaml"
    f.write_text(f"""
run: {{name: t, seed: 3}}
model: {{name: {model_dir}, max_length: {{query: 16, passage: 16, sts: 16}}}}
data:
  datasets:
    - {{name: sts, task: sts, path: {sts}, score_range: [0, 5], batch_size: 8}}
    - {{name: ret, task: retrieval, path: {ret}, batch_size: 8}}
sampler: {{policy: temperature, temperature: 2.0}}
loss:
  retrieval: {{temperature: 0.05, negatives: 1}}
  sts: {{cosent: 1.0, pearson: 1.0, rank_kl: 1.0, pro: 0.5, mid_nce: 0.5}}
train: {{epochs: 2, lr: 1.0e-3, warmup_ratio: 0.2, checkpoint_every: 4, log_every: 1, keep_checkpoints: 10}}
""")
    return load_config(f, [f"{k}={v}" for k, v in over.items()])


def _weights(model_dir):
    return load_file(str(model_dir / "model.safetensors"))


def test_stop_and_resume_equals_uninterrupted(tmp_path, tiny_model_dir):
    cfg = _cfg(tmp_path, tiny_model_dir)
    full = train(cfg, output_dir=tmp_path / "full")
    assert full.steps == sum(full.planned_steps_per_task.values())
    assert full.steps_per_task == full.planned_steps_per_task

    part = train(cfg, output_dir=tmp_path / "resumed", stop_after=5)
    assert part.steps == 5
    assert ckpt.list_checkpoints(tmp_path / "resumed" / "checkpoints")[-1].name == "step-000005"
    rest = train(cfg, output_dir=tmp_path / "resumed")
    assert rest.resumed_from == 5
    assert rest.steps_per_task == full.steps_per_task

    a, b = _weights(tmp_path / "full" / "model"), _weights(tmp_path / "resumed" / "model")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)


def test_training_changes_weights_and_lowers_loss(tmp_path, tiny_model_dir):
    cfg = _cfg(tmp_path, tiny_model_dir, **{"train.epochs": 6})
    res = train(cfg, output_dir=tmp_path / "o")
    before = load_file(str(tiny_model_dir / "model.safetensors"))
    after = _weights(tmp_path / "o" / "model")
    changed = [k for k in after if k in before and not torch.equal(before[k], after[k])]
    assert changed
    lines = [json.loads(x) for x in (tmp_path / "o" / "metrics.jsonl").read_text().splitlines()]
    ret = [x["loss/ret"] for x in lines if "loss/ret" in x]
    assert len(ret) >= 6
    assert sum(ret[-3:]) / 3 < sum(ret[:3]) / 3


def test_checkpoint_manifest_detects_corruption(tmp_path, tiny_model_dir):
    cfg = _cfg(tmp_path, tiny_model_dir)
    train(cfg, output_dir=tmp_path / "o", stop_after=4)
    root = tmp_path / "o" / "checkpoints"
    latest = ckpt.latest_checkpoint(root)
    assert latest is not None and ckpt.verify_checkpoint(latest)
    files = sorted(p.name for p in latest.iterdir())
    assert "optimizer.safetensors" in files and "manifest.json" in files
    assert not any(p.suffix in {".pt", ".bin", ".pkl"} for p in latest.rglob("*"))
    # flip a byte: the checkpoint no longer verifies and is skipped
    f = latest / "optimizer.safetensors"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))
    assert not ckpt.verify_checkpoint(latest)
    assert ckpt.latest_checkpoint(root) != latest


def test_fault_injection_fires_once(tmp_path, tiny_model_dir, monkeypatch):
    cfg = _cfg(tmp_path, tiny_model_dir)
    monkeypatch.setenv("CODIEMB_FAIL_AT", "0:6")
    with pytest.raises(RuntimeError, match="injected failure"):
        train(cfg, output_dir=tmp_path / "o")
    res = train(cfg, output_dir=tmp_path / "o")  # resumes from step 4, does not fail again
    assert res.resumed_from == 4
    assert res.steps_per_task == res.planned_steps_per_task


def test_progress_hook_counts_every_step(tmp_path, tiny_model_dir):
    """The console's train line: on_progress(0, total) before the first step, then once per step."""
    cfg = _cfg(tmp_path, tiny_model_dir, **{"train.max_steps": 3, "train.checkpoint_every": 0})
    calls = []

    class Cb:
        def on_log(self, step, metrics):
            pass

        def on_checkpoint(self, step, path):
            pass

        def on_progress(self, done, total):
            calls.append((done, total))

    result = train(cfg, output_dir=tmp_path / "out", callbacks=Cb())
    assert calls == [(0, 3), (1, 3), (2, 3), (3, 3)] and result.steps == 3
