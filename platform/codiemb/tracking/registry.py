"""The model registry: log a sentence-transformers folder as an MLflow model, register it, gate it.

Workflow (MLflow 3: aliases, not stages)::

    info = log_model("runs/final", metrics=summary, config=cfg)     # inside the run
    version = register(run_id, "codiemb-minilm")                     # alias `challenger`
    decision = promote("codiemb-minilm", suite="dev", margin=0.1)   # maybe moves `champion`
    path = resolve_model_uri("models:/codiemb-minilm@champion")      # a local ST folder

**The gate.** ``promote`` scores the challenger and the current champion with the same
``score_fn`` (default: ``codiemb.evaluate.suites.evaluate_model(...)["summary"]`` on a dev suite,
``dev`` by default; a suite with test data is refused), reduces each
to one number — the summary's ``mean`` if it has one, else the mean of the metrics both models
share — and moves ``champion`` only when ``challenger - champion > margin`` (metrics are ×100,
so margin 0.1 is a tenth of a point), or when there is no champion yet. The decision and the
scores are written as tags on the challenger's model version (``gate.*``).

**Faults.** Every registry call retries transient failures (server unreachable, 5xx) with
exponential backoff and short HTTP timeouts, then raises one :class:`~codiemb.errors.UserError`
line. ``register`` is idempotent: running it again for the same run reuses the version it made.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from codiemb.errors import ModelError, UserError
from codiemb.tracking.mlflow_run import is_transient, one_line, redact_text, short_http

log = logging.getLogger(__name__)

CHALLENGER = "challenger"
CHAMPION = "champion"
DEFAULT_ARTIFACT_PATH = "model"
INPUT_EXAMPLE = ["what is a unified text embedding model?", "a man is playing a guitar"]

ScoreFn = Callable[[str], Mapping[str, float]]


# --------------------------------------------------------------------------- plumbing
def _client(tracking_uri: str | None = None):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


def _uri(tracking_uri: str | None) -> str:
    import mlflow

    return redact_text(tracking_uri or mlflow.get_tracking_uri())


def with_retries(fn: Callable[[], Any], what: str, *, tracking_uri: str | None = None, attempts: int = 4,
                 backoff: float = 1.0, timeout: float = 5.0, hint: str = "") -> Any:
    """Call ``fn``; on a transient MLflow failure wait ``backoff·2^i`` s and try again.

    Each attempt uses short HTTP settings (``timeout`` s, no urllib3 retries), so ``attempts=4,
    backoff=1`` against a dead server gives up after about 7 s. A rejection (4xx) is not retried.
    """
    from mlflow.exceptions import MlflowException

    last: BaseException | None = None
    for i in range(attempts):
        try:
            with short_http(timeout):
                return fn()
        except UserError:
            raise
        except MlflowException as exc:
            if not is_transient(exc):
                raise UserError(f"{what}: {one_line(exc)}") from None
            last = exc
        except Exception as exc:  # noqa: BLE001 - connection errors surface as many types
            if not is_transient(exc):
                raise
            last = exc
        if i < attempts - 1:
            delay = backoff * 2**i
            log.warning("%s: MLflow unreachable (attempt %d/%d), retrying in %.1f s", what, i + 1, attempts, delay)
            time.sleep(delay)
    hint = f"; {hint}" if hint else ""
    raise UserError(f"{what}: MLflow server {_uri(tracking_uri)} unreachable after {attempts} attempts "
                    f"({one_line(last, 120)}){hint}") from None


def _is_missing(exc: BaseException) -> bool:
    from mlflow.exceptions import MlflowException

    return isinstance(exc, MlflowException) and exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND")


def alias_version(name: str, alias: str, tracking_uri: str | None = None) -> str | None:
    """The version an alias points to, or None when the alias (or the model) does not exist."""
    from mlflow.exceptions import MlflowException

    client = _client(tracking_uri)

    def get() -> str | None:
        try:
            return str(client.get_model_version_by_alias(name, alias).version)
        except MlflowException as exc:
            # unknown model: RESOURCE_DOES_NOT_EXIST; unknown alias: INVALID_PARAMETER_VALUE "... not found"
            if _is_missing(exc) or exc.get_http_status_code() == 404 or "not found" in str(exc).lower():
                return None
            raise

    return with_retries(get, f"look up {name}@{alias}", tracking_uri=tracking_uri)


# --------------------------------------------------------------------------- log_model
def _pip_requirements() -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    reqs = []
    for pkg in ("sentence-transformers", "transformers", "torch", "tokenizers", "safetensors", "numpy", "pandas"):
        try:
            reqs.append(f"{pkg}=={version(pkg).split('+')[0]}")
        except PackageNotFoundError:
            continue
    return reqs


def model_card(model_dir: str | os.PathLike, *, name: str | None = None, metrics: Mapping[str, float] | None = None,
               config: Any = None, data: Any = None, run_id: str | None = None, description: str | None = None) -> str:
    """A README.md for the logged model: what it is, the data it saw, its metrics, the config."""
    import yaml

    import codiemb

    folder = Path(model_dir)
    arch = {}
    if (folder / "config.json").is_file():
        try:
            arch = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        except ValueError:
            arch = {}
    cfg_tree = config.to_dict() if hasattr(config, "to_dict") else (dict(config) if config else None)
    if data is None and cfg_tree:
        data = [{k: d.get(k) for k in ("name", "task", "path")} for d in (cfg_tree.get("data") or {}).get("datasets", [])]
    lines = [f"# {name or folder.name}", "",
             description or "Text-embedding model (retrieval + STS) trained with codiemb.", "",
             f"- codiemb: {codiemb.__version__}"]
    if run_id:
        lines.append(f"- MLflow run: `{run_id}`")
    if arch:
        lines.append(f"- architecture: {arch.get('model_type', '?')}, hidden size {arch.get('hidden_size', '?')}, "
                     f"{arch.get('num_hidden_layers', '?')} layers")
    lines += ["", "## Usage", "", "```python",
              "from codiemb.tracking.registry import resolve_model_uri",
              "from sentence_transformers import SentenceTransformer",
              "model = SentenceTransformer(resolve_model_uri('models:/NAME@champion'))",
              "embeddings = model.encode(['a sentence'])", "```", "", "## Data", ""]
    if data:
        for d in data:
            lines.append("- " + (", ".join(f"{k}: {v}" for k, v in d.items()) if isinstance(d, Mapping) else str(d)))
    else:
        lines.append("(not recorded)")
    lines += ["", "## Metrics", ""]
    if metrics:
        lines += ["| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4f} |" if isinstance(v, (int, float)) else f"| {k} | {v} |" for k, v in metrics.items()]
    else:
        lines.append("(not recorded)")
    lines += ["", "## Config", ""]
    if cfg_tree:
        lines += ["```yaml", yaml.safe_dump(cfg_tree, sort_keys=False).rstrip(), "```"]
    else:
        lines.append("(not recorded)")
    return redact_text("\n".join(lines) + "\n")


@contextlib.contextmanager
def _run_context(run_id: str | None) -> Iterator[None]:
    import mlflow

    active = mlflow.active_run()
    if run_id is None:
        if active is None:
            raise UserError("log_model needs an active MLflow run (codiemb.tracking.start_run) or a run_id")
        yield
    elif active is not None and active.info.run_id == run_id:
        yield
    else:
        with mlflow.start_run(run_id=run_id, nested=active is not None):
            yield


def log_model(model_dir: str | os.PathLike, artifact_path: str = DEFAULT_ARTIFACT_PATH, *, run_id: str | None = None,
              flavor: str = "auto", metrics: Mapping[str, float] | None = None, config: Any = None,
              data: Any = None, description: str | None = None, input_example: list[str] | None = None):
    """Log a sentence-transformers folder as an MLflow model of the run; returns mlflow's ``ModelInfo``.

    ``flavor``: ``sentence_transformers`` (MLflow's flavor; checked to work with
    sentence-transformers 6.2 although MLflow 3.17 lists 6.1 as the newest tested),
    ``pyfunc`` (``codiemb.tracking.pyfunc``: the folder travels unchanged), or ``auto``
    (the flavor, falling back to the pyfunc when the flavor fails). Both carry a signature
    (list of strings -> float vectors), an input example, pinned pip requirements, and a model
    card ``README.md`` (data, metrics, config) at the top of the model's artifacts.
    """
    import mlflow

    folder = Path(model_dir)
    if not (folder / "modules.json").is_file() and not (folder / "config.json").is_file():
        raise ModelError(f"{folder}: not a sentence-transformers / HF model folder")
    if flavor not in ("auto", "sentence_transformers", "pyfunc"):
        raise UserError(f"log_model: unknown flavor {flavor!r} (auto, sentence_transformers, pyfunc)")
    example = list(input_example or INPUT_EXAMPLE)
    with _run_context(run_id):
        rid = mlflow.active_run().info.run_id
        info = None
        what = f"log model {folder} to run {rid}"
        hint = f"the folder stays at {folder}; log and register it later (codiemb register)"
        if flavor in ("auto", "sentence_transformers"):
            try:
                info = with_retries(lambda: _log_st_flavor(folder, artifact_path, example), what,
                                    attempts=2, timeout=120, hint=hint)
            except UserError:
                raise
            except Exception as exc:  # noqa: BLE001 - the flavor failed on this folder: use the pyfunc
                if flavor == "sentence_transformers":
                    raise
                log.warning("mlflow.sentence_transformers could not log %s (%s); logging a pyfunc instead",
                            folder, one_line(exc))
        if info is None:
            info = with_retries(lambda: _log_pyfunc(folder, artifact_path, example), what,
                                attempts=2, timeout=120, hint=hint)
        card = model_card(folder, name=artifact_path, metrics=metrics, config=config, data=data, run_id=rid,
                          description=description)
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "README.md").write_text(card, encoding="utf-8")
            with_retries(lambda: _client().log_model_artifact(info.model_id, str(Path(tmp) / "README.md")),
                         f"log the model card of {info.model_id}", timeout=60)
    log.info("logged model %s (run %s, model id %s)", artifact_path, rid, info.model_id)
    return info


def _log_st_flavor(folder: Path, artifact_path: str, example: list[str]):
    import mlflow.sentence_transformers
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(folder), device="cpu", trust_remote_code=False)
    return mlflow.sentence_transformers.log_model(model, name=artifact_path, input_example=example,
                                                  pip_requirements=_pip_requirements())


def _log_pyfunc(folder: Path, artifact_path: str, example: list[str]):
    import mlflow.pyfunc
    from mlflow.models import infer_signature
    from sentence_transformers import SentenceTransformer

    vectors = SentenceTransformer(str(folder), device="cpu").encode(example, convert_to_numpy=True)
    signature = infer_signature(example, vectors.astype("float32"),
                                params={"batch_size": 32, "normalize": False})
    return mlflow.pyfunc.log_model(
        name=artifact_path,
        python_model=str(Path(__file__).with_name("pyfunc.py")),
        artifacts={"model": str(folder)},
        signature=signature,
        input_example=example,
        pip_requirements=_pip_requirements(),
    )


# --------------------------------------------------------------------------- register
def _logged_model_id(client, run_id: str, artifact_path: str) -> str | None:
    run = client.get_run(run_id)
    models = client.search_logged_models(
        experiment_ids=[run.info.experiment_id],
        filter_string=f"source_run_id = '{run_id}' AND name = '{artifact_path}'",
        order_by=[{"field_name": "creation_time", "ascending": False}],
        max_results=1,
    )
    return models[0].model_id if models else None


#: Tag ``train_tracked`` puts on its run: the local folder with ``mlflow_run_id.txt`` and ``model/``.
OUTPUT_DIR_TAG = "codiemb.output_dir"


def run_model_folder(client, run_id: str) -> Path | None:
    """The model folder a run left on this machine, or None.

    The folder comes from the run's ``codiemb.output_dir`` tag and counts only when its
    ``mlflow_run_id.txt`` names this very run (a folder reused by another run does not).
    """
    from codiemb.tracking.train_run import RUN_ID_FILE

    tag = client.get_run(run_id).data.tags.get(OUTPUT_DIR_TAG)
    if not tag:
        return None
    root = Path(tag)
    id_file = root / RUN_ID_FILE
    if not id_file.is_file() or id_file.read_text().strip() != run_id:
        return None
    if (root / "model" / "modules.json").is_file():
        return root / "model"
    try:
        return Path(find_model_folder(root))
    except ModelError:
        return None


def _log_left_behind_model(client, run_id: str, name: str, artifact_path: str, tracking_uri: str | None) -> str:
    """Log the model a run left in its output folder (MLflow was unreachable when training ended)."""
    import mlflow

    folder = run_model_folder(client, run_id)
    if folder is None:
        raise UserError(f"run {run_id} has no logged model named {artifact_path!r} and no run folder of it is on "
                        f"this machine; log it from its run folder: codiemb register RUN_FOLDER --name {name}")
    log.warning("run %s has no logged model (MLflow was unreachable when it ended); logging %s now", run_id, folder)
    metrics = dict(client.get_run(run_id).data.metrics) or None
    previous = mlflow.get_tracking_uri()
    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    try:
        return log_model(folder, artifact_path, run_id=run_id, metrics=metrics).model_id
    finally:
        if tracking_uri:
            mlflow.set_tracking_uri(previous)


def register(run_id: str, name: str, artifact_path: str = DEFAULT_ARTIFACT_PATH, *, alias: str = CHALLENGER,
             tracking_uri: str | None = None, attempts: int = 4, backoff: float = 1.0,
             timeout: float = 5.0) -> str:
    """Register the run's logged model under ``name``, point ``alias`` at it, return the version.

    Idempotent: a version of ``name`` already made from this run's model is reused. Transient
    failures retry with backoff, then one UserError line (run ``codiemb register RUN`` later).
    A run whose model never reached MLflow (the server was away when training ended) gets it
    logged here from the run's output folder, when that folder is on this machine
    (:func:`run_model_folder`).
    """
    from mlflow.exceptions import MlflowException

    client = _client(tracking_uri)

    def once() -> str:
        try:
            client.get_registered_model(name)
        except MlflowException as exc:
            if not _is_missing(exc):
                raise
            try:
                client.create_registered_model(name, description="codiemb text-embedding models")
            except MlflowException as exc2:
                if exc2.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
        model_id = _logged_model_id(client, run_id, artifact_path)
        source = f"models:/{model_id}" if model_id else f"runs:/{run_id}/{artifact_path}"
        existing = [mv for mv in client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
                    if (model_id and getattr(mv, "model_id", None) == model_id) or mv.source == source]
        if existing:
            mv = max(existing, key=lambda v: int(v.version))
            log.info("run %s is already version %s of %s; reusing it", run_id, mv.version, name)
        else:
            if model_id is None:  # training ended while MLflow was away: log the folder it left
                model_id = _log_left_behind_model(client, run_id, name, artifact_path, tracking_uri)
                source = f"models:/{model_id}"
            mv = client.create_model_version(name, source, run_id=run_id, model_id=model_id,
                                             tags={"codiemb.artifact_path": artifact_path})
        client.set_registered_model_alias(name, alias, str(mv.version))
        return str(mv.version)

    version = with_retries(once, f"register run {run_id} as model {name!r}", tracking_uri=tracking_uri,
                           attempts=attempts, backoff=backoff, timeout=timeout,
                           hint=f"run `codiemb register {run_id}` when it is back")
    log.info("registered %s version %s (alias %s)", name, version, alias)
    return version


# --------------------------------------------------------------------------- gate
def gate_score(summary: Mapping[str, Any], keys: list[str] | None = None) -> float:
    """One number from an evaluation summary: its ``mean`` if present, else the mean of ``keys`` (or all)."""
    if keys is None and "mean" in summary:
        return float(summary["mean"])
    values = [float(summary[k]) for k in (keys or list(summary)) if k != "mean"
              and isinstance(summary.get(k), (int, float)) and math.isfinite(float(summary[k]))]
    if not values:
        raise UserError(f"gate: the evaluation summary has no numeric metric ({', '.join(map(str, summary)) or 'empty'})")
    return sum(values) / len(values)


DEFAULT_GATE_SUITE = "dev"


def check_gate_suite(suite: str) -> None:
    """The gate decides on dev data only: a suite with any test task is refused (one line)."""
    from codiemb.evaluate.suites import SUITES

    if suite not in SUITES:
        raise UserError(f"gate: unknown evaluation suite {suite!r}; choose from "
                        f"{', '.join(k for k, v in SUITES.items() if all(t.split != 'test' for t in v))}")
    test = [t.name for t in SUITES[suite] if t.split == "test"]
    if test:
        dev = [k for k, v in SUITES.items() if all(t.split != "test" for t in v)]
        raise UserError(f"gate: suite {suite!r} holds test data ({', '.join(test)}); a champion is chosen on dev "
                        f"only: use one of {', '.join(dev)} (test is reported after the decision)")


def default_score_fn(suite: str = DEFAULT_GATE_SUITE, data_dir: str | None = None, tracking_uri: str | None = None,
                     cache_dir: str | None = None) -> ScoreFn:
    """The real evaluator: resolve the model URI to a folder and run the named suite on it
    (corpus embeddings cached in ``cache_dir`` when given: an unchanged champion is not embedded again)."""

    def score(uri: str) -> Mapping[str, float]:
        from codiemb.evaluate.suites import evaluate_model

        path = resolve_model_uri(uri, tracking_uri=tracking_uri)
        return evaluate_model(path, suite=suite, data_dir=data_dir, show_progress=False,
                              cache_dir=cache_dir)["summary"]

    return score


def promote(name: str, version: str | int | None = None, suite: str = DEFAULT_GATE_SUITE, margin: float = 0.1,
            score_fn: ScoreFn | None = None, *, data_dir: str | None = None,
            tracking_uri: str | None = None, cache_dir: str | None = None) -> dict[str, Any]:
    """The promotion gate. ``version`` defaults to the ``challenger`` alias; returns the decision.

    ``suite`` must be a dev suite (``dev``, ``stsb-dev``, ``scifact-dev``): a champion is never
    chosen on test data (:func:`check_gate_suite`).

    The returned dict: name, challenger_version, champion_version (before the gate),
    challenger_score, champion_score (None without a champion), margin, suite, promoted (bool),
    decision ("promoted" | "rejected" | "unchanged"), reason, scores ({"challenger": {...},
    "champion": {...}}).
    """
    check_gate_suite(suite)
    client = _client(tracking_uri)
    if version is None:
        version = alias_version(name, CHALLENGER, tracking_uri)
        if version is None:
            raise UserError(f"model {name!r} has no '{CHALLENGER}' alias: register a run first (codiemb register RUN)")
    version = str(version)
    champion = alias_version(name, CHAMPION, tracking_uri)
    score_fn = score_fn or default_score_fn(suite, data_dir, tracking_uri, cache_dir)
    result: dict[str, Any] = {"name": name, "challenger_version": version, "champion_version": champion,
                              "suite": suite, "margin": float(margin), "challenger_score": None,
                              "champion_score": None, "scores": {}}
    if champion == version:
        result.update(promoted=False, decision="unchanged", reason=f"version {version} is already {CHAMPION}")
        return result

    challenger_scores = dict(score_fn(f"models:/{name}/{version}"))
    result["scores"]["challenger"] = challenger_scores
    if champion is None:
        result["challenger_score"] = gate_score(challenger_scores)
        promoted, reason = True, f"no {CHAMPION} yet"
    else:
        champion_scores = dict(score_fn(f"models:/{name}/{champion}"))
        result["scores"]["champion"] = champion_scores
        shared = sorted(k for k in challenger_scores if k in champion_scores and k != "mean")
        both_have_mean = "mean" in challenger_scores and "mean" in champion_scores
        keys = None if both_have_mean else (shared or None)
        result["challenger_score"] = gate_score(challenger_scores, keys)
        result["champion_score"] = gate_score(champion_scores, keys)
        gain = result["challenger_score"] - result["champion_score"]
        promoted = gain > margin
        reason = (f"challenger {result['challenger_score']:.4f} vs {CHAMPION} {result['champion_score']:.4f}: "
                  f"gain {gain:+.4f} {'>' if promoted else '<='} margin {margin}")
    result.update(promoted=promoted, decision="promoted" if promoted else "rejected", reason=reason)

    tags = {
        "gate.suite": suite, "gate.margin": str(margin), "gate.decision": result["decision"],
        "gate.reason": reason, "gate.challenger_score": f"{result['challenger_score']:.6f}",
        "gate.champion_version": champion or "", "gate.time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "gate.scores": json.dumps(result["scores"], sort_keys=True)[:4900],
    }
    if result["champion_score"] is not None:
        tags["gate.champion_score"] = f"{result['champion_score']:.6f}"

    def record() -> None:
        for k, v in tags.items():
            client.set_model_version_tag(name, version, k, v)
        if promoted:
            client.set_registered_model_alias(name, CHAMPION, version)

    with_retries(record, f"record the gate decision for {name} version {version}", tracking_uri=tracking_uri)
    log.info("gate %s v%s: %s (%s)", name, version, result["decision"], reason)
    return result


# --------------------------------------------------------------------------- loading
def find_model_folder(root: str | os.PathLike) -> str:
    """The sentence-transformers (or HF) folder inside a downloaded MLflow model or artifact tree."""
    import yaml

    root = Path(root)
    mlmodel = root / "MLmodel"
    if mlmodel.is_file():
        flavors = (yaml.safe_load(mlmodel.read_text(encoding="utf-8")) or {}).get("flavors", {})
        pyfunc = flavors.get("python_function", {})
        candidates = []
        if "sentence_transformers" in flavors and pyfunc.get("data"):
            candidates.append(root / pyfunc["data"])
        art = (pyfunc.get("artifacts") or {}).get("model")
        if isinstance(art, Mapping) and art.get("path"):
            candidates.append(root / art["path"])
        for c in candidates:
            if c.is_dir():
                return str(c)
    for c in [root, *sorted(p.parent for p in root.glob("*/modules.json")),
              *sorted(p.parent for p in root.glob("*/*/modules.json"))]:
        if (c / "modules.json").is_file() or (c is root and (c / "config.json").is_file()):
            return str(c)
    raise ModelError(f"{root}: no sentence-transformers folder in these artifacts")


def resolve_model_uri(uri: str, dst: str | os.PathLike | None = None, tracking_uri: str | None = None) -> str:
    """``models:/NAME@ALIAS`` | ``models:/NAME/VERSION`` | ``runs:/RUN/PATH`` | local folder -> local folder.

    Downloads the artifacts (into ``dst`` or a fresh temp folder) and returns the
    sentence-transformers folder inside them. An unknown model, version or alias is a ModelError.
    """
    import mlflow.artifacts

    text = str(uri)
    if "://" not in text and ":/" not in text:
        path = Path(text).expanduser()
        if path.is_dir():
            return find_model_folder(path)
        raise ModelError(f"model not found: {text} (expected models:/NAME@ALIAS, models:/NAME/VERSION, runs:/... "
                         "or a local folder)")
    target = Path(dst) if dst else Path(tempfile.mkdtemp(prefix="codiemb-model-"))
    target.mkdir(parents=True, exist_ok=True)

    def download() -> str:
        return mlflow.artifacts.download_artifacts(artifact_uri=text, dst_path=str(target), tracking_uri=tracking_uri)

    try:
        local = with_retries(download, f"download {text}", tracking_uri=tracking_uri, timeout=120)
    except UserError as exc:
        raise ModelError(str(exc)) from None
    return find_model_folder(local)


def load_encoder(uri: str, tracking_uri: str | None = None):
    """Resolve ``uri`` and load it as a ``codiemb`` Encoder (a SentenceTransformer until that lands)."""
    path = resolve_model_uri(uri, tracking_uri=tracking_uri)
    try:
        from codiemb.model.encoder import Encoder
    except ImportError:
        from sentence_transformers import SentenceTransformer

        return SentenceTransformer(path)
    return Encoder.load(path)


def load_champion(name: str, tracking_uri: str | None = None):
    """The current ``champion`` of ``name``, loaded (see :func:`load_encoder`)."""
    return load_encoder(f"models:/{name}@{CHAMPION}", tracking_uri=tracking_uri)
