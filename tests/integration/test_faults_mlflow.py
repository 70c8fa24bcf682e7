"""The MLflow server goes away mid-run: logging keeps working, registration fails clearly, then recovers.

One private server (own port and SQLite file) is stopped and restarted on the same port, so the
client sees exactly what a user would: connection refused, then the same server again.
"""

from __future__ import annotations

import logging
import time

import pytest

from codiemb.config import config_from_dict
from codiemb.errors import UserError
from codiemb.tracking.mlflow_run import SafeLogger, start_run
from codiemb.tracking.registry import alias_version, log_model, register
from services import free_port

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def server(mlflow_server_factory):
    return mlflow_server_factory()


@pytest.fixture(scope="module")
def st_folder(tiny_model_dir, tmp_path_factory):
    from sentence_transformers import SentenceTransformer

    path = tmp_path_factory.mktemp("st-fault") / "model"
    SentenceTransformer(str(tiny_model_dir), device="cpu").save(str(path))
    return path


def _warnings(caplog, needle: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and needle in r.getMessage()]


def test_server_stops_mid_run_then_returns(server, st_folder, caplog, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
    caplog.set_level(logging.WARNING, logger="codiemb")
    cfg = config_from_dict({"run": {"name": "fault"}, "tracking": {"uri": server.url, "experiment": "t-fault"}})
    client = MlflowClient(tracking_uri=server.url)
    try:
        with start_run(cfg, retry_after=0.5) as run:
            run_id = run.run_id
            log_model(st_folder)  # trained and logged before the outage
            for step in range(1, 4):
                assert run.log_metrics({"loss": 1.0 / step}, step=step)

            server.stop()
            t0 = time.monotonic()
            for step in range(4, 24):  # training goes on: no exception, calls return at once
                assert run.log_metrics({"loss": 1.0 / step}, step=step) is False
            run.log_params({"late.param": "x"})
            assert time.monotonic() - t0 < 5.0
            assert not run.online and run.pending == 21
            assert len(_warnings(caplog, "unreachable")) == 1  # one warning, not one per call

            # registration with the server down: retries with backoff, then one clear line, in < 20 s
            t0 = time.monotonic()
            with pytest.raises(UserError) as err:
                register(run_id, "fault-model")
            elapsed = time.monotonic() - t0
            msg = str(err.value)
            assert elapsed < 20.0, elapsed
            assert elapsed > 1.0 + 2.0  # it did back off between attempts (1 s, 2 s, 4 s)
            assert "\n" not in msg and "unreachable after 4 attempts" in msg
            assert f"codiemb register {run_id}" in msg

            server.start()
            time.sleep(0.6)  # past retry_after: the next call flushes the buffer
            assert run.log_metrics({"loss": 0.0}, step=24)
            assert run.online and run.pending == 0
            assert _warnings(caplog, "reachable again")
    finally:
        if not server.running:
            server.start()

    got = client.get_run(run_id)
    assert got.info.status == "FINISHED"
    assert got.data.params["late.param"] == "x"
    history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "loss"))
    assert [s for s, _ in history] == list(range(1, 25))
    assert history[9] == (10, pytest.approx(0.1))
    # `codiemb register RUN` later finishes the job
    assert register(run_id, "fault-model") == "1"
    assert alias_version("fault-model", "challenger", tracking_uri=server.url) == "1"


def test_logger_without_any_server_buffers_and_drops_with_one_warning(caplog):
    caplog.set_level(logging.WARNING, logger="codiemb")
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens here
    logger = SafeLogger(url, experiment="nowhere", retry_after=60.0, max_buffer=10)
    t0 = time.monotonic()
    for step in range(8):
        assert logger.log_metrics({"a": step, "b": -step}, step=step) is False
    assert time.monotonic() - t0 < 5.0
    assert logger.run_id is None and logger.pending == 10 and logger.dropped == 6
    assert len(_warnings(caplog, "unreachable")) == 1
    assert len(_warnings(caplog, "buffer full")) == 1
    # the newest metrics are the ones kept
    assert [m[3] for m in logger._metrics][-2:] == [7, 7]
    logger.close()
    assert len(_warnings(caplog, "not logged")) == 1


def test_run_started_while_server_down_is_created_when_it_returns(server, caplog):
    from mlflow.tracking import MlflowClient

    caplog.set_level(logging.WARNING, logger="codiemb")
    cfg = config_from_dict({"run": {"name": "late"}, "tracking": {"uri": server.url, "experiment": "t-late"}})
    server.stop()
    try:
        with start_run(cfg, retry_after=0.2) as run:
            assert run.run_id is None and not run.online
            run.log_metrics({"loss": 2.0}, step=1)
            server.start()
            time.sleep(0.3)
            assert run.log_metrics({"loss": 1.0}, step=2)
            run_id = run.run_id
            assert run_id is not None
    finally:
        if not server.running:
            server.start()
    client = MlflowClient(tracking_uri=server.url)
    got = client.get_run(run_id)
    assert got.info.status == "FINISHED" and got.info.run_name == "late"
    assert got.data.params["run.name"] == "late"
    assert [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, "loss"), key=lambda m: m.step)] == \
        [(1, 2.0), (2, 1.0)]
    assert [a.path for a in client.list_artifacts(run_id)] == ["config.yaml"]
