"""One MLflow run per pipeline, logged from rank 0, that never crashes training.

``start_run(cfg)`` opens (or, given ``run_id``, resumes) a run, logs the resolved config as
params (flattened dotted keys, values cut to MLflow's limit) and as ``config.yaml``, plus tags
(codiemb version, git commit), and yields a :class:`SafeLogger`.

Every client call goes through the ``SafeLogger``: short HTTP timeouts and no urllib3 retry storm,
so an unreachable server costs milliseconds, not minutes. What cannot be sent is buffered in
memory (bounded) and sent when the server answers again; once the buffer is full the oldest
metrics are dropped, with one warning. While the server is down the logger only re-tries every
``retry_after`` seconds, so training speed does not depend on the server.

Credentials come only from the environment (MLflow reads ``MLFLOW_TRACKING_USERNAME/PASSWORD/TOKEN``,
boto3 reads ``AWS_*``). Nothing we log may contain them: :func:`redact` masks values whose key
looks like a credential, ``user:pass@`` in URIs, and any literal value of a credential-like
environment variable; it is applied to every param, tag and text artifact we write.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from codiemb.errors import UserError

log = logging.getLogger(__name__)

MASK = "***"

#: The limits an MLflow server enforces on what one run logs. MLflow documents them (REST API
#: ``log-batch``) but exports them only from the private ``mlflow.utils.validation``, so they are
#: copied here (which also keeps this module cheap to import). tests/integration/test_private_apis.py
#: compares them with MLflow's and logs values at exactly these limits to a real server.
MAX_PARAM_VALUE = 6000  # characters in a param value (MAX_PARAM_VAL_LENGTH)
MAX_TAG_VALUE = 8000  # characters in a tag value (MAX_TAG_VAL_LENGTH)
MAX_KEY_LENGTH = 250  # characters in a param, tag or metric key (MAX_ENTITY_KEY_LENGTH)
MAX_PARAMS_PER_BATCH = 100  # params + tags in one log_batch (MAX_PARAMS_TAGS_PER_BATCH)
MAX_METRICS_PER_BATCH = 1000  # metrics in one log_batch (MAX_METRICS_PER_BATCH)

# --------------------------------------------------------------------------- redaction
_SECRET_KEY = re.compile(
    r"(password|passwd|passphrase|secret|credential|private[_-]?key|api[_-]?key|access[_-]?key"
    r"|session[_-]?key|authorization|auth[_-]?token|(^|[._-])token($|[._-])|^token$)",
    re.IGNORECASE,
)
_URI_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<userinfo>[^/\s@]+)@")
_BEARER = re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]{8,}")
_AWS_KEY_ID = re.compile(r"\b(AKIA|ASIA)[A-Z0-9]{16}\b")


def metric_key(key: Any) -> str:
    """MLflow metric names allow ``[A-Za-z0-9_\-. /]``: ``ndcg@10`` becomes ``ndcg_at_10``."""
    import re

    return re.sub(r"[^A-Za-z0-9_\-. /]", "_", str(key).replace("@", "_at_"))


def is_secret_key(key: str) -> bool:
    """True for names such as AWS_SECRET_ACCESS_KEY, MLFLOW_TRACKING_PASSWORD, hf_token, api-key."""
    return bool(_SECRET_KEY.search(str(key)))


def environ_items(environ=None) -> list[tuple[str, str]]:
    """A snapshot of the environment that survives other threads changing it meanwhile.

    ``os.environ.items()`` reads a key, then its value: MLflow's telemetry thread sets and deletes
    ``_MLFLOW_TELEMETRY_SESSION_ID`` while runs start, and a key deleted in between raised KeyError
    (a 30-trial merge search died on it). Keys that vanish are skipped; a key list that changes
    while being copied is copied again.
    """
    environ = os.environ if environ is None else environ
    for _ in range(10):
        try:
            keys = list(environ)
            break
        except RuntimeError:  # dictionary changed size during iteration
            continue
    else:
        keys = []
    out = []
    for key in keys:
        value = environ.get(key)
        if value is not None:
            out.append((key, value))
    return out


def _secret_env_values() -> list[str]:
    """Literal values of credential-like environment variables (longest first, >= 4 chars)."""
    values = {v for k, v in environ_items() if is_secret_key(k) and v and len(v) >= 4}
    return sorted(values, key=len, reverse=True)


def redact_text(text: str) -> str:
    """Mask credentials inside free text: env secret values, ``user:pass@`` in URIs, bearer tokens."""
    if not text:
        return text
    for value in _secret_env_values():
        text = text.replace(value, MASK)
    text = _URI_USERINFO.sub(lambda m: f"{m.group('scheme')}{MASK}@", text)
    text = _BEARER.sub(lambda m: f"{m.group(1)} {MASK}", text)
    return _AWS_KEY_ID.sub(MASK, text)


def redact(values: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``values`` safe to log: credential-like keys get ``***``, string values are scrubbed.

    Non-string values are kept as they are (numbers and booleans carry no secret); keys that
    themselves contain a secret value are scrubbed too.
    """
    out: dict[str, Any] = {}
    for key, value in values.items():
        key = redact_text(str(key))
        if is_secret_key(key) and value not in (None, ""):
            out[key] = MASK
        elif isinstance(value, str):
            out[key] = redact_text(value)
        elif isinstance(value, (list, tuple, dict)):
            out[key] = redact_text(json.dumps(value, default=str))
        else:
            out[key] = value
    return out


# --------------------------------------------------------------------------- small helpers
def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> dotted keys; lists and scalars are leaves."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


def _param_value(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (list, tuple, dict)) else str(value)
    return text if len(text) <= MAX_PARAM_VALUE else text[: MAX_PARAM_VALUE - 3] + "..."


def git_commit(path: str | os.PathLike | None = None) -> str | None:
    """The commit of the code that runs: ``$CODIEMB_GIT_COMMIT`` or ``git rev-parse HEAD``, else None."""
    if os.environ.get("CODIEMB_GIT_COMMIT"):
        return os.environ["CODIEMB_GIT_COMMIT"]
    where = Path(path) if path else Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "-C", str(where), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    sha = out.stdout.strip()
    return sha if out.returncode == 0 and re.fullmatch(r"[0-9a-f]{40}", sha) else None


@contextlib.contextmanager
def short_http(timeout: float = 5.0, max_retries: int = 0, backoff: int = 1) -> Iterator[None]:
    """MLflow client HTTP settings for calls that must fail fast (restored afterwards).

    MLflow's defaults (7 urllib3 retries with backoff factor 2, 120 s timeout) make one call to a
    dead server take minutes; during training we prefer to buffer and move on.
    """
    new = {
        "MLFLOW_HTTP_REQUEST_TIMEOUT": str(int(max(1, timeout))),
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(max_retries),
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": str(int(backoff)),
    }
    old = {k: os.environ.get(k) for k in new}
    os.environ.update(new)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def is_transient(exc: BaseException) -> bool:
    """Server unreachable / overloaded (retry later) vs a request the server rejected (don't)."""
    try:
        from mlflow.exceptions import MlflowException
    except ImportError:  # pragma: no cover
        return True
    if isinstance(exc, MlflowException):
        status = exc.get_http_status_code()
        return not (400 <= status < 500)
    return isinstance(exc, (OSError, ConnectionError, TimeoutError)) or "requests" in type(exc).__module__ \
        or "urllib3" in type(exc).__module__


def one_line(exc: BaseException, limit: int = 200) -> str:
    text = " ".join(str(exc).split())
    return redact_text(text if len(text) <= limit else text[: limit - 3] + "...")


# --------------------------------------------------------------------------- the safe logger
class SafeLogger:
    """MLflow logging that buffers while the server is away and never raises into training.

    All ``log_*`` methods enqueue, then try to flush; they return True when everything pending
    reached the server. ``run_id`` may be None when the run could not be created yet (server down
    at start): the run is created on the first flush that reaches the server.
    """

    def __init__(self, tracking_uri: str, run_id: str | None = None, *, experiment: str = "codiemb",
                 run_name: str | None = None, create_tags: Mapping[str, str] | None = None,
                 timeout: float = 5.0, retry_after: float = 30.0, max_buffer: int = 100_000):
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self.experiment = experiment
        self.run_name = run_name
        self._create_tags = dict(create_tags or {})
        self.timeout = timeout
        self.retry_after = retry_after
        self.max_buffer = max_buffer
        self._metrics: list[tuple[str, float, int, int]] = []  # key, value, timestamp_ms, step
        self._params: dict[str, str] = {}
        self._tags: dict[str, str] = {}
        self._artifacts: list[tuple[str, str | None]] = []
        self._down_since: float | None = None
        self._next_try = 0.0
        self._warned_down = False
        self._warned_drop = False
        self.dropped = 0
        self._spool = Path(tempfile.mkdtemp(prefix="codiemb-mlflow-"))
        self._client = None

    # ------------------------------------------------------------------ public API
    @property
    def online(self) -> bool:
        return self._down_since is None

    @property
    def pending(self) -> int:
        return len(self._metrics) + len(self._params) + len(self._tags) + len(self._artifacts)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> bool:
        now = int(time.time() * 1000)
        for key, value in metrics.items():
            try:
                self._metrics.append((metric_key(key), float(value), now, int(step or 0)))
            except (TypeError, ValueError):
                log.warning("metric %s=%r is not a number; not logged", key, value)
        overflow = len(self._metrics) - self.max_buffer
        if overflow > 0:
            del self._metrics[:overflow]
            self.dropped += overflow
            if not self._warned_drop:
                self._warned_drop = True
                log.warning("MLflow metric buffer full (%d); dropping the oldest metrics", self.max_buffer)
        return self.flush()

    def log_metric(self, key: str, value: float, step: int | None = None) -> bool:
        return self.log_metrics({key: value}, step)

    def log_params(self, params: Mapping[str, Any]) -> bool:
        for k, v in redact(params).items():
            self._params[str(k)[:MAX_KEY_LENGTH]] = _param_value(v)
        return self.flush()

    def set_tags(self, tags: Mapping[str, Any]) -> bool:
        for k, v in redact(tags).items():
            self._tags[str(k)[:MAX_KEY_LENGTH]] = str(v)[:MAX_TAG_VALUE]
        return self.flush()

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> bool:
        """Upload a file or folder. The file must stay on disk until it is sent (see :meth:`log_text`)."""
        self._artifacts.append((str(path), artifact_path))
        return self.flush()

    def log_text(self, text: str, artifact_file: str) -> bool:
        """Write ``text`` (redacted) to a spool file named like ``artifact_file`` and upload it."""
        folder, name = os.path.split(artifact_file)
        target = self._spool / f"{len(list(self._spool.iterdir()))}" / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(redact_text(text), encoding="utf-8")
        return self.log_artifact(target, folder or None)

    def log_figure(self, figure: Any, artifact_file: str) -> bool:
        """Save a matplotlib figure to a spool PNG and upload it as ``artifact_file``."""
        folder, name = os.path.split(artifact_file)
        target = self._spool / f"{len(list(self._spool.iterdir()))}" / name
        target.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(target, dpi=100)
        return self.log_artifact(target, folder or None)

    def flush(self, force: bool = False) -> bool:
        """Send what is pending. While the server is down, only try every ``retry_after`` s (or ``force``)."""
        if not self.pending and self.run_id is not None:
            return True
        if not force and self._down_since is not None and time.monotonic() < self._next_try:
            return False
        try:
            with short_http(self.timeout):
                self._send()
        except Exception as exc:  # noqa: BLE001 - the point is that training never sees it
            if is_transient(exc):
                self._mark_down(exc)
            else:  # the server refused something; keep the rest flowing
                log.warning("MLflow rejected a logging call (%s); dropped it", one_line(exc))
                self._drop_rejected()
            return False
        if self._down_since is not None:
            log.warning("MLflow server at %s reachable again after %.0f s; buffered data sent",
                        self.tracking_uri, time.monotonic() - self._down_since)
            self._down_since = None
        return True

    def close(self, status: str = "FINISHED", end_run: bool = True) -> None:
        """Final flush (forced); mark the run terminated; warn once about anything that did not get out."""
        self.flush(force=True)
        if end_run and self.run_id is not None:
            try:
                with short_http(self.timeout):
                    self.client.set_terminated(self.run_id, status)
            except Exception as exc:  # noqa: BLE001
                log.warning("could not mark MLflow run %s %s (%s)", self.run_id, status, one_line(exc))
        if self.pending:
            log.warning("MLflow server %s unreachable at the end of the run: %d metrics, %d params/tags and "
                        "%d artifacts were not logged (artifact files stay under %s)", self.tracking_uri,
                        len(self._metrics), len(self._params) + len(self._tags), len(self._artifacts), self._spool)

    # ------------------------------------------------------------------ internals
    @property
    def client(self):
        if self._client is None:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(tracking_uri=self.tracking_uri)
        return self._client

    def _mark_down(self, exc: BaseException) -> None:
        if self._down_since is None:
            self._down_since = time.monotonic()
        self._next_try = time.monotonic() + self.retry_after
        if not self._warned_down:
            self._warned_down = True
            log.warning("MLflow server at %s unreachable (%s); buffering metrics and retrying every %.0f s, "
                        "training goes on", self.tracking_uri, one_line(exc, 120), self.retry_after)

    def _ensure_run(self) -> None:
        if self.run_id is not None:
            return
        exp = self.client.get_experiment_by_name(self.experiment)
        exp_id = exp.experiment_id if exp else self.client.create_experiment(self.experiment)
        # run_name= sets the run's name (and its mlflow.runName tag) through the public API
        run = self.client.create_run(exp_id, tags=dict(self._create_tags), run_name=self.run_name)
        self.run_id = run.info.run_id
        log.info("created MLflow run %s once the server answered", self.run_id)

    def _send(self) -> None:
        from mlflow.entities import Metric, Param, RunTag

        self._ensure_run()
        while self._params or self._tags:
            params = list(self._params.items())[:MAX_PARAMS_PER_BATCH]
            tags = list(self._tags.items())[: MAX_PARAMS_PER_BATCH - len(params)]
            self.client.log_batch(self.run_id, params=[Param(k, v) for k, v in params],
                                  tags=[RunTag(k, v) for k, v in tags], synchronous=True)
            for k, _ in params:
                self._params.pop(k, None)
            for k, _ in tags:
                self._tags.pop(k, None)
        while self._metrics:
            chunk = self._metrics[:MAX_METRICS_PER_BATCH]
            self.client.log_batch(self.run_id, metrics=[Metric(k, v, ts, st) for k, v, ts, st in chunk],
                                  synchronous=True)
            del self._metrics[: len(chunk)]
        while self._artifacts:
            path, artifact_path = self._artifacts[0]
            if not os.path.exists(path):
                log.warning("artifact %s vanished before it could be logged; skipped", path)
            elif os.path.isdir(path):
                self.client.log_artifacts(self.run_id, path, artifact_path)
            else:
                self.client.log_artifact(self.run_id, path, artifact_path)
            self._artifacts.pop(0)

    def _drop_rejected(self) -> None:
        """After a 4xx: drop the first pending group (the one just sent) and try the rest once."""
        if self._params or self._tags:
            self._params.clear()
            self._tags.clear()
        elif self._metrics:
            del self._metrics[:MAX_METRICS_PER_BATCH]
        elif self._artifacts:
            self._artifacts.pop(0)


# --------------------------------------------------------------------------- start_run
def run_tags(extra: Mapping[str, Any] | None = None) -> dict[str, str]:
    import codiemb

    tags = {"codiemb.version": codiemb.__version__}
    sha = git_commit()
    if sha:
        tags["mlflow.source.git.commit"] = sha
        tags["codiemb.git_commit"] = sha
    tags.update({k: str(v) for k, v in (extra or {}).items()})
    return tags


@contextlib.contextmanager
def start_run(cfg: Any, run_id: str | None = None, nested: bool = False, run_name: str | None = None,
              tags: Mapping[str, Any] | None = None, retry_after: float = 30.0,
              timeout: float = 5.0) -> Iterator[SafeLogger]:
    """Open (or resume) the MLflow run for ``cfg`` and yield its :class:`SafeLogger`.

    - ``cfg.tracking.uri`` / ``cfg.tracking.experiment`` pick the server and experiment.
    - ``run_id``: continue that run (same run, no duplicate); a run_id the server does not know
      is a :class:`UserError`.
    - ``nested``: a child of the active run (sweep trials, merges).
    - The resolved config goes in as params (dotted keys) and ``config.yaml``; tags carry the
      codiemb version and git commit. All of it passes through :func:`redact`.
    - If the server is unreachable at start, the run is created later, when it answers; the
      block runs either way. On exit the run is marked FINISHED, or FAILED on an exception.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    uri = cfg.tracking.uri
    experiment = cfg.tracking.experiment
    run_name = run_name or getattr(getattr(cfg, "run", None), "name", None)
    all_tags = redact(run_tags(tags))
    mlflow.set_tracking_uri(uri)
    fluent = False
    existing_params: dict[str, str] = {}
    try:
        with short_http(timeout):
            if run_id is not None:
                run = mlflow.get_run(run_id)  # raises RESOURCE_DOES_NOT_EXIST for unknown ids
                existing_params = dict(run.data.params)
                active = mlflow.start_run(run_id=run_id, nested=nested)
            else:
                exp = mlflow.set_experiment(experiment)
                active = mlflow.start_run(experiment_id=exp.experiment_id, run_name=run_name, nested=nested,
                                          tags=all_tags)
        fluent = True
        logger = SafeLogger(uri, active.info.run_id, experiment=experiment, run_name=run_name,
                            timeout=timeout, retry_after=retry_after)
    except MlflowException as exc:
        if not is_transient(exc):
            what = f"run {run_id}" if run_id else f"experiment {experiment!r}"
            raise UserError(f"MLflow at {redact_text(uri)}: cannot open {what}: {one_line(exc)}") from None
        create_tags = dict(all_tags)
        parent = mlflow.active_run()
        if nested and parent is not None:
            create_tags["mlflow.parentRunId"] = parent.info.run_id
        logger = SafeLogger(uri, run_id, experiment=experiment, run_name=run_name, create_tags=create_tags,
                            timeout=timeout, retry_after=retry_after)
        logger._mark_down(exc)

    params = {k: v for k, v in flatten(cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)).items()}
    safe = {k: _param_value(v) for k, v in redact(params).items()}
    if existing_params:
        changed = sorted(k for k, v in safe.items() if k in existing_params and existing_params[k] != v)
        if changed:
            log.warning("resumed run %s: config differs for %s; MLflow keeps the original params",
                        run_id, ", ".join(changed[:10]))
        safe = {k: v for k, v in safe.items() if k not in existing_params}
    logger.set_tags(all_tags)
    logger.log_params(safe)
    if hasattr(cfg, "to_yaml"):
        logger.log_text(cfg.to_yaml(), "config.yaml")

    status = "FINISHED"
    try:
        yield logger
    except BaseException as exc:
        # stopped by SIGTERM (train/stop.py: checkpoint written, the same command resumes this run)
        from codiemb.train.stop import TrainingStopped

        status = "KILLED" if isinstance(exc, TrainingStopped) else "FAILED"
        raise
    finally:
        logger.close(status, end_run=not fluent)
        if fluent:
            try:
                with short_http(timeout):
                    mlflow.end_run(status)
            except Exception as exc:  # noqa: BLE001 - ending a run must not mask the block's outcome
                log.warning("could not mark MLflow run %s %s (%s)", logger.run_id, status, one_line(exc))


# --------------------------------------------------------------------------- plots
def loss_curve_png(history: Mapping[str, list[tuple[int, float]]], path: str | os.PathLike,
                   title: str = "training loss") -> Path:
    """Plot ``{name: [(step, value), ...]}`` as lines on one axis and save a PNG (Agg canvas, no pyplot)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for name, points in history.items():
        if not points:
            continue
        steps, values = zip(*sorted(points))
        ax.plot(steps, values, label=name, linewidth=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if any(history.values()):
        ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    return out
