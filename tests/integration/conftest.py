"""Servers for integration tests, all on 127.0.0.1 (no network): a local Ray instance and moto's S3.

Session fixtures, shared by every integration test:

- ``ray_local``: ``ray.init(num_cpus=4)`` on a fresh local instance (never an existing cluster),
  shut down at the end of the session. Its dashboard runs (on a free port on 127.0.0.1), as in
  ``codiemb``'s own ``init_ray``: Ray Train's placement-group cleaner asks the State API, which the
  dashboard serves, whether a controller died; without it the placement group of a trainer that a
  Tune trial stop kills (ASHA) is never removed and its CPUs starve the next trainer.
- ``s3_endpoint``: moto's real server as a subprocess on a free port; yields
  ``"http://127.0.0.1:PORT"``. While it runs, the environment holds test credentials
  (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY`` = ``testing``, ``AWS_DEFAULT_REGION`` =
  ``us-east-1``) and points every S3 client at it: ``CODIEMB_S3_ENDPOINT`` (codiemb's pyarrow
  filesystems), ``AWS_ENDPOINT_URL`` (boto3) and ``MLFLOW_S3_ENDPOINT_URL`` (MLflow artifacts).
  The previous values come back at teardown.
"""

from __future__ import annotations

import os

# Fake credentials for moto, in the environment BEFORE any Ray instance starts: codiemb never puts
# S3 keys into objects Ray pickles, so Ray's worker processes resolve them from their own
# environment (the standard AWS chain), which they inherit from this process at ray.init.
for _k, _v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
               "AWS_DEFAULT_REGION": "us-east-1"}.items():
    os.environ.setdefault(_k, _v)
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_until_up(url: str, proc: subprocess.Popen, log_path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            out = log_path.read_text(errors="replace")
            raise RuntimeError(f"moto server exited with {proc.returncode}: {out[-2000:]}")
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except urllib.error.HTTPError:
            return  # it answered, even if with an error status
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"moto server did not answer at {url} within {timeout:.0f}s")


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory):
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env_values = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "CODIEMB_S3_ENDPOINT": url,
        "AWS_ENDPOINT_URL": url,
        "MLFLOW_S3_ENDPOINT_URL": url,
    }
    saved = {k: os.environ.get(k) for k in [*env_values, "AWS_SESSION_TOKEN", "AWS_REGION"]}
    log_path = tmp_path_factory.mktemp("moto") / "moto.log"
    log_file = open(log_path, "wb")  # a file, not a pipe: a full pipe would block the server
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=log_file, stderr=subprocess.STDOUT)
    try:
        _wait_until_up(f"{url}/", proc, log_path)
        os.environ.pop("AWS_SESSION_TOKEN", None)
        os.environ.pop("AWS_REGION", None)
        os.environ.update(env_values)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log_file.close()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="session")
def ray_local():
    import ray

    if ray.is_initialized():  # pragma: no cover - someone else started it in this process
        yield ray
        return
    ray.init(address="local", num_cpus=4, include_dashboard=True, dashboard_host="127.0.0.1",
             dashboard_port=_free_port(), object_store_memory=512 * 1024**2,
             log_to_driver=False, configure_logging=False)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    try:
        yield ray
    finally:
        ray.shutdown()
from conftest_services import *  # noqa: F401,F403
