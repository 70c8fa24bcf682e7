"""How the data path's cost grows with the corpus: shard build rate, time to first step, peak memory.

For each size in ``--rows`` it writes a synthetic retrieval corpus (JSONL files of 100k rows: a
query of 4-10 words, one positive and three negatives of 30-80 words, MS MARCO-like lengths), then
runs ``codiemb train`` on it as a user would (a local Ray instance, ``scaling.num_workers`` Ray
Train workers, a tiny random BERT with a real tokenizer, ``--steps`` steps), twice:

1. **cold**: the token shards are built by Ray Data (validate + tokenize in one pass);
2. **warm**: a second run over the same data reuses the shards (no tokenizing).

While a run is going, a sampler reads the resident memory (RSS) of every process in the run's
process tree every 0.2 s and keeps each process's peak: the **driver** (the ``codiemb`` process),
each **Ray Train worker** (``RayTrainWorker`` in its title) and the Ray Data **tokenizer actors**.
It reports, per size and run: rows/s of the shard build (rows read / build seconds, from the shard
set's manifest), seconds from launch to the end of the first training step (the first line of the
run's ``metrics.jsonl``), and the peaks. The acceptance of the scale issue: from the smallest to the
largest size, the driver's and every worker's peak grows by at most 1.3x.

    python benchmarks/data_scale.py --rows 100000 500000 2000000 --workers 2 --steps 30
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # conftest.build_tiny_bert: the tests' tiny random BERT

_WORDS = ("the a of to in and is are was on for with as by at from that this it not cat dog man woman "
          "child car house tree water fire sun moon red blue green big small good bad runs walks eats plays "
          "sleeps reads writes sees protein cell gene cancer risk study patients effect increase decrease "
          "treatment disease model data result shows found high low").split()
FILE_ROWS = 100_000


def _text(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choices(_WORDS, k=rng.randint(lo, hi)))


def write_corpus(folder: Path, rows: int, seed: int = 0) -> int:
    """``rows`` retrieval rows in files of FILE_ROWS rows; returns the bytes written."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    total = 0
    for f in range((rows + FILE_ROWS - 1) // FILE_ROWS):
        n = min(FILE_ROWS, rows - f * FILE_ROWS)
        lines = []
        for _ in range(n):
            lines.append(json.dumps({"query": _text(rng, 4, 10), "positive": _text(rng, 30, 80),
                                     "negatives": [_text(rng, 30, 80) for _ in range(3)]}))
        data = ("\n".join(lines) + "\n").encode()
        (folder / f"part-{f:05d}.jsonl").write_bytes(data)
        total += len(data)
    return total


class PeakRSS(threading.Thread):
    """Peak RSS per process of a process tree, sampled every ``every`` seconds, by role."""

    def __init__(self, root_pid: int, every: float = 0.2):
        super().__init__(daemon=True)
        self.root, self.every = root_pid, every
        self.peaks: dict[int, tuple[str, int]] = {}
        self.stop = threading.Event()

    @staticmethod
    def role(p: psutil.Process, root: int) -> str | None:
        if p.pid == root:
            return "driver"
        try:
            title = " ".join(p.cmdline())
        except (psutil.Error, OSError):
            return None
        if "RayTrainWorker" in title:
            return "train_worker"
        if "ShardBlockWriter" in title or "MapWorker" in title:
            return "tokenizer_actor"
        return None

    def run(self) -> None:
        try:
            root = psutil.Process(self.root)
        except psutil.Error:
            return
        while not self.stop.is_set():
            try:
                procs = [root] + root.children(recursive=True)
            except psutil.Error:
                break
            for p in procs:
                try:
                    role = self.role(p, self.root)
                    if role is None:
                        continue
                    rss = p.memory_info().rss
                except psutil.Error:
                    continue
                old = self.peaks.get(p.pid)
                if old is None or rss > old[1]:
                    self.peaks[p.pid] = (role, rss)
            time.sleep(self.every)

    def by_role(self) -> dict[str, list[int]]:
        out: dict[str, list[int]] = {}
        for role, rss in self.peaks.values():
            out.setdefault(role, []).append(rss)
        return {k: sorted(v, reverse=True) for k, v in out.items()}


def run_once(data: Path, model: Path, work: Path, shards: Path, name: str, args) -> dict:
    cfg = {
        "run": {"name": name, "seed": 0},
        "model": {"name": str(model), "max_length": {"query": 32, "passage": 128, "sts": 32}},
        "data": {"datasets": [{"name": "synthetic", "task": "retrieval", "path": str(data), "batch_size": args.batch_size}],
                 "shards": str(shards)},
        "loss": {"retrieval": {"negatives": 3}},
        "train": {"max_steps": args.steps, "lr": 1e-4, "warmup_ratio": 0.0, "log_every": 1, "checkpoint_every": 0,
                  "eval_at_end": False},
        "scaling": {"num_workers": args.workers},
        "storage": {"path": str(work / "storage")},
        "tracking": {"enabled": False},
    }
    cfg_file = work / f"{name}.yaml"
    import yaml

    cfg_file.write_text(yaml.safe_dump(cfg))
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", CODIEMB_NO_PROGRESS="1",
               TOKENIZERS_PARALLELISM="false", RAY_DEDUP_LOGS="0")
    log = open(work / f"{name}.log", "w")
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "codiemb.cli", "train", str(cfg_file)], stdout=log,
                            stderr=subprocess.STDOUT, env=env, cwd=work)
    sampler = PeakRSS(proc.pid)
    sampler.start()
    metrics = work / "storage" / name / "metrics.jsonl"
    first_step = None
    while proc.poll() is None:
        if first_step is None and metrics.is_file() and metrics.stat().st_size > 0:
            first_step = time.perf_counter() - t0
        time.sleep(0.2)
    wall = time.perf_counter() - t0
    sampler.stop.set()
    sampler.join()
    log.close()
    if proc.returncode != 0:
        raise SystemExit(f"run {name} failed (rc {proc.returncode}); see {work / (name + '.log')}")
    manifest = json.loads(next(shards.glob("*/manifest.json")).read_text())
    text = (work / f"{name}.log").read_text()
    roles = sampler.by_role()
    return {"first_step_s": first_step, "wall_s": wall, "reused": "reusing token shards" in text,
            "build_s": manifest["seconds"], "rows": manifest["counts"]["read"],
            "driver_mb": max(roles.get("driver", [0])) / 2**20,
            "workers_mb": [r / 2**20 for r in roles.get("train_worker", [])],
            "actors_mb": [r / 2**20 for r in roles.get("tokenizer_actor", [])]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[100_000, 500_000, 2_000_000])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--work", default=None, help="folder for data, shards and runs (default: a temp folder, removed)")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)
    from conftest import build_tiny_bert

    base = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="codiemb-data-scale-"))
    base.mkdir(parents=True, exist_ok=True)
    model = build_tiny_bert(base / "tiny-bert", hidden=64, layers=2, heads=2)
    results = []
    try:
        for rows in args.rows:
            work = base / f"rows-{rows}"
            data, shards = work / "data", work / "shards"
            t = time.perf_counter()
            size = write_corpus(data, rows)
            print(f"[{rows} rows] wrote {size / 2**20:.0f} MiB of JSONL in {time.perf_counter() - t:.0f} s", flush=True)
            cold = run_once(data, model, work, shards, "cold", args)
            warm = run_once(data, model, work, shards, "warm", args)
            results.append({"rows": rows, "jsonl_mib": size / 2**20, "cold": cold, "warm": warm})
            print(f"[{rows} rows] cold: build {cold['build_s']:.0f} s ({cold['rows'] / cold['build_s']:.0f} rows/s), "
                  f"first step {cold['first_step_s']:.0f} s, driver {cold['driver_mb']:.0f} MiB, workers "
                  f"{[round(x) for x in cold['workers_mb']]} MiB; warm: reused={warm['reused']}, first step "
                  f"{warm['first_step_s']:.0f} s", flush=True)
            shutil.rmtree(data)  # keep the disk bounded: the next size writes its own
            shutil.rmtree(shards)
    finally:
        if not args.work:
            shutil.rmtree(base, ignore_errors=True)
    print()
    print("| rows | JSONL MiB | build rows/s | first step cold s | first step warm s (reused) | driver peak MiB cold / warm | "
          "worker peak MiB cold / warm (max) | tokenizer actor peak MiB |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        c, w = r["cold"], r["warm"]
        print(f"| {r['rows']:,} | {r['jsonl_mib']:.0f} | {c['rows'] / c['build_s']:,.0f} | {c['first_step_s']:.0f} | "
              f"{w['first_step_s']:.0f} ({'yes' if w['reused'] else 'NO'}) | {c['driver_mb']:.0f} / {w['driver_mb']:.0f} | "
              f"{max(c['workers_mb'], default=0):.0f} / {max(w['workers_mb'], default=0):.0f} | "
              f"{max(c['actors_mb'], default=0):.0f} |")
    if len(results) > 1:
        lo, hi = results[0], results[-1]
        for run in ("cold", "warm"):
            d = hi[run]["driver_mb"] / lo[run]["driver_mb"]
            wk = max(hi[run]["workers_mb"]) / max(lo[run]["workers_mb"])
            print(f"{run}: {hi['rows'] / lo['rows']:.0f}x rows -> driver peak x{d:.2f}, worker peak x{wk:.2f} "
                  f"({'within' if max(d, wk) <= 1.3 else 'ABOVE'} 1.3x)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
