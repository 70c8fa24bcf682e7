"""The MLflow server as infra/ deploys it, for real: ``infra/mlflow/start_server.sh`` (login on,
secrets only in the environment) and ``infra/local/start_stack.sh`` (the same script on loopback).

Shown here: the server listens on 127.0.0.1 only; a request without credentials (or with a wrong
password) is refused with 401 and ``/health`` stays open; no process of the server has a password
or a database URI on its command line; the admin creates a user with MLflow's public auth client,
and codiemb's ``start_run``, with that user's login taken from the environment, logs a run.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from codiemb.config import config_from_dict
from codiemb.errors import UserError
from codiemb.tracking.mlflow_run import start_run
from services import free_port

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent


# --------------------------------------------------------------------------- helpers
def _request(url: str, user: str | None = None, password: str | None = None) -> int:
    req = urllib.request.Request(url)
    if user is not None:
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        req.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def _wait_healthy(url: str, proc: subprocess.Popen | None, log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: {log.read_text(errors='replace')[-3000:]}")
        try:
            if _request(f"{url}/health") == 200:
                return
        except (urllib.error.URLError, OSError):  # not listening yet
            pass
        time.sleep(0.3)
    raise RuntimeError(f"no /health at {url} within {timeout:.0f}s: {log.read_text(errors='replace')[-3000:]}")


def _group_cmdlines(pgid: int) -> list[str]:
    """The command lines of every live process in process group ``pgid`` (the server and its workers)."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            if int(stat.rsplit(")", 1)[1].split()[2]) != pgid:
                continue
            out.append((d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
        except (OSError, IndexError, ValueError):
            continue
    return out


def _listen_addresses(port: int) -> set[str]:
    """Local addresses (hex, as /proc/net/tcp{,6} write them) with a socket LISTENing on ``port``."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            addr, hexport = local.rsplit(":", 1)
            if state == "0A" and int(hexport, 16) == port:
                found.add(addr)
    return found


LOOPBACK = {"0100007F", "00000000000000000000000001000000"}  # 127.0.0.1, ::1


def _stop_group(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=20)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _server_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "AWS_"))}
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # no job runner: faster start, fewer processes
    return env


# --------------------------------------------------------------------------- infra/mlflow/start_server.sh
@pytest.fixture(scope="module")
def auth_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow-auth")
    marker = "dbmarker" + secrets.token_hex(6)  # in both database paths: it must show on no command line
    (root / f"{marker}-tracking").mkdir()
    (root / f"{marker}-users").mkdir()
    port = free_port()
    admin_password = "Adm1n-" + secrets.token_urlsafe(12)
    flask_key = secrets.token_hex(16)
    env = _server_env()
    env.update(
        MLFLOW_BIN=str(VENV_BIN / "mlflow"), MLFLOW_PYTHON=sys.executable, MLFLOW_PORT=str(port), MLFLOW_WORKERS="1",
        MLFLOW_BACKEND_STORE_URI=f"sqlite:///{root}/{marker}-tracking/mlflow.db",
        MLFLOW_AUTH_DATABASE_URI=f"sqlite:///{root}/{marker}-users/basic_auth.db",
        MLFLOW_AUTH_ADMIN_USERNAME="admin", MLFLOW_AUTH_ADMIN_PASSWORD=admin_password,
        MLFLOW_FLASK_SERVER_SECRET_KEY=flask_key, MLFLOW_ARTIFACTS_DESTINATION=str(root / "artifacts"),
        MLFLOW_AUTH_CONFIG_DIR=str(root / "auth"),
        MLFLOW_DB_UPGRADE="1",  # the in-process `mlflow db upgrade` path, on a fresh database
    )
    log = root / "server.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen(["bash", str(REPO / "infra/mlflow/start_server.sh")], env=env, stdout=fh,
                                stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, proc, log)
        yield {"url": url, "port": port, "proc": proc, "root": root, "marker": marker, "log": log,
               "admin_password": admin_password, "secrets": [admin_password, flask_key, marker]}
    finally:
        _stop_group(proc)


def test_server_listens_on_loopback_only(auth_server):
    addrs = _listen_addresses(auth_server["port"])
    assert addrs and addrs <= LOOPBACK, addrs


def test_requests_without_a_valid_login_are_refused(auth_server):
    api = f"{auth_server['url']}/api/2.0/mlflow/experiments/search?max_results=1"
    assert _request(api) == 401
    assert _request(api, "admin", "not-the-password") == 401
    assert _request(api, "nobody", auth_server["admin_password"]) == 401
    assert _request(api, "admin", auth_server["admin_password"]) == 200
    assert _request(f"{auth_server['url']}/health") == 200  # probes need no login


def test_no_secret_on_any_command_line_of_the_server(auth_server):
    cmdlines = _group_cmdlines(auth_server["proc"].pid)
    assert any("mlflow" in c and "server" in c for c in cmdlines), cmdlines
    assert any("--app-name basic-auth" in c for c in cmdlines), cmdlines
    assert len(cmdlines) >= 2, f"expected the server and its uvicorn worker: {cmdlines}"
    for c in cmdlines:
        for s in auth_server["secrets"]:
            assert s not in c, f"a secret on a command line: {c}"
    assert auth_server["admin_password"] not in auth_server["log"].read_text(errors="replace")
    # the users database went where the private config file said
    (cfg,) = (auth_server["root"] / "auth").glob("mlflow-auth.*/basic_auth.ini")
    assert oct(cfg.stat().st_mode & 0o777) == "0o600"
    assert (auth_server["root"] / f"{auth_server['marker']}-users" / "basic_auth.db").is_file()
    assert (auth_server["root"] / f"{auth_server['marker']}-tracking" / "mlflow.db").is_file()


def test_a_user_with_its_login_in_the_environment_logs_a_run(auth_server, monkeypatch):
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.server import get_app_client
    from mlflow.tracking import MlflowClient

    url = auth_server["url"]
    # the admin (login from the environment) creates the jobs' user with MLflow's public auth client
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", auth_server["admin_password"])
    job_password = "Job-" + secrets.token_urlsafe(12)
    get_app_client("basic-auth", tracking_uri=url).create_user(username="codiemb", password=job_password)

    # no login: refused, and codiemb's start_run says so in one line
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME")
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD")
    cfg = config_from_dict({"run": {"name": "auth-run"}, "tracking": {"uri": url, "experiment": "t-auth"}})
    with pytest.raises(MlflowException) as err:
        MlflowClient(url).search_experiments()
    assert err.value.get_http_status_code() == 401
    with pytest.raises(UserError) as err:
        with start_run(cfg):
            pass
    msg = str(err.value)
    assert "\n" not in msg and ("401" in msg or "nauthorized" in msg.lower()), msg

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "codiemb")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", job_password)
    try:
        with start_run(cfg) as run:
            assert run.online
            assert run.log_metrics({"loss": 0.5}, step=1)
            run_id = run.run_id
    finally:
        while mlflow.active_run() is not None:
            mlflow.end_run()
    got = MlflowClient(url).get_run(run_id)
    assert got.info.status == "FINISHED" and got.data.metrics["loss"] == 0.5
    assert got.data.params["tracking.uri"] == url
    # and the password reached no param or tag
    assert job_password not in json.dumps([got.data.params, got.data.tags])


# --------------------------------------------------------------------------- infra/local/start_stack.sh
def test_local_stack_server_is_loopback_only_with_login(tmp_path):
    stack = tmp_path / "stack"
    port = free_port()
    env = _server_env()
    env.update(CODIEMB_STACK_DIR=str(stack), CODIEMB_STACK_RAY="0", MLFLOW_PORT=str(port), CODIEMB_BIN=str(VENV_BIN))
    try:
        start = subprocess.run(["bash", str(REPO / "infra/local/start_stack.sh")], env=env, capture_output=True,
                               text=True, timeout=300)
        assert start.returncode == 0, start.stderr[-3000:]
        password = (stack / "mlflow_admin_password").read_text().strip()
        assert password not in start.stdout + start.stderr  # --env reads the file, it does not print it
        assert oct((stack / "mlflow_admin_password").stat().st_mode & 0o777) == "0o600"
        assert oct(stack.stat().st_mode & 0o777) == "0o700"
        # what `eval "$(start_stack.sh --env)"` gives a shell
        shown = subprocess.run(["bash", "-c", f'eval "$({REPO}/infra/local/start_stack.sh --env)"; '
                                'printf "%s\\n" "$MLFLOW_TRACKING_URI" "$MLFLOW_TRACKING_USERNAME" "$MLFLOW_TRACKING_PASSWORD"'],
                               env=env, capture_output=True, text=True, timeout=60)
        uri, user, pw = shown.stdout.split("\n")[:3]
        assert uri == f"http://127.0.0.1:{port}" and user == "admin" and pw == password
        addrs = _listen_addresses(port)
        assert addrs and addrs <= LOOPBACK, addrs
        api = f"{uri}/api/2.0/mlflow/experiments/search?max_results=1"
        assert _request(api) == 401 and _request(api, user, pw) == 200
        pid = int((stack / "mlflow.pid").read_text())
        assert not [c for c in _group_cmdlines(pid) if password in c or "sqlite:" in c]
    finally:
        stop = subprocess.run(["bash", str(REPO / "infra/local/stop_stack.sh")], env=env, capture_output=True,
                              text=True, timeout=120)
    assert stop.returncode == 0, stop.stderr
    deadline = time.monotonic() + 20
    while _listen_addresses(port) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _listen_addresses(port)
    assert not list(stack.glob("mlflow-auth.*"))  # the rendered config went with the server
