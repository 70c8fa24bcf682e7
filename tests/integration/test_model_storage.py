"""``model.name: s3://...`` and ``storage.path: s3://...`` on moto's server (127.0.0.1), 2 Ray workers;
FSDP through Ray Train's workers.

The model folder exists only in the bucket: every process that needs it (the shard build's
tokenizer actors, each Train worker) copies it from storage into its local cache, keyed by the
URI and every file's size and mtime. The trained model and the checkpoints land on the run's
storage (the bucket).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from codiemb.config import load_config
from services import write_tiny_pairs

pytestmark = pytest.mark.integration

BUCKET = "codiemb-models"


def _upload(s3, folder: Path, prefix: str) -> None:
    for f in sorted(folder.rglob("*")):
        if f.is_file():
            s3.upload_file(str(f), BUCKET, f"{prefix}/{f.relative_to(folder).as_posix()}")


def test_model_from_s3_trains_on_two_workers_and_lands_on_storage(s3_endpoint, ray_local, tiny_model_dir,
                                                                   tmp_path, monkeypatch):
    import boto3

    from codiemb.model.encoder import Encoder
    from codiemb.paths import cache_dir
    from codiemb.train.ray_trainer import train_on_ray

    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    s3.create_bucket(Bucket=BUCKET)
    _upload(s3, tiny_model_dir, "models/tiny")
    monkeypatch.setenv("CODIEMB_CACHE", str(tmp_path / "cache"))  # the workers get it too
    monkeypatch.setenv("CODIEMB_SKIP_DEV", "1")
    ret, sts = write_tiny_pairs(tmp_path, 32, 32)
    f = tmp_path / "c.yaml"
    f.write_text(f"""
run: {{name: s3model, seed: 1}}
model: {{name: "s3://{BUCKET}/models/tiny/", max_length: {{query: 16, passage: 16, sts: 16}}}}
data:
  shards: {tmp_path / 'shards'}
  datasets:
    - {{name: ret, task: retrieval, path: {ret}, batch_size: 4}}
    - {{name: sts, task: sts, path: {sts}, score_range: [0, 5], batch_size: 4}}
loss: {{retrieval: {{temperature: 0.05, negatives: 1}}, sts: {{mid_nce: 0.0}}}}
train: {{max_steps: 2, lr: 1.0e-3, checkpoint_every: 1, log_every: 1}}
scaling: {{num_workers: 2}}
storage: {{path: "s3://{BUCKET}/runs"}}
tracking: {{enabled: false}}
""")
    cfg = load_config(f, [f"train.output={tmp_path / 'out' / 'model'}"])
    res = train_on_ray(cfg, resume=False)
    assert res.steps == 2

    # one cached copy, shared by every process on this node (same key), fetched from the bucket
    fetched = list((cache_dir() / "remote").iterdir())
    assert len(fetched) == 1 and fetched[0].name.startswith("tiny-")
    assert (fetched[0] / "model.safetensors").read_bytes() == (tiny_model_dir / "model.safetensors").read_bytes()

    # the trained model and the checkpoints are on the run's storage
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix="runs/s3model/")["Contents"]}
    assert "runs/s3model/model/model.safetensors" in keys and "runs/s3model/model/modules.json" in keys
    assert any(k.startswith("runs/s3model/step-000001/") and k.endswith("manifest.json") for k in keys)
    assert any(k.startswith("runs/s3model/final/model/") for k in keys)
    summary = json.loads((tmp_path / "out" / "train_summary.json").read_text())
    assert summary["model_uri"] == f"s3://{BUCKET}/runs/s3model/model"
    trained = Encoder.load(summary["model_uri"])  # read back from storage, like a next stage would
    base = Encoder.load(str(tiny_model_dir))
    texts = ["the cat sleeps", "red sun big tree"]
    torch.testing.assert_close(trained.encode(texts), Encoder.load(str(tmp_path / "out" / "model")).encode(texts))
    assert not torch.allclose(trained.encode(texts), base.encode(texts), atol=1e-4)  # it trained

    # a changed file on storage is a new cache entry, never the stale copy
    cfg_json = json.loads((tiny_model_dir / "config.json").read_text())
    s3.put_object(Bucket=BUCKET, Key="models/tiny/config.json", Body=json.dumps(dict(cfg_json, layer_norm_eps=1e-6)))
    changed = Encoder.load(f"s3://{BUCKET}/models/tiny")
    assert changed.backbone.config.layer_norm_eps == 1e-6
    assert len([d for d in (cache_dir() / "remote").iterdir() if d.name.startswith("tiny-")]) == 2


def test_fsdp_on_ray_workers_trains_and_saves_the_full_model(ray_local, tiny_model_dir, tmp_path, monkeypatch):
    """scaling.strategy: fsdp through Ray Train's workers (the loop shards; Ray's own fsdp is FSDP1)."""
    from safetensors.torch import load_file

    from codiemb.train.ray_trainer import train_on_ray

    monkeypatch.setenv("CODIEMB_SKIP_DEV", "1")
    ret, sts = write_tiny_pairs(tmp_path, 32, 32)
    f = tmp_path / "c.yaml"
    f.write_text(f"""
run: {{name: fsdpray, seed: 1}}
model: {{name: {tiny_model_dir}, max_length: {{query: 16, passage: 16, sts: 16}}}}
data:
  datasets:
    - {{name: ret, task: retrieval, path: {ret}, batch_size: 4}}
    - {{name: sts, task: sts, path: {sts}, score_range: [0, 5], batch_size: 4}}
loss: {{retrieval: {{temperature: 0.05, negatives: 1}}, sts: {{mid_nce: 0.0}}}}
train: {{max_steps: 3, lr: 1.0e-3, checkpoint_every: 2, log_every: 1}}
scaling: {{num_workers: 2, strategy: fsdp}}
storage: {{path: {tmp_path / 'storage'}}}
tracking: {{enabled: false}}
""")
    res = train_on_ray(load_config(f), resume=False)
    assert res.steps == 3 and res.grad_sync.startswith("FSDP")
    base = load_file(str(tiny_model_dir / "model.safetensors"))
    for folder in (tmp_path / "storage" / "fsdpray" / "model", tmp_path / "storage" / "fsdpray" / "step-000002" / "model"):
        got = load_file(str(folder / "model.safetensors"))
        assert {k: v.shape for k, v in got.items()} == {k: v.shape for k, v in base.items()}  # full, not shards
        assert any(not torch.equal(got[k], base[k]) for k in base)
