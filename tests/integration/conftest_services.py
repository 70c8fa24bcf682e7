"""MLflow server fixtures. ``tests/integration/conftest.py`` imports them with
``from conftest_services import *  # noqa: F401,F403`` (that folder is on sys.path under pytest's
default import mode), so they sit next to ``s3_endpoint`` and ``ray_local``.

- ``mlflow_server`` (session): one ``mlflow server`` with a SQLite backend and artifacts in the
  moto S3 bucket ``MLFLOW_BUCKET`` under ``mlflow/``; an :class:`services.MlflowServer` with
  ``.url``, ``.bucket``, ``.prefix``, ``.s3_endpoint``. Do not stop it in a test.
- ``mlflow_tracking`` (function): ``MLFLOW_TRACKING_URI`` and ``mlflow.set_tracking_uri`` point at
  ``mlflow_server`` for one test, restored afterwards; yields the URL.
- ``mlflow_server_factory`` (session): ``make(s3=False)`` starts a private server (own port and
  database) that a test may stop and restart; all are stopped at the end of the session.
"""

from __future__ import annotations

import pytest

from services import MlflowServer, ensure_bucket

MLFLOW_BUCKET = "codiemb-mlflow"

__all__ = ["MLFLOW_BUCKET", "mlflow_server", "mlflow_tracking", "mlflow_server_factory"]


@pytest.fixture(scope="session")
def mlflow_server(s3_endpoint, tmp_path_factory):
    ensure_bucket(s3_endpoint, MLFLOW_BUCKET)
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"), s3_endpoint=s3_endpoint,
                          bucket=MLFLOW_BUCKET, prefix="mlflow")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def mlflow_tracking(mlflow_server, monkeypatch):
    import mlflow

    previous = mlflow.get_tracking_uri() if mlflow.is_tracking_uri_set() else None
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    mlflow.set_tracking_uri(mlflow_server.url)
    yield mlflow_server.url
    while mlflow.active_run() is not None:
        mlflow.end_run()
    mlflow.set_tracking_uri(previous)


@pytest.fixture(scope="session")
def mlflow_server_factory(tmp_path_factory, request):
    servers: list[MlflowServer] = []

    def make(s3: bool = False) -> MlflowServer:
        kwargs = {}
        if s3:
            endpoint = request.getfixturevalue("s3_endpoint")
            ensure_bucket(endpoint, MLFLOW_BUCKET)
            kwargs = {"s3_endpoint": endpoint, "bucket": MLFLOW_BUCKET, "prefix": f"private-{len(servers)}"}
        server = MlflowServer(tmp_path_factory.mktemp("mlflow-private"), **kwargs)
        servers.append(server)
        return server.start()

    try:
        yield make
    finally:
        for s in servers:
            s.stop()
