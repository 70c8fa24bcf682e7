"""Peak memory of one retrieval training step, with and without GradCache (``train.mini_batch_size``).

For every batch size in ``--batch`` and every mini-batch size in ``--mini-batch`` (``0``: no
GradCache, one forward over the whole batch) a FRESH subprocess builds the step and measures it,
so no setting inherits another's allocator state:

- a random BERT (``--hidden``, ``--layers``; the tests' ``build_tiny_bert`` with its real WordPiece
  tokenizer), in train mode; B synthetic retrieval rows (a query of 4-12 words, one positive of
  25-45 words; queries <= 16 tokens, passages <= 48), tokenized once before the step, as the loop's
  token shards are;
- one warm-up step on 4 rows (one-time allocations: thread pools, autograd engine), its freed
  heap returned to the kernel (glibc ``malloc_trim``), then
- the measured step, exactly the loop's sequence: ``retrieval_loss`` (the loop's forward,
  ``train.retrieval_forward``, default ``auto``: unpadded on CPU; in-batch negatives, InfoNCE),
  ``loss.backward()``, then ``GradCache.backward()`` when it is on. No optimizer step (its state
  does not depend on the batch).

Memory: on CPU the process's resident set (RSS): the kernel's peak (``VmHWM``) is reset through
``/proc/self/clear_refs`` just before the step and read after it; reported is that peak minus
the RSS just before the step (the model, the grads, the tokenized rows are in both). Every
setting runs with the same fixed glibc mmap threshold (``--malloc-mmap-threshold``, default 128
KiB): glibc's default threshold is dynamic, it grows up to 32 MiB after large blocks are freed,
and then freed activations stay in the heap, fragmented, so the RSS peak measured the allocator's
retention as much as the step (with GradCache's many equal chunks: 1.62x from 64 to 512 here,
for a live peak that is flat; ``--malloc-mmap-threshold 0`` reproduces that). On a GPU
(``--device cuda``): ``torch.cuda.max_memory_allocated`` minus ``memory_allocated`` before the step.
Also printed: the step's seconds and its loss (dropout is on, as in training, so with and
without GradCache the losses differ by the dropout masks only; equality with dropout off is
``tests/unit/test_gradcache.py``'s). The issue's goal: with ``mini_batch_size`` 32, the step peak
at batch 512 is under 1.3x the one at batch 64 (without GradCache it grows about with the batch).

    python benchmarks/gradcache_memory.py --batch 64 512 --mini-batch 0 32 --threads 1 --json /tmp/gradcache_memory.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORDS = ("the a of to in and is are was on for with as by at from that this it not cat dog man woman child "
         "car house tree water fire sun moon red blue green big small good bad runs walks eats plays sleeps "
         "reads writes sees protein cell gene cancer risk study patients effect increase decrease treatment "
         "disease model data result shows found high low").split()


def rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [{"query": " ".join(rng.choices(WORDS, k=rng.randint(4, 12))),
             "positives": [" ".join(rng.choices(WORDS, k=rng.randint(25, 45)))]} for _ in range(n)]


# --------------------------------------------------------------------------- child: one setting
def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _malloc_trim() -> None:
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


def measure(model: str, batch: int, mini_batch: int, device: str, forward: str) -> dict:
    import torch

    from codiemb.config import config_from_dict
    from codiemb.model.encoder import Encoder
    from codiemb.train.gradcache import GradCache
    from codiemb.train.loop import DistContext, TaskData, retrieval_loss, store_of

    dev = torch.device(device)
    cfg = config_from_dict({
        "model": {"name": model, "max_length": {"query": 16, "passage": 48}},
        "loss": {"retrieval": {"temperature": 0.05, "positives": 1, "negatives": 0}},
        "train": {"retrieval_forward": forward, "mini_batch_size": mini_batch or None},
    })
    enc = Encoder.load(model, device=dev)
    enc.train()
    ctx = DistContext(device=dev)
    td = TaskData(name="r", task="retrieval", records=rows(batch), batch_size=batch)
    store_of(td, enc, cfg)  # tokenized once, before the step (the loop reads token shards)

    def step(idx):
        ctx.gradcache = GradCache(mini_batch, dev) if mini_batch else None
        loss, _, tokens = retrieval_loss(enc, None, td, cfg, ctx, random.Random(0), idx=idx)
        loss.backward()
        if ctx.gradcache is not None:
            ctx.gradcache.backward()
        return float(loss.detach()), tokens

    torch.manual_seed(0)
    step(list(range(4)))  # warm-up: one-time allocations are not the step's
    enc.zero_grad(set_to_none=False)
    ctx.gradcache = None
    gc.collect()
    _malloc_trim()  # hand the warm-up's freed heap back: the step's peak is not hidden in reused pages
    torch.manual_seed(1)
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(dev)
        before = torch.cuda.memory_allocated(dev)
    else:
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS (VmHWM) to the current RSS
        before = _rss_kib("VmRSS") * 1024
    t0 = time.perf_counter()
    loss, tokens = step(list(range(batch)))
    if dev.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated(dev)
    else:
        peak = _rss_kib("VmHWM") * 1024
    return {"batch": batch, "mini_batch_size": mini_batch or None, "step_peak_mib": (peak - before) / 2**20,
            "before_mib": before / 2**20, "seconds": time.perf_counter() - t0, "loss": loss, "tokens": tokens,
            "memory": "cuda max_memory_allocated" if dev.type == "cuda" else "RSS peak (VmHWM)"}


# --------------------------------------------------------------------------- parent
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[64, 512])
    ap.add_argument("--mini-batch", type=int, nargs="+", default=[0, 32], help="0: no GradCache")
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--model", help="a model folder instead of the random BERT")
    ap.add_argument("--forward", default="auto", choices=["auto", "padded", "unpadded"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--malloc-mmap-threshold", type=int, default=131072,
                    help="glibc MALLOC_MMAP_THRESHOLD_ for every setting (0: glibc's dynamic default)")
    ap.add_argument("--json")
    ap.add_argument("--child", nargs=2, type=int, metavar=("BATCH", "MINI_BATCH"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.child:
        import torch

        torch.set_num_threads(args.threads)
        print(json.dumps(measure(args.model, *args.child, args.device, args.forward)))
        return 0

    print("$ python benchmarks/gradcache_memory.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])))
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            sys.path.insert(0, str(REPO / "tests"))
            from conftest import build_tiny_bert  # the tests' random BERT with a real tokenizer

            model = str(build_tiny_bert(Path(tmp) / "bert", hidden=args.hidden, layers=args.layers,
                                        heads=max(1, args.hidden // 32)))
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                   OMP_NUM_THREADS=str(args.threads))
        if args.malloc_mmap_threshold:
            env["MALLOC_MMAP_THRESHOLD_"] = str(args.malloc_mmap_threshold)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO / "platform"), env.get("PYTHONPATH")) if p)
        results = []
        for mb in args.mini_batch:
            for b in args.batch:
                cmd = [sys.executable, __file__, "--child", str(b), str(mb), "--model", model, "--device",
                       args.device, "--forward", args.forward, "--threads", str(args.threads)]
                out = subprocess.run(cmd, env=env, capture_output=True, text=True)
                if out.returncode != 0:
                    sys.stderr.write(out.stderr)
                    raise SystemExit(f"setting batch={b} mini_batch={mb} failed (exit {out.returncode})")
                res = json.loads(out.stdout.strip().splitlines()[-1])
                results.append(res)
                print(f"batch {b:4d}  mini_batch_size {str(res['mini_batch_size']):>4}  step peak "
                      f"{res['step_peak_mib']:8.1f} MiB  {res['seconds']:6.1f} s  loss {res['loss']:.6f}", flush=True)

    name = args.model or f"random BERT, hidden {args.hidden}, {args.layers} layers"
    print(f"\nmodel: {name}; device {args.device}; forward {args.forward}; threads {args.threads}; "
          f"memory: {results[0]['memory']}, above its value just before the step; "
          f"MALLOC_MMAP_THRESHOLD_={args.malloc_mmap_threshold or 'glibc default (dynamic)'}")
    print("\n| batch | mini_batch_size | step peak (MiB) | step s | loss |\n|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['batch']} | {r['mini_batch_size'] or 'none'} | {r['step_peak_mib']:.1f} | {r['seconds']:.1f} | {r['loss']:.6f} |")
    lo, hi = min(args.batch), max(args.batch)
    ratios = {}
    for mb in args.mini_batch:
        peak = {r["batch"]: r["step_peak_mib"] for r in results if (r["mini_batch_size"] or 0) == mb}
        ratios[mb or "none"] = peak[hi] / peak[lo]
        print(f"mini_batch_size {mb or 'none'}: peak at batch {hi} / at batch {lo} = {ratios[mb or 'none']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"command": sys.argv, "results": results, "ratios": ratios}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
