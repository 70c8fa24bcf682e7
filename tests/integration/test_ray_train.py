"""Ray Train: 2 workers == 1 process with the doubled batch; fault injection; MLflow; fail fast."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import sigterm_after

from codiemb.config import load_config
from codiemb.errors import UserError
from services import write_tiny_pairs

pytestmark = pytest.mark.integration



def _data(tmp_path, n_ret=64, n_sts=64):
    return write_tiny_pairs(tmp_path, n_ret, n_sts)


def _cfg(tmp_path, model_dir, *extra):
    ret, sts = _data(tmp_path)
    f = tmp_path / "c.yaml"
    f.write_text(f"""
run: {{name: raytest, seed: 1}}
model: {{name: {model_dir}, max_length: {{query: 16, passage: 16, sts: 16}}}}
data:
  datasets:
    - {{name: ret, task: retrieval, path: {ret}, batch_size: 4}}
    - {{name: sts, task: sts, path: {sts}, score_range: [0, 5], batch_size: 4}}
loss: {{retrieval: {{temperature: 0.05, negatives: 1}}, sts: {{mid_nce: 0.0}}}}
train: {{epochs: 1, lr: 1.0e-3, checkpoint_every: 3, log_every: 1}}
scaling: {{num_workers: 2}}
storage: {{path: {tmp_path / 'storage'}}}
tracking: {{enabled: false}}
""")
    return load_config(f, list(extra))


# --------------------------------------------------------------------------- equivalence
def test_two_ddp_workers_equal_one_process_with_double_batch(ray_local, tmp_path, nodrop_model_dir, monkeypatch):
    """5 optimizer steps of the real loop: 2 Ray Train workers (gradients synchronised by DDP through
    ray.train.torch.prepare_model, negatives gathered) vs one process with the doubled per-step batch.
    The rows carry exactly the one negative the config asks for, so no rank samples anything."""
    from safetensors.torch import load_file

    import codiemb.train.loop as loop
    from codiemb.train.loop import train
    from codiemb.train.ray_trainer import train_on_ray

    assert not hasattr(loop, "average_gradients")  # the hand-written flat all-reduce is gone
    monkeypatch.setenv("CODIEMB_SKIP_DEV", "1")
    common = ["train.max_steps=5", "train.checkpoint_every=0", "train.warmup_ratio=0", "sampler.policy=round_robin"]
    two = train_on_ray(_cfg(tmp_path, nodrop_model_dir, "run.name=ddp2", *common), resume=False)
    assert json.loads((tmp_path / "storage" / "ddp2" / "train_summary.json").read_text())["grad_sync"] == \
        "DistributedDataParallel"
    one_cfg = _cfg(tmp_path, nodrop_model_dir, "run.name=one", "scaling.num_workers=1", *common,
                   "data.datasets.0.batch_size=8", "data.datasets.1.batch_size=8")
    one = train(one_cfg, output_dir=tmp_path / "one", resume=False)
    assert one.grad_sync == "none (one process)"
    assert two.steps_per_task == one.steps_per_task and two.steps == 5
    a = load_file(str(tmp_path / "storage" / "ddp2" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "one" / "model" / "model.safetensors"))
    base = load_file(str(nodrop_model_dir / "model.safetensors"))
    moved = 0
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")
        moved += int(not torch.equal(a[k], base[k]))
    assert moved > 10  # the weights really trained


# --------------------------------------------------------------------------- end to end
def test_fault_injection_recovers_exact_steps_one_mlflow_run(ray_local, tmp_path, tiny_model_dir, monkeypatch,
                                                             mlflow_tracking):
    from mlflow.tracking import MlflowClient

    from codiemb.tracking.train_run import train_tracked

    monkeypatch.setenv("CODIEMB_FAIL_AT", "1:5")
    monkeypatch.setenv("CODIEMB_SKIP_DEV", "1")
    cfg = _cfg(tmp_path, tiny_model_dir, "tracking.enabled=true",  # retries: the default max_failures
               f"tracking.uri={mlflow_tracking}", "tracking.experiment=raytest-fault")
    assert cfg.scaling.max_failures > 0
    result, run_id = train_tracked(cfg, local=False)
    assert result.steps == sum(result.planned_steps_per_task.values())
    assert result.steps_per_task == result.planned_steps_per_task
    # the failure really happened (marker) and the run resumed from the step-3 checkpoint
    assert list((tmp_path / "storage" / "raytest").glob(".fail-injected-rank1-step5"))
    assert result.resumed_from == 3
    client = MlflowClient(mlflow_tracking)
    exp = client.get_experiment_by_name("raytest-fault")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1 and runs[0].info.run_id == run_id
    metrics = runs[0].data.metrics
    for name, planned in result.planned_steps_per_task.items():
        assert metrics[f"steps_planned/{name}"] == planned == metrics[f"steps_done/{name}"]
    hist = client.get_metric_history(run_id, "loss/ret")
    assert hist, "per-task loss logged from rank 0"


def test_more_workers_than_cluster_fails_fast(ray_local, tmp_path, tiny_model_dir):
    from codiemb.train.ray_trainer import check_resources

    cfg = _cfg(tmp_path, tiny_model_dir, "scaling.num_workers=64")
    with pytest.raises(UserError, match="cannot grow"):
        check_resources(cfg)
    cfg = _cfg(tmp_path, tiny_model_dir, "scaling.use_gpu=true")
    with pytest.raises(UserError, match="GPU"):
        check_resources(cfg)
    cfg = _cfg(tmp_path, tiny_model_dir, "scaling.num_workers=64", "scaling.autoscaling=true")
    check_resources(cfg)  # an autoscaling cluster may grow: no error


def test_relative_sqlite_uri_reaches_the_drivers_store(ray_local, tmp_path, tiny_model_dir, monkeypatch):
    """The quickstart's `sqlite:///mlflow.db` is relative; Ray starts each worker in its own folder,
    where it would open a fresh, empty store and drop rank 0's per-step metrics ("run not found")."""
    from mlflow.tracking import MlflowClient

    from codiemb.tracking.train_run import train_tracked

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CODIEMB_SKIP_DEV", "1")
    cfg = _cfg(tmp_path, tiny_model_dir, "scaling.num_workers=1", "tracking.enabled=true",
               "tracking.uri=sqlite:///mlflow.db", "tracking.experiment=raytest-sqlite", "train.checkpoint_every=0")
    result, run_id = train_tracked(cfg, local=False)
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    steps = [m.step for m in client.get_metric_history(run_id, "lr")]
    assert steps == list(range(1, result.steps + 1)), steps  # every step, logged by rank 0 into this store


# --------------------------------------------------------------------------- exact resume after SIGKILL
def _consumed(trace_dir):
    """The rows each (step, rank) trained on, the LAST time that step ran (a resumed run re-runs the
    steps after its checkpoint); and how many step records there were in all."""
    import collections

    last, records = {}, 0
    for f in sorted(trace_dir.glob("rank*.jsonl")):
        for line in f.read_text().splitlines():
            r = json.loads(line)
            last[(r["step"], r["rank"])] = (r["dataset"], tuple(r["rows"]))
            records += 1
    multiset = collections.Counter((ds, row) for ds, rows in last.values() for row in rows)
    return last, multiset, records


def test_sigkilled_worker_resumes_with_the_rows_and_weights_of_an_uninterrupted_run(ray_local, tmp_path,
                                                                                    tiny_model_dir, monkeypatch):
    from safetensors.torch import load_file

    from codiemb.train.ray_trainer import train_on_ray

    monkeypatch.setenv("CODIEMB_SKIP_DEV", "1")
    monkeypatch.setenv("CODIEMB_ROW_TRACE", str(tmp_path / "trace-whole"))
    whole = train_on_ray(_cfg(tmp_path, tiny_model_dir, "run.name=whole", "scaling.max_failures=0"), resume=False)
    # the same run, rank 1's worker process SIGKILLed at step 7 (mid-epoch; last checkpoint: step 6)
    monkeypatch.setenv("CODIEMB_ROW_TRACE", str(tmp_path / "trace-killed"))
    monkeypatch.setenv("CODIEMB_KILL_AT", "1:7")
    killed_cfg = _cfg(tmp_path, tiny_model_dir, "run.name=killed")  # nothing set: Ray Train retries by default
    assert killed_cfg.scaling.max_failures > 0
    killed = train_on_ray(killed_cfg, resume=False)
    assert list((tmp_path / "storage" / "killed").glob(".kill-injected-rank1-step7"))
    # resumed from the last checkpoint Ray Train had registered when the worker died (step 6, or 3
    # when the controller had not yet taken step 6's report): either way, before the kill
    assert killed.resumed_from in (3, 6) and killed.steps == whole.steps
    last_w, rows_w, n_w = _consumed(tmp_path / "trace-whole")
    last_k, rows_k, n_k = _consumed(tmp_path / "trace-killed")
    assert n_k > n_w  # the steps after the checkpoint really ran twice on the killed run (once before the kill, once after)
    assert last_k == last_w  # every (step, rank) trained on the same rows
    assert rows_k == rows_w and sum(rows_w.values()) == n_w * 4  # the multiset of (dataset, row id)
    a = load_file(str(tmp_path / "storage" / "whole" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "storage" / "killed" / "model" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")


# --------------------------------------------------------------------------- SIGTERM to the driver


def test_sigterm_to_the_driver_stops_both_workers_at_one_step_and_the_rerun_resumes(ray_local, tmp_path,
                                                                                    tiny_model_dir, monkeypatch):
    """SIGTERM to the driver of a 2-worker run (checkpoints by time only, so the ranks must agree on
    when): both ranks stop at the same step boundary, its checkpoint is reported, TrainingStopped
    names the step; the same call resumes from it and ends at the plan, every (step, rank) trained
    once on the rows the sampler assigns it (those of an uninterrupted run)."""
    from codiemb.data.sampler import TaskBatchSampler
    from codiemb.tracking.train_run import train_tracked
    from codiemb.train.stop import TrainingStopped

    monkeypatch.setenv("CODIEMB_SKIP_DEV", "1")
    monkeypatch.setenv("CODIEMB_ROW_TRACE", str(tmp_path / "trace"))
    cfg = _cfg(tmp_path, tiny_model_dir, "run.name=term", "train.epochs=8", "train.checkpoint_every=0",
               "train.checkpoint_every_minutes=0.005")
    sender = sigterm_after(tmp_path / "trace" / "rank0.jsonl", 2)
    with pytest.raises(TrainingStopped) as stopped:
        train_tracked(cfg, local=False)
    sender.join(timeout=5)
    step = stopped.value.step
    sampler = TaskBatchSampler({"ret": 64, "sts": 64}, {"ret": 4, "sts": 4}, world_size=2,
                               policy=cfg.sampler.policy, temperature=cfg.sampler.temperature,
                               epochs=cfg.train.epochs, seed=cfg.run.seed)
    total = len(sampler)
    assert 2 <= step < total, (step, total)
    assert str(stopped.value) == f"stopped by SIGTERM at step {step}; rerun the same command to resume"
    assert (tmp_path / "storage" / "term" / f"step-{step:06d}").is_dir()  # the final checkpoint, reported
    assert not (tmp_path / "storage" / "term" / "model").exists()

    result, _ = train_tracked(cfg, local=False)  # the same call
    assert result.resumed_from == step
    assert result.steps == total and result.steps_per_task == result.planned_steps_per_task
    last, rows, records = _consumed(tmp_path / "trace")
    assert records == 2 * total  # no step ran twice, none was skipped
    planned = {}
    for s in range(total):
        for r in range(2):
            name, idx = sampler.batch(s, r)
            planned[(s, r)] = (name, tuple(int(i) for i in idx))
    assert last == planned
