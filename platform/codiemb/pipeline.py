"""The whole job: train (joint, or specialists) -> merge / merge search -> evaluate -> register -> gate.

The gate decides on the dev suite (``registry.gate.suite``, default ``dev``; a test suite is
refused); the test suite (``evaluate.suite``, default ``default``) is evaluated after the decision
and only reported. Both evaluations share the corpus embeddings (``embedding_cache_dir``), so a
model embeds a corpus once.

One parent MLflow run holds it all; every training run, merge and sweep trial is a nested child run.
``codiemb pipeline CONFIG`` and ``jobs/pipeline.py`` call :func:`run_pipeline`; ``codiemb quickstart``
runs it on ``configs/quickstart.yaml``. Like ``cli.py`` this module sits at the edge: it may import
Ray and MLflow (lazily), the core does not.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from codiemb.config import Config, MergeConfig, MergeModelConfig, apply_overrides, config_from_dict
from codiemb.errors import ConfigError, UserError

log = logging.getLogger(__name__)

PARENT_RUN_FILE = "mlflow_pipeline_run_id.txt"


@dataclass
class PipelineResult:
    model_dir: str
    models: dict[str, str] = field(default_factory=dict)
    evaluation: dict[str, Any] | None = None
    registered: dict[str, Any] | None = None
    gate: dict[str, Any] | None = None
    run_id: str | None = None
    sweep: dict[str, Any] | None = None
    wall_s: float = 0.0
    stages_s: dict[str, float] = field(default_factory=dict)
    dev_evaluation: dict[str, Any] | None = None  # the gate's suite (dev): what the champion is chosen on


def embedding_cache_dir(cfg: Config) -> str:
    """Where evaluations cache corpus embeddings: ``<storage.path>/.cache/embeddings`` (``./runs/...`` for s3)."""
    base = Path("runs") if cfg.storage.path.startswith("s3://") else Path(cfg.storage.path)
    return str(base / ".cache" / "embeddings")


def specialist_config(cfg: Config, name: str, overrides: dict[str, Any]) -> Config:
    """The pipeline config with a specialist's dotted overrides; its own run name and output."""
    tree = cfg.to_dict()
    tree["pipeline"] = None
    tree["run"]["name"] = f"{cfg.run.name}-{name}"
    tree["train"]["output"] = None
    apply_overrides(tree, [f"{k}={json.dumps(v)}" for k, v in overrides.items()])
    return config_from_dict(tree, f"pipeline.specialists.{name}")


def log_geometry(logger, model: str, root: Path, data_dir=None) -> dict:
    """The embedding-geometry report of a registered model (``codiemb report``'s defaults) on its
    MLflow run: metrics ``geometry/<task>/<metric>``, ``geometry.md``, ``geometry.json``, ``geometry.png``
    (also written to ``root``)."""
    from codiemb.evaluate.geometry import flat_metrics, geometry_png, geometry_report, geometry_table, sample_tasks

    report = geometry_report(model, sample_tasks(data_dir))
    logger.log_metrics(flat_metrics(report))
    table = geometry_table([report])
    (root / "geometry.md").write_text(table)
    logger.log_text(table, "geometry.md")
    logger.log_text(json.dumps(report, indent=1), "geometry.json")
    logger.log_artifact(geometry_png([report], root / "geometry.png"))
    return report


def run_pipeline(cfg: Config, *, local: bool = False, resume: bool = True) -> PipelineResult:
    from codiemb.tracking.mlflow_run import start_run
    from codiemb.tracking.train_run import output_root, train_tracked

    if cfg.pipeline is None:
        raise ConfigError("config has no 'pipeline' section (stages, specialists)")
    stages = list(cfg.pipeline.stages)
    if "register" in stages:  # fail before training, not after: the gate decides on dev only
        from codiemb.tracking.registry import check_gate_suite

        check_gate_suite(cfg.registry.gate.suite if cfg.registry else "dev")
    if "train" in stages or "tune" in stages:  # training-free: its evaluation of merged models is below
        from codiemb.train.loop import refuse_token_prepending

        refuse_token_prepending(cfg)
    root = output_root(cfg)
    root.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    id_file = root / PARENT_RUN_FILE
    previous = id_file.read_text().strip() if resume and id_file.is_file() else None

    with start_run(cfg, run_id=previous, run_name=f"pipeline-{cfg.run.name}") as parent:
        if parent.run_id:
            id_file.write_text(parent.run_id)
        models: dict[str, str] = {}
        final: str | None = None
        sweep_info = None

        # ---------------------------------------------------------------- train
        if "train" in stages:
            t0 = time.perf_counter()
            if cfg.pipeline.specialists:
                for name, overrides in cfg.pipeline.specialists.items():
                    scfg = specialist_config(cfg, name, overrides)
                    t1 = time.perf_counter()
                    result, _ = train_tracked(scfg, local=local, resume=resume, nested=True, log_model=False)
                    log.info("specialist %s: %.1f s (data + training %.1f s of it in the loop)", name,
                             time.perf_counter() - t1, result.wall_s)
                    models[name] = result.model_dir
                    log.info("specialist %s: %s", name, result.model_dir)
            else:
                result, _ = train_tracked(cfg, local=local, resume=resume, nested=True, log_model=False)
                models["joint"] = result.model_dir
            final = list(models.values())[-1]
            timings["train"] = time.perf_counter() - t0

        merge_cfg = cfg
        if models and ("merge" in stages or "tune" in stages):
            m = cfg.merge or MergeConfig()
            m = m.model_copy(update={"models": [MergeModelConfig(model=p) for p in models.values()],
                                     "base_model": m.base_model or cfg.model.name})
            merge_cfg = cfg.model_copy(update={"merge": m})

        # ---------------------------------------------------------------- merge search / merge
        if "tune" in stages:
            from codiemb.tune.merge_search import run_merge_search

            t0 = time.perf_counter()
            if merge_cfg.tune is None:
                raise ConfigError("pipeline stage 'tune' needs a 'tune' section")
            sweep = run_merge_search(merge_cfg)
            if not sweep.output_dir:
                raise UserError("the merge search finished without a successful trial")
            final = sweep.output_dir
            sweep_info = {"best_config": sweep.best_config, "best_metrics": sweep.best_metrics,
                          "n_trials": sweep.n_trials, "n_errors": sweep.n_errors, "wall_s": sweep.wall_s}
            parent.log_metrics({f"sweep/best_{k}": v for k, v in sweep.best_metrics.items()
                                if isinstance(v, (int, float))})
            timings["tune"] = time.perf_counter() - t0
        elif "merge" in stages:
            from codiemb.merge.run import run_merge

            t0 = time.perf_counter()
            merged = run_merge(merge_cfg, output=root / "merged")
            final = merged.output_dir
            timings["merge"] = time.perf_counter() - t0
        if final is None:
            raise ConfigError("pipeline produced no model: include 'train' (or 'merge' with merge.models)")

        # ---------------------------------------------------------------- evaluate (dev: the gate's suite)
        from codiemb import console
        from codiemb.evaluate.report import markdown_table
        from codiemb.evaluate.suites import evaluate_model

        cache_dir = embedding_cache_dir(cfg)
        gate_suite = cfg.registry.gate.suite if cfg.registry else "dev"
        report_suite = cfg.evaluate.get("suite", "default")
        evaluation = dev_evaluation = None
        dev_summary: dict[str, float] = {}

        tp = cfg.model.token_prepending

        def run_eval(suite: str, label: str) -> dict:
            with console.stage(f"evaluate {label}", unit="text") as bar:
                bar.set_postfix_str(f"suite {suite}")
                return evaluate_model(final, suite=suite, data_dir=cfg.data.root, show_progress=False,
                                      cache_dir=cache_dir, progress=bar,
                                      token_prepending=tp if tp.enabled else None)

        def report_test() -> None:  # reported, never used to choose (after the gate when there is one)
            nonlocal evaluation
            t0 = time.perf_counter()
            evaluation = run_eval(report_suite, "test")
            log.info("evaluate test: %.1f s", time.perf_counter() - t0)
            summary = {k: float(v) for k, v in evaluation["summary"].items() if isinstance(v, (int, float))}
            parent.log_metrics({f"eval/{k}": v for k, v in summary.items()})
            table = markdown_table(evaluation)
            parent.log_text(table, "evaluation.md")
            parent.log_text(json.dumps(evaluation, indent=1), "evaluation.json")
            (root / "evaluation.md").write_text(table + "\n")
            timings["evaluate"] = timings.get("evaluate", 0.0) + time.perf_counter() - t0

        if "evaluate" in stages or "register" in stages:
            t0 = time.perf_counter()
            dev_evaluation = run_eval(gate_suite, "dev")
            log.info("evaluate dev: %.1f s", time.perf_counter() - t0)
            dev_summary = {k: float(v) for k, v in dev_evaluation["summary"].items() if isinstance(v, (int, float))}
            parent.log_metrics({f"eval_dev/{k}": v for k, v in dev_summary.items()})
            parent.log_text(json.dumps(dev_evaluation, indent=1), "evaluation_dev.json")
            timings["evaluate"] = time.perf_counter() - t0
            if "register" not in stages:
                report_test()

        # ---------------------------------------------------------------- register + gate (on dev)
        registered = gate = None
        if "register" in stages:
            from codiemb.tracking.registry import check_gate_suite, log_model, promote, register

            check_gate_suite(gate_suite)
            t0 = time.perf_counter()
            bar = console.stage("register", total=3, unit="step")
            name = cfg.registry.name if cfg.registry else cfg.run.name
            parent.flush(force=True)
            if not parent.run_id:
                bar.close()
                raise UserError(f"MLflow at {cfg.tracking.uri} is unreachable: the model stays at {final}; "
                                f"run `codiemb register {root}` when it is back")
            bar.set_postfix_str("log model")
            log_model(final, run_id=parent.run_id, config=cfg.to_dict(),
                      metrics={f"dev_{k}": v for k, v in dev_summary.items()},
                      data={k: str(v) for k, v in models.items()})
            bar.update(1)
            bar.set_postfix_str("register")
            version = register(parent.run_id, name)
            bar.update(1)
            registered = {"name": name, "version": version, "uri": f"models:/{name}/{version}"}
            challenger_uri = f"models:/{name}/{version}"

            def score(uri: str) -> dict[str, float]:
                if uri == challenger_uri and dev_summary:
                    return dev_summary  # just measured on the same suite: do not evaluate twice
                from codiemb.tracking.registry import default_score_fn

                return dict(default_score_fn(gate_suite, cfg.data.root, cache_dir=cache_dir)(uri))

            gate_cfg = cfg.registry.gate if cfg.registry else None
            bar.set_postfix_str(f"gate on {gate_suite}")
            gate = promote(name, version, suite=gate_suite, margin=gate_cfg.margin if gate_cfg else 0.1,
                           score_fn=score)
            bar.update(1)
            bar.set_postfix_str(gate["decision"])
            bar.close()
            parent.set_tags({"registered_model": name, "registered_version": version,
                             "gate.decision": gate["decision"], "gate.suite": gate_suite})
            timings["register"] = time.perf_counter() - t0
            if "evaluate" in stages:
                report_test()
            t0 = time.perf_counter()
            log_geometry(parent, final, root, data_dir=cfg.data.root)
            timings["geometry"] = time.perf_counter() - t0

        wall = time.perf_counter() - t_start
        parent.log_metrics({f"time/{k}_s": v for k, v in timings.items()} | {"time/total_s": wall})
        result = PipelineResult(model_dir=str(final), models=models, evaluation=evaluation, registered=registered,
                                gate=gate, run_id=parent.run_id, sweep=sweep_info, wall_s=wall, stages_s=timings,
                                dev_evaluation=dev_evaluation)
        (root / "pipeline_result.json").write_text(json.dumps(result.__dict__, indent=1, default=str))
        return result
