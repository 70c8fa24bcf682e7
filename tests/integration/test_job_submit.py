"""End to end: `ray start --head` on loopback (token auth), a real `mlflow server` with artifacts in
S3 (moto), and `ray job submit --working-dir . -- python jobs/pipeline.py --config ...`.

The job trains two specialists on Ray workers, merges them, evaluates, registers and gates. The
test checks the job SUCCEEDED, the model's artifacts are in the bucket, the registry holds the
version with its aliases, and that a submission without the token is refused.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from services import free_port, s3_keys, write_tiny_pairs

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent


def _ray(*args, env=None, timeout=120, check=False):
    return subprocess.run([str(VENV_BIN / "ray"), *args], env=env, capture_output=True, text=True,
                          timeout=timeout, check=check)


def _submit(address: str, *args, env=None, timeout=300, wait_agent_s: float = 180):
    """`ray job submit`, retried while the head's job agent has not registered yet.

    The dashboard answers (`ray job list` works) before the node's agent has joined; until then
    a submission fails with "No available agent to submit job, please try again later" (seen on
    a loaded 2-core CI machine). Any other failure is returned at once.
    """
    deadline = time.time() + wait_agent_s
    while True:
        r = _ray("job", "submit", "--address", address, *args, env=env, timeout=timeout)
        if r.returncode == 0 or "no available agent" not in (r.stdout + r.stderr).lower() or time.time() > deadline:
            return r
        time.sleep(3)


def _agent_log_tail(temp: Path, chars: int = 3000) -> str:
    """The end of the head's dashboard agent logs, so a failed submission says why the agent is missing."""
    out = []
    for log in sorted(temp.glob("session_*/logs/dashboard_agent*")):
        out.append(f"\n--- {log.name} ---\n{log.read_text(errors='replace')[-chars:]}")
    return "".join(out) or "\n(no dashboard_agent log under the head's temp dir)"


@pytest.fixture(scope="module")
def ray_head():
    """A Ray head from `ray start --head --block` on 127.0.0.1 with the dashboard (job server).

    Every port the head's agents listen on is a free one: the session's ``ray_local`` cluster (started
    by earlier integration tests, with its dashboard) already holds Ray's default agent port 52365, and
    a second agent on it never registers, so every submission fails with "No available agent" (CI).
    """
    temp = Path(tempfile.mkdtemp(prefix="rj", dir="/tmp"))  # short: Ray's unix socket paths are limited
    gcs, dash = free_port(), free_port()
    agent_ports = ["--dashboard-agent-listen-port", str(free_port()), "--dashboard-agent-grpc-port", str(free_port()),
                   "--runtime-env-agent-port", str(free_port()), "--metrics-export-port", str(free_port())]
    env = dict(os.environ, RAY_AUTH_MODE="token", PATH=f"{VENV_BIN}:{os.environ.get('PATH', '')}",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", CODIEMB_NO_PROGRESS="1")
    env.pop("RAY_ADDRESS", None)
    log = open(temp / "head.log", "wb")
    proc = subprocess.Popen(
        [str(VENV_BIN / "ray"), "start", "--head", "--block", "--port", str(gcs), "--dashboard-port", str(dash),
         "--dashboard-host", "127.0.0.1", "--node-ip-address", "127.0.0.1", "--num-cpus", "4",
         "--include-dashboard", "true", "--temp-dir", str(temp), "--disable-usage-stats", *agent_ports],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    deadline = time.time() + 120
    while True:
        r = _ray("job", "list", "--address", address, env=env, timeout=60)
        if r.returncode == 0:
            break
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(f"ray head did not come up: {(temp / 'head.log').read_text()[-2000:]}\n{r.stderr[-1000:]}")
        time.sleep(2)
    yield {"address": address, "env": env, "temp": temp}
    proc.terminate()  # `ray start --block` stops the processes it started
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
    shutil.rmtree(temp, ignore_errors=True)


def _write_job_config(tmp_path: Path, model_dir: Path, tracking_uri: str) -> Path:
    ret, sts = write_tiny_pairs(tmp_path, 48, 48)
    cfg = tmp_path / "job.yaml"
    cfg.write_text(f"""
run: {{name: jobtest, seed: 0}}
model: {{name: {model_dir}, max_length: {{query: 16, passage: 16, sts: 16}}}}
data:
  datasets:
    - {{name: ret, task: retrieval, path: {ret}, batch_size: 4}}
    - {{name: sts, task: sts, path: {sts}, score_range: [0, 5], batch_size: 4}}
loss: {{retrieval: {{negatives: 1}}, sts: {{mid_nce: 0.0}}}}
train: {{epochs: 1, lr: 1.0e-3, checkpoint_every: 0}}
scaling: {{num_workers: 2}}
storage: {{path: {tmp_path / 'storage'}}}
tracking: {{uri: "{tracking_uri}", experiment: jobtest}}
merge: {{method: delta_guided, parameters: {{gamma: 1.0, lam: 1.0}}}}
pipeline:
  stages: [train, merge, evaluate, register]
  specialists:
    ir: {{data.datasets: [{{name: ret, task: retrieval, path: {ret}, batch_size: 4}}]}}
    sts: {{data.datasets: [{{name: sts, task: sts, path: {sts}, score_range: [0, 5], batch_size: 4}}]}}
registry: {{name: jobtest-model, gate: {{suite: stsb-dev, margin: 0.1}}}}
evaluate: {{suite: stsb}}
""")
    return cfg


def test_ray_job_submit_pipeline_end_to_end(ray_head, mlflow_server, tmp_path, tiny_model_dir):
    from mlflow.tracking import MlflowClient

    cfg = _write_job_config(tmp_path, tiny_model_dir, mlflow_server.url)
    env = ray_head["env"]
    sub_id = f"codiemb-test-{int(time.time())}"
    r = _submit(ray_head["address"], "--working-dir", str(REPO), "--submission-id", sub_id, "--no-wait", "--",
                "python", "jobs/pipeline.py", "--config", str(cfg), env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:] + _agent_log_tail(ray_head["temp"])

    deadline = time.time() + 900
    status = ""
    while time.time() < deadline:
        status = _ray("job", "status", "--address", ray_head["address"], sub_id, env=env).stdout.lower()
        if any(s in status for s in ("succeeded", "failed", "stopped")):
            break
        time.sleep(5)
    logs = _ray("job", "logs", "--address", ray_head["address"], sub_id, env=env).stdout
    assert "succeeded" in status and "failed" not in status, f"{status}\n--- job logs ---\n{logs[-4000:]}"
    assert "registered:   models:/jobtest-model/1" in logs

    client = MlflowClient(mlflow_server.url)
    version = client.get_model_version_by_alias("jobtest-model", "challenger")
    assert version.version == "1"
    assert client.get_model_version_by_alias("jobtest-model", "champion").version == "1"
    # the logged model's files are objects in the bucket, under the server's artifact prefix
    keys = s3_keys(mlflow_server.s3_endpoint, mlflow_server.bucket, mlflow_server.prefix)
    assert any(k.endswith("model.safetensors") for k in keys), keys[:20]
    assert any(k.endswith("modules.json") for k in keys)
    # one parent run with the specialists as nested runs
    exp = client.get_experiment_by_name("jobtest")
    runs = client.search_runs([exp.experiment_id])
    parents = [x for x in runs if "mlflow.parentRunId" not in x.data.tags]
    children = [x for x in runs if "mlflow.parentRunId" in x.data.tags]
    assert len(parents) == 1 and len(children) == 2


def test_submission_without_token_is_refused(ray_head, tmp_path):
    env = dict(ray_head["env"], RAY_AUTH_MODE="disabled", HOME=str(tmp_path))  # no token sent
    env.pop("RAY_AUTH_TOKEN", None)
    r = _ray("job", "submit", "--address", ray_head["address"], "--no-wait", "--", "echo", "hi", env=env)
    assert r.returncode != 0
    out = (r.stdout + r.stderr).lower()
    assert "401" in out or "unauthorized" in out or "authentication" in out, out[-1500:]
