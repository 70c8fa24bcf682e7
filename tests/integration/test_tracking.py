"""start_run against a real mlflow server whose artifacts live in moto's S3."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

import codiemb
from codiemb.config import Config, config_from_dict
from codiemb.errors import UserError
from codiemb.tracking.mlflow_run import loss_curve_png, start_run
from services import s3_keys, s3_read

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def _cfg(uri: str, experiment: str, **extra) -> Config:
    tree = {"run": {"name": "trk"}, "tracking": {"uri": uri, "experiment": experiment},
            "train": {"lr": 3e-5, "epochs": 2}}
    tree.update(extra)
    return config_from_dict(tree)


def _client(uri):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def test_run_params_metrics_artifacts_land_in_server_and_bucket(mlflow_tracking, mlflow_server, tmp_path):
    cfg = _cfg(mlflow_server.url, "t-tracking")
    history = {"sts": [(1, 2.0), (2, 1.5), (3, 1.0)], "retrieval": [(1, 3.0), (3, 2.5)]}
    with start_run(cfg) as run:
        assert run.log_metrics({"loss": 2.0, "lr": 1e-5}, step=1)
        assert run.log_metrics({"loss": 1.25}, step=2)
        png = loss_curve_png(history, tmp_path / "loss.png")
        assert run.log_artifact(png, "plots")
        run_id = run.run_id

    client = _client(mlflow_server.url)
    got = client.get_run(run_id)
    assert got.info.status == "FINISHED"
    assert got.info.run_name == "trk"
    params = got.data.params
    # the resolved config, flattened with dotted keys, values as text
    assert params["train.lr"] == "3e-05" and params["train.epochs"] == "2.0"
    assert params["run.name"] == "trk" and params["tracking.experiment"] == "t-tracking"
    assert params["data.datasets"] == "[]" and params["model.max_length.query"] == "64"
    assert set(params) == set(cfg.flat())
    # tags: package version and the commit of this checkout
    sha = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert got.data.tags["codiemb.version"] == codiemb.__version__
    assert got.data.tags["mlflow.source.git.commit"] == sha
    # metrics with steps
    hist = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "loss"))
    assert hist == [(1, 2.0), (2, 1.25)]
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "lr")] == [(1, 1e-5)]
    # artifacts: config.yaml round-trips to the same config; the plot is a PNG
    local = Path(client.download_artifacts(run_id, "config.yaml", str(tmp_path / "dl")))
    assert config_from_dict(yaml.safe_load(local.read_text())) == cfg
    png_remote = Path(client.download_artifacts(run_id, "plots/loss.png", str(tmp_path / "dl2")))
    assert png_remote.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png_remote.read_bytes() == png.read_bytes()
    # ... and they are objects in the S3 bucket behind the server
    keys = s3_keys(mlflow_server.s3_endpoint, mlflow_server.bucket, f"{mlflow_server.prefix}/")
    assert any(k.endswith(f"/{run_id}/artifacts/config.yaml") for k in keys), keys
    png_key = next(k for k in keys if k.endswith(f"/{run_id}/artifacts/plots/loss.png"))
    assert s3_read(mlflow_server.s3_endpoint, mlflow_server.bucket, png_key) == png.read_bytes()


def test_resume_continues_the_same_run(mlflow_tracking, mlflow_server):
    import mlflow

    cfg = _cfg(mlflow_server.url, "t-resume")
    with start_run(cfg) as run:
        run.log_metrics({"loss": 1.0}, step=1)
        run_id = run.run_id
    with start_run(cfg, run_id=run_id) as run:
        assert run.run_id == run_id
        run.log_metrics({"loss": 0.5}, step=2)

    client = _client(mlflow_server.url)
    exp = client.get_experiment_by_name("t-resume")
    runs = mlflow.search_runs([exp.experiment_id], output_format="list")
    assert [r.info.run_id for r in runs] == [run_id]
    assert sorted((m.step, m.value) for m in client.get_metric_history(run_id, "loss")) == [(1, 1.0), (2, 0.5)]
    assert client.get_run(run_id).info.status == "FINISHED"

    with pytest.raises(UserError, match="cannot open run") as err:
        with start_run(cfg, run_id="0" * 32):
            pass
    assert "\n" not in str(err.value)


def test_a_failing_block_marks_the_run_failed(mlflow_tracking, mlflow_server):
    cfg = _cfg(mlflow_server.url, "t-failed")
    with pytest.raises(RuntimeError, match="boom"):
        with start_run(cfg) as run:
            run_id = run.run_id
            raise RuntimeError("boom")
    assert _client(mlflow_server.url).get_run(run_id).info.status == "FAILED"


def test_no_credential_reaches_params_tags_metrics_or_artifacts(mlflow_tracking, mlflow_server, monkeypatch,
                                                                 tmp_path):
    aws_secret = "SeCr3t-aws-0123456789abcdefXYZ"
    mlflow_password = "pw-Mlflow-98765-qwerty"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", aws_secret)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", mlflow_password)
    secrets = [aws_secret, mlflow_password]
    # the config itself carries a credential in a URI; callers pass more in params, tags and text
    cfg = _cfg(mlflow_server.url, "t-secrets",
               storage={"path": "s3://bucket/runs", "endpoint_url": f"http://alice:{mlflow_password}@127.0.0.1:9000"})
    with start_run(cfg, tags={"hf_token": "hf_abcdefgh12345678", "note": f"key={aws_secret}"}) as run:
        run.log_params({"aws_secret_access_key": aws_secret, "upload": f"s3://alice:{mlflow_password}@h/x"})
        run.log_metrics({"loss": 1.0}, step=1)
        run.log_text(f"debug: password {mlflow_password} and {aws_secret}\n", "notes/debug.txt")
        run_id = run.run_id

    client = _client(mlflow_server.url)
    got = client.get_run(run_id)
    texts = [*got.data.params, *got.data.params.values(), *got.data.tags, *got.data.tags.values(),
             *got.data.metrics]
    root = Path(client.download_artifacts(run_id, "", str(tmp_path / "all")))
    files = [p for p in root.rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"config.yaml", "debug.txt"}
    texts += [p.read_text(errors="replace") for p in files]
    # everything the server stored for this run in the bucket, byte for byte
    keys = [k for k in s3_keys(mlflow_server.s3_endpoint, mlflow_server.bucket, f"{mlflow_server.prefix}/")
            if f"/{run_id}/" in k]
    assert keys
    texts += [s3_read(mlflow_server.s3_endpoint, mlflow_server.bucket, k).decode(errors="replace") for k in keys]
    for secret in secrets:
        assert not [t for t in texts if secret in t], f"secret leaked: {secret}"
    # the values were logged, masked (not silently absent)
    assert got.data.params["storage.endpoint_url"] == "http://***@127.0.0.1:9000"
    assert got.data.params["aws_secret_access_key"] == "***"
    assert got.data.params["upload"] == "s3://***@h/x"
    assert got.data.tags["hf_token"] == "***" and got.data.tags["note"] == "key=***"
    assert "debug: password *** and ***" in (root / "notes" / "debug.txt").read_text()
