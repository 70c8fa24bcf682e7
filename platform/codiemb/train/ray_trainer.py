"""Ray Train wiring: a ``TorchTrainer`` whose worker body is the plain loop (``train/loop.py``).

- Data: before the trainer starts, each configured dataset is validated and tokenized ONCE by a
  Ray Data job on the cluster into token shards on storage (``data/build.py``; reused when its
  key matches, so a re-submitted job, a restarted worker or a Tune trial never tokenizes again).
  Workers get only the shard sets' locations and read their rows of each step by row id,
  memory-mapped (``data/shards.py``): a worker's memory does not grow with the corpus, and the
  rows of step k are the same after any restart (no ``streaming_split``, whose block-to-worker
  assignment depends on who asks first).
- Negatives: the IR loss gathers queries and passages from all workers (gloo on CPU, NCCL on GPU).
- Storage and fault tolerance: ``RunConfig(storage_path, name=run.name)`` with a deterministic
  name, so a re-submitted job finds its checkpoints and resumes; ``FailureConfig(max_failures)``
  restarts workers from the last reported checkpoint.
- SIGTERM to the driver (``train/stop.py``): a watcher thread sets a small flag actor; rank 0
  polls it (at most twice a second), all ranks agree at the next step boundary, save a final
  checkpoint and report it; the driver then raises ``TrainingStopped`` and the same command resumes.
- Tracking: rank 0 logs to MLflow; the run id is stored in the checkpoint so a resumed job
  continues the same MLflow run.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from codiemb.config import Config, config_from_dict
from codiemb.errors import UserError
from codiemb.train.loop import DistContext, TaskData, TrainResult, make_task_data, train

log = logging.getLogger(__name__)

RUN_ID_FILE = "mlflow_run_id.txt"


# --------------------------------------------------------------------------- cluster
def init_ray(num_cpus: int | None = None) -> None:
    """Connect to ``$RAY_ADDRESS`` / a running job's cluster, else start a local instance."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS") or os.environ.get("RAY_JOB_ID"):
        ray.init(log_to_driver=True)
        return
    # On small machines declare more logical CPUs so Train workers and Data tasks do not starve.
    ray.init(num_cpus=num_cpus or max(4, os.cpu_count() or 1), log_to_driver=True)


def worker_resources(cfg: Config) -> dict[str, float]:
    res = dict(cfg.scaling.resources_per_worker or {})
    res.setdefault("CPU", 1.0)
    if cfg.scaling.use_gpu:
        res.setdefault("GPU", 1.0)
    return res


def check_resources(cfg: Config) -> None:
    """Fail fast, in one line, when the cluster can never hold the workers (unless it can grow)."""
    import ray

    if cfg.scaling.autoscaling:
        return
    total = ray.cluster_resources()
    need = worker_resources(cfg)
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    # every worker must fit on some node, and all of them on the cluster
    for key, amount in need.items():
        have = total.get(key, 0.0)
        if amount * cfg.scaling.num_workers > have + 1e-9:
            raise UserError(
                f"scaling asks for {cfg.scaling.num_workers} workers x {amount:g} {key} = "
                f"{amount * cfg.scaling.num_workers:g} {key}, but the cluster has {have:g} {key} and cannot grow "
                "(set scaling.autoscaling: true on an autoscaling cluster)"
            )
        if nodes and not any(n["Resources"].get(key, 0.0) + 1e-9 >= amount for n in nodes):
            raise UserError(f"no node of the cluster has {amount:g} {key} for one worker")


# --------------------------------------------------------------------------- worker body
class _RayCallbacks:
    """Rank 0 logs metrics to MLflow; every rank reports each checkpoint to Ray Train; rank 0 tells
    the driver's progress actor (when there is one) how many steps are done."""

    def __init__(self, rank: int, tracker: Any | None, run_id: str | None, progress: Any | None = None):
        self.rank = rank
        self.tracker = tracker
        self.run_id = run_id
        self.progress = progress

    def on_progress(self, done: int, total: int) -> None:
        if self.progress is not None:
            self.progress.set.remote(done, total)  # fire and forget

    def on_log(self, step: int, metrics: dict[str, float]) -> None:
        if self.tracker is not None:
            self.tracker.log_metrics(metrics, step=step)

    def on_checkpoint(self, step: int, path: Path | None) -> None:
        import ray.train

        checkpoint = None
        if path is not None:
            if self.run_id:
                (Path(path) / RUN_ID_FILE).write_text(self.run_id)
            checkpoint = ray.train.Checkpoint.from_directory(str(path))
        ray.train.report({"step": step}, checkpoint=checkpoint, checkpoint_dir_name=f"step-{step:06d}")


class StopFlag:
    """Set by the driver on SIGTERM, polled by rank 0 (a Ray actor: ``ray.remote(num_cpus=0)``)."""

    def __init__(self):
        self._set = False

    def set(self) -> None:
        self._set = True

    def is_set(self) -> bool:
        return self._set


def _stop_poller(flag, every_s: float = 0.5):
    """``should_stop`` for rank 0: asks the driver's flag actor at most every ``every_s`` seconds;
    an unreachable flag (driver gone) reads as not set, with one warning."""
    import ray

    state = {"last": float("-inf"), "set": False, "warned": False}

    def should_stop() -> bool:
        now = time.monotonic()
        if not state["set"] and now - state["last"] >= every_s:
            state["last"] = now
            try:
                state["set"] = bool(ray.get(flag.is_set.remote(), timeout=30))
            except Exception as exc:  # noqa: BLE001 - a lost flag must not fail the step
                if not state["warned"]:
                    log.warning("cannot read the driver's stop flag (%s); training goes on", exc)
                    state["warned"] = True
        return state["set"]

    return should_stop


def _watch_stop(flag, done: threading.Event) -> threading.Thread:
    """A driver thread that sets ``flag`` once SIGTERM asked for a stop (until ``done``)."""
    from codiemb.train import stop

    def run():
        while not done.is_set():
            if stop.wait(0.2):
                flag.set.remote()
                return

    t = threading.Thread(target=run, name="codiemb-stop-watch", daemon=True)
    t.start()
    return t


def open_tasks(cfg: Config, shard_sets: dict[str, str], data_counts: dict | None = None) -> list[TaskData]:
    """Every configured dataset's TaskData over its shard set (opened, not read), with the teacher
    vectors the driver built (``data_counts[name]["teachers"]``) when ``loss.distill`` is on."""
    from codiemb.data.shards import ShardStore
    from codiemb.train.distill import open_teachers

    tasks = [make_task_data(cfg, ds, store=ShardStore.open(shard_sets[ds.name])) for ds in cfg.data.datasets]
    for td in tasks:
        dirs = ((data_counts or {}).get(td.name) or {}).get("teachers")
        if dirs and cfg.loss.distill is not None:
            open_teachers(td, dirs, cfg)
    return tasks


def _rank_placement(world: int) -> list[dict]:
    """Where each rank ran, in rank order: its Ray node id and torch's thread count (gathered over
    the process group; recorded in the train summary as ``ranks``)."""
    import ray
    import torch

    me = {"node_id": ray.get_runtime_context().get_node_id(), "torch_threads": torch.get_num_threads()}
    if world <= 1:
        return [dict(me, rank=0)]
    import torch.distributed as dist

    out: list = [None] * world
    dist.all_gather_object(out, me)
    return [dict(p, rank=r) for r, p in enumerate(out)]


def _prepare_ddp(module, ddp_kwargs: dict):
    """Ray Train's own DDP wrap (device placement, DistributedDataParallel) of the loop's step module."""
    import ray.train.torch

    return ray.train.torch.prepare_model(module, parallel_strategy="ddp", parallel_strategy_kwargs=ddp_kwargs)


def train_loop_per_worker(config: dict) -> None:
    import ray.train
    import ray.train.torch

    cfg = config_from_dict(config["cfg"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    ctx = DistContext(rank=rank, world_size=world, device=ray.train.torch.get_device(),
                      prepare_model=_prepare_ddp)
    if config.get("stop_flag") is not None:  # rank 0 asks the driver; the loop's all_reduce tells the rest
        ctx.should_stop = _stop_poller(config["stop_flag"]) if rank == 0 else (lambda: False)

    tasks = open_tasks(cfg, config["shard_sets"], config.get("data_counts"))

    resume_from = None
    run_id = config.get("mlflow_run_id")
    checkpoint = ray.train.get_checkpoint()
    # a fresh local work folder per attempt; the run-level folder (stable across restarts on this
    # node) holds the fault-injection markers
    run_local = Path(tempfile.gettempdir()) / "codiemb" / cfg.run.name
    run_local.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix=f"rank{rank}-", dir=run_local))
    if checkpoint is not None:
        local = workdir / "restored"
        with checkpoint.as_directory() as d:
            shutil.copytree(d, local)
        resume_from = local
        if (local / RUN_ID_FILE).is_file():
            run_id = (local / RUN_ID_FILE).read_text().strip() or run_id

    tracker = None
    if rank == 0 and cfg.tracking.enabled and run_id:
        from codiemb.tracking.mlflow_run import SafeLogger

        tracker = SafeLogger(cfg.tracking.uri, run_id, experiment=cfg.tracking.experiment)
    callbacks = _RayCallbacks(rank, tracker, run_id, config.get("progress") if rank == 0 else None)
    from codiemb.train.stop import TrainingStopped

    try:
        result = train(cfg, tasks, output_dir=workdir / "out", ctx=ctx, callbacks=callbacks,
                       resume=resume_from is not None, resume_from=resume_from,
                       data_counts=config.get("data_counts"), fail_marker_dir=config.get("fail_marker_dir") or run_local)
    except TrainingStopped as stopped:  # its checkpoint is reported; the driver sees no "final" report
        log.info("rank %d: %s", rank, stopped)
        if tracker is not None:
            tracker.close("RUNNING", end_run=False)
        return
    placement = _rank_placement(world)
    final = None
    metrics = {"step": result.steps, "final": 1, "samples_per_s": result.samples_per_s,
               "tokens_per_s": result.tokens_per_s, "wall_s": result.wall_s}
    if rank == 0:
        final = workdir / "final"
        final.mkdir(exist_ok=True)
        shutil.copytree(result.model_dir, final / "model")
        metrics_file = Path(result.output_dir) / "metrics.jsonl"
        if metrics_file.is_file():
            shutil.copy(metrics_file, final / "metrics.jsonl")
        (final / "train_summary.json").write_text(json.dumps(dict(result.__dict__, ranks=placement), indent=1,
                                                             default=str))
        if run_id:
            (final / RUN_ID_FILE).write_text(run_id)
        final = ray.train.Checkpoint.from_directory(str(final))
    if tracker is not None:
        tracker.close("RUNNING", end_run=False)  # flush; the driver ends the run
    ray.train.report(metrics, checkpoint=final, checkpoint_dir_name="final")


# --------------------------------------------------------------------------- driver
_PROGRESS_ACTOR = None


def _progress_actor_class():
    """A tiny actor (no CPU) that holds rank 0's (steps done, total) for the driver's stage line."""
    global _PROGRESS_ACTOR
    if _PROGRESS_ACTOR is None:
        import ray

        @ray.remote(num_cpus=0)
        class StepProgress:
            def __init__(self) -> None:
                self.done, self.total = 0, None

            def set(self, done: int, total: int) -> None:
                self.done, self.total = int(done), int(total)

            def get(self) -> tuple[int, int | None]:
                return self.done, self.total

        _PROGRESS_ACTOR = StepProgress
    return _PROGRESS_ACTOR


class _StageLine:
    """The console's train line, fed by polling the progress actor from a thread while ``fit`` runs."""

    def __init__(self, name: str) -> None:
        import threading

        from codiemb import console

        self.actor = _progress_actor_class().remote() if console.active() else None
        self.bar = console.stage(f"train {name}", unit="step")
        self.bar.set_postfix_str("starting Ray Train workers")
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True) if self.actor is not None else None
        if self.thread is not None:
            self.thread.start()

    def _pull(self) -> None:
        import ray

        done, total = ray.get(self.actor.get.remote(), timeout=10)
        if total is not None and self.bar.total != total:  # the loop started: time the steps from here
            self.bar.reset(total=total)
            self.bar.set_postfix_str("")
        if done > self.bar.n:
            self.bar.update(done - self.bar.n)

    def _poll(self) -> None:
        while not self.stop.wait(1.0):
            try:
                self._pull()
            except Exception:  # the stage line must never break training
                log.debug("progress actor not reachable", exc_info=True)

    def close(self) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join(timeout=5)
            try:
                self._pull()
            except Exception:
                pass
            import ray

            ray.kill(self.actor)
        self.bar.close()


def build_shards_with_ray(cfg: Config, quarantine_dir: Path) -> tuple[dict[str, str], dict[str, dict]]:
    """Build (or reuse) every dataset's token shards with Ray Data; their locations and counts."""
    from codiemb.train.loop import load_task_data

    tasks, counts = load_task_data(cfg, quarantine_dir, use_ray=True)
    return {t.name: counts[t.name]["shards"] for t in tasks}, counts


def _storage(cfg: Config):
    """``storage_path`` and, for ``s3://`` with a custom endpoint (``storage.endpoint_url``, or the
    driver's ``CODIEMB_S3_ENDPOINT`` / ``AWS_ENDPOINT_URL[_S3]``), a pyarrow filesystem: Ray Train's
    controller runs in its own actor, which may not have the driver's environment."""
    path = cfg.storage.path
    if path.startswith("s3://"):
        if cfg.storage.endpoint_url or any(os.environ.get(k) for k in ("CODIEMB_S3_ENDPOINT", "AWS_ENDPOINT_URL_S3",
                                                                       "AWS_ENDPOINT_URL")):
            from codiemb.data.local import open_filesystem

            if cfg.storage.endpoint_url:
                os.environ.setdefault("CODIEMB_S3_ENDPOINT", cfg.storage.endpoint_url)
            fs, stripped = open_filesystem(path)
            return stripped, fs
        return path, None
    return str(Path(path).resolve()), None


def _worker_config(cfg: Config) -> dict:
    """The config the workers get: a relative ``sqlite:///mlflow.db`` (or a bare path) made absolute,
    since Ray starts each worker in its own folder and it would log into a fresh, empty store."""
    from codiemb.paths import absolute_tracking_uri

    tree = cfg.to_dict()
    tree["tracking"]["uri"] = absolute_tracking_uri(cfg.tracking.uri)
    return tree


def upload_model(model_dir: Path, cfg: Config) -> str:
    """The trained model's place on the run's storage: for remote storage (``s3://`` or another
    URI) ``model_dir`` is copied to ``<storage.path>/<run.name>/model`` (a folder that
    ``model.name`` may name for the next run); local storage already holds it (returned as is)."""
    if "://" not in cfg.storage.path or cfg.storage.path.startswith("file://"):
        return str(model_dir)
    import pyarrow.fs as pafs

    from codiemb.data.local import open_filesystem

    uri = f"{cfg.storage.path.rstrip('/')}/{cfg.run.name}/model"
    fs, dest = open_filesystem(uri)
    fs.delete_dir_contents(dest, missing_dir_ok=True)  # a re-run replaces the folder, no stale files
    pafs.copy_files(str(Path(model_dir).resolve()), dest, source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=fs)
    log.info("trained model uploaded to %s", uri)
    return uri


def train_on_ray(cfg: Config, *, resume: bool = True, mlflow_run_id: str | None = None) -> TrainResult:
    """Run the loop on ``scaling.num_workers`` Ray Train workers and return the final result.

    The final model is copied to ``train.output`` (default ``<storage.path>/<run.name>/model`` for
    local storage; for ``s3://`` storage, ``./runs/<run.name>/model`` on the driver, and uploaded to
    ``<storage.path>/<run.name>/model``: the summary's ``model_uri``). Checkpoints are Ray Train's,
    under ``<storage.path>/<run.name>/`` (``step-NNNNNN/``, ``final/``), on that storage.
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    init_ray()
    check_resources(cfg)
    storage_path, storage_fs = _storage(cfg)
    local_root = Path(cfg.train.output).parent if cfg.train.output else (
        Path(cfg.storage.path) / cfg.run.name if not cfg.storage.path.startswith("s3://") else Path("runs") / cfg.run.name)
    local_root.mkdir(parents=True, exist_ok=True)
    shard_sets, counts = build_shards_with_ray(cfg, local_root)
    if not resume:
        run_dir = Path(storage_path) / cfg.run.name
        if storage_fs is None and run_dir.exists():
            shutil.rmtree(run_dir)

    from codiemb.paths import worker_env

    env = worker_env()
    fail_marker_dir = None
    if storage_fs is None and not storage_path.startswith("s3://"):
        fail_marker_dir = str(Path(storage_path) / cfg.run.name)
    import ray

    stop_flag = ray.remote(num_cpus=0)(StopFlag).remote()
    line = _StageLine(cfg.run.name)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": _worker_config(cfg), "mlflow_run_id": mlflow_run_id, "data_counts": counts,
                           "fail_marker_dir": fail_marker_dir, "shard_sets": shard_sets, "stop_flag": stop_flag,
                           "progress": line.actor},
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu,
                                               resources_per_worker=worker_resources(cfg)),
        run_config=ray.train.RunConfig(
            name=cfg.run.name, storage_path=storage_path, storage_filesystem=storage_fs,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=max(2, cfg.train.keep_checkpoints + 1)),
            failure_config=ray.train.FailureConfig(max_failures=cfg.scaling.max_failures),
            worker_runtime_env={"env_vars": env} if env else None,
        ),
    )
    watching = threading.Event()
    _watch_stop(stop_flag, watching)
    try:
        result = trainer.fit()
    finally:
        watching.set()
        line.close()
    if result.error:
        raise result.error
    from codiemb.train import stop

    if not (result.metrics or {}).get("final") and stop.requested():  # workers stopped at a step boundary
        raise stop.TrainingStopped(int((result.metrics or {}).get("step", 0)), stop.reason())
    model_out = Path(cfg.train.output) if cfg.train.output else local_root / "model"
    with result.checkpoint.as_directory() as d:
        if model_out.exists():
            shutil.rmtree(model_out)
        shutil.copytree(Path(d) / "model", model_out)
        summary = json.loads((Path(d) / "train_summary.json").read_text())
        if (Path(d) / "metrics.jsonl").is_file():
            shutil.copy(Path(d) / "metrics.jsonl", local_root / "metrics.jsonl")
    summary["model_dir"] = str(model_out)
    summary["output_dir"] = str(local_root)
    summary["model_uri"] = upload_model(model_out, cfg)
    summary["data_counts"] = counts
    (local_root / "train_summary.json").write_text(json.dumps(summary, indent=1, default=str))
    fields = TrainResult.__dataclass_fields__
    return TrainResult(**{k: v for k, v in summary.items() if k in fields})
