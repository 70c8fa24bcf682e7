"""The MLflow server dies in the middle of a real training run (issue 6, "Faults").

``train_tracked`` trains the tiny BERT in this process against a private ``mlflow server``. The
loop's logging hook (``_LoggerCallbacks.on_log``, the one ``train_tracked`` hands to the loop) is
wrapped so that, right after step ``STOP_AT``'s metrics went out, the server process is killed
(SIGTERM to its process group, port refusing connections): from then on every logging call meets
a dead server, as a client on another host would see it. Training must not notice beyond one
warning; the model must stay in the run's folder; once the server is back, ``codiemb register
RUN_ID`` (the CLI) must log that folder into the same run and register it.
"""

from __future__ import annotations

import json
import logging
import time

import numpy as np
import pytest

from codiemb.config import load_config
from services import write_tiny_pairs

pytestmark = pytest.mark.integration

STOP_AT = 5  # the server goes away right after this step's metrics were sent
MAX_STEPS = 20
TEXTS = ["the cat sleeps in the house", "a man plays with a big dog", "red sun", "water"]


def _config(tmp_path, model_dir, url: str):
    ret, sts = write_tiny_pairs(tmp_path, 48, 48)
    f = tmp_path / "outage.yaml"
    f.write_text(f"""
run: {{name: outage, seed: 1}}
model: {{name: {model_dir}, max_length: {{query: 16, passage: 16, sts: 16}}}}
data:
  datasets:
    - {{name: ret, task: retrieval, path: {ret}, batch_size: 4}}
    - {{name: sts, task: sts, path: {sts}, score_range: [0, 5], batch_size: 4}}
loss: {{retrieval: {{temperature: 0.05, negatives: 1}}, sts: {{mid_nce: 0.0}}}}
train: {{epochs: 1, max_steps: {MAX_STEPS}, lr: 1.0e-3, log_every: 1, checkpoint_every: 0, eval_at_end: false}}
storage: {{path: {tmp_path / 'storage'}}}
tracking: {{uri: "{url}", experiment: outage}}
registry: {{name: outage-model}}
""")
    return load_config(f)


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name.startswith("codiemb")]


def _encode(folder) -> np.ndarray:
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(folder), device="cpu").encode(TEXTS, convert_to_numpy=True)


@pytest.fixture
def restore_tracking_uri():
    """train_tracked and the CLI set MLflow's global tracking URI; put the previous one back."""
    import mlflow

    previous = mlflow.get_tracking_uri() if mlflow.is_tracking_uri_set() else None
    yield
    while mlflow.active_run() is not None:
        mlflow.end_run()
    mlflow.set_tracking_uri(previous)


def test_server_killed_mid_training_then_register_run_id_finishes(mlflow_server_factory, tiny_model_dir, tmp_path,
                                                                   caplog, capsys, monkeypatch,
                                                                   restore_tracking_uri):
    from mlflow.tracking import MlflowClient

    from codiemb import cli
    from codiemb.tracking import train_run
    from codiemb.tracking.registry import CHALLENGER, alias_version, resolve_model_uri

    server = mlflow_server_factory()
    monkeypatch.setenv("CODIEMB_NO_PROGRESS", "1")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
    caplog.set_level(logging.INFO, logger="codiemb")
    cfg = _config(tmp_path, tiny_model_dir, server.url)
    root = tmp_path / "storage" / "outage"

    stopped: list[tuple[int, float]] = []
    original_on_log = train_run._LoggerCallbacks.on_log

    def on_log(self, step, metrics):
        original_on_log(self, step, metrics)
        if step == STOP_AT and not stopped:
            server.stop()
            stopped.append((step, time.monotonic()))

    monkeypatch.setattr(train_run._LoggerCallbacks, "on_log", on_log)
    try:
        result, run_id = train_run.train_tracked(cfg, local=True)
        returned = time.monotonic()
        assert stopped and stopped[0][0] == STOP_AT
    finally:
        if not server.running:
            server.start()

    # ---- training went on: every planned step, the model in the run's folder, local metrics complete
    assert result.steps == MAX_STEPS
    assert sum(result.planned_steps_per_task.values()) == MAX_STEPS
    assert result.steps_per_task == result.planned_steps_per_task
    rows = [json.loads(line) for line in (root / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, MAX_STEPS + 1))
    assert run_id and (root / train_run.RUN_ID_FILE).read_text().strip() == run_id
    model_dir = root / "model"
    assert result.model_dir == str(model_dir) and (model_dir / "modules.json").is_file()
    trained = _encode(model_dir)
    assert trained.shape == (len(TEXTS), 32) and np.isfinite(trained).all()
    # it is the trained model, not the starting point
    from codiemb.model.encoder import Encoder

    start = Encoder.load(cfg.model.name, pooling=cfg.model.pooling, normalize=cfg.model.normalize)
    start.eval()
    start_dir = tmp_path / "start"
    start.save(start_dir)
    assert np.abs(trained - _encode(start_dir)).max() > 1e-3
    # the outage did not slow training down by retries: steps after the stop took seconds, not minutes
    offline_s = returned - stopped[0][1]
    assert offline_s < 30.0, offline_s

    # ---- one warning about the dead server, not one per step
    warnings = _warnings(caplog)
    down = [w for w in warnings if "buffering metrics" in w]
    assert len(down) == 1, warnings
    assert server.url in down[0] and "training goes on" in down[0]
    assert len(warnings) < MAX_STEPS - STOP_AT, warnings  # a handful in total for 15 steps offline
    model_warning = [w for w in warnings if f"codiemb register {run_id} --name outage-model" in w]
    assert len(model_warning) == 1 and "unreachable" in model_warning[0], warnings
    assert any("were not logged" in w for w in warnings), warnings

    # ---- what reached the server: the metrics up to the stop, the output-folder tag, no model yet
    client = MlflowClient(tracking_uri=server.url)
    run = client.get_run(run_id)
    assert [m.step for m in sorted(client.get_metric_history(run_id, "lr"), key=lambda m: m.step)] == \
        list(range(1, STOP_AT + 1))
    lr_local = {r["step"]: r["lr"] for r in rows}
    for m in client.get_metric_history(run_id, "lr"):
        assert m.value == pytest.approx(lr_local[m.step], rel=1e-12)
    assert run.data.tags["codiemb.output_dir"] == str(root.resolve())
    assert run.info.status == "RUNNING"  # the end of the run was never heard of
    assert not client.search_logged_models(experiment_ids=[run.info.experiment_id],
                                           filter_string=f"source_run_id = '{run_id}'")

    # ---- after the server is back, the command the warning names finishes the job
    caplog.clear()
    capsys.readouterr()
    rc = cli.main(["register", run_id, "--name", "outage-model", "--tracking-uri", server.url])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert json.loads(out.strip().splitlines()[-1]) == {"name": "outage-model", "version": "1",
                                                        "alias": "challenger", "run_id": run_id}
    assert alias_version("outage-model", CHALLENGER, tracking_uri=server.url) == "1"
    mv = client.get_model_version("outage-model", "1")
    assert mv.run_id == run_id
    assert client.get_run(run_id).info.status == "FINISHED"
    # the registered model is the folder training left behind: same embeddings
    registered = _encode(resolve_model_uri("models:/outage-model@challenger", dst=tmp_path / "dl",
                                           tracking_uri=server.url))
    np.testing.assert_allclose(registered, trained, atol=1e-5, rtol=0)
    # running it again is idempotent: same version, no second one
    rc = cli.main(["register", run_id, "--name", "outage-model", "--tracking-uri", server.url])
    assert rc == 0
    assert [v.version for v in client.search_model_versions("name = 'outage-model'")] == ["1"]

    # a run with no logged model and no run folder on this machine: one line naming the way out
    bare = client.create_run(run.info.experiment_id).info.run_id
    capsys.readouterr()
    rc = cli.main(["register", bare, "--name", "outage-model", "--tracking-uri", server.url])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("codiemb: error:")]
    assert rc == 2 and len(errors) == 1, errors
    assert f"run {bare} has no logged model" in errors[0]
    assert "codiemb register RUN_FOLDER --name outage-model" in errors[0]
