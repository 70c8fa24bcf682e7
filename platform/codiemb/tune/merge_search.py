"""Search 1: merge coefficients with Ray Tune + Optuna (DESIGN §4 "Search").

The driver loads the base and the models once, builds the fast dev set once
(``merge/evaluate_merge.py``: pre-tokenized STS-B dev and a fixed SciFact dev candidate pool) and
hands both to every trial through the object store (``tune.with_parameters``). A trial merges in
memory with its sampled method / λ / γ / weights / density / granularity, scores the dev sets,
reports the metrics to Tune and logs them to its own MLflow run nested under the sweep's run::

    Tuner(with_resources(with_parameters(merge_trial, bundle=...), {"cpu": n}),
          param_space=build_param_space(tune.space),
          tune_config=TuneConfig(search_alg=OptunaSearch(metric, mode, sampler), num_samples,
                                 max_concurrent_trials),
          run_config=RunConfig(name, storage_path, failure_config=FailureConfig(max_failures)))

- a trial that raises is recorded as ERROR (its MLflow run FAILED, the error as a tag, Optuna
  told FAIL) and the sweep goes on;
- with ``tune.resume`` an existing experiment folder is continued with ``Tuner.restore`` (finished
  trials are kept, the searcher state too; the parent MLflow run is reused);
- at the end the parent run gets the best config, the results table (CSV) and the Pareto-front
  PNG, and the best merge is re-made and written as a sentence-transformers folder.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

from codiemb.config import Config
from codiemb.errors import ConfigError
from codiemb.tune.common import (
    METRICS,
    OBJECTIVE,
    PARENT_RUN_FILE,
    SweepResult,
    TrackingInfo,
    absolutize,
    collect_rows,
    experiment_dir,
    fail_trials_from_env,
    finish_children,
    parent_run_id,
    pareto_plot,
    select_best,
    specialist_targets,
    trial_index,
    trial_progress,
    trial_run,
    with_objective,
    write_csv,
)
from codiemb.tune.space import DEFAULT_MERGE_SPACE, build_param_space, check_merge_space, merge_trial_args

log = logging.getLogger(__name__)


def merge_trial(config: dict[str, Any], bundle: dict[str, Any]) -> None:
    """One trial: merge in memory, score on the dev set, report. Runs in a Ray actor."""
    import torch
    from ray import tune

    from codiemb.merge.evaluate_merge import score_state_dict
    from codiemb.merge.run import merge_in_memory

    t0 = time.perf_counter()
    torch.set_num_threads(max(1, int(bundle["threads"])))
    ctx = tune.get_context()
    trial_id = ctx.get_trial_id()
    inputs = bundle["inputs"]
    method, weights, params = merge_trial_args(config, bundle["method"], inputs.weights, bundle["base_params"])
    with trial_run(bundle["tracking"], ctx.get_trial_name(), {"codiemb.trial_id": trial_id,
                                                               "codiemb.kind": "merge-trial"}) as tracker:
        tracker.log_params({"method": method, **{f"weight_{i}": w for i, w in enumerate(weights)}, **params})
        if trial_index(ctx.get_trial_dir()) in bundle["fail_trials"]:
            raise RuntimeError(f"CODIEMB_TUNE_FAIL_TRIALS: injected failure in trial {trial_id}")
        sd, extra = merge_in_memory(method, inputs, weights, params, probe=bundle.get("probe"))
        t1 = time.perf_counter()
        scores = score_state_dict(inputs.encoder, bundle["dev"], sd)
        metrics = with_objective(scores, bundle["objective_weights"], bundle.get("objective_targets"))
        metrics.update(merge_seconds=t1 - t0, trial_seconds=time.perf_counter() - t0)
        if extra.get("learned"):
            metrics["learned_lam"] = float(extra["learned"]["lam"])
        tracker.log_metrics(metrics)
        tune.report({**metrics, "trial_id": trial_id})


def _bundle(cfg: Config, inputs, dev, tracking: TrackingInfo | None, probe) -> dict[str, Any]:
    threads = cfg.tune.trial_cpus if cfg.tune.trial_cpus is not None else 1
    return {"inputs": inputs, "dev": dev, "tracking": tracking, "probe": probe, "method": cfg.merge.method,
            "base_params": dict(cfg.merge.parameters), "objective_weights": dict(cfg.tune.objective_weights),
            "threads": max(1, int(threads)), "fail_trials": fail_trials_from_env()}


def _reference_scores(inputs, dev, cfg: Config) -> dict[str, dict[str, float]]:
    """Dev scores of the base and of each model, for the table and the plot."""
    from codiemb.merge.evaluate_merge import score_state_dict

    ref = {"base": with_objective(score_state_dict(inputs.encoder, dev, inputs.base), cfg.tune.objective_weights)}
    for i, (name, sd) in enumerate(zip(inputs.names, inputs.models)):
        label = f"model_{i}:{Path(name).parent.name if Path(name).name == 'model' else Path(name).name}"
        ref[label] = with_objective(score_state_dict(inputs.encoder, dev, sd), cfg.tune.objective_weights)
    inputs.encoder.load_state_dict(inputs.base)
    return ref


def run_merge_search(cfg: Config, callbacks: list | None = None) -> SweepResult:
    """Run (or resume) the merge-coefficient sweep; write the best merge; see the module docstring.

    ``callbacks``: extra ``ray.tune.Callback`` objects for a fresh sweep (a restored sweep keeps
    the ones it started with)."""
    from ray import tune

    from codiemb.merge.run import build_probe, dev_set_for, load_inputs, merge_in_memory, write_merged
    from codiemb.train.ray_trainer import init_ray

    t_start = time.perf_counter()
    if cfg.tune is None or cfg.merge is None:
        raise ConfigError("a merge search needs both a 'tune' and a 'merge' section")
    if cfg.tune.objective == "maximin" and not cfg.tune.dev.reference:
        raise ConfigError("tune.objective maximin scores trials against the merged models' dev scores: "
                          "set tune.dev.reference: true")
    cfg = absolutize(cfg)
    space_cfg = dict(cfg.tune.space or DEFAULT_MERGE_SPACE)
    check_merge_space(space_cfg, len(cfg.merge.models))
    param_space = build_param_space(space_cfg)
    root, name = experiment_dir(cfg)
    exp_path = root / name

    from codiemb import console

    bar = console.stage("tune", total=cfg.tune.num_samples, unit="trial")
    bar.set_postfix_str("dev pool (BM25 + base-model mining, cached)")
    inputs = load_inputs(cfg)
    dev = dev_set_for(cfg, inputs)
    bar.set_postfix_str("trials")
    log.info("dev set: %s", dev.info)
    methods = space_cfg.get("method", {}).get("values", []) if isinstance(space_cfg.get("method"), dict) else \
        [space_cfg.get("method", cfg.merge.method)]
    probe = None
    if "self_positioning" in methods or cfg.merge.method == "self_positioning":
        probe = build_probe(cfg, inputs.encoder, cfg.merge.probe_size, cfg.run.seed)

    init_ray()
    restoring = cfg.tune.resume and tune.Tuner.can_restore(str(exp_path))
    if exp_path.exists() and not restoring:
        log.info("starting the sweep afresh: removing %s", exp_path)
        shutil.rmtree(exp_path)
    exp_path.mkdir(parents=True, exist_ok=True)

    tracking = None
    parent_ctx = None
    if cfg.tracking.enabled:
        from codiemb.tracking.mlflow_run import start_run

        parent_ctx = start_run(cfg, run_id=parent_run_id(exp_path) if restoring else None, run_name=name,
                               tags={"codiemb.kind": "merge-search"}, nested=_inside_a_run())
    import contextlib

    with (parent_ctx or contextlib.nullcontext()) as parent:
        if parent is not None:
            parent.flush(force=True)
            if parent.run_id:
                (exp_path / PARENT_RUN_FILE).write_text(parent.run_id)
            tracking = TrackingInfo(cfg.tracking.uri, cfg.tracking.experiment, parent.run_id)
        reference = _reference_scores(inputs, dev, cfg) if cfg.tune.dev.reference else {}
        bundle = _bundle(cfg, inputs, dev, tracking, probe)
        if cfg.tune.objective == "maximin":
            bundle["objective_targets"] = specialist_targets(reference)
            reference = {k: with_objective(v, cfg.tune.objective_weights, bundle["objective_targets"])
                         for k, v in reference.items()}
            log.info("maximin targets (best merged model per dev metric): %s", json.dumps(bundle["objective_targets"]))
        log.info("reference dev scores: %s", json.dumps(reference))
        cpus = cfg.tune.trial_cpus if cfg.tune.trial_cpus is not None else 1.0
        trainable = tune.with_resources(tune.with_parameters(merge_trial, bundle=bundle), {"cpu": cpus})
        if restoring:
            log.info("resuming the sweep in %s", exp_path)
            tuner = tune.Tuner.restore(str(exp_path), trainable=trainable, resume_unfinished=True,
                                       resume_errored=False, restart_errored=False)
        else:
            from codiemb.tune.common import make_searcher

            tuner = tune.Tuner(
                trainable,
                param_space=param_space,
                tune_config=tune.TuneConfig(search_alg=make_searcher(cfg), num_samples=cfg.tune.num_samples,
                                            max_concurrent_trials=cfg.tune.max_concurrent, reuse_actors=True),
                run_config=tune.RunConfig(name=name, storage_path=str(root),
                                          failure_config=tune.FailureConfig(max_failures=cfg.tune.max_failures),
                                          callbacks=[*(callbacks or []), trial_progress(bar)], verbose=1),
            )
        grid = tuner.fit()
        rows = collect_rows(grid, list(space_cfg))
        done = sum(r["status"] != "INCOMPLETE" for r in rows)
        bar.update(max(0, done - bar.n))
        bar.set_postfix_str("writing the best merge")
        finish_children(tracking, rows)
        best = select_best(rows, cfg)
        n_err = sum(r["status"] == "ERROR" for r in rows)
        complete = len(rows) >= cfg.tune.num_samples and all(r["status"] != "INCOMPLETE" for r in rows)
        if not complete:
            log.warning("the sweep was interrupted after %d of %d trials; run the same command again to resume "
                        "(tune.resume: true)", sum(r["status"] != "INCOMPLETE" for r in rows), cfg.tune.num_samples)
        csv_path = write_csv(rows, exp_path / "results.csv")
        png = pareto_plot(rows, exp_path / "pareto_front.png", best, reference,
                          title=f"{name}: {len(rows)} trials ({n_err} failed)")

        output_dir = None
        best_config: dict[str, Any] = {}
        best_metrics: dict[str, float] = {}
        if best is not None:
            best_config = {k: best[k] for k in space_cfg if k in best}
            best_metrics = {k: best[k] for k in (*METRICS.values(), OBJECTIVE) if k in best}
            method, weights, params = merge_trial_args(best_config, cfg.merge.method, inputs.weights,
                                                       cfg.merge.parameters)
            sd, extra = merge_in_memory(method, inputs, weights, params, probe=probe)
            out = Path(cfg.tune.output) if cfg.tune.output else exp_path / "best-model"
            report = {"method": method, "parameters": params, "weights": weights, "base": inputs.base_name,
                      "inputs": [{"model": n, "weight": w} for n, w in zip(inputs.names, weights)],
                      "search": {"experiment": str(exp_path), "trial_id": best["trial_id"], "config": best_config,
                                 "objective": cfg.tune.objective, "n_trials": len(rows), "n_failed": n_err},
                      "dev": {**best_metrics, "pool": dev.info}, "reference_dev": reference, **extra}
            output_dir = str(write_merged(inputs, sd, out, report))
        (exp_path / "best.json").write_text(json.dumps({"trial_id": best and best["trial_id"], "config": best_config,
                                                         "metrics": best_metrics, "output": output_dir,
                                                         "reference": reference}, indent=2, default=str))
        if parent is not None:
            parent.log_params({f"best.{k}": v for k, v in best_config.items()})
            parent.log_metrics({f"best/{k}": v for k, v in best_metrics.items()})
            parent.log_metrics({f"reference/{n.split(':')[0]}/{k}": v for n, sc in reference.items()
                                for k, v in sc.items() if k in (*METRICS.values(), OBJECTIVE)})
            parent.log_metrics({"trials": len(rows), "trials_failed": n_err,
                                "sweep_seconds": time.perf_counter() - t_start})
            parent.log_artifact(str(csv_path), "sweep")
            parent.log_artifact(str(exp_path / "best.json"), "sweep")
            if png is not None:
                parent.log_artifact(str(png), "sweep")
            parent.set_tags({"codiemb.best_trial": best["trial_id"] if best else "none"})
    best_obj = best_metrics.get(OBJECTIVE)
    bar.set_postfix_str(f"best dev objective {best_obj:.2f}" if isinstance(best_obj, (int, float)) else "done")
    bar.close()
    return SweepResult(search="merge", experiment_path=str(exp_path), best_trial=best and best["trial_id"],
                       best_config=best_config, best_metrics=best_metrics, output_dir=output_dir,
                       n_trials=len(rows), n_errors=n_err, rows=rows, results_csv=str(csv_path),
                       pareto_png=str(png) if png else None, parent_run_id=tracking.parent_run_id if tracking else None,
                       wall_s=time.perf_counter() - t_start, reference=reference, complete=complete)


__all__ = ["merge_trial", "run_merge_search"]



def _inside_a_run() -> bool:
    """True inside the pipeline's parent run: the sweep's run is then nested under it."""
    import mlflow

    return mlflow.active_run() is not None
