"""Search 2 on a real local Ray cluster and MLflow server: each trial is its own TorchTrainer
(Train V2 inside a Tune trial), reports dev scores every 2 steps, and ASHA stops the weak ones."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from codiemb.config import config_from_dict

pytestmark = pytest.mark.integration

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
from test_merge_run import _save_encoder, tiny_bert, write_tiny_dev  # noqa: E402


def _history(exp_path: Path) -> dict[int, list[dict]]:
    """Each trial's reported results (progress.csv), by trial ordinal."""
    from codiemb.tune.common import trial_index

    out = {}
    for f in exp_path.glob("loss_trial_*/progress.csv"):
        with open(f, newline="") as fh:
            out[trial_index(f.parent)] = [dict(r) for r in csv.DictReader(fh)]
    return out


def _live_placement_groups(ray, expected: set[str] | None = None, wait_s: float = 30.0) -> set[str]:
    """Ids of the placement groups not removed; with ``expected``, wait up to wait_s for that set
    (removal is asynchronous)."""
    import time

    deadline = time.monotonic() + wait_s
    while True:
        live = {pid for pid, pg in ray.util.placement_group_table().items() if pg["state"] != "REMOVED"}
        if expected is None or live == expected or time.monotonic() > deadline:
            return live
        time.sleep(0.5)


def test_loss_sweep_trains_per_trial_and_asha_stops_the_weak(tiny_model_dir, tmp_path, ray_local, mlflow_tracking):
    from mlflow.tracking import MlflowClient

    from codiemb.tune.loss_search import run_loss_search, warn_without_state_api

    src = tiny_bert(tiny_model_dir, tmp_path / "hf")
    base = _save_encoder(src, tmp_path / "base")
    data = write_tiny_dev(tmp_path / "data")
    cfg = config_from_dict({
        "run": {"name": "ls", "seed": 0},
        "model": {"name": str(base), "max_length": {"query": 16, "passage": 32, "sts": 16}},
        "data": {"datasets": [
            {"name": "sts", "task": "sts", "path": data["sts"], "score_range": [0, 5], "batch_size": 4},
            {"name": "ir", "task": "retrieval", "path": data["ir_train"], "batch_size": 2}],
            "dev": {"sts": data["sts"], "retrieval": {"beir": data["beir"], "qrels": "dev"}}},
        "loss": {"sts": {"mid_nce": 0.0}},
        "train": {"max_steps": 4, "eval_every": 2, "lr": 1e-3, "warmup_ratio": 0.0, "log_every": 1},
        "storage": {"path": str(tmp_path / "runs")},
        "tracking": {"uri": mlflow_tracking, "experiment": "loss-sweep"},
        "tune": {"search": "loss", "num_samples": 2, "max_concurrent": 1, "algorithm": "random",
                 "asha": {"max_t": 2, "grace_period": 1, "reduction_factor": 2},
                 "space": {"loss.sts.pearson": {"type": "uniform", "low": 0.0, "high": 4.0},
                           "loss.retrieval.temperature": {"type": "loguniform", "low": 0.01, "high": 1.0},
                           "sampler.temperature": {"type": "uniform", "low": 0.5, "high": 4.0}}},
    })
    assert warn_without_state_api(), "the placement-group cleaner needs the State API (the dashboard)"
    before_pgs = _live_placement_groups(ray_local)
    res = run_loss_search(cfg)
    assert res.complete and res.n_trials == 2 and res.n_errors == 0
    hist = _history(Path(res.experiment_path))
    assert sorted(hist) == [1, 2]
    # rung 1 (the report at step 2) holds dev scores; the objective is their mean
    rung1 = {k: float(v[0]["objective"]) for k, v in hist.items()}
    for k, v in hist.items():
        first = v[0]
        assert int(first["step"]) == 2
        assert float(first["objective"]) == pytest.approx(
            (float(first["sts_spearman"]) + float(first["retrieval_ndcg_at_10"])) / 2)
    # trial 1 runs to the end (2 reports: step 2, final step 4); ASHA's rule for trial 2 at rung 1:
    # stop when its objective is below the cutoff of the values recorded before it (just trial 1's)
    assert len(hist[1]) == 2 and int(hist[1][1]["step"]) == 4
    cutoff = np.nanpercentile([rung1[1]], 50)
    assert len(hist[2]) == (1 if rung1[2] < cutoff else 2)

    # the trials' MLflow runs are nested under the sweep's run, params and dev metrics logged
    client = MlflowClient(mlflow_tracking)
    exp = client.get_experiment_by_name("loss-sweep")
    children = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{res.parent_run_id}'")
    assert len(children) == 2
    for c in children:
        assert float(c.data.params["loss.sts.pearson"]) >= 0.0
        assert "dev/sts_spearman" in c.data.metrics and "objective" in c.data.metrics
        assert "loss/sts" in c.data.metrics or "loss/ir" in c.data.metrics
    # trial 1 ran to its final report (FINISHED); trial 2 is KILLED exactly when ASHA stopped it
    status = {c.data.tags["codiemb.trial_id"]: c.info.status for c in children}
    errors = {c.data.tags["codiemb.trial_id"]: c.data.tags.get("codiemb.error") for c in children}
    by_ordinal = {r["trial"]: r["trial_id"] for r in res.rows}
    assert status[by_ordinal[1]] == "FINISHED", errors
    assert status[by_ordinal[2]] == ("KILLED" if len(hist[2]) == 1 else "FINISHED")
    best = json.loads((Path(res.experiment_path) / "best.json").read_text())
    assert best["trial_id"] == res.best_trial and res.output_dir and (Path(res.output_dir) / "modules.json").is_file()
    # every trial's TorchTrainer gave its workers' placement group back, the ASHA-stopped one too
    # (a leaked one holds its CPUs for the rest of the session and starves the next trainer)
    assert _live_placement_groups(ray_local, before_pgs) == before_pgs


def test_a_cluster_without_dashboard_gets_one_warning(tmp_path):
    """The other side of the check above, on a real Ray instance started without its dashboard (in a
    child process: this one already holds the session's cluster)."""
    import subprocess

    code = ("import logging, ray\n"
            "logging.basicConfig(level=logging.WARNING)\n"
            "ray.init(address='local', num_cpus=1, include_dashboard=False, log_to_driver=False)\n"
            "from codiemb.tune.loss_search import warn_without_state_api\n"
            "print('STATE_API', warn_without_state_api())\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "STATE_API False" in out.stdout
    warnings = [line for line in out.stderr.splitlines() if "has no State API" in line]
    assert len(warnings) == 1 and "dashboard" in warnings[0], out.stderr[-2000:]
