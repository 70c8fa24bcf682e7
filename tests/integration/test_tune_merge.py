"""Search 1 on a real local Ray cluster and a real MLflow server: a merge-coefficient sweep over
tiny models with a tiny synthetic dev set; nested runs, a crashing trial, resume after Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import pytest
import torch

from codiemb.config import config_from_dict

pytestmark = pytest.mark.integration

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
from test_merge_run import _save_encoder, tiny_bert, write_tiny_dev  # noqa: E402

SPACE = {
    "method": {"type": "choice", "values": ["delta_guided", "ties", "task_arithmetic"]},
    "lam": {"type": "uniform", "low": 0.5, "high": 1.5},
    "gamma": {"type": "uniform", "low": 0.0, "high": 2.0},
    "density": {"type": "uniform", "low": 0.2, "high": 1.0},
    "weight_1": {"type": "uniform", "low": 0.2, "high": 1.0},
}


@pytest.fixture(scope="module")
def setup(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("tune-merge")
    src = tiny_bert(tiny_model_dir, root / "hf")
    base = _save_encoder(src, root / "base")
    ir = _save_encoder(src, root / "ir", perturb=0.03, seed=1)
    sts = _save_encoder(src, root / "sts", perturb=0.03, seed=2)
    data = write_tiny_dev(root / "data")
    return root, base, [ir, sts], data


def _cfg(setup, tmp_path, uri, name, num_samples=6, **tune):
    root, base, models, data = setup
    return config_from_dict({
        "run": {"name": name, "seed": 0},
        "model": {"name": str(base)},
        "data": {"dev": {"sts": data["sts"], "retrieval": {"beir": data["beir"], "qrels": "dev"}}},
        "storage": {"path": str(tmp_path / "runs")},
        "tracking": {"uri": uri, "experiment": name},
        "merge": {"method": "delta_guided", "models": [{"model": str(m)} for m in models]},
        "tune": {"search": "merge", "num_samples": num_samples, "max_concurrent": 2, "algorithm": "tpe",
                 "space": SPACE, "trial_cpus": 1,
                 "dev": {"bm25_candidates": 3, "dense_candidates": 3, "cache_dir": str(tmp_path / "cache")}, **tune},
    })


def _children(uri, experiment, parent_id):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'", max_results=1000)


def test_merge_sweep_nested_runs_failed_trial_and_best_model(setup, tmp_path, ray_local, mlflow_tracking,
                                                             monkeypatch):
    from mlflow.tracking import MlflowClient
    from sentence_transformers import SentenceTransformer

    from codiemb.merge.evaluate_merge import score_state_dict
    from codiemb.merge.run import load_inputs
    from codiemb.tune.merge_search import run_merge_search

    monkeypatch.setenv("CODIEMB_TUNE_FAIL_TRIALS", "3")  # the third trial raises
    cfg = _cfg(setup, tmp_path, mlflow_tracking, "sweep-a")
    res = run_merge_search(cfg)

    assert res.complete and res.n_trials == 6 and res.n_errors == 1
    failed = [r for r in res.rows if r["status"] == "ERROR"]
    assert len(failed) == 1 and failed[0]["trial"] == 3
    assert "injected failure" in failed[0]["error"]
    ok = [r for r in res.rows if r["status"] == "TERMINATED"]
    assert len(ok) == 5 and all(0 <= r["retrieval_ndcg_at_10"] <= 100 for r in ok)
    for r in ok:  # objective = the mean of the two dev metrics (weights 0.5/0.5)
        assert r["objective"] == pytest.approx((r["sts_spearman"] + r["retrieval_ndcg_at_10"]) / 2)
    assert res.best_metrics["objective"] == pytest.approx(max(r["objective"] for r in ok))

    # every trial is a nested run of the sweep's run; the crashed one FAILED with its error
    children = _children(mlflow_tracking, "sweep-a", res.parent_run_id)
    assert len(children) == 6
    by_trial = {c.data.tags["codiemb.trial_id"]: c for c in children}
    assert set(by_trial) == {r["trial_id"] for r in res.rows}
    assert by_trial[failed[0]["trial_id"]].info.status == "FAILED"
    assert "injected failure" in by_trial[failed[0]["trial_id"]].data.tags["codiemb.error"]
    for r in ok:
        run = by_trial[r["trial_id"]]
        assert run.info.status == "FINISHED"
        assert run.data.metrics["objective"] == pytest.approx(r["objective"])
        assert run.data.params["method"] == r["method"]
    client = MlflowClient(mlflow_tracking)
    parent = client.get_run(res.parent_run_id)
    assert parent.data.params["best.method"] == res.best_config["method"]
    assert parent.data.metrics["best/objective"] == pytest.approx(res.best_metrics["objective"])
    arts = {a.path for a in client.list_artifacts(res.parent_run_id, "sweep")}
    assert {"sweep/results.csv", "sweep/pareto_front.png", "sweep/best.json"} <= arts

    # the best merge is written, loads in sentence-transformers, and re-scores to the trial's numbers
    out = Path(res.output_dir)
    st = SentenceTransformer(str(out), device="cpu")
    assert [type(m).__name__ for m in st] == ["Transformer", "Pooling", "Normalize"]
    report = json.loads((out / "merge_report.json").read_text())
    assert report["search"]["trial_id"] == res.best_trial
    inputs = load_inputs(cfg)
    from codiemb.merge.run import dev_set_for
    from codiemb.tune.common import absolutize

    dev = dev_set_for(absolutize(cfg), inputs)
    from safetensors.torch import load_file

    merged = {f"backbone.{k}": v for k, v in load_file(str(out / "model.safetensors")).items()}
    base_sd = inputs.encoder.state_dict()
    merged = {k: merged.get(k, base_sd[k]) for k in base_sd}
    again = score_state_dict(inputs.encoder, dev, merged)
    assert again["sts_spearman"] == pytest.approx(res.best_metrics["sts_spearman"], abs=1e-3)
    assert again["retrieval_ndcg_at_10"] == pytest.approx(res.best_metrics["retrieval_ndcg_at_10"], abs=1e-3)
    assert Path(res.results_csv).read_text().count("\n") == 7  # header + 6 trials


class _InterruptAfter:
    """A Tune callback that presses Ctrl-C (SIGINT to this process) once ``n`` trials completed;
    a marker file keeps it from firing again in the restored sweep (Tune pickles its callbacks)."""

    def __new__(cls, n: int, marker: Path):
        from ray.tune import Callback

        class Interrupt(Callback):
            def __init__(self):
                self.n, self.marker, self.done = n, str(marker), 0

            def on_trial_complete(self, iteration, trials, trial, **info):
                self.done += 1
                if self.done >= self.n and not os.path.exists(self.marker):
                    Path(self.marker).write_text("fired")
                    os.kill(os.getpid(), signal.SIGINT)

        return Interrupt()


def test_interrupted_sweep_resumes_without_rerunning_finished_trials(setup, tmp_path, ray_local, mlflow_tracking):
    from codiemb.tune.merge_search import run_merge_search

    cfg = _cfg(setup, tmp_path, mlflow_tracking, "sweep-b", num_samples=4, max_concurrent=1)
    first = run_merge_search(cfg, callbacks=[_InterruptAfter(2, tmp_path / "fired")])
    assert (tmp_path / "fired").exists()
    assert not first.complete
    done_first = {r["trial_id"]: r for r in first.rows if r["status"] == "TERMINATED"}
    assert 2 <= len(done_first) < 4

    second = run_merge_search(cfg)
    assert second.complete and second.n_trials == 4 and second.n_errors == 0
    assert second.parent_run_id == first.parent_run_id  # the same sweep run continues
    rows = {r["trial_id"]: r for r in second.rows}
    for tid, r in done_first.items():  # finished trials are kept, not re-run
        assert rows[tid]["objective"] == pytest.approx(r["objective"])
    children = _children(mlflow_tracking, "sweep-b", second.parent_run_id)
    finished = [c for c in children if c.info.status == "FINISHED"]
    assert len(finished) == 4
    assert len({c.data.tags["codiemb.trial_id"] for c in finished}) == 4
    assert torch.isfinite(torch.tensor(second.best_metrics["objective"]))
