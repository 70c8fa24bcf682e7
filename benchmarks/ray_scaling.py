"""Ray scaling: training samples/s with 1 and with 2 Ray Train workers, in one run.

    .venv/bin/python benchmarks/ray_scaling.py --config configs/codiemb-minilm.yaml --model minilm \\
        --steps 20 --warmup-steps 3 --workers 1,2 --threads-per-worker 1

Each setting is one ``codiemb.train.ray_trainer.train_on_ray`` run of the recipe (same data, same
seed, same task-batch plan) for ``--warmup-steps + --steps`` steps, with the SAME global batch:
with ``W`` workers every dataset's per-worker batch is the recipe's batch / ``W`` and the IR loss
gathers queries and passages from all workers (``loss.retrieval.gather_across_workers``), so each
step sees the same number of in-batch negatives. Every worker asks Ray for
``--threads-per-worker`` CPUs, and Ray sets each worker's ``OMP_NUM_THREADS`` (torch threads) to
that number; the threads each rank really used are read back from the train summary (``ranks``).

Timing comes from the run's own ``metrics.jsonl`` (rank 0, ``train.log_every = 1``): each line
holds the step's ``samples_per_s`` = global samples of the step / its wall time (from the end of
the previous step's logging to the end of this step: forward, backward, all-reduce, optimizer).
The first ``--warmup-steps`` steps are dropped; over the timed steps

    wall = sum_i samples_i / samples_per_s_i,    samples/s = sum_i samples_i / wall,

with ``samples_i`` the global batch of step ``i``'s task. Ray start-up, data loading and model
saving are not in it (the driver's wall time for the whole run is printed beside it). Checkpoints,
dev evaluation and MLflow are switched off. The timed steps' task mix is printed per setting; the
ratio compares like with like only when the mixes agree (the script warns otherwise).

Output: the command, a markdown table (per setting: workers, per-worker batches, torch threads,
steps timed, their task mix, wall s, samples/s, tokens/s, the driver's total wall s) and, last,
``ratio 2 workers / 1 worker samples/s: X.XX`` (the last ``--workers`` entry over the first).
``--json PATH`` writes every step's timing. ``--set KEY=VALUE`` (repeatable) overrides the config
(e.g. ``model.max_length.passage=64`` for a model with short position tables). Ray: a local
instance (``$RAY_ADDRESS`` or a running job's cluster is used instead when set).
"""

from __future__ import annotations

import argparse
import json
import os
import platform as _platform
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("CODIEMB_NO_PROGRESS", "1")
os.environ.setdefault("CODIEMB_SKIP_DEV", "1")

REPO = Path(__file__).resolve().parents[1]
if str(REPO / "platform") not in sys.path:
    sys.path.insert(0, str(REPO / "platform"))

from codiemb.config import Config, load_config  # noqa: E402
from codiemb.errors import ConfigError  # noqa: E402


def threads_for(args: argparse.Namespace, workers: int) -> int:
    """CPUs (= torch threads) per worker: the flag's number, or with ``auto`` the machine's cores
    split between the workers (1 worker x 2 threads against 2 workers x 1 thread on 2 cores)."""
    if args.threads_per_worker == "auto":
        return max(1, (os.cpu_count() or 1) // workers)
    return int(args.threads_per_worker)


def setting_config(args: argparse.Namespace, workers: int, storage: Path) -> Config:
    """The recipe with ``workers`` workers, the global batch split evenly, timing-only switches."""
    base = load_config(args.config, args.set)
    overrides = list(args.set) + [
        f"model.name={args.model}" if args.model else None,
        f"run.name=ray-scaling-{workers}w",
        f"train.max_steps={args.warmup_steps + args.steps}",
        "train.log_every=1",
        "train.checkpoint_every=0",
        "train.eval_every=0",
        "train.eval_at_end=false",
        "train.grad_accum=1",
        "tracking.enabled=false",
        f"scaling.num_workers={workers}",
        f"scaling.resources_per_worker={{CPU: {threads_for(args, workers)}}}",
        "scaling.use_gpu=false",
        "scaling.max_failures=0",
        f"storage.path={storage}",
    ]
    for i, ds in enumerate(base.data.datasets):
        if ds.batch_size % workers:
            raise ConfigError(f"dataset {ds.name}: batch size {ds.batch_size} does not split over {workers} workers")
        overrides.append(f"data.datasets.{i}.batch_size={ds.batch_size // workers}")
    return load_config(args.config, [o for o in overrides if o])


def timed_steps(metrics_file: Path, global_batch: dict[str, int], warmup: int) -> list[dict]:
    """Per timed step: its task, global samples, seconds and tokens, from ``metrics.jsonl``."""
    lines = [json.loads(x) for x in metrics_file.read_text().splitlines() if x.strip()]
    prev = {name: 0.0 for name in global_batch}
    steps = []
    for line in lines:
        counts = {name: line.get(f"steps/{name}", 0.0) for name in global_batch}
        moved = [name for name in global_batch if counts[name] > prev[name]]
        prev = counts
        if len(moved) != 1:
            raise RuntimeError(f"metrics.jsonl step {line['step']}: expected one task per line, got {moved}")
        name = moved[0]
        samples = global_batch[name]
        seconds = samples / line["samples_per_s"]
        if line["step"] > warmup:
            steps.append({"step": line["step"], "task": name, "samples": samples, "seconds": seconds,
                          "tokens": line["tokens_per_s"] * seconds})
    return steps


def run_setting(args: argparse.Namespace, workers: int, storage: Path) -> dict:
    from codiemb.train.ray_trainer import train_on_ray

    cfg = setting_config(args, workers, storage)
    per_worker = {ds.name: ds.batch_size for ds in cfg.data.datasets}
    global_batch = {k: v * workers for k, v in per_worker.items()}
    t0 = time.perf_counter()
    result = train_on_ray(cfg, resume=False)
    driver_wall = time.perf_counter() - t0
    out = Path(result.output_dir)
    summary = json.loads((out / "train_summary.json").read_text())
    want = args.warmup_steps + args.steps
    if result.steps != want:
        raise RuntimeError(f"{workers} workers: ran {result.steps} steps, wanted {want} (the data plan is shorter?)")
    steps = timed_steps(out / "metrics.jsonl", global_batch, args.warmup_steps)
    # consistency: every step's samples per the config == the loop's own total over all steps
    all_steps = timed_steps(out / "metrics.jsonl", global_batch, 0)
    loop_samples = summary["samples_per_s"] * summary["wall_s"]
    if abs(sum(s["samples"] for s in all_steps) - loop_samples) > 0.01 * loop_samples:
        raise RuntimeError(f"samples per step do not add up: {sum(s['samples'] for s in all_steps)} "
                           f"vs {loop_samples:.1f}")
    wall = sum(s["seconds"] for s in steps)
    mix: dict[str, int] = {}
    for s in steps:
        mix[s["task"]] = mix.get(s["task"], 0) + 1
    return {
        "workers": workers, "per_worker_batch": per_worker, "global_batch": global_batch,
        "torch_threads": [r.get("torch_threads") for r in summary.get("ranks", [])],
        "node_ids": [r.get("node_id") for r in summary.get("ranks", [])],
        "steps_timed": len(steps), "task_mix": mix, "wall_s": wall,
        "samples_per_s": sum(s["samples"] for s in steps) / wall,
        "tokens_per_s": sum(s["tokens"] for s in steps) / wall,
        "driver_wall_s": driver_wall, "steps": steps,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=str(REPO / "configs" / "codiemb-minilm.yaml"))
    ap.add_argument("--model", default="minilm", help="model alias or folder (overrides model.name)")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per setting")
    ap.add_argument("--warmup-steps", type=int, default=3, help="untimed steps at the start of each run")
    ap.add_argument("--workers", default="1,2", help="comma-separated worker counts, e.g. 1,2")
    ap.add_argument("--threads-per-worker", default="1",
                    help="CPUs (= torch threads) per worker, or 'auto': the cores split between the workers")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    ap.add_argument("--json", help="write every setting and step here")
    ap.add_argument("--keep", action="store_true", help="keep the runs' storage folder (printed)")
    args = ap.parse_args(argv)
    workers = [int(w) for w in args.workers.split(",") if w.strip()]
    threads_ok = args.threads_per_worker == "auto" or (args.threads_per_worker.isdigit() and int(args.threads_per_worker) >= 1)
    if not workers or min(workers) < 1 or args.steps < 1 or args.warmup_steps < 0 or not threads_ok:
        ap.error("--workers must be positive integers, --steps >= 1, --warmup-steps >= 0, "
                 "--threads-per-worker >= 1 or auto")

    print("$ " + " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]), flush=True)
    from codiemb.train.ray_trainer import init_ray

    init_ray(num_cpus=max(4, max(w * threads_for(args, w) for w in workers) + 2))  # + CPUs for Ray Data
    storage = Path(tempfile.mkdtemp(prefix="ray-scaling-"))
    results = []
    try:
        for w in workers:
            results.append(run_setting(args, w, storage))
    finally:
        if args.keep:
            print(f"runs kept in {storage}")
        else:
            shutil.rmtree(storage, ignore_errors=True)

    names = list(results[0]["per_worker_batch"])
    print()
    cpu = _platform.processor() or _platform.machine()
    print(f"config {args.config}, model {args.model}, {args.warmup_steps} warm-up + {args.steps} timed steps per "
          f"setting, {args.threads_per_worker} CPU(s) per worker, {os.cpu_count()} cores, {cpu}")
    print()
    print(f"| workers | per-worker batch ({'/'.join(names)}) | global batch | torch threads per rank | steps timed "
          "| timed task mix | wall s | samples/s | tokens/s | driver wall s |")
    print("|---:|---|---|---|---:|---|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['workers']} | {'/'.join(str(r['per_worker_batch'][n]) for n in names)} "
              f"| {'/'.join(str(r['global_batch'][n]) for n in names)} | {','.join(map(str, r['torch_threads']))} "
              f"| {r['steps_timed']} | {', '.join(f'{k} {v}' for k, v in sorted(r['task_mix'].items()))} "
              f"| {r['wall_s']:.2f} | {r['samples_per_s']:.2f} | {r['tokens_per_s']:.0f} | {r['driver_wall_s']:.1f} |")
    if any(r["task_mix"] != results[0]["task_mix"] for r in results):
        print("\nWARNING: the timed steps' task mix differs between settings; the ratio mixes tasks of different cost.")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=1))
    first, last = results[0], results[-1]
    ratio = last["samples_per_s"] / first["samples_per_s"]
    print()
    print(f"ratio {last['workers']} workers / {first['workers']} worker samples/s: {ratio:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
