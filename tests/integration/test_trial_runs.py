"""A trial's nested MLflow run against a real mlflow server, in the race CI hit: Tune stops a
trial right after its last report, and the trial's Train run dies under it before the trial's own
code has logged its final metrics and closed its run.

``tune_stop_event`` is the stop event of Tune's trial session; no session exists in this test, so a
plain event stands in for it: what is tested is our bookkeeping on either side of that signal."""

from __future__ import annotations

import threading

import pytest

from codiemb.tune import common
from codiemb.tune.common import TrackingInfo, finish_children, trial_run

pytestmark = pytest.mark.integration


def _parent(uri: str, experiment: str) -> tuple:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(experiment)
    parent = client.create_run(exp_id, run_name="sweep")
    return client, TrackingInfo(uri, experiment, parent.info.run_id)


def _child(client, tracking: TrackingInfo, trial_id: str):
    exp = client.get_experiment_by_name(tracking.experiment)
    runs = client.search_runs([exp.experiment_id], f"tags.`codiemb.trial_id` = '{trial_id}'")
    assert len(runs) == 1
    return runs[0]


def test_stop_by_tune_leaves_run_for_finish_children(mlflow_tracking, monkeypatch):
    client, tracking = _parent(mlflow_tracking, "trial-runs-stop")
    stop = threading.Event()
    stop.set()  # Tune's Trainable.stop() sets it before it tears the trial's actor down
    monkeypatch.setattr(common, "tune_stop_event", lambda: stop)
    with trial_run(tracking, "t1", {"codiemb.trial_id": "aaa"}) as tracker:
        tracker.log_params({"x": 1})
        raise RuntimeError("The actor died unexpectedly before finishing this task. class_name: TrainController")
    run = _child(client, tracking, "aaa")  # the error did not escape, and the run is still open
    assert run.info.status == "RUNNING" and "codiemb.error" not in run.data.tags

    rows = [{"trial_id": "aaa", "status": "TERMINATED", "final": 1, "objective": 71.5,
             "sts_spearman": 80.0, "retrieval_ndcg_at_10": 63.0}]
    assert finish_children(tracking, rows) == 1
    run = _child(client, tracking, "aaa")
    assert run.info.status == "FINISHED"
    assert run.data.metrics == {"objective": 71.5, "sts_spearman": 80.0, "retrieval_ndcg_at_10": 63.0}


def test_real_error_fails_the_run(mlflow_tracking, monkeypatch):
    client, tracking = _parent(mlflow_tracking, "trial-runs-error")
    monkeypatch.setattr(common, "tune_stop_event", threading.Event)  # never set
    with pytest.raises(ValueError, match="bad batch"):
        with trial_run(tracking, "t1", {"codiemb.trial_id": "bbb"}):
            raise ValueError("bad batch")
    run = _child(client, tracking, "bbb")
    assert run.info.status == "FAILED" and "bad batch" in run.data.tags["codiemb.error"]
    assert finish_children(tracking, [{"trial_id": "bbb", "status": "ERROR"}]) == 0
    assert _child(client, tracking, "bbb").info.status == "FAILED"


def test_closed_run_gets_missing_final_metrics(mlflow_tracking):
    client, tracking = _parent(mlflow_tracking, "trial-runs-closed")
    with trial_run(tracking, "t1", {"codiemb.trial_id": "ccc"}) as tracker:
        tracker.log_metrics({"objective": 60.0})
    rows = [{"trial_id": "ccc", "status": "TERMINATED", "final": 1, "objective": 61.0, "sts_spearman": 70.0}]
    assert finish_children(tracking, rows) == 0  # closed by the trial itself; only the gaps are filled
    run = _child(client, tracking, "ccc")
    assert run.info.status == "FINISHED"
    assert run.data.metrics == {"objective": 60.0, "sts_spearman": 70.0}
