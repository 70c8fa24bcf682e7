"""Silver pairs (issue 18, item 3): STS-B train with and without teacher-labelled pairs.

1. ``codiemb data augment`` (unless ``--silver`` exists): the STS-B train sentences and the SNLI
   dev+test pairs' sentences as the unlabeled pool, ``--anchors`` of them re-paired with their top
   ``--k`` BM25 neighbours, STS-B train's own pairs and every pair touching an STS-B dev or test
   sentence dropped, ``--max-pairs`` kept, scored by ``--teacher`` (cosine → 5·clamp(cos, 0, 1)).
2. ``codiemb train configs/stsb-silver.yaml --local --no-tracking`` twice: the baseline (STS-B
   train) and the silver arm (STS-B train + the silver file as a second STS dataset), same steps.
3. STS-B dev (chosen on) and test (reported) Spearman × 100 of the base model and both arms.

    .venv/bin/python benchmarks/silver_pairs.py --out runs/silver --steps 120 [--write-benchmarks]

Each command is printed before it runs; a model folder that exists is reused (delete to retrain).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = "configs/stsb-silver.yaml"
STSB = "{name: stsb, task: sts, path: sts/stsb/train.jsonl, score_range: [0, 5], batch_size: 32}"


def run(cmd: list[str]) -> float:
    print("$ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=REPO)
    return time.perf_counter() - t0


def augment_cmd(args) -> list[str]:
    return [sys.executable, "-m", "codiemb.cli", "data", "augment", "sts/stsb/train.jsonl",
            "train/nli/snli/snli_dev_test_pairs.jsonl", "--labelled", "sts/stsb/train.jsonl",
            "--exclude-texts", "sts/stsb/dev.jsonl", "--exclude-texts", "sts/stsb/test.jsonl",
            "--samplers", "bm25", "--k", str(args.k), "--anchors", str(args.anchors), "--max-pairs",
            str(args.max_pairs), "--teacher", args.teacher, "--out", str(args.silver)] + ([] if args.ray else ["--local"])


def train_cmd(args, arm: str) -> list[str]:
    cmd = [sys.executable, "-m", "codiemb.cli", "train", CONFIG, "--local", "--no-tracking", "--output",
           str(Path(args.out) / arm), "--set", f"train.max_steps={args.steps}"]
    if arm == "silver":
        silver = (f"{{name: silver, task: sts, path: {Path(args.silver).resolve()}, score_range: [0, 5], "
                  f"batch_size: 32}}")
        cmd += ["--set", f"data.datasets=[{STSB}, {silver}]"]
    return cmd


def sts_scores(model: str) -> dict:
    from codiemb.evaluate.sts import evaluate_sts
    from codiemb.model.encoder import Encoder
    from codiemb.paths import data_dir

    enc, root = Encoder.load(model), data_dir()
    return {split: evaluate_sts(enc, root / f"sts/stsb/{split}.jsonl", batch_size=64)["spearman"]
            for split in ("dev", "test")}


def table(rows: list[dict], pairs: int, teacher: str) -> str:
    lines = ["| model | STS-B train pairs | silver pairs (teacher) | steps | STS-B dev | STS-B test | train wall |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        silver = f"{pairs:,} ({teacher})" if r["arm"] == "silver" else "–"
        wall = f"{r['wall_s']:.0f} s" if r.get("wall_s") else "–"
        lines.append(f"| {r['name']} | {r['gold']} | {silver} | {r['steps']} | {r['dev']:.2f} | {r['test']:.2f} | {wall} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/silver")
    p.add_argument("--silver", default="runs/data/stsb_snli_silver_mpnet.jsonl")
    p.add_argument("--teacher", default="mpnet")
    p.add_argument("--anchors", type=int, default=2000)
    p.add_argument("--k", type=int, default=2)
    p.add_argument("--max-pairs", type=int, default=3000)
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--ray", action="store_true", help="score the pairs with Ray Data actors (default: one process)")
    p.add_argument("--arms", default="baseline,silver", help="which trainings to run (default both)")
    p.add_argument("--json", help="write the rows here")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    arms = args.arms.split(",")
    pairs = 0
    if "silver" in arms:
        if not Path(args.silver).is_file():
            run(augment_cmd(args))
        else:
            print(f"# reusing {args.silver} (made by: {' '.join(augment_cmd(args)[1:])})")
        pairs = sum(1 for _ in open(args.silver, encoding="utf-8"))
    rows = [{"name": "all-MiniLM-L6-v2 (base)", "arm": "base", "gold": "–", "steps": "–", **sts_scores("minilm")}]
    for arm in arms:
        model, wall_file = Path(args.out) / arm / "model", Path(args.out) / arm / "wall_s.json"
        if not model.is_dir():
            wall_file.parent.mkdir(parents=True, exist_ok=True)
            wall_file.write_text(json.dumps(run(train_cmd(args, arm))))
        wall = json.loads(wall_file.read_text()) if wall_file.is_file() else None
        name = "STS-B train" if arm == "baseline" else "STS-B train + silver pairs"
        rows.append({"name": name, "arm": arm, "gold": "5,749", "steps": args.steps, "wall_s": wall,
                     **sts_scores(str(model))})
        print(json.dumps(rows[-1]), flush=True)
    print(table(rows, pairs, args.teacher))
    if args.json:
        Path(args.json).write_text(json.dumps({"pairs": pairs, "teacher": args.teacher, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
