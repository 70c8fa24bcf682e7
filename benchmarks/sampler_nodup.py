"""Cost of the no-duplicates option of the task-batch sampler on generated rows.

    .venv/bin/python benchmarks/sampler_nodup.py --rows 1000000 --batch-size 64 --passages 4 --pool 0.5

Generates ``--rows`` retrieval rows as text hashes (what the sampler reads from the token shards'
``text_hash`` arrays): a unique query and ``--passages`` passages per row (one positive and the
rest negatives), every passage drawn from a shared pool of ``pool · rows`` documents, so rows share
positives and one row's negative is another's positive, as mined hard negatives make them. Then,
for one dataset and one epoch, times the batches of every step (``global_rows(step)`` for the whole
epoch) with and without ``row_hashes``, counts the batches that held a duplicate and those that
needed a swap, and checks (untimed) that no batch of the no-duplicates epoch holds a text twice.

``--data FILE`` takes the rows of a real retrieval file instead (its texts hashed as strings; the
shards hash token ids, which can only merge more texts), e.g. SciFact's training pairs.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time

import numpy as np

from codiemb.data.nodup import find_offenders
from codiemb.data.sampler import TaskBatchSampler


def generate(rows: int, passages: int, pool: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(offsets, values): row r's hashes are values[offsets[r]:offsets[r+1]] (query first)."""
    rng = np.random.default_rng(seed)
    per = 1 + passages
    values = np.empty((rows, per), np.int64)
    values[:, 0] = rng.integers(1 << 62, 1 << 63, size=rows, dtype=np.int64)  # queries: unique in practice
    values[:, 1:] = rng.integers(0, max(1, int(pool * rows)), size=(rows, passages), dtype=np.int64)
    return np.arange(0, rows * per + 1, per, dtype=np.int64), values.reshape(-1)


def from_file(path: str) -> tuple[np.ndarray, np.ndarray]:
    from codiemb.data.hashing import text_hashes
    from codiemb.data.local import read_records
    from codiemb.paths import resolve_data_path

    rows = read_records(resolve_data_path(path), "retrieval").records
    texts = [[r["query"], *r["positives"], *(r.get("negatives") or [])] for r in rows]
    offsets = np.zeros(len(texts) + 1, np.int64)
    offsets[1:] = np.cumsum([len(t) for t in texts])
    return offsets, text_hashes(t for row in texts for t in row)


def epoch(sampler: TaskBatchSampler) -> tuple[float, float, list[list[int]]]:
    """(wall s, CPU s of this process, the epoch's batches)."""
    t0, c0 = time.perf_counter(), time.process_time()
    batches = [sampler.global_rows(s)[1] for s in range(len(sampler))]
    return time.perf_counter() - t0, time.process_time() - c0, batches


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--batch-size", type=int, default=64, help="global batch (per-rank batch x world size)")
    ap.add_argument("--passages", type=int, default=4, help="passages per row (1 positive + negatives)")
    ap.add_argument("--pool", type=float, default=0.5, help="passage pool size as a fraction of the rows")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--data", help="a retrieval JSONL/Parquet to take the rows from (relative: under the data folder)")
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    print("command: python benchmarks/sampler_nodup.py " + " ".join(sys.argv[1:] if argv is None else argv))
    t0 = time.perf_counter()
    offsets, values = from_file(a.data) if a.data else generate(a.rows, a.passages, a.pool, a.seed)
    gen_s = time.perf_counter() - t0
    a.rows = len(offsets) - 1
    sizes, bs = {"ir": a.rows}, {"ir": a.batch_size}
    plain = TaskBatchSampler(sizes, bs, epochs=a.epochs, seed=a.seed)
    plain_s, plain_cpu, plain_batches = epoch(plain)
    nodup = TaskBatchSampler(sizes, bs, epochs=a.epochs, seed=a.seed, row_hashes={"ir": (offsets, values)})
    nodup_s, nodup_cpu, nodup_batches = epoch(nodup)
    # untimed checks: batches with a duplicate before and after, and the plan is the same
    before = np.unique(find_offenders(np.asarray(plain_batches), offsets, values) // a.batch_size).size
    after = np.unique(find_offenders(np.asarray(nodup_batches), offsets, values) // a.batch_size).size
    assert plain.steps_per_task() == nodup.steps_per_task()
    stats = nodup.swap_summary()["ir"]
    out = {"data": a.data, "rows": a.rows, "global_batch": a.batch_size, "passages": a.passages, "pool": a.pool,
           "batches": len(plain), "hash_mib": round((offsets.nbytes + values.nbytes) / 2**20, 1),
           "generate_s": round(gen_s, 2), "epoch_s_without": round(plain_s, 3), "epoch_s_with": round(nodup_s, 3),
           "epoch_cpu_s_without": round(plain_cpu, 3), "epoch_cpu_s_with": round(nodup_cpu, 3),
           "batches_with_duplicates_without": int(before), "batches_swapped": stats["swapped"],
           "rows_swapped": stats["swaps"], "batches_with_duplicates_with": int(after),
           "unresolved": stats["unresolved"],
           "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    print("| rows | global batch | batches | epoch s without (CPU s) | epoch s with (CPU s) | batches with a duplicate (without) | "
          "batches swapped | rows swapped | batches with a duplicate (with) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    print(f"| {a.rows:,} | {a.batch_size} | {len(plain):,} | {plain_s:.2f} ({plain_cpu:.2f}) | {nodup_s:.2f} ({nodup_cpu:.2f}) | "
          f"{before:,} | "
          f"{stats['swapped']:,} | {stats['swaps']:,} | {after:,} |")
    print(json.dumps(out))
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(out, fh, indent=1)
    return out


if __name__ == "__main__":
    main()
