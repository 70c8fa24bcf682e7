"""cluster.yaml passes Ray's own launcher validation; the KubeRay manifests have what KubeRay requires;
every deployment file is secure by default.

Secure by default, checked on the parsed YAML and on what the scripts really do: the MLflow
server runs ``--app-name basic-auth`` with every secret (database URIs, admin password, CSRF key)
from the environment or a Kubernetes Secret, never on a command line (``start_server.sh`` is run
with a stub ``mlflow`` that records its argv, environment and the rendered ``basic_auth.ini``); the
clients (every Ray pod) sign in with ``MLFLOW_TRACKING_USERNAME/PASSWORD`` from a Secret; S3
credentials come from each pod's / node's AWS chain (ServiceAccount, instance profile), never
from a literal; the local stack binds 127.0.0.1. tests/integration/test_mlflow_auth.py starts
the real servers.

KubeRay's required fields come from its v1 API types (ray-project/kuberay,
ray-operator/apis/ray/v1/raycluster_types.go and rayjob_types.go: fields without ``omitempty``):
RayCluster ``spec.headGroupSpec.{template, rayStartParams}``; each worker group
``groupName, minReplicas, maxReplicas, rayStartParams, template``; plus the webhook rules
(unique group names, minReplicas <= replicas <= maxReplicas) and Kubernetes' own (a container
has a name and an image).
"""

from __future__ import annotations

import configparser
import copy
import os
import re
import stat
import subprocess
import textwrap
from pathlib import Path
from urllib.parse import urlsplit

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
    # Ray has no public validator for launcher configs: this is the one `ray up` runs, from a private
    # module. No skip on purpose: if Ray moves or changes it, this test must fail, not go quiet.
    import jsonschema  # ray[default] depends on it; validate_config raises its errors
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
    # MLflow runs with login on: every Ray pod (driver, Train workers, Tune trials) signs in with
    # the login from a Secret, which the MLflow client reads from the environment
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        assert "secretKeyRef" in env[name]["valueFrom"], f"{where}: {name} from a Secret"
    # S3 from the standard AWS chain on each pod: a ServiceAccount for IRSA / workload identity,
    # and at most an optional Secret with static keys; never a key in the manifest
    assert template["spec"]["serviceAccountName"], f"{where}: a ServiceAccount for S3 (IRSA)"
    for src in c.get("envFrom", []):
        assert set(src) == {"secretRef"}, f"{where}: envFrom only from Secrets"
    assert not any(e["name"].startswith("AWS_") and "value" in e for e in c.get("env", [])), where


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
    m = re.fullmatch(r"python jobs/pipeline\.py --config (\S+\.yaml) --set tracking\.uri=(https?://\S+)",
                     spec["entrypoint"])
    assert m, spec["entrypoint"]
    config, uri = m.groups()
    assert (REPO / config).is_file() or config.startswith("configs/"), config
    # the RayJob's cluster is deleted after the job: it must log to the server, not a SQLite file on the head
    assert urlsplit(uri).netloc in _mlflow_allowed_hosts(), f"{uri}: not a host the MLflow server accepts"
    assert spec["shutdownAfterJobFinishes"] is True
    assert yaml.safe_load(spec["runtimeEnvYAML"])["working_dir"]
    _check_cluster_spec(spec["rayClusterSpec"], "RayJob.spec.rayClusterSpec")
    submitter = spec["submitterPodTemplate"]["spec"]["containers"][0]
    assert {e["name"] for e in submitter["env"]} >= {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"}
    # the submitter only runs `ray job submit`: it gets the Ray token and nothing else
    assert not [e["name"] for e in submitter["env"] if e["name"].startswith(("MLFLOW_", "AWS_"))]
    assert "envFrom" not in submitter


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


# --------------------------------------------------------------------------- MLflow server
SERVER_SCRIPT = REPO / "infra/mlflow/start_server.sh"
# what a deployment's Secret holds; a '%' (URL-encoded password) and '&' are the awkward characters
SERVER_SECRETS = {
    "MLFLOW_BACKEND_STORE_URI": "postgresql://mlflow:db%40Pass&word1@db.internal:5432/mlflow",
    "MLFLOW_AUTH_DATABASE_URI": "postgresql://auth:authDB%25pw-77@db.internal:5432/mlflow_auth",
    "MLFLOW_AUTH_ADMIN_PASSWORD": "admin-Pw%&-9f3e1c",
    "MLFLOW_FLASK_SERVER_SECRET_KEY": "csrf-7d2a9c41e0",
}


def _stub(path: Path, body: str) -> Path:
    path.write_text("#!/usr/bin/env bash\n" + textwrap.dedent(body))
    path.chmod(0o755)
    return path


def _run_server_script(tmp_path: Path, **env_over: str) -> tuple[subprocess.CompletedProcess, Path]:
    """start_server.sh with a stub `mlflow` that records its argv, its environment and the auth config."""
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    mlflow = _stub(tmp_path / "mlflow", f"""
        printf '%s\\n' "$@" > {out}/argv
        env -0 > {out}/environ
        cp "$MLFLOW_AUTH_CONFIG_PATH" {out}/basic_auth.ini
        stat -c '%a' "$MLFLOW_AUTH_CONFIG_PATH" > {out}/mode
        stat -c '%a' "$(dirname "$MLFLOW_AUTH_CONFIG_PATH")" > {out}/dirmode
        echo "$MLFLOW_AUTH_CONFIG_PATH" > {out}/config_path
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(SERVER_SECRETS, MLFLOW_AUTH_ADMIN_USERNAME="admin", MLFLOW_ARTIFACTS_DESTINATION="s3://bucket/mlflow",
               MLFLOW_BIN=str(mlflow), MLFLOW_AUTH_CONFIG_DIR=str(tmp_path / "auth"))
    env.update(env_over)
    env = {k: v for k, v in env.items() if v is not None and v != "<unset>"}
    proc = subprocess.run(["bash", str(SERVER_SCRIPT)], env=env, capture_output=True, text=True, timeout=60)
    return proc, out


def _environ(out: Path) -> dict[str, str]:
    items = (out / "environ").read_bytes().split(b"\0")
    return dict(i.decode().split("=", 1) for i in items if b"=" in i)


def test_mlflow_server_script_requires_login_and_keeps_secrets_off_the_command_line(tmp_path):
    proc, out = _run_server_script(tmp_path)
    assert proc.returncode == 0, proc.stderr
    argv = (out / "argv").read_text().splitlines()
    assert argv[0] == "server"
    assert argv[argv.index("--app-name") + 1] == "basic-auth"  # login required
    assert argv[argv.index("--host") + 1] == "127.0.0.1"       # loopback unless told otherwise
    assert argv[argv.index("--artifacts-destination") + 1] == "s3://bucket/mlflow"
    assert "--backend-store-uri" not in argv and "--default-artifact-root" not in argv
    joined = "\n".join(argv) + proc.stdout + proc.stderr        # neither `ps` nor the log shows a secret
    for secret in SERVER_SECRETS.values():
        assert secret not in joined and secret.split("@")[0] not in joined
    env = _environ(out)
    # `mlflow server` reads the backend URI from the environment (click envvar MLFLOW_BACKEND_STORE_URI)
    assert env["MLFLOW_BACKEND_STORE_URI"] == SERVER_SECRETS["MLFLOW_BACKEND_STORE_URI"]
    assert env["MLFLOW_AUTH_ADMIN_USERNAME"] == "admin"
    assert env["MLFLOW_AUTH_ADMIN_PASSWORD"] == SERVER_SECRETS["MLFLOW_AUTH_ADMIN_PASSWORD"]
    assert env["MLFLOW_FLASK_SERVER_SECRET_KEY"] == SERVER_SECRETS["MLFLOW_FLASK_SERVER_SECRET_KEY"]
    assert "MLFLOW_AUTH_DATABASE_URI" not in env  # it lives in the private config file only
    # the rendered basic_auth.ini: readable by its owner only, in a folder of its own
    assert (out / "mode").read_text().strip() == "600" and (out / "dirmode").read_text().strip() == "700"
    config_path = Path((out / "config_path").read_text().strip())
    assert config_path.parent.parent == tmp_path / "auth"
    assert env["MLFLOW_AUTH_CONFIG_PATH"] == str(config_path)
    ini = configparser.ConfigParser()  # as MLflow reads it: '%' interpolation on
    ini.read(out / "basic_auth.ini")
    assert ini["mlflow"]["database_uri"] == SERVER_SECRETS["MLFLOW_AUTH_DATABASE_URI"]
    assert ini["mlflow"]["default_permission"] in {"READ", "NO_PERMISSIONS"}
    assert "admin_password" not in ini["mlflow"]  # the admin login comes from the environment


def test_rendered_auth_config_reads_the_same_in_mlflow(tmp_path, monkeypatch):
    """MLflow's own reader of the auth config (the one the basic-auth app calls) sees what we meant."""
    from mlflow.server.auth.config import read_auth_config

    proc, out = _run_server_script(tmp_path)
    assert proc.returncode == 0, proc.stderr
    monkeypatch.setenv("MLFLOW_AUTH_CONFIG_PATH", str(out / "basic_auth.ini"))
    monkeypatch.setenv("MLFLOW_AUTH_ADMIN_USERNAME", "admin")
    monkeypatch.setenv("MLFLOW_AUTH_ADMIN_PASSWORD", SERVER_SECRETS["MLFLOW_AUTH_ADMIN_PASSWORD"])
    cfg = read_auth_config()
    assert cfg.database_uri == SERVER_SECRETS["MLFLOW_AUTH_DATABASE_URI"]
    assert cfg.admin_username == "admin" and cfg.admin_password == SERVER_SECRETS["MLFLOW_AUTH_ADMIN_PASSWORD"]
    assert cfg.authorization_function == "mlflow.server.auth:authenticate_request_basic_auth"


@pytest.mark.parametrize("missing", ["MLFLOW_BACKEND_STORE_URI", "MLFLOW_AUTH_DATABASE_URI", "MLFLOW_AUTH_ADMIN_USERNAME",
                                     "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY",
                                     "MLFLOW_ARTIFACTS_DESTINATION"])
def test_mlflow_server_script_refuses_to_start_without_a_secret(tmp_path, missing):
    proc, out = _run_server_script(tmp_path, **{missing: "<unset>"})
    assert proc.returncode != 0 and missing in proc.stderr
    assert not (out / "argv").exists()  # the server was never started


def test_mlflow_server_script_rejects_a_multiline_auth_uri(tmp_path):
    proc, out = _run_server_script(tmp_path, MLFLOW_AUTH_DATABASE_URI="sqlite:///a.db\nadmin_password = x")
    assert proc.returncode != 0 and not (out / "argv").exists()


def test_mlflow_db_upgrade_reads_the_uri_in_process(tmp_path):
    python = _stub(tmp_path / "python", f"""
        printf '%s\\n' "$@" > {tmp_path}/python_argv
        cat > {tmp_path}/python_stdin
    """)
    proc, out = _run_server_script(tmp_path, MLFLOW_DB_UPGRADE="1", MLFLOW_PYTHON=str(python))
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "python_argv").read_text().split() == ["-"]  # the program comes on stdin
    code = (tmp_path / "python_stdin").read_text()
    assert 'os.environ["MLFLOW_BACKEND_STORE_URI"]' in code and '"db", "upgrade"' in code
    assert "postgresql://" not in code


def _k8s_docs(rel: str) -> dict[str, dict]:
    return {d["kind"]: d for d in yaml.safe_load_all((REPO / rel).read_text()) if d}


def _mlflow_allowed_hosts() -> set[str]:
    dep = _k8s_docs("infra/mlflow/kubernetes.yaml")["Deployment"]
    env = {e["name"]: e for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}
    return set(env["MLFLOW_ALLOWED_HOSTS"]["value"].split(","))


def test_mlflow_kubernetes_manifest():
    docs = _k8s_docs("infra/mlflow/kubernetes.yaml")
    dep, svc = docs["Deployment"], docs["Service"]
    assert dep["apiVersion"] == "apps/v1" and svc["apiVersion"] == "v1"
    pod = dep["spec"]["template"]["spec"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    assert svc["spec"]["selector"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    (c,) = pod["containers"]
    # it runs the script the tests above check (login on, secrets off the command line), from a ConfigMap
    assert c["command"][-1].endswith("/start_server.sh") and "args" not in c
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    script_dir = c["command"][-1].rsplit("/", 1)[0]
    files = next(n for n, m in mounts.items() if m["mountPath"] == script_dir)
    assert "configMap" in volumes[files] and mounts[files].get("readOnly") is True
    assert not any(re.search(r"--backend-store-uri|://", x) for x in c["command"])
    env = {e["name"]: e for e in c["env"]}
    for name in ("MLFLOW_BACKEND_STORE_URI", "MLFLOW_AUTH_DATABASE_URI", "MLFLOW_AUTH_ADMIN_USERNAME",
                 "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"):
        assert "value" not in env[name] and "secretKeyRef" in env[name]["valueFrom"], f"{name} from a Secret"
    for e in c["env"]:
        if re.search(r"SECRET|PASSWORD|TOKEN|ACCESS_KEY|_URI$", e["name"]):
            assert "value" not in e, f"{e['name']} must come from a Secret"
    # the rendered auth config goes to memory, not to the image or a disk
    auth_dir = env["MLFLOW_AUTH_CONFIG_DIR"]["value"]
    auth_vol = next(n for n, m in mounts.items() if m["mountPath"] == auth_dir)
    assert volumes[auth_vol]["emptyDir"]["medium"] == "Memory"
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["serviceAccountName"]  # S3 through IRSA / workload identity
    assert env["MLFLOW_ARTIFACTS_DESTINATION"]["value"].startswith("s3://")
    for probe in ("readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"]["path"] == "/health"  # the one route basic-auth leaves open
    port = env["MLFLOW_PORT"]["value"]
    assert any(str(p["containerPort"]) == port for p in c["ports"])
    assert any(str(p["port"]) == port for p in svc["spec"]["ports"])
    assert f"{svc['metadata']['name']}.mlflow.svc:{port}" in _mlflow_allowed_hosts()


# --------------------------------------------------------------------------- cluster launcher, local stack
def test_cluster_yaml_gives_nodes_an_mlflow_login_file_and_no_keys(cluster):
    mounts = cluster["file_mounts"]
    assert mounts["/home/ray/.mlflow/credentials"] == "~/.mlflow/credentials"  # MLflow's own credentials file
    assert any("chmod 600" in c and "/home/ray/.mlflow/credentials" in c for c in cluster["setup_commands"])
    for name, t in cluster["available_node_types"].items():  # S3 from the instance profile (AWS chain)
        assert t["node_config"]["IamInstanceProfile"]["Name"], name
    text = yaml.safe_dump(cluster)
    assert not re.search(r"MLFLOW_TRACKING_PASSWORD|AWS_SECRET_ACCESS_KEY|runtime_env", text)


def test_local_stack_binds_loopback_and_uses_the_server_script():
    script = (REPO / "infra/local/start_stack.sh").read_text()
    assert "infra/mlflow/start_server.sh" in script and "MLFLOW_HOST=127.0.0.1" in script
    assert "--dashboard-host=0.0.0.0" not in script and "--dashboard-host=127.0.0.1" in script
    assert "--node-ip-address=127.0.0.1" in script
    # the shell that evals --env gets the password by reading the file, never printed
    assert """export MLFLOW_TRACKING_PASSWORD="$(cat %q)\"""" in script


def test_no_mlflow_server_on_all_interfaces_outside_kubernetes():
    """Every place that starts `mlflow server|ui` binds loopback; only the pod binds 0.0.0.0 (behind login)."""
    hits = []
    for path in [*REPO.glob("infra/**/*"), *REPO.glob("platform/**/*.py"), *REPO.glob("jobs/*.py"),
                 *REPO.glob("tests/**/*.py"), REPO / "README.md", REPO / "cluster.yaml"]:
        if not path.is_file() or path == Path(__file__).resolve():
            continue
        for line in path.read_text(errors="replace").splitlines():
            if re.search(r"mlflow\"?,?\s+\"?(server|ui)\b", line) and re.search(r"0\.0\.0\.0", line):
                hits.append(f"{path.relative_to(REPO)}: {line.strip()}")
    assert not hits, hits
    k8s = _k8s_docs("infra/mlflow/kubernetes.yaml")["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    assert {e["name"]: e.get("value") for e in k8s["env"]}["MLFLOW_HOST"] == "0.0.0.0"
