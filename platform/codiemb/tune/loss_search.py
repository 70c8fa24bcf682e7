"""Search 2: loss weights and the sampler temperature; each trial trains with its own TorchTrainer.

Ray Train V2 does not take a trainer as a Tune trainable (no ``Tuner(trainer)``). The Tune + Train
V2 pattern: the Tune trial is a plain function that builds a ``TorchTrainer`` and calls ``fit()``;
the trainer's ``RunConfig(callbacks=[TuneReportCallback()])`` forwards every ``ray.train.report``
of the workers to Tune, so a scheduler sees them as the trial's intermediate results::

    def loss_trial(config):                                  # a Tune trial (one actor)
        cfg = apply_trial(base_config, config)               # loss.sts.rank_kl=..., sampler.temperature=...
        TorchTrainer(loss_trial_worker, ..., run_config=ray.train.RunConfig(
            callbacks=[TuneReportCallback()])).fit()

    Tuner(loss_trial, param_space, TuneConfig(search_alg=OptunaSearch(...), scheduler=ASHAScheduler(...)))

The worker body is the plain training loop (``train/loop.py``). Every ``train.eval_every`` steps
(forced equal to ``checkpoint_every``) rank 0 scores the dev sets (``evaluate_dev``) and every
rank then reports ``{step, sts_spearman, retrieval_ndcg_at_10, objective}`` — one report is one
ASHA time unit (``training_iteration``); ASHA stops the trials whose objective is in the bottom
1 − 1/reduction_factor at a rung. The final report carries the final dev scores and the model.
Each trial is a nested MLflow run under the sweep's run (training metrics logged from rank 0);
a trial stopped by ASHA is closed as KILLED.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from codiemb.config import Config, config_from_dict
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
    make_searcher,
    parent_run_id,
    pareto_plot,
    select_best,
    trial_index,
    trial_progress,
    trial_run,
    with_objective,
    write_csv,
)
from codiemb.tune.space import apply_trial, build_param_space, check_loss_space

log = logging.getLogger(__name__)

_DEV_NAMES = {"sts_spearman": METRICS["sts"], "retrieval_ndcg@10": METRICS["retrieval"]}
_ENV_KEYS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "CODIEMB_NO_PROGRESS", "CODIEMB_DATA", "TOKENIZERS_PARALLELISM")


def _dev_metrics(dev: dict[str, float], weights: dict[str, float]) -> dict[str, float]:
    return with_objective({_DEV_NAMES[k]: v for k, v in dev.items() if k in _DEV_NAMES}, weights)


class _ReportCallbacks:
    """Loop callbacks in a Train worker: rank 0 logs to the trial's MLflow run and keeps the
    latest dev scores; at each checkpoint step every rank reports (Train needs all ranks), rank
    0's report carrying the dev scores (that is the one ``TuneReportCallback`` forwards)."""

    def __init__(self, rank: int, tracker: Any | None, weights: dict[str, float]):
        self.rank, self.tracker, self.weights = rank, tracker, weights
        self.dev: dict[str, float] = {}

    def on_log(self, step: int, metrics: dict[str, float]) -> None:
        if self.tracker is not None:
            self.tracker.log_metrics({k.replace("@", "_at_"): v for k, v in metrics.items()}, step=step)
        dev = {k[4:]: v for k, v in metrics.items() if k.startswith("dev/")}
        if dev:
            self.dev = _dev_metrics(dev, self.weights)
            # logged here, before the report that may end the trial: Tune stops a trial (and its
            # process) as soon as ASHA has its last report, so code after fit() may never run
            if self.tracker is not None and OBJECTIVE in self.dev:
                self.tracker.log_metrics({OBJECTIVE: self.dev[OBJECTIVE]}, step=step)

    def on_checkpoint(self, step: int, path: Path | None) -> None:
        import ray.train

        metrics: dict[str, Any] = {"step": step}
        if self.rank == 0:
            metrics.update(self.dev)
            self.dev = {}
        ray.train.report(metrics)


def loss_trial_worker(config: dict) -> None:
    """The Train worker body of a loss-search trial: the plain loop on this worker's shards."""
    import ray.train
    import ray.train.torch

    from codiemb.train.loop import DistContext, train
    from codiemb.train.ray_trainer import open_tasks

    cfg = config_from_dict(config["cfg"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    from codiemb.train.ray_trainer import _prepare_ddp

    ctx = DistContext(rank=rank, world_size=world, device=ray.train.torch.get_device(), prepare_model=_prepare_ddp)
    tasks = open_tasks(cfg, config["shard_sets"], config.get("data_counts"))
    tracker = None
    if rank == 0 and config.get("mlflow_run_id"):
        from codiemb.tracking.mlflow_run import SafeLogger

        tracker = SafeLogger(cfg.tracking.uri, config["mlflow_run_id"], experiment=cfg.tracking.experiment)
    callbacks = _ReportCallbacks(rank, tracker, config["objective_weights"])
    workdir = Path(tempfile.mkdtemp(prefix=f"codiemb-{cfg.run.name}-rank{rank}-"))
    try:
        result = train(cfg, tasks, output_dir=workdir / "out", ctx=ctx, callbacks=callbacks, resume=False,
                       data_counts=config.get("data_counts"))
        metrics: dict[str, Any] = {"step": result.steps, "final": 1}
        checkpoint = None
        if rank == 0:
            metrics.update(_dev_metrics(result.dev or {}, config["objective_weights"]))
            final = workdir / "final"
            final.mkdir()
            shutil.copytree(result.model_dir, final / "model")
            (final / "train_summary.json").write_text(json.dumps(result.__dict__, indent=1, default=str))
            checkpoint = ray.train.Checkpoint.from_directory(str(final))
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name="final")
    finally:
        if tracker is not None:
            tracker.close(end_run=False)
        shutil.rmtree(workdir, ignore_errors=True)


def loss_trial(config: dict[str, Any], bundle: dict[str, Any]) -> None:
    """One Tune trial: this trial's config -> a TorchTrainer run whose reports reach Tune."""
    import ray.train
    from ray import tune
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    from codiemb.train.ray_trainer import build_shards_with_ray, worker_resources

    ctx = tune.get_context()
    trial_id = ctx.get_trial_id()
    cfg = apply_trial(bundle["cfg"], config)
    cfg.run.name = f"{bundle['name']}-{trial_id}"
    with trial_run(bundle["tracking"], ctx.get_trial_name(), {"codiemb.trial_id": trial_id,
                                                               "codiemb.kind": "loss-trial"}) as tracker:
        tracker.log_params(dict(config))
        if trial_index(ctx.get_trial_dir()) in bundle["fail_trials"]:
            raise RuntimeError(f"CODIEMB_TUNE_FAIL_TRIALS: injected failure in trial {trial_id}")
        workdir = Path(bundle["exp_path"]) / "trainers" / trial_id
        shard_sets, counts = build_shards_with_ray(cfg, workdir)  # built once per sweep: trials reuse them
        env = {k: os.environ[k] for k in _ENV_KEYS if k in os.environ}
        trainer = TorchTrainer(
            loss_trial_worker,
            train_loop_config={"cfg": cfg.to_dict(), "mlflow_run_id": tracker.run_id, "data_counts": counts,
                               "objective_weights": bundle["objective_weights"], "shard_sets": shard_sets},
            scaling_config=ray.train.ScalingConfig(num_workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu,
                                                   resources_per_worker=worker_resources(cfg)),
            run_config=ray.train.RunConfig(name=trial_id, storage_path=str(Path(bundle["exp_path"]) / "trainers"),
                                           callbacks=[TuneReportCallback()],
                                           failure_config=ray.train.FailureConfig(max_failures=0),
                                           worker_runtime_env={"env_vars": env} if env else None),
        )
        result = trainer.fit()
        if result.error:
            raise result.error
        final = {k: v for k, v in (result.metrics or {}).items() if k in (*METRICS.values(), OBJECTIVE)}
        tracker.log_metrics(final)


def _check(cfg: Config) -> None:
    if cfg.tune is None:
        raise ConfigError("config has no 'tune' section")
    if cfg.tune.objective == "maximin":
        raise ConfigError("tune.objective maximin compares a merge with the models it merges; a loss search has "
                          "none: use weighted or pareto")
    if not cfg.data.datasets:
        raise ConfigError("a loss search trains: data.datasets is empty")
    if cfg.data.dev is None or not (cfg.data.dev.sts or cfg.data.dev.retrieval):
        raise ConfigError("a loss search scores every trial on the dev sets: set data.dev")
    if not cfg.tune.space:
        raise ConfigError("tune.space is empty: name the loss weights to search, e.g. loss.sts.rank_kl")


def asha_scheduler(cfg: Config):
    """ASHA (Li et al. 2018, https://arxiv.org/abs/1810.05934) over report counts."""
    from ray.tune.schedulers import ASHAScheduler

    a = dict(cfg.tune.asha or {})
    unknown = sorted(set(a) - {"max_t", "grace_period", "reduction_factor", "brackets"})
    if unknown:
        raise ConfigError(f"tune.asha: unknown key(s) {', '.join(unknown)}; known: max_t, grace_period, "
                          "reduction_factor, brackets")
    return ASHAScheduler(time_attr="training_iteration", metric=OBJECTIVE, mode="max",
                         max_t=int(a.get("max_t", 100)), grace_period=int(a.get("grace_period", 1)),
                         reduction_factor=float(a.get("reduction_factor", 2)), brackets=int(a.get("brackets", 1)))


def warn_without_state_api() -> bool:
    """Warn (and return False) when the cluster serves no State API (it comes with the dashboard).

    A trial that Tune stops (ASHA, or the last report at ``max_t``) kills its TorchTrainer's
    controller; Ray Train's placement-group cleaner then removes the workers' placement group only
    after the State API says the controller is dead. Without it every stopped trial keeps its
    workers' CPUs, and a later trainer waits for them forever.
    """
    from ray.util.state import list_nodes

    try:
        list_nodes(limit=1, timeout=10, raise_on_missing_output=False)
        return True
    except Exception as e:  # no dashboard: connection refused, or the API server is down
        log.warning("this Ray cluster has no State API (no dashboard): a trial that ASHA stops leaves its "
                    "trainer's placement group, and its CPUs, held, so the sweep may stall; start Ray with "
                    "the dashboard (ray[default]; `ray start --head` includes it). (%s)", str(e).splitlines()[0])
        return False


def run_loss_search(cfg: Config) -> SweepResult:
    """Run (or resume) the loss-weight sweep; see the module docstring. The best trial's model is
    copied to ``tune.output`` (default ``<experiment>/best-model``)."""
    from ray import tune

    from codiemb.train.ray_trainer import init_ray

    t_start = time.perf_counter()
    _check(cfg)
    cfg = absolutize(cfg)
    every = cfg.train.eval_every or cfg.train.checkpoint_every
    if not every:
        raise ConfigError("a loss search reports every train.eval_every steps: set it > 0")
    cfg.train.eval_every = cfg.train.checkpoint_every = every
    cfg.train.checkpoint_every_minutes = None  # each checkpoint is a report, one ASHA rung step: by steps only
    tree = cfg.to_dict()
    check_loss_space(tree, cfg.tune.space)
    param_space = build_param_space(cfg.tune.space)
    root, name = experiment_dir(cfg)
    exp_path = root / name

    init_ray()
    warn_without_state_api()
    restoring = cfg.tune.resume and tune.Tuner.can_restore(str(exp_path))
    if exp_path.exists() and not restoring:
        shutil.rmtree(exp_path)
    exp_path.mkdir(parents=True, exist_ok=True)
    from codiemb.train.ray_trainer import build_shards_with_ray

    build_shards_with_ray(cfg, exp_path)  # once, here: every trial with this data and tokenizer reuses them

    tracking = None
    parent_ctx = None
    if cfg.tracking.enabled:
        from codiemb.tracking.mlflow_run import start_run

        parent_ctx = start_run(cfg, run_id=parent_run_id(exp_path) if restoring else None, run_name=name,
                               tags={"codiemb.kind": "loss-search"}, nested=_inside_a_run())
    with (parent_ctx or contextlib.nullcontext()) as parent:
        if parent is not None:
            parent.flush(force=True)
            if parent.run_id:
                (exp_path / PARENT_RUN_FILE).write_text(parent.run_id)
            tracking = TrackingInfo(cfg.tracking.uri, cfg.tracking.experiment, parent.run_id)
        bundle = {"cfg": tree, "name": name, "tracking": tracking, "exp_path": str(exp_path),
                  "objective_weights": dict(cfg.tune.objective_weights), "fail_trials": fail_trials_from_env()}
        # the trial only drives its TorchTrainer (whose workers hold the CPUs); Tune needs > 0
        cpus = max(0.01, cfg.tune.trial_cpus if cfg.tune.trial_cpus is not None else 0.1)
        from codiemb import console

        bar = console.stage("tune", total=cfg.tune.num_samples, unit="trial")
        trainable = tune.with_resources(tune.with_parameters(loss_trial, bundle=bundle), {"cpu": cpus})
        if restoring:
            tuner = tune.Tuner.restore(str(exp_path), trainable=trainable, resume_unfinished=True,
                                       resume_errored=False, restart_errored=False)
        else:
            tuner = tune.Tuner(
                trainable,
                param_space=param_space,
                tune_config=tune.TuneConfig(search_alg=make_searcher(cfg), scheduler=asha_scheduler(cfg),
                                            num_samples=cfg.tune.num_samples,
                                            max_concurrent_trials=cfg.tune.max_concurrent),
                run_config=tune.RunConfig(name=name, storage_path=str(root),
                                          failure_config=tune.FailureConfig(max_failures=cfg.tune.max_failures),
                                          callbacks=[trial_progress(bar)], verbose=1),
            )
        grid = tuner.fit()
        bar.close()
        rows = collect_rows(grid, list(cfg.tune.space))
        finish_children(tracking, rows)
        best = select_best(rows, cfg)
        n_err = sum(r["status"] == "ERROR" for r in rows)
        complete = len(rows) >= cfg.tune.num_samples and all(r["status"] != "INCOMPLETE" for r in rows)
        csv_path = write_csv(rows, exp_path / "results.csv")
        png = pareto_plot(rows, exp_path / "pareto_front.png", best, None,
                          title=f"{name}: {len(rows)} trials ({n_err} failed)")
        best_config = {k: best[k] for k in cfg.tune.space if best and k in best}
        best_metrics = {k: best[k] for k in (*METRICS.values(), OBJECTIVE) if best and k in best}
        output_dir = None
        if best is not None:
            for r in grid:
                if (r.metrics or {}).get("trial_id") == best["trial_id"] or \
                        Path(r.path or "").name.find(f"_{best['trial_id']}_") >= 0:
                    ckpt = (r.metrics or {}).get("checkpoint_path")
                    if ckpt and (Path(ckpt) / "model").is_dir():
                        out = Path(cfg.tune.output) if cfg.tune.output else exp_path / "best-model"
                        if out.exists():
                            shutil.rmtree(out)
                        shutil.copytree(Path(ckpt) / "model", out)
                        output_dir = str(out)
        (exp_path / "best.json").write_text(json.dumps({"trial_id": best and best["trial_id"], "config": best_config,
                                                         "metrics": best_metrics, "output": output_dir}, indent=2))
        if parent is not None:
            parent.log_params({f"best.{k}": v for k, v in best_config.items()})
            parent.log_metrics({f"best/{k}": v for k, v in best_metrics.items()})
            parent.log_metrics({"trials": len(rows), "trials_failed": n_err,
                                "trials_stopped_early": sum(1 for r in rows if r["status"] == "TERMINATED"
                                                            and r.get("training_iteration", 0) < _max_reports(r, rows)),
                                "sweep_seconds": time.perf_counter() - t_start})
            parent.log_artifact(str(csv_path), "sweep")
            parent.log_artifact(str(exp_path / "best.json"), "sweep")
            if png is not None:
                parent.log_artifact(str(png), "sweep")
    return SweepResult(search="loss", experiment_path=str(exp_path), best_trial=best and best["trial_id"],
                       best_config=best_config, best_metrics=best_metrics, output_dir=output_dir,
                       n_trials=len(rows), n_errors=n_err, rows=rows, results_csv=str(csv_path),
                       pareto_png=str(png) if png else None, parent_run_id=tracking.parent_run_id if tracking else None,
                       wall_s=time.perf_counter() - t_start, complete=complete)


def _max_reports(row: dict, rows: list[dict]) -> int:
    return max((r.get("training_iteration") or 0) for r in rows)


def _inside_a_run() -> bool:
    """True inside the pipeline's parent run: the sweep's run is then nested under it."""
    import mlflow

    return mlflow.active_run() is not None
