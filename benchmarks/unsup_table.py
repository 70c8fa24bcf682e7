"""SimCSE vs WhitenedCSE vs DebCSE: train all-MiniLM-L6-v2 on the STS-B train sentences as unlabeled
text (configs/unsup-stsb.yaml, scores never read), the same sentences, seed and steps for each
method, then STS-B dev (where anything is chosen) and test (reported only), with the base model.

    nice -n 19 .venv/bin/python benchmarks/unsup_table.py --steps 60 [--set train.lr=2e-5 ...] [--json out.json]

Each run is ``codiemb train configs/unsup-stsb.yaml --local --no-tracking --set
loss.unsupervised.method=M --set train.max_steps=STEPS`` in a subprocess.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
METHODS = ("simcse", "whitenedcse", "debcse")


def train(method: str, steps: int, out_root: str, extra: list[str]) -> tuple[str, float]:
    out = Path(out_root) / f"unsup-{method}"
    cmd = [sys.executable, "-m", "codiemb.cli", "train", str(REPO / "configs/unsup-stsb.yaml"), "--local",
           "--no-tracking", "--set", f"loss.unsupervised.method={method}", "--set", f"train.max_steps={steps}",
           "--set", f"run.name=unsup-{method}", "--set", f"storage.path={out_root}", "--no-resume"]
    for item in extra:
        cmd += ["--set", item]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=REPO, env=dict(os.environ, CODIEMB_NO_PROGRESS="1"))
    return str(out / "model"), time.perf_counter() - t0


def score(model: str) -> dict:
    from codiemb.evaluate.sts import evaluate_sts
    from codiemb.model.encoder import Encoder
    from codiemb.paths import data_dir

    root = data_dir(None)
    enc = Encoder.load(model)
    return {"stsb_dev": evaluate_sts(enc, root / "sts/stsb/dev.jsonl")["spearman"],
            "stsb_test": evaluate_sts(enc, root / "sts/stsb/test.jsonl")["spearman"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--out", default="runs/unsup-bench")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="extra --set for every run")
    ap.add_argument("--json")
    a = ap.parse_args()
    rows = [{"model": "minilm (base, no training)", **score("minilm"), "train_s": 0.0}]
    for m in a.methods:
        path, secs = train(m, a.steps, a.out, a.overrides)
        rows.append({"model": m, **score(path), "train_s": secs})
        print(json.dumps(rows[-1]), flush=True)
    print(f"| model ({a.steps} steps, batch 64, max_length 32) | STS-B dev | STS-B test | train s |")
    print("|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['stsb_dev']:.2f} | {r['stsb_test']:.2f} | {r['train_s']:.0f} |")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
