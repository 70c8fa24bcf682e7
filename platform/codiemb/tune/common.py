"""Pieces both searches share: objectives, the Optuna searcher, per-trial MLflow child runs,
the experiment folder, the results table, the Pareto front and its plot.

Objectives (DESIGN §4 "Search"): the two dev metrics are ``sts_spearman`` (STS-B dev Spearman ×
100) and ``retrieval_ndcg_at_10`` (SciFact dev nDCG@10 × 100).

- ``objective: weighted`` — one metric, ``objective = Σ_k w_k·m_k / Σ_k w_k`` over the metrics
  present (``tune.objective_weights``, keys ``sts`` and ``retrieval``), maximised; TPE by default.
- ``objective: pareto`` — both metrics, maximised jointly (``OptunaSearch(metric=[...],
  mode=["max", "max"])``); NSGA-II (``algorithm: nsga2``) or multi-objective TPE. The "best"
  trial is then the member of the Pareto front with the highest weighted objective.
- ``objective: maximin`` (merge search only) — ``objective = min_k (m_k − t_k)``, t_k the best dev
  score on metric k among the models being merged (their reference scores, before the trials):
  the worst gap to the best specialist, maximised. It is the fusion goal "close to the STS
  specialist on STS AND close to the IR specialist on retrieval" written as one number, and
  unlike a weighted sum it cannot buy a surplus on one task with a deficit on the other.
"""

from __future__ import annotations

import contextlib
import csv
import logging
import math
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from codiemb.config import Config
from codiemb.errors import ConfigError
from codiemb.paths import absolute_tracking_uri  # noqa: F401  (re-exported: trials need absolute URIs)

log = logging.getLogger(__name__)

METRICS = {"sts": "sts_spearman", "retrieval": "retrieval_ndcg_at_10"}
OBJECTIVE = "objective"
PARENT_RUN_FILE = "mlflow_parent_run_id.txt"
TRIAL_FAIL_ENV = "CODIEMB_TUNE_FAIL_TRIALS"  # fault injection: "2,5" -> the 2nd and 5th trial raise


@dataclass
class SweepResult:
    search: str
    experiment_path: str
    best_trial: str | None
    best_config: dict[str, Any]
    best_metrics: dict[str, float]
    output_dir: str | None
    n_trials: int
    n_errors: int
    rows: list[dict[str, Any]] = field(default_factory=list)
    results_csv: str | None = None
    pareto_png: str | None = None
    parent_run_id: str | None = None
    wall_s: float = 0.0
    reference: dict[str, dict[str, float]] = field(default_factory=dict)
    complete: bool = True  # False: interrupted (Ctrl-C) before every trial ran; run again to resume


# --------------------------------------------------------------------------- objective
def objective_value(scores: Mapping[str, float], weights: Mapping[str, float]) -> float:
    """Σ w_k·m_k / Σ w_k over the metrics present in ``scores`` (NaN when none is)."""
    unknown = sorted(set(weights) - set(METRICS))
    if unknown:
        raise ConfigError(f"tune.objective_weights: unknown key(s) {', '.join(unknown)}; use sts, retrieval")
    num = den = 0.0
    for key, metric in METRICS.items():
        w = float(weights.get(key, 0.0))
        v = scores.get(metric)
        if w and v is not None and math.isfinite(float(v)):
            num += w * float(v)
            den += w
    return num / den if den else float("nan")


def specialist_targets(reference: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """Per dev metric, the best score among the merged models' reference scores (the base excluded)."""
    targets: dict[str, float] = {}
    for name, sc in reference.items():
        if name == "base":
            continue
        for metric in METRICS.values():
            v = sc.get(metric)
            if _finite(v):
                targets[metric] = max(targets.get(metric, float("-inf")), float(v))
    return targets


def maximin_value(scores: Mapping[str, float], targets: Mapping[str, float]) -> float:
    """min_k (m_k − t_k) over the metrics with a target (NaN when a targeted metric is missing)."""
    if not targets:
        raise ConfigError("tune.objective maximin needs the merged models' reference scores (tune.dev.reference: true)")
    gaps = []
    for metric, target in targets.items():
        v = scores.get(metric)
        if not _finite(v):
            return float("nan")
        gaps.append(float(v) - float(target))
    return min(gaps)


def with_objective(scores: Mapping[str, float], weights: Mapping[str, float],
                   targets: Mapping[str, float] | None = None) -> dict[str, float]:
    """``scores`` plus ``objective``: the weighted mean, or with ``targets`` the maximin gap."""
    out = {k: float(v) for k, v in scores.items() if isinstance(v, (int, float))}
    out[OBJECTIVE] = maximin_value(out, targets) if targets is not None else objective_value(out, weights)
    return out


def metric_and_mode(cfg: Config) -> tuple[str | list[str], str | list[str]]:
    if cfg.tune.objective == "pareto":
        return [METRICS["sts"], METRICS["retrieval"]], ["max", "max"]
    return OBJECTIVE, "max"


def make_searcher(cfg: Config):
    """``OptunaSearch`` with the configured sampler (tpe | nsga2 | random), metric(s) and mode(s)."""
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    seed = cfg.tune.seed if cfg.tune.seed is not None else cfg.run.seed
    algo = cfg.tune.algorithm
    if algo == "nsga2":
        sampler = optuna.samplers.NSGAIISampler(seed=seed, population_size=max(4, min(50, cfg.tune.num_samples // 4)))
    elif algo == "random":
        sampler = optuna.samplers.RandomSampler(seed=seed)
    else:
        sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=max(2, min(10, cfg.tune.num_samples // 3)))
    metric, mode = metric_and_mode(cfg)
    return OptunaSearch(metric=metric, mode=mode, sampler=sampler)


# --------------------------------------------------------------------------- paths
def absolutize(cfg: Config) -> Config:
    """A copy of ``cfg`` whose local paths (data root, models, storage, tracking) are absolute."""
    from codiemb.paths import data_dir

    c = cfg.model_copy(deep=True)
    c.tracking.uri = absolute_tracking_uri(c.tracking.uri)
    if "://" not in c.storage.path:
        c.storage.path = str(Path(c.storage.path).resolve())
    try:
        c.data.root = str(data_dir(c.data.root))
    except Exception:  # noqa: BLE001 - no data folder: paths stay as given
        pass
    if Path(c.model.name).exists():
        c.model.name = str(Path(c.model.name).resolve())
    if c.merge is not None:
        if c.merge.base_model and Path(c.merge.base_model).exists():
            c.merge.base_model = str(Path(c.merge.base_model).resolve())
        for m in c.merge.models:
            if Path(m.model).exists():
                m.model = str(Path(m.model).resolve())
    return c


def experiment_dir(cfg: Config) -> tuple[Path, str]:
    """(storage folder of all sweeps, this sweep's name): ``<storage.path>/tune/<name>``."""
    if "://" in cfg.storage.path:
        raise ConfigError("tune needs a local storage.path for now (got a URI)")
    name = cfg.tune.name or f"{cfg.run.name}-{cfg.tune.search}-search"
    if not re.fullmatch(r"[A-Za-z0-9._-]+", name):
        raise ConfigError(f"tune.name {name!r}: use letters, digits, '.', '_' and '-' only")
    return Path(cfg.storage.path).resolve() / "tune", name


def fail_trials_from_env() -> set[int]:
    spec = os.environ.get(TRIAL_FAIL_ENV, "").strip()
    return {int(x) for x in spec.split(",") if x.strip()} if spec else set()


_TRIAL_DIR = re.compile(r"_([0-9a-f]+(?:_\d{5})?)_(\d+)(?:_|$)")


def trial_dir_info(path: str | os.PathLike | None) -> tuple[str, int]:
    """(trial id, 1-based ordinal) from a trial folder name ``<trainable>_<id>_<n>_<params>_<time>``."""
    m = _TRIAL_DIR.search(os.path.basename(str(path or "")))
    return (m.group(1), int(m.group(2))) if m else (os.path.basename(str(path or "")), -1)


def trial_index(path: str | os.PathLike | None) -> int:
    """The trial's 1-based ordinal in its sweep (Tune numbers trials as it creates them)."""
    return trial_dir_info(path)[1]


# --------------------------------------------------------------------------- MLflow
@dataclass
class TrackingInfo:
    """What a trial needs to open its child run under the sweep's parent run (picklable)."""

    uri: str
    experiment: str
    parent_run_id: str | None


@contextlib.contextmanager
def trial_run(tracking: TrackingInfo | None, run_name: str, tags: Mapping[str, Any] | None = None
              ) -> Iterator[Any]:
    """A nested MLflow run for one trial (``mlflow.parentRunId`` = the sweep's run), or a no-op
    logger when tracking is off. Marked FAILED (with the error as a tag) when the block raises,
    except when Tune itself is stopping the trial."""
    if tracking is None or tracking.parent_run_id is None:
        yield _NullLogger()
        return
    from codiemb.tracking.mlflow_run import SafeLogger, one_line, run_tags

    create = {**run_tags(tags), "mlflow.parentRunId": tracking.parent_run_id}
    logger = SafeLogger(tracking.uri, None, experiment=tracking.experiment, run_name=run_name,
                        create_tags=create, retry_after=5.0)
    logger.flush(force=True)  # create the run now, so its id is known
    stop = tune_stop_event()
    try:
        yield logger
    except BaseException as exc:
        if stop is not None and stop.is_set():
            # Tune stopped this trial (ASHA, or max_t right after its last report) and the trial's
            # Train run died with it: not a failure. The run stays open for finish_children, which
            # settles it (FINISHED or KILLED) from Tune's own record once the sweep is done.
            log.info("trial %s stopped by Tune (%s)", run_name, one_line(exc, 200))
            logger.close(end_run=False)
            return
        logger.set_tags({"codiemb.error": one_line(exc, 500)})
        logger.close("FAILED")
        raise
    logger.close("FINISHED")


def tune_stop_event() -> threading.Event | None:
    """The event Tune sets when it stops the trial running in this thread, or None outside a Tune trial.

    Take it when the trial starts: Tune drops the session itself right after setting the event.

    Ray has no public call for it: this reads ``stop_event`` of Tune's trial session from
    ``ray.train._internal.session.get_session()`` (private; the pin on ray in pyproject.toml is
    for it). tests/integration/test_private_apis.py runs it in a real Tune trial that Tune stops,
    so a Ray that moves it fails that test; at run time such a Ray gets one warning, and the
    trials Tune stops are then recorded as FAILED instead of KILLED / FINISHED.
    """
    try:
        from ray.train._internal.session import get_session
    except ImportError as exc:
        _private_api_gone(f"ray.train._internal.session.get_session cannot be imported ({exc})")
        return None
    session = get_session()
    if session is None:  # not inside a Tune trial
        return None
    stop = getattr(session, "stop_event", None)
    if not isinstance(stop, threading.Event):
        _private_api_gone(f"Tune's trial session ({type(session).__name__}) has no stop_event")
        return None
    return stop


_warned_private: set[str] = set()


def _private_api_gone(what: str) -> None:
    if what in _warned_private:
        return
    _warned_private.add(what)
    try:
        import ray

        version = ray.__version__
    except Exception:  # noqa: BLE001
        version = "?"
    log.warning("codiemb cannot tell when Tune stops a trial on Ray %s: %s. Trials that Tune stops early "
                "will be marked FAILED in MLflow; install the Ray version pyproject.toml pins.", version, what)


class _NullLogger:
    run_id = None

    def __getattr__(self, name):
        return lambda *a, **k: True


def finish_children(tracking: TrackingInfo | None, rows: Sequence[Mapping[str, Any]]) -> int:
    """Close the child runs left RUNNING. Tune stops a trial's actor as soon as the scheduler says
    so — ASHA also at ``max_t`` — so the trial cannot always close its own run: a trial whose last
    report was its final one is FINISHED (its last metrics logged here), one stopped before it
    KILLED (tag ``codiemb.stopped_early``), one that errored FAILED. Returns how many were closed."""
    if tracking is None or tracking.parent_run_id is None:
        return 0
    from mlflow.tracking import MlflowClient

    from codiemb.tracking.mlflow_run import short_http

    by_trial = {r["trial_id"]: r for r in rows}
    closed = 0
    try:
        with short_http(5.0):
            client = MlflowClient(tracking.uri)
            exp = client.get_experiment_by_name(tracking.experiment)
            runs = client.search_runs([exp.experiment_id],
                                      f"tags.mlflow.parentRunId = '{tracking.parent_run_id}'", max_results=10000)
            for run in runs:
                row = by_trial.get(run.data.tags.get("codiemb.trial_id", ""), {})
                # a run the trial closed itself only gets the final metrics it lacks
                still_open = run.info.status == "RUNNING"
                for k in (*METRICS.values(), OBJECTIVE):
                    if _finite(row.get(k)) and (still_open or k not in run.data.metrics):
                        client.log_metric(run.info.run_id, k, float(row[k]))
                if not still_open:
                    continue
                if row.get("status") == "ERROR":
                    status = "FAILED"
                elif row.get("final"):
                    status = "FINISHED"
                else:
                    status = "KILLED"
                    client.set_tag(run.info.run_id, "codiemb.stopped_early", "true")
                client.set_terminated(run.info.run_id, status)
                closed += 1
    except Exception as exc:  # noqa: BLE001 - bookkeeping must not fail the sweep
        log.warning("could not close the trials' MLflow runs (%s)", exc)
    return closed


def parent_run_id(exp_path: Path) -> str | None:
    f = exp_path / PARENT_RUN_FILE
    return f.read_text().strip() or None if f.is_file() else None


# --------------------------------------------------------------------------- results
def collect_rows(grid, param_names: Sequence[str]) -> list[dict[str, Any]]:
    """One row per trial: id, status (TERMINATED | ERROR), the sampled params, the last metrics."""
    rows = []
    for r in grid:
        metrics = dict(r.metrics or {})
        tid = metrics.get("trial_id") or trial_dir_info(r.path)[0]
        status = "ERROR" if r.error else "TERMINATED" if (OBJECTIVE in metrics or "trial_id" in metrics) else "INCOMPLETE"
        row: dict[str, Any] = {"trial_id": tid, "trial": trial_index(r.path), "status": status}
        for p in param_names:
            row[p] = (r.config or {}).get(p)
        for k in (*METRICS.values(), OBJECTIVE, "training_iteration", "step", "final", "score_seconds",
                  "merge_seconds", "trial_seconds"):
            if k in metrics:
                row[k] = metrics[k]
        if r.error:
            row["error"] = error_line(r.error)
        rows.append(row)
    rows.sort(key=lambda x: x["trial"])
    return rows


def error_line(error: BaseException) -> str:
    """The exception line of a trial error (Ray wraps it in a remote traceback)."""
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    last = lines[-1] if lines else type(error).__name__
    return last[:300]


def write_csv(rows: Sequence[Mapping[str, Any]], path: Path) -> Path:
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    return path


def pareto_front(points: Sequence[tuple[float, float]]) -> list[bool]:
    """Maximising both coordinates: a point is on the front when no other point is >= in both and
    > in at least one."""
    out = []
    for i, (a, b) in enumerate(points):
        dominated = any((c >= a and d >= b) and (c > a or d > b) for j, (c, d) in enumerate(points) if j != i)
        out.append(not dominated)
    return out


def select_best(rows: Sequence[Mapping[str, Any]], cfg: Config) -> dict[str, Any] | None:
    """Weighted / maximin: the highest objective. Pareto: the front member with the highest weighted objective."""
    ok = [r for r in rows if r["status"] == "TERMINATED" and _finite(r.get(OBJECTIVE))]
    if not ok:
        return None
    if cfg.tune.objective == "pareto":
        both = [r for r in ok if _finite(r.get(METRICS["sts"])) and _finite(r.get(METRICS["retrieval"]))]
        if both:
            mask = pareto_front([(r[METRICS["sts"]], r[METRICS["retrieval"]]) for r in both])
            ok = [r for r, m in zip(both, mask) if m]
    return max(ok, key=lambda r: r[OBJECTIVE])


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(float(v))


def pareto_plot(rows: Sequence[Mapping[str, Any]], path: Path, best: Mapping[str, Any] | None = None,
                reference: Mapping[str, Mapping[str, float]] | None = None, title: str = "") -> Path | None:
    """Scatter of every finished trial (STS-B dev Spearman vs retrieval dev nDCG@10), the Pareto
    front as a step line, the chosen trial starred, reference models (base, specialists) as crosses."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    sx, sy = METRICS["sts"], METRICS["retrieval"]
    pts = [(float(r[sx]), float(r[sy])) for r in rows
           if r["status"] == "TERMINATED" and _finite(r.get(sx)) and _finite(r.get(sy))]
    if not pts:
        return None
    mask = pareto_front(pts)
    fig = Figure(figsize=(6.5, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=18, c="#9aa5b1", label="trials")
    front = sorted(p for p, m in zip(pts, mask) if m)
    ax.plot([p[0] for p in front], [p[1] for p in front], "o-", c="#d62728", ms=5, lw=1.2, label="Pareto front")
    for name, sc in (reference or {}).items():
        if _finite(sc.get(sx)) and _finite(sc.get(sy)):
            ax.scatter([sc[sx]], [sc[sy]], marker="x", s=50, c="black")
            ax.annotate(name, (sc[sx], sc[sy]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    if best is not None and _finite(best.get(sx)) and _finite(best.get(sy)):
        ax.scatter([best[sx]], [best[sy]], marker="*", s=160, c="#ff7f0e", label="chosen", zorder=5)
    ax.set_xlabel("STS-B dev Spearman x100")
    ax.set_ylabel("retrieval dev nDCG@10 x100")
    ax.set_title(title or "trials and Pareto front")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def trial_progress(bar):
    """A Tune callback (on the driver) that moves the console's tune line by one per finished trial.

    Tune saves its run config (callbacks included) with the experiment; the bar (it holds the
    terminal stream) is left out of that copy, so a restored callback moves nothing."""
    from ray import tune

    class TrialProgress(tune.Callback):
        def __init__(self, bar) -> None:
            self.bar = bar

        def __getstate__(self):
            return {"bar": None}

        def _one(self) -> None:
            if self.bar is not None:
                self.bar.update(1)

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._one()

        def on_trial_error(self, iteration, trials, trial, **info):
            self._one()

    return TrialProgress(bar)
