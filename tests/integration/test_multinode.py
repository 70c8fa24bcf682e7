"""Multi-node: a 2-node Ray cluster on this machine, one training worker on each node.

The cluster is two ``ray start --block`` processes on 127.0.0.1 with token auth (a fresh token in
``RAY_AUTH_TOKEN``, shared by both nodes and the driver): a head (``--resources {"node_a": 1,
"train_slot": 1}``) and a second node joined with ``ray start --address`` (``{"node_b": 1,
"train_slot": 1}``), 2 CPUs each. The workers ask for ``{CPU: 1, train_slot: 1}``: the cluster has
two slots, one per node, so Ray must place one worker on each node, and each node keeps a CPU for
Ray Data. The driver runs ``train_on_ray`` in a subprocess connected with
``ray.init(address=...)``, so the test process's own Ray (``ray_local``) is neither used nor shut
down. The train summary records the Ray node id of each rank (``ranks``).

Clean-up: SIGTERM to each ``ray start --block`` process group and to every process of the two
trees (by pid), SIGKILL to those alive after 10 s (``ray stop`` would stop every Ray on the machine,
other people's included).
"""

from __future__ import annotations

import json
import math
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from services import free_port, write_tiny_pairs

pytestmark = pytest.mark.integration

VENV_BIN = Path(sys.executable).parent
NODE_CPUS = 2


def _tree(pid: int) -> list:
    import psutil

    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _wait_for_line(proc: subprocess.Popen, log: Path, text: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = log.read_text(errors="replace") if log.exists() else ""
        if text in out:
            return
        if proc.poll() is not None:
            break
        time.sleep(0.5)
    out = log.read_text(errors="replace") if log.exists() else ""
    raise RuntimeError(f"`ray start` did not print {text!r} (exit {proc.poll()}):\n{out[-3000:]}")


@pytest.fixture
def two_node_cluster():
    """Yields ``{"address", "env", "temp"}`` for a head + one worker node, both on 127.0.0.1."""
    import psutil

    temp = Path(tempfile.mkdtemp(prefix="rmn", dir="/tmp"))  # short: Ray's unix socket paths are limited
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32),
               PATH=f"{VENV_BIN}:{os.environ.get('PATH', '')}", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               CODIEMB_NO_PROGRESS="1", RAY_USAGE_STATS_ENABLED="0")
    for k in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH", "RAY_JOB_ID", "OMP_NUM_THREADS"):
        env.pop(k, None)
    gcs = free_port()
    address = f"127.0.0.1:{gcs}"
    common = ["--block", "--node-ip-address", "127.0.0.1", "--num-cpus", str(NODE_CPUS), "--num-gpus", "0",
              "--disable-usage-stats"]
    procs: list[subprocess.Popen] = []
    pids: dict[int, object] = {}

    def start(name: str, args: list[str]) -> None:
        log = temp / f"{name}.log"
        with open(log, "wb") as fh:  # a file, not a pipe: a full pipe would block Ray
            proc = subprocess.Popen([str(VENV_BIN / "ray"), "start", *args, *common], env=env, stdout=fh,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(proc)
        _wait_for_line(proc, log, "Ray runtime started", timeout=90)

    try:
        start("head", ["--head", "--port", str(gcs), "--temp-dir", str(temp), "--include-dashboard", "false",
                       "--resources", json.dumps({"node_a": 1, "train_slot": 1})])
        start("node_b", ["--address", address, "--resources", json.dumps({"node_b": 1, "train_slot": 1})])
        yield {"address": address, "env": env, "temp": temp}
    finally:
        for proc in procs:  # every process of both trees, remembered before any of them stops
            for p in _tree(proc.pid):
                pids[p.pid] = p
        for proc in procs:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for p in pids.values():  # processes that left the process group get SIGTERM too
            try:
                p.terminate()
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(list(pids.values()), timeout=10)
        for p in alive:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=10)
        for proc in procs:
            proc.wait(timeout=10)
        shutil.rmtree(temp, ignore_errors=True)


def _write_config(tmp_path: Path, model_dir: Path) -> Path:
    ret, sts = write_tiny_pairs(tmp_path, 32, 32)
    cfg = tmp_path / "multinode.yaml"
    cfg.write_text(f"""
run: {{name: multinode, seed: 0}}
model: {{name: {model_dir}, max_length: {{query: 16, passage: 16, sts: 16}}}}
data:
  datasets:
    - {{name: ret, task: retrieval, path: {ret}, batch_size: 4}}
    - {{name: sts, task: sts, path: {sts}, score_range: [0, 5], batch_size: 4}}
loss: {{retrieval: {{negatives: 1}}, sts: {{mid_nce: 0.0}}}}
train: {{epochs: 1, lr: 1.0e-3, checkpoint_every: 0, log_every: 1}}
scaling: {{num_workers: 2, resources_per_worker: {{CPU: 1, train_slot: 1}}}}
storage: {{path: {tmp_path / 'storage'}}}
tracking: {{enabled: false}}
""")
    return cfg


DRIVER = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path

    import ray
    from codiemb.config import load_config
    from codiemb.train.ray_trainer import train_on_ray

    address, config, out = sys.argv[1:4]
    ray.init(address=address, log_to_driver=False)
    deadline = time.monotonic() + 60
    while len([n for n in ray.nodes() if n["Alive"]]) < 2:  # the second node may still be registering
        if time.monotonic() > deadline:
            raise SystemExit(f"cluster has {len(ray.nodes())} nodes, expected 2")
        time.sleep(0.5)
    nodes = {n["NodeID"]: sorted(k for k in n["Resources"] if k.startswith("node_"))
             for n in ray.nodes() if n["Alive"]}
    result = train_on_ray(load_config(config), resume=False)
    summary = json.loads((Path(result.output_dir) / "train_summary.json").read_text())
    json.dump({"nodes": nodes, "summary": summary}, open(out, "w"))
""")


def test_two_nodes_one_worker_each(two_node_cluster, tmp_path, tiny_model_dir):
    cfg = _write_config(tmp_path, tiny_model_dir)
    out = tmp_path / "driver_out.json"
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    r = subprocess.run([sys.executable, str(driver), two_node_cluster["address"], str(cfg), str(out)],
                       env=two_node_cluster["env"], cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout[-3000:] + "\n" + r.stderr[-5000:]
    got = json.loads(out.read_text())

    # the cluster: two alive nodes, the head with node_a and the joined one with node_b
    nodes = got["nodes"]
    assert sorted(nodes.values()) == [["node_a"], ["node_b"]], nodes
    summary = got["summary"]
    # one rank on each node
    ranks = sorted(summary["ranks"], key=lambda p: p["rank"])
    assert [p["rank"] for p in ranks] == [0, 1]
    assert {p["node_id"] for p in ranks} == set(nodes), (ranks, nodes)
    assert ranks[0]["node_id"] != ranks[1]["node_id"]
    assert all(p["torch_threads"] == 1 for p in ranks)  # Ray sets OMP_NUM_THREADS from CPU: 1
    # the planned steps ran: each worker holds 16 rows of each task (equal split of 32) in batches
    # of 4 -> 4 retrieval + 4 STS steps
    assert summary["planned_steps_per_task"] == {"ret": 4, "sts": 4}
    assert summary["steps_per_task"] == summary["planned_steps_per_task"]
    assert summary["steps"] == 8
    # the loss is finite at every logged step, and negatives were gathered from both workers
    lines = [json.loads(x) for x in (Path(summary["output_dir"]) / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == list(range(1, 9))
    losses = [v for x in lines for k, v in x.items() if k.startswith("loss/")]
    assert len(losses) == 8 and all(math.isfinite(v) for v in losses)
    assert all(math.isfinite(v) for v in summary["final_losses"].values())
    neg = {x["retrieval/negatives_per_query"] for x in lines if "retrieval/negatives_per_query" in x}
    assert neg == {4 * 2 * (1 + 1) - 1}  # 4 queries x 2 workers x (1 positive + 1 negative) - own positive
    assert (Path(summary["model_dir"]) / "modules.json").is_file()
