"""Training under one MLflow run: the resolved config, data counts, per-task losses, throughput,
per-task step counts (planned and done), a loss-curve PNG and the model.

The run id is written next to the run's output (``mlflow_run_id.txt``) and into every checkpoint,
so re-running the same command (or Ray restarting the workers) continues the same MLflow run.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from codiemb.config import Config
from codiemb.tracking.run_folder_lock import run_folder_lock
from codiemb.train.loop import TrainResult

log = logging.getLogger(__name__)

RUN_ID_FILE = "mlflow_run_id.txt"


def output_root(cfg: Config) -> Path:
    if cfg.train.output:
        return Path(cfg.train.output).parent if Path(cfg.train.output).name == "model" else Path(cfg.train.output)
    if cfg.storage.path.startswith("s3://"):
        return Path("runs") / cfg.run.name
    return Path(cfg.storage.path) / cfg.run.name


class _LoggerCallbacks:
    def __init__(self, logger):
        self.logger = logger

    def on_log(self, step: int, metrics: dict[str, float]) -> None:
        self.logger.log_metrics(metrics, step=step)

    def on_checkpoint(self, step: int, path: Path | None) -> None:
        if path is not None and self.logger.run_id:
            (Path(path) / RUN_ID_FILE).write_text(self.logger.run_id)


def loss_history(metrics_file: Path) -> dict[str, list[tuple[int, float]]]:
    history: dict[str, list[tuple[int, float]]] = {}
    if not metrics_file.is_file():
        return history
    for line in metrics_file.read_text().splitlines():
        row = json.loads(line)
        for k, v in row.items():
            if k.startswith("loss/"):
                history.setdefault(k[5:], []).append((int(row["step"]), float(v)))
    return history


def train_tracked(cfg: Config, *, local: bool, resume: bool = True, nested: bool = False,
                  log_model: bool = True) -> tuple[TrainResult, str | None]:
    """Train (in this process or on Ray) inside an MLflow run; return the result and the run id."""
    from codiemb.train.loop import refuse_token_prepending

    refuse_token_prepending(cfg)  # before any shard build or Ray start
    root = output_root(cfg)
    with run_folder_lock(root):  # a second training into the same folder is refused
        return _train_tracked(cfg, root, local=local, resume=resume, nested=nested, log_model=log_model)


def _train_tracked(cfg: Config, root: Path, *, local: bool, resume: bool, nested: bool,
                   log_model: bool) -> tuple[TrainResult, str | None]:
    if local and not cfg.train.output:
        cfg = cfg.model_copy(deep=True)
        cfg.train.output = str(root)

    if not cfg.tracking.enabled:
        return _train(cfg, local, resume, None), None

    from codiemb.tracking.mlflow_run import loss_curve_png, start_run

    id_file = root / RUN_ID_FILE
    previous = id_file.read_text().strip() if resume and id_file.is_file() else None
    with start_run(cfg, run_id=previous, nested=nested) as logger:
        if logger.run_id:
            id_file.write_text(logger.run_id)
        from codiemb.tracking.registry import OUTPUT_DIR_TAG

        # where the model stays if it cannot be logged: `codiemb register RUN_ID` looks here later
        logger.set_tags({OUTPUT_DIR_TAG: str(root.resolve())})
        result = _train(cfg, local, resume, logger)
        logger.log_params({f"data.{name}.{k}": v for name, c in (result.data_counts or {}).items()
                           for k, v in c.items()})
        final = {"train/steps": result.steps, "train/samples_per_s": result.samples_per_s,
                 "train/tokens_per_s": result.tokens_per_s, "train/wall_s": result.wall_s}
        final.update({f"steps_done/{k}": v for k, v in result.steps_per_task.items()})
        final.update({f"steps_planned/{k}": v for k, v in result.planned_steps_per_task.items()})
        final.update({f"dev/{k}": v for k, v in (result.dev or {}).items()})
        logger.log_metrics(final, step=result.steps)
        png = loss_curve_png(loss_history(Path(result.output_dir) / "metrics.jsonl"), root / "loss_curve.png")
        logger.log_artifact(png)
        summary = Path(result.output_dir) / "train_summary.json"
        if summary.is_file():
            logger.log_artifact(summary)
        if log_model and logger.run_id:
            from codiemb.errors import UserError
            from codiemb.tracking.registry import log_model as _log_model

            try:
                _log_model(result.model_dir, run_id=logger.run_id, config=cfg.to_dict(),
                           metrics={k: float(v) for k, v in final.items()}, data=result.data_counts)
            except UserError as exc:  # server down: the model stays in the run's storage
                name = cfg.registry.name if cfg.registry else cfg.run.name  # as the pipeline names it
                log.warning("%s; once MLflow is back: codiemb register %s --name %s", exc, logger.run_id, name)
        return result, logger.run_id


class _StageCallbacks(_LoggerCallbacks):
    """Metrics to MLflow (when there is a run) and the steps to the console's stage line."""

    def __init__(self, logger, bar):
        super().__init__(logger)
        self.bar = bar

    def on_log(self, step: int, metrics: dict[str, float]) -> None:
        if self.logger is not None:
            super().on_log(step, metrics)

    def on_checkpoint(self, step: int, path: Path | None) -> None:
        if self.logger is not None:
            super().on_checkpoint(step, path)

    def on_progress(self, done: int, total: int) -> None:
        self.bar.total = total
        self.bar.update(done - self.bar.n)


def _train(cfg: Config, local: bool, resume: bool, logger: Any) -> TrainResult:
    """The local loop or the Ray driver; while it runs, SIGTERM stops training at the next step
    boundary with a checkpoint (``train/stop.py``: raises ``TrainingStopped``)."""
    from codiemb.train.stop import sigterm_stops_training

    with sigterm_stops_training():
        if local:
            from codiemb import console
            from codiemb.train.loop import train

            with console.stage(f"train {cfg.run.name}", unit="step") as bar:
                return train(cfg, resume=resume, callbacks=_StageCallbacks(logger, bar))
        from codiemb.train.ray_trainer import train_on_ray

        return train_on_ray(cfg, resume=resume, mlflow_run_id=logger.run_id if logger is not None else None)
