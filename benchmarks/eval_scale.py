"""How retrieval evaluation's memory grows with the corpus: a generated BEIR set of ``--docs`` documents.

It writes a BEIR folder (``corpus.jsonl``, ``queries.jsonl``, ``qrels/test.tsv``) of short generated
documents, builds a tiny random BERT with ``--dim``-wide embeddings (384 by default: minilm's
width, so the embedding matrix is the size minilm's would be) and a real WordPiece tokenizer, then
runs the real evaluator, ``codiemb.evaluate.retrieval.evaluate_retrieval``, on it: the corpus is
streamed from the file in chunks, embedded, added to the exact faiss ``IndexFlatIP`` blocks and
searched; metrics by pytrec_eval. ``--ray`` embeds the corpus with Ray Data actors instead (a
local Ray instance).

A sampler thread reads this process's resident memory (RSS) every 0.1 s. The report gives the RSS
before the evaluation (interpreter, torch, faiss and the model loaded), the peak during it, and
both against the size of the float32 embedding matrix (docs x dim x 4 bytes). The scale issue's
bar: the driver's peak under 2x the matrix (1M x 384 float32 = 1.5 GB).

    python benchmarks/eval_scale.py --docs 1000000 --queries 1000
    python benchmarks/eval_scale.py --docs 100000 300000 1000000   # several sizes, one table

``write_beir`` is also the tests' generated BEIR set (tests/integration/test_eval_ray.py).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

_WORDS = ("the a of to in and is are was on for with as by at from that this it not cat dog man woman "
          "child car house tree water fire sun moon red blue green big small good bad runs walks eats plays "
          "sleeps reads writes sees protein cell gene cancer risk study patients effect increase decrease "
          "treatment disease model data result shows found high low").split()


def write_beir(root: Path, docs: int, queries: int, words: tuple[int, int] = (6, 20), seed: int = 0) -> Path:
    """A BEIR folder of ``docs`` generated documents and ``queries`` queries with one or two relevant docs each.

    A query is a few words taken from its first relevant document, so a model can find it. The corpus
    is written line by line (never held in memory).
    """
    root = Path(root)
    (root / "qrels").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    relevant = {q: sorted(rng.sample(range(docs), k=min(docs, rng.choice((1, 2))))) for q in range(queries)}
    first: dict[int, list[int]] = {}
    for q, rel in relevant.items():
        first.setdefault(rel[0], []).append(q)
    query_text: dict[int, str] = {}
    with open(root / "corpus.jsonl", "w", encoding="utf-8") as fh:
        for d in range(docs):
            body = rng.choices(_WORDS, k=rng.randint(*words))
            for q in first.get(d, ()):
                query_text[q] = " ".join(rng.sample(body, k=min(len(body), 3)))
            fh.write(json.dumps({"_id": f"d{d}", "title": "", "text": " ".join(body)}) + "\n")
    with open(root / "queries.jsonl", "w", encoding="utf-8") as fh:
        for q in range(queries):
            fh.write(json.dumps({"_id": f"q{q}", "text": query_text[q]}) + "\n")
    with open(root / "qrels" / "test.tsv", "w", encoding="utf-8") as fh:
        fh.write("query-id\tcorpus-id\tscore\n")
        for q, rel in relevant.items():
            for d in rel:
                fh.write(f"q{q}\td{d}\t1\n")
    return root


class PeakRSS(threading.Thread):
    """Peak resident memory of this process, sampled every ``every`` seconds."""

    def __init__(self, every: float = 0.1):
        super().__init__(daemon=True)
        import psutil

        self.proc = psutil.Process()
        self.every = every
        self.peak = self.proc.memory_info().rss
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(self.every)

    def finish(self) -> int:
        self.stop.set()
        self.join()
        return max(self.peak, self.proc.memory_info().rss)


def measure(folder: Path, model: Path, args) -> dict:
    """One evaluation in this process (run as a child of main, so each size starts from a fresh process)."""
    import psutil
    import torch

    from codiemb.data.beir import load_beir
    from codiemb.evaluate.retrieval import evaluate_retrieval
    from codiemb.model.encoder import Encoder

    torch.set_num_threads(args.threads)
    enc = Encoder.load(str(model))
    split = load_beir(folder, "test", corpus=False)
    before = psutil.Process().memory_info().rss
    sampler = PeakRSS()
    sampler.start()
    t0 = time.perf_counter()
    options = {"num_actors": args.actors, "rows_per_task": 8192} if args.ray else None
    result = evaluate_retrieval(enc, split, batch_size=args.batch_size, doc_max_length=32, query_max_length=16,
                                chunk_size=args.chunk_size, use_ray=args.ray, ray_options=options)
    seconds = time.perf_counter() - t0
    peak = sampler.finish()
    return {"docs": result["n_docs"], "queries": result["n_queries"], "dim": args.dim, "seconds": round(seconds, 1),
            "docs_per_s": round(result["n_docs"] / seconds), "rss_before_mb": round(before / 2**20),
            "rss_peak_mb": round(peak / 2**20), "matrix_mb": round(result["n_docs"] * args.dim * 4 / 2**20),
            "ndcg@10": round(result["ndcg@10"], 2), "path": "ray" if args.ray else "local"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, nargs="+", default=[1_000_000])
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--dim", type=int, default=384, help="embedding width of the tiny random model")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--chunk-size", type=int, default=16384)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ray", action="store_true", help="embed the corpus with Ray Data actors")
    ap.add_argument("--actors", type=int, default=2)
    ap.add_argument("--work", type=Path, default=None, help="folder for the generated sets (default: a temp dir)")
    ap.add_argument("--out", type=Path, default=None, help="also write the rows as JSON here")
    ap.add_argument("--_child", nargs=2, metavar=("FOLDER", "MODEL"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._child:
        print("RESULT " + json.dumps(measure(Path(args._child[0]), Path(args._child[1]), args)), flush=True)
        return 0
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import build_tiny_bert  # the tests' tiny random BERT with a real tokenizer

    work = args.work or Path(tempfile.mkdtemp(prefix="eval-scale-"))
    model = build_tiny_bert(work / "model", hidden=args.dim, layers=1, heads=max(1, args.dim // 64))
    rows = []
    for n in args.docs:
        folder = work / f"beir-{n}"
        if not (folder / "qrels" / "test.tsv").exists():
            t0 = time.perf_counter()
            write_beir(folder, n, args.queries)
            print(f"wrote {n} docs in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        cmd = [sys.executable, __file__, "--_child", str(folder), str(model)] + [
            a for a in (argv if argv is not None else sys.argv[1:])]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "platform"), os.environ.get("PYTHONPATH", "")]))
        out = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if out.returncode:
            print(out.stdout + out.stderr, file=sys.stderr)
            return out.returncode
        row = json.loads(next(line for line in out.stdout.splitlines() if line.startswith("RESULT "))[7:])
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("\n| docs | path | seconds | docs/s | RSS before MB | RSS peak MB | matrix MB | peak / matrix | nDCG@10 |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['docs']:,} | {r['path']} | {r['seconds']} | {r['docs_per_s']:,} | {r['rss_before_mb']:,} | "
              f"{r['rss_peak_mb']:,} | {r['matrix_mb']:,} | {r['rss_peak_mb'] / r['matrix_mb']:.2f} | {r['ndcg@10']} |")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
