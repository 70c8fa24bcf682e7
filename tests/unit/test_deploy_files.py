"""cluster.yaml passes Ray's own launcher validation; the KubeRay manifests have what KubeRay requires.

KubeRay's required fields come from its v1 API types (ray-project/kuberay,
ray-operator/apis/ray/v1/raycluster_types.go and rayjob_types.go: fields without ``omitempty``):
RayCluster ``spec.headGroupSpec.{template, rayStartParams}``; each worker group
``groupName, minReplicas, maxReplicas, rayStartParams, template``; plus the webhook rules
(unique group names, minReplicas <= replicas <= maxReplicas) and Kubernetes' own (a container
has a name and an image).
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
RAY_VERSION = "2.60.0"
# a credential assigned a literal value; placeholders (``...``, ``$VAR``, ``<x>``) are fine
SECRET_WORDS = re.compile(
    r"(AKIA[0-9A-Z]{16}|(secret_access_key|password|token)\s*[:=]\s*(?![.]{3}|\$|<|\{)[\"']?\w{4,})", re.I)


def _load(rel: str):
    return yaml.safe_load((REPO / rel).read_text())


# --------------------------------------------------------------------------- cluster.yaml
@pytest.fixture(scope="module")
def cluster():
    return _load("cluster.yaml")


def test_cluster_yaml_passes_ray_validation(cluster):
    jsonschema = pytest.importorskip("jsonschema")
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(copy.deepcopy(cluster))  # the schema ray/autoscaler/ray-schema.json + Ray's extra checks
    prepared = prepare_config(copy.deepcopy(cluster))  # what `ray up` does: merge AWS defaults, then validate
    validate_config(prepared)
    # the validator really rejects broken configs (so passing means something)
    broken = copy.deepcopy(cluster)
    broken["available_node_types"]["worker.gpu"]["min_workers"] = "zero"
    with pytest.raises(jsonschema.ValidationError):
        validate_config(broken)
    broken = copy.deepcopy(cluster)
    broken["not_a_launcher_field"] = 1
    with pytest.raises(jsonschema.ValidationError):
        validate_config(broken)
    broken = copy.deepcopy(cluster)
    broken["head_node_type"] = "nope"
    with pytest.raises(ValueError):
        validate_config(broken)


def test_cluster_yaml_shape(cluster):
    assert cluster["provider"]["type"] == "aws"
    assert cluster["docker"]["image"] == f"rayproject/ray:{RAY_VERSION}-gpu"
    types = cluster["available_node_types"]
    head = types[cluster["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0 and not head["node_config"]["InstanceType"].startswith(("g", "p"))
    gpu_types = [t for name, t in types.items() if name != cluster["head_node_type"] and t["resources"].get("GPU", 0) >= 1]
    assert gpu_types, "an autoscaling GPU worker type"
    for t in gpu_types:
        assert t["min_workers"] == 0 and t["max_workers"] >= 1
        assert t["max_workers"] <= cluster["max_workers"]
        assert t["node_config"]["InstanceType"].split(".")[0] in {"g5", "g6", "g6e", "p4d", "p5"}
    assert any("pip install" in c and "codiemb" in c for c in cluster["setup_commands"])
    assert any(target.endswith("codiemb") and src == "." for target, src in cluster["file_mounts"].items())
    starts = cluster["head_start_ray_commands"] + cluster["worker_start_ray_commands"]
    assert any("ray start --head" in c and "RAY_AUTH_MODE=token" in c for c in cluster["head_start_ray_commands"])
    assert any("ray start --address" in c and "RAY_AUTH_MODE=token" in c for c in cluster["worker_start_ray_commands"])
    assert all("--port=6379" in c or "--address" in c for c in starts if "ray start" in c)


# --------------------------------------------------------------------------- KubeRay
def _check_pod_template(template: dict, where: str, gpu: bool) -> None:
    containers = template["spec"]["containers"]
    assert containers, f"{where}: a pod needs containers"
    c = containers[0]
    assert c["name"] and c["image"] == f"rayproject/ray:{RAY_VERSION}-gpu", where
    res = c["resources"]
    assert res["limits"]["cpu"] and res["limits"]["memory"], where
    if gpu:
        assert int(res["limits"]["nvidia.com/gpu"]) >= 1, f"{where}: GPU limit"
    else:
        assert "nvidia.com/gpu" not in res.get("limits", {}), where
    env = {e["name"]: e for e in c.get("env", [])}
    assert env["RAY_AUTH_MODE"]["value"] == "token", where
    assert "secretKeyRef" in env["RAY_AUTH_TOKEN"]["valueFrom"], f"{where}: token from a Secret"
    for e in c.get("env", []):  # credentials only via Secrets: no literal value for a credential-like name
        if re.search(r"SECRET|PASSWORD|TOKEN|ACCESS_KEY", e["name"]) and e["name"] != "RAY_AUTH_MODE":
            assert "value" not in e and "valueFrom" in e, f"{where}: {e['name']} must come from a Secret"


def _check_cluster_spec(spec: dict, where: str) -> None:
    assert spec["rayVersion"] == RAY_VERSION
    assert spec["enableInTreeAutoscaling"] is True
    head = spec["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict), f"{where}: headGroupSpec.rayStartParams is required"
    assert all(isinstance(v, str) for v in head["rayStartParams"].values()), "rayStartParams values are strings"
    _check_pod_template(head["template"], f"{where}.headGroupSpec", gpu=False)
    groups = spec["workerGroupSpecs"]
    names = [g["groupName"] for g in groups]
    assert len(names) == len(set(names)) and all(names)
    for g in groups:
        w = f"{where}.workerGroupSpecs[{g['groupName']}]"
        for field in ("groupName", "minReplicas", "maxReplicas", "rayStartParams", "template"):
            assert field in g, f"{w}: {field} is required"
        assert 0 <= g["minReplicas"] <= g.get("replicas", g["minReplicas"]) <= g["maxReplicas"], w
        assert g["minReplicas"] == 0 and g["maxReplicas"] >= 1, f"{w}: autoscaling from zero"
        _check_pod_template(g["template"], w, gpu=True)


def test_raycluster_manifest():
    doc = _load("infra/kuberay/raycluster.yaml")
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayCluster"
    assert doc["metadata"]["name"]
    _check_cluster_spec(doc["spec"], "RayCluster.spec")


def test_rayjob_manifest():
    doc = _load("infra/kuberay/rayjob.yaml")
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayJob"
    spec = doc["spec"]
    assert re.fullmatch(r"python jobs/pipeline\.py --config \S+\.yaml", spec["entrypoint"])
    config = spec["entrypoint"].split("--config ")[1]
    assert (REPO / config).is_file() or config.startswith("configs/"), config
    assert spec["shutdownAfterJobFinishes"] is True
    assert yaml.safe_load(spec["runtimeEnvYAML"])["working_dir"]
    _check_cluster_spec(spec["rayClusterSpec"], "RayJob.spec.rayClusterSpec")
    submitter = spec["submitterPodTemplate"]["spec"]["containers"][0]
    assert {e["name"] for e in submitter["env"]} >= {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"}


def test_deploy_files_hold_no_literal_credentials():
    files = [REPO / "cluster.yaml", *sorted((REPO / "infra").rglob("*")), ]
    texts = {p: p.read_text() for p in files if p.is_file()}
    assert len(texts) >= 6
    # the detector itself: literals are caught, placeholders are not
    assert SECRET_WORDS.search("AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMI") and SECRET_WORDS.search("password: hunter22")
    assert SECRET_WORDS.search("key: AKIAIOSFODNN7EXAMPLE")
    assert not SECRET_WORDS.search("PASSWORD=... token=$(openssl rand -hex 32) password: ${PW}")
    for path, text in texts.items():
        assert not SECRET_WORDS.search(text), f"{path} holds a literal credential"


def test_mlflow_server_script_uses_a_database_and_s3():
    script = (REPO / "infra/mlflow/start_server.sh").read_text()
    assert "--backend-store-uri" in script and "--artifacts-destination" in script
    assert "MLFLOW_BACKEND_STORE_URI:?" in script  # required from the environment, not hard-coded
    readme = (REPO / "infra/mlflow/README.md").read_text()
    assert "postgresql://" in readme and "s3://" in readme
