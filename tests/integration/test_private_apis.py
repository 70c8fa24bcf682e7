"""Every private Ray / MLflow API codiemb relies on, run for real (no mocks), so that a Ray or MLflow
that changes underneath fails here, loudly, instead of codiemb degrading in silence.

- ``codiemb.tune.common.tune_stop_event`` reads ``stop_event`` from
  ``ray.train._internal.session.get_session()`` (Ray has no public call for it): a real Tune
  trial, stopped by Tune, must see a ``threading.Event`` and see it set.
- ``codiemb.tracking.mlflow_run`` copies MLflow's logging limits from the private
  ``mlflow.utils.validation``: they must equal MLflow's, a real server must take what
  ``SafeLogger`` sends at exactly those limits, cut longer values at the same length and refuse
  a longer key or a larger batch.
- Public replacements checked on the real path: a lazily created run gets its name through
  ``MlflowClient.create_run(run_name=...)`` (it used ``mlflow.utils.mlflow_tags`` before).

Elsewhere: ``ray.autoscaler._private.util.validate_config`` (Ray's launcher schema; the test
imports it without a skip) in tests/unit/test_deploy_files.py; ``FileBasedDatasource``'s
``_read_stream`` / ``_open_input_source`` hooks (``codiemb.data.readers``) in
tests/integration/test_readers_ray.py, which reads through real Ray Data.
"""

from __future__ import annotations

import json
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from codiemb.tracking import mlflow_run
from codiemb.tracking.mlflow_run import SafeLogger

pytestmark = pytest.mark.integration


# --------------------------------------------------------------------------- Ray: Tune's stop event
def _stopped_trial(config):
    """Reports until Tune stops it; records what tune_stop_event gave and whether it was set."""
    from ray import tune

    from codiemb.tune.common import tune_stop_event

    out = Path(config["out"])
    stop = tune_stop_event()
    (out / "kind").write_text(type(stop).__name__)
    if isinstance(stop, threading.Event):
        def watch():
            if stop.wait(300):  # returns True once Tune sets it, even if Ray clears it right after
                (out / "stop_seen").write_text("1")

        threading.Thread(target=watch, daemon=True).start()
    for i in range(10_000):
        tune.report({"i": i})
        time.sleep(0.05)


def test_tune_stop_event_is_set_when_tune_stops_a_real_trial(ray_local, tmp_path):
    import ray.cloudpickle
    from ray import tune

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import test modules

    from codiemb.tune.common import tune_stop_event

    assert tune_stop_event() is None  # outside a trial: no session, no event, no warning
    out = tmp_path / "out"
    out.mkdir()
    tuner = tune.Tuner(
        tune.with_resources(_stopped_trial, {"cpu": 1}),
        param_space={"out": str(out)},
        tune_config=tune.TuneConfig(num_samples=1),
        run_config=tune.RunConfig(name="stop-event", storage_path=str(tmp_path / "ray_results"),
                                  stop={"training_iteration": 3}, verbose=0),
    )
    grid = tuner.fit()
    assert not grid.errors, grid.errors
    assert grid[0].metrics["training_iteration"] == 3
    assert (out / "kind").read_text() == "Event", "tune_stop_event() found no stop_event in Tune's trial session"
    deadline = time.monotonic() + 30
    while not (out / "stop_seen").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert (out / "stop_seen").exists(), "Tune stopped the trial but the event was never set"


# --------------------------------------------------------------------------- MLflow: logging limits
def test_mlflow_limits_are_mlflows():
    from mlflow.utils import validation  # private: imported here so that a rename fails this test

    assert mlflow_run.MAX_PARAM_VALUE == validation.MAX_PARAM_VAL_LENGTH
    assert mlflow_run.MAX_TAG_VALUE == validation.MAX_TAG_VAL_LENGTH
    assert mlflow_run.MAX_KEY_LENGTH == validation.MAX_ENTITY_KEY_LENGTH
    assert mlflow_run.MAX_PARAMS_PER_BATCH == validation.MAX_PARAMS_TAGS_PER_BATCH
    assert mlflow_run.MAX_METRICS_PER_BATCH <= min(validation.MAX_METRICS_PER_BATCH, validation.MAX_ENTITIES_PER_BATCH)


def test_mlflow_limits_hold_on_a_real_server(mlflow_tracking):
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    logger = SafeLogger(mlflow_tracking, None, experiment="t-limits", run_name="limits", retry_after=0.0)
    params = {f"p{i:03d}": i for i in range(2 * mlflow_run.MAX_PARAMS_PER_BATCH + 50)}  # three batches
    params["long"] = "x" * (mlflow_run.MAX_PARAM_VALUE + 500)  # cut to the limit, not rejected
    params["k" * (mlflow_run.MAX_KEY_LENGTH + 20)] = 1
    assert logger.log_params(params)
    assert logger.set_tags({"long_tag": "t" * (mlflow_run.MAX_TAG_VALUE + 500)})
    n_metrics = 2 * mlflow_run.MAX_METRICS_PER_BATCH + 300  # one call, sent as three batches
    assert logger.log_metrics({f"m{j:04d}": float(j) for j in range(n_metrics)}, step=1)
    assert logger.pending == 0 and logger.dropped == 0
    logger.close()

    client = MlflowClient(mlflow_tracking)
    run = client.get_run(logger.run_id)
    assert len(run.data.params) == len(params)
    assert len(run.data.params["long"]) == mlflow_run.MAX_PARAM_VALUE
    assert "k" * mlflow_run.MAX_KEY_LENGTH in run.data.params
    assert len(run.data.tags["long_tag"]) == mlflow_run.MAX_TAG_VALUE
    assert len(run.data.metrics) == n_metrics and run.data.metrics[f"m{n_metrics - 1:04d}"] == n_metrics - 1
    # one past each limit: MLflow cuts values at exactly our limits and refuses longer keys and
    # larger batches, so the limits are MLflow's, not ours
    client.log_param(logger.run_id, "over", "y" * (mlflow_run.MAX_PARAM_VALUE + 1))
    client.set_tag(logger.run_id, "over_tag", "y" * (mlflow_run.MAX_TAG_VALUE + 1))
    run = client.get_run(logger.run_id)
    assert len(run.data.params["over"]) == mlflow_run.MAX_PARAM_VALUE
    assert len(run.data.tags["over_tag"]) == mlflow_run.MAX_TAG_VALUE
    with pytest.raises(MlflowException):
        client.log_param(logger.run_id, "k" * (mlflow_run.MAX_KEY_LENGTH + 1), 1)
    # the client splits big batches itself; the server's own limit shows on the REST API
    n_params, n_metrics = mlflow_run.MAX_PARAMS_PER_BATCH, mlflow_run.MAX_METRICS_PER_BATCH
    assert _log_batch(mlflow_tracking, logger.run_id, params=[{"key": f"b{i}", "value": "1"} for i in range(n_params)]) == 200
    assert _log_batch(mlflow_tracking, logger.run_id,
                      params=[{"key": f"c{i}", "value": "1"} for i in range(n_params + 1)]) == 400
    metrics = [{"key": f"x{i}", "value": 1.0, "timestamp": 0, "step": 0} for i in range(n_metrics + 1)]
    assert _log_batch(mlflow_tracking, logger.run_id, metrics=metrics[:-1]) == 200
    assert _log_batch(mlflow_tracking, logger.run_id, metrics=metrics) == 400


def _log_batch(url: str, run_id: str, **body) -> int:
    req = urllib.request.Request(f"{url}/api/2.0/mlflow/runs/log-batch", method="POST",
                                 data=json.dumps({"run_id": run_id, **body}).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def test_a_run_created_once_the_server_answers_gets_its_name(mlflow_tracking):
    from mlflow.tracking import MlflowClient

    logger = SafeLogger(mlflow_tracking, None, experiment="t-lazy-name", run_name="lazy-name",
                        create_tags={"codiemb.trial_id": "abc"})
    assert logger.flush(force=True) and logger.run_id is not None
    logger.close()
    run = MlflowClient(mlflow_tracking).get_run(logger.run_id)
    assert run.info.run_name == "lazy-name"
    assert run.data.tags["mlflow.runName"] == "lazy-name" and run.data.tags["codiemb.trial_id"] == "abc"
