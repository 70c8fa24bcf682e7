"""A real ``mlflow server`` on 127.0.0.1 for the integration tests (no network beyond loopback).

``MlflowServer(root).start()`` runs::

    mlflow server --host 127.0.0.1 --port PORT --workers 1
                  --backend-store-uri sqlite:///ROOT/mlflow.db
                  --artifacts-destination s3://BUCKET/PREFIX      (or ROOT/artifacts)

as a subprocess in its own process group, waits for ``/health`` and can be stopped and started
again on the same port and database (the fault tests do that mid-run). The S3 endpoint (moto) is
passed through ``MLFLOW_S3_ENDPOINT_URL`` and the ``AWS_*`` variables of the environment; clients
never see S3 credentials, they talk to the server's artifact proxy.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    def __init__(self, root: str | os.PathLike, *, port: int | None = None, s3_endpoint: str | None = None,
                 bucket: str | None = None, prefix: str = "mlflow", env: dict[str, str] | None = None):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.s3_endpoint = s3_endpoint
        self.bucket = bucket
        self.prefix = prefix
        self.extra_env = dict(env or {})
        self.proc: subprocess.Popen | None = None
        self.log_path = self.root / "server.log"
        self.starts = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def backend_store_uri(self) -> str:
        return f"sqlite:///{self.root / 'mlflow.db'}"

    @property
    def artifacts_destination(self) -> str:
        if self.s3_endpoint and self.bucket:
            return f"s3://{self.bucket}/{self.prefix}"
        return str(self.root / "artifacts")

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def command(self) -> list[str]:
        return [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
                "--workers", "1", "--backend-store-uri", self.backend_store_uri,
                "--artifacts-destination", self.artifacts_destination]

    def start(self, timeout: float = 90.0) -> "MlflowServer":
        if self.running:
            return self
        env = dict(os.environ)
        env.pop("MLFLOW_TRACKING_URI", None)
        env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")  # no job runner: faster start, fewer processes
        if self.s3_endpoint:
            env["MLFLOW_S3_ENDPOINT_URL"] = self.s3_endpoint
        env.update(self.extra_env)
        log = open(self.log_path, "ab")  # a file, not a pipe: a full pipe would block the server
        self.proc = subprocess.Popen(self.command(), env=env, stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        log.close()
        self.starts += 1
        self._wait_healthy(timeout)
        return self

    def _wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {self.proc.returncode}: "
                                   f"{self.log_path.read_text(errors='replace')[-3000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"mlflow server did not answer /health at {self.url} within {timeout:.0f}s")

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM the server's process group (mlflow runs uvicorn as a child); SIGKILL if it lingers."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        # wait until the port refuses connections, so "stopped" means unreachable
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    time.sleep(0.1)
            except OSError:
                break
        self.proc = None

    def __enter__(self) -> "MlflowServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def s3_client(endpoint: str):
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, region_name=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"))


def ensure_bucket(endpoint: str, bucket: str) -> None:
    client = s3_client(endpoint)
    existing = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
    if bucket not in existing:
        client.create_bucket(Bucket=bucket)


def s3_keys(endpoint: str, bucket: str, prefix: str = "") -> list[str]:
    """Every object key under ``prefix`` (paginated)."""
    client = s3_client(endpoint)
    keys: list[str] = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys += [o["Key"] for o in page.get("Contents", [])]
    return keys


def s3_read(endpoint: str, bucket: str, key: str) -> bytes:
    return s3_client(endpoint).get_object(Bucket=bucket, Key=key)["Body"].read()


WORDS = "cat dog man woman child car house tree water fire sun moon red blue green big small".split()


def write_tiny_pairs(folder: Path, n_ret: int, n_sts: int, seed: int = 0) -> tuple[Path, Path]:
    """Random-word training files for the tiny model: ``ret.jsonl`` (query, positive, one hard
    negative) and ``sts.jsonl`` (scores in [0, 5]), the same rows for the same arguments."""
    import json
    import random

    rng = random.Random(seed)
    ret, sts = Path(folder) / "ret.jsonl", Path(folder) / "sts.jsonl"
    with open(ret, "w") as fh:
        for _ in range(n_ret):
            q = " ".join(rng.sample(WORDS, 3))
            fh.write(json.dumps({"query": q, "positive": q + " " + rng.choice(WORDS),
                                 "negatives": [" ".join(rng.sample(WORDS, 4))]}) + "\n")
    with open(sts, "w") as fh:
        for _ in range(n_sts):
            fh.write(json.dumps({"sentence1": " ".join(rng.sample(WORDS, 4)), "sentence2": " ".join(rng.sample(WORDS, 4)),
                                 "score": round(rng.uniform(0, 5), 1)}) + "\n")
    return ret, sts
