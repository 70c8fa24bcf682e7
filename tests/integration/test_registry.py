"""log_model / register / promote / resolve_model_uri against a real mlflow server (artifacts in S3)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from codiemb.config import config_from_dict
from codiemb.errors import ModelError, UserError
from codiemb.tracking.mlflow_run import start_run
from codiemb.tracking.registry import (CHALLENGER, CHAMPION, alias_version, gate_score, log_model, promote, register,
                                       resolve_model_uri)
from services import s3_keys

pytestmark = pytest.mark.integration

TEXTS = ["the cat sleeps in the house", "a man plays with a big dog", "protein risk study shows high effect", "sun"]


@pytest.fixture(scope="module")
def st_folders(tiny_model_dir, tmp_path_factory):
    """Two sentence-transformers folders (mean pooling over the tiny BERT); B is A with perturbed weights."""
    import torch
    from sentence_transformers import SentenceTransformer

    root = tmp_path_factory.mktemp("st")
    model = SentenceTransformer(str(tiny_model_dir), device="cpu")
    model.save(str(root / "a"))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    model.save(str(root / "b"))
    return {"a": root / "a", "b": root / "b"}


def _encode(folder) -> np.ndarray:
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(folder), device="cpu").encode(TEXTS, convert_to_numpy=True)


def _logged_run(url: str, experiment: str, folder: Path, **kw) -> str:
    cfg = config_from_dict({"run": {"name": "reg"}, "tracking": {"uri": url, "experiment": experiment},
                            "data": {"datasets": [{"name": "stsb", "task": "sts", "path": "sts/stsb/train.jsonl"}]}})
    with start_run(cfg) as run:
        log_model(folder, config=cfg, metrics={"stsb.spearman": 81.5, "scifact.ndcg@10": 60.25}, **kw)
        return run.run_id


def _client(url):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=url)


def test_log_register_alias_model_card_and_bucket(mlflow_tracking, mlflow_server, st_folders, tmp_path):
    url = mlflow_server.url
    run_id = _logged_run(url, "t-registry", st_folders["a"])
    version = register(run_id, "reg-basic")
    assert version == "1"
    assert alias_version("reg-basic", CHALLENGER) == "1"
    assert alias_version("reg-basic", CHAMPION) is None
    # idempotent: the same run registers as the same version (what `codiemb register RUN` relies on)
    assert register(run_id, "reg-basic") == "1"
    assert [v.version for v in _client(url).search_model_versions("name = 'reg-basic'")] == ["1"]

    root = Path(resolve_model_uri("models:/reg-basic@challenger", dst=tmp_path / "dl")).parent
    mlmodel = yaml.safe_load((root / "MLmodel").read_text())
    assert "sentence_transformers" in mlmodel["flavors"]
    assert json.loads(mlmodel["signature"]["inputs"]) == [{"type": "string", "required": True}]
    assert (root / "input_example.json").is_file()
    card = (root / "README.md").read_text()
    assert "| stsb.spearman | 81.5000 |" in card and "| scifact.ndcg@10 | 60.2500 |" in card
    assert "name: stsb, task: sts, path: sts/stsb/train.jsonl" in card
    assert "```yaml" in card and f"MLflow run: `{run_id}`" in card
    # the weights live in the S3 bucket behind the server
    mv = _client(url).get_model_version("reg-basic", "1")
    assert mv.run_id == run_id and mv.source.startswith("models:/m-")
    model_id = mv.source.split("/")[-1]
    keys = s3_keys(mlflow_server.s3_endpoint, mlflow_server.bucket, f"{mlflow_server.prefix}/")
    assert any(f"/models/{model_id}/artifacts/" in k and k.endswith("model.safetensors") for k in keys), keys


def test_gate_moves_champion_only_when_better_by_margin(mlflow_tracking, mlflow_server, st_folders):
    import mlflow

    url = mlflow_server.url
    name = "reg-gate"
    exp = "t-gate"
    cfg = config_from_dict({"tracking": {"uri": url, "experiment": exp}})
    # three versions from one run (three logged models), so the test logs each folder once
    with start_run(cfg) as run:
        for path in ("m1", "m2", "m3"):
            log_model(st_folders["a"], artifact_path=path)
        run_id = run.run_id
    scores = {"1": {"sts": 50.0, "ir": 40.0},            # mean 45.0
              "2": {"sts": 50.05, "ir": 40.07},          # mean 45.06: +0.06, not > 0.1
              "3": {"sts": 51.0, "ir": 40.5}}            # mean 45.75: +0.75
    calls: list[str] = []

    def score_fn(uri: str) -> dict[str, float]:
        calls.append(uri)
        return scores[uri.rsplit("/", 1)[1]]

    client = _client(url)
    assert register(run_id, name, "m1") == "1"
    first = promote(name, margin=0.1, score_fn=score_fn)
    assert first["promoted"] and first["decision"] == "promoted" and first["champion_version"] is None
    assert calls == [f"models:/{name}/1"]
    assert alias_version(name, CHAMPION) == "1"

    assert register(run_id, name, "m2") == "2"
    second = promote(name, margin=0.1, score_fn=score_fn)
    assert calls[1:] == [f"models:/{name}/2", f"models:/{name}/1"]
    assert not second["promoted"] and second["decision"] == "rejected"
    assert second["challenger_score"] == pytest.approx(45.06) and second["champion_score"] == pytest.approx(45.0)
    assert alias_version(name, CHAMPION) == "1" and alias_version(name, CHALLENGER) == "2"
    tags = client.get_model_version(name, "2").tags
    assert tags["gate.decision"] == "rejected" and tags["gate.champion_version"] == "1"
    assert float(tags["gate.challenger_score"]) == pytest.approx(45.06)
    assert float(tags["gate.champion_score"]) == pytest.approx(45.0)
    assert json.loads(tags["gate.scores"])["challenger"] == scores["2"]

    # the same gain passes a smaller margin; a larger gain passes the default one
    assert promote(name, version=2, margin=0.05, score_fn=score_fn)["promoted"]
    assert alias_version(name, CHAMPION) == "2"
    assert register(run_id, name, "m3") == "3"
    third = promote(name, score_fn=score_fn)  # challenger alias -> 3, margin 0.1
    assert third["promoted"] and third["champion_version"] == "2"
    assert third["challenger_score"] - third["champion_score"] == pytest.approx(45.75 - 45.06)
    assert alias_version(name, CHAMPION) == "3"
    assert client.get_model_version(name, "3").tags["gate.decision"] == "promoted"
    # promoting the champion again changes nothing and evaluates nothing
    n = len(calls)
    again = promote(name, version=3, score_fn=score_fn)
    assert again["decision"] == "unchanged" and len(calls) == n
    assert mlflow.search_runs(experiment_names=[exp], output_format="list")[0].info.run_id == run_id


def test_gate_score_reduction():
    assert gate_score({"a": 1.0, "b": 3.0}) == 2.0
    assert gate_score({"a": 1.0, "b": 3.0, "mean": 10.0}) == 10.0
    assert gate_score({"a": 1.0, "b": 3.0, "c": float("nan")}) == 2.0
    assert gate_score({"a": 1.0, "b": 3.0, "c": 9.0}, keys=["a", "b"]) == 2.0
    with pytest.raises(UserError):
        gate_score({})


def test_champion_in_a_new_process_encodes_like_the_saved_folder(mlflow_tracking, mlflow_server, st_folders,
                                                                  tmp_path):
    url = mlflow_server.url
    name = "reg-champion"
    run_id = _logged_run(url, "t-champion", st_folders["b"])
    register(run_id, name)
    promote(name, score_fn=lambda uri: {"sts": 1.0})
    script = (
        "import sys, numpy as np\n"
        "from sentence_transformers import SentenceTransformer\n"
        "import mlflow.pyfunc\n"
        "from codiemb.tracking.registry import resolve_model_uri\n"
        f"texts = {TEXTS!r}\n"
        f"path = resolve_model_uri('models:/{name}@champion')\n"
        "np.save(sys.argv[1], SentenceTransformer(path, device='cpu').encode(texts, convert_to_numpy=True))\n"
        f"np.save(sys.argv[2], mlflow.pyfunc.load_model('models:/{name}@champion').predict(texts))\n"
        "print(path)\n"
    )
    env = dict(os.environ, MLFLOW_TRACKING_URI=url, HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path / "st.npy"), str(tmp_path / "pyfunc.npy")],
                         env=env, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    resolved = Path(out.stdout.strip().splitlines()[-1])
    assert resolved != st_folders["b"] and (resolved / "modules.json").is_file()
    expected = _encode(st_folders["b"])
    assert not np.allclose(expected, _encode(st_folders["a"]), atol=1e-3)  # the two models really differ
    np.testing.assert_allclose(np.load(tmp_path / "st.npy"), expected, atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.load(tmp_path / "pyfunc.npy"), expected, atol=1e-5, rtol=0)


def test_pyfunc_flavor_keeps_the_folder_and_returns_embeddings(mlflow_tracking, mlflow_server, st_folders,
                                                               tmp_path):
    import mlflow.pyfunc
    import pandas as pd

    url = mlflow_server.url
    run_id = _logged_run(url, "t-pyfunc", st_folders["a"], flavor="pyfunc")
    path = Path(resolve_model_uri(f"runs:/{run_id}/model", dst=tmp_path / "dl"))

    def sha(p: Path) -> str:
        return hashlib.sha256(p.read_bytes()).hexdigest()

    src = st_folders["a"]
    assert sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()) == \
        sorted(p.relative_to(src).as_posix() for p in src.rglob("*") if p.is_file())
    assert sha(path / "model.safetensors") == sha(src / "model.safetensors")
    model = mlflow.pyfunc.load_model(f"runs:/{run_id}/model")
    expected = _encode(src)
    np.testing.assert_allclose(model.predict(pd.DataFrame({"text": TEXTS})), expected, atol=1e-5, rtol=0)
    np.testing.assert_allclose(model.predict(TEXTS), expected, atol=1e-5, rtol=0)
    assert model.metadata.signature.inputs.to_dict() == [{"type": "string", "required": True}]


def test_unknown_alias_is_one_clear_error(mlflow_tracking, tmp_path):
    with pytest.raises(ModelError) as err:
        resolve_model_uri("models:/no-such-model@champion", dst=tmp_path)
    assert "\n" not in str(err.value) and "no-such-model" in str(err.value)
    with pytest.raises(UserError, match="no 'challenger' alias"):
        promote("no-such-model", score_fn=lambda uri: {})
