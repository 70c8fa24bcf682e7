"""The fusion table: base, specialists, (naive) joint, and each merge of the two specialists,
scored on dev (selection) and test (report), full SciFact corpus.

    .venv/bin/python benchmarks/merge_table.py --ir runs/quickstart-ir/model --sts runs/quickstart-sts/model \
        [--joint runs/codiemb-minilm/model] [--best runs/tune/quickstart-merge-search/best-model] \
        [--config configs/quickstart.yaml] [--out BENCHMARKS-merge.md]

Merges: uniform soup, task arithmetic (lam 1, weights 1/1), TIES (density 0.2), delta-guided
(gamma 1, element), Self Positioning (probe from the config's training data, never dev/test).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from score_dev_test import score  # noqa: E402

MERGES = [
    ("uniform soup", "uniform_soup", {}),
    ("task arithmetic (λ=1)", "task_arithmetic", {"lam": 1.0}),
    ("TIES (density 0.2)", "ties", {"density": 0.2}),
    ("delta-guided (γ=1)", "delta_guided", {"gamma": 1.0}),
    ("Self Positioning", "self_positioning", {}),
]


def main() -> None:
    from codiemb.config import MergeConfig, MergeModelConfig, load_config
    from codiemb.merge.run import load_inputs, merge_in_memory, write_merged

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="minilm")
    ap.add_argument("--ir", required=True)
    ap.add_argument("--sts", required=True)
    ap.add_argument("--joint", action="append", default=[], help="NAME=FOLDER (repeatable)")
    ap.add_argument("--best", help="the search's best merge folder")
    ap.add_argument("--config", default="configs/quickstart.yaml", help="training data for the Self Positioning probe")
    ap.add_argument("--methods", default=",".join(m for _, m, _ in MERGES))
    ap.add_argument("--out")
    ap.add_argument("--json")
    a = ap.parse_args()

    cfg = load_config(a.config)
    cfg.merge = MergeConfig(method="uniform_soup", base_model=a.base,
                            models=[MergeModelConfig(model=a.ir), MergeModelConfig(model=a.sts)])
    models: list[tuple[str, str]] = [("base (all-MiniLM-L6-v2)", a.base), ("IR specialist", a.ir),
                                     ("STS specialist", a.sts)]
    for j in a.joint:
        name, _, folder = j.partition("=")
        models.append((name, folder))
    tmp = Path(tempfile.mkdtemp(prefix="merge-table-"))
    inputs = load_inputs(cfg)
    wanted = a.methods.split(",")
    for label, method, params in MERGES:
        if method not in wanted:
            continue
        t0 = time.perf_counter()
        sd, extra = merge_in_memory(method, inputs, params=params, cfg=cfg)
        out = write_merged(inputs, sd, tmp / method, {"method": method, "parameters": params, **extra})
        print(f"merged {method} in {time.perf_counter() - t0:.1f}s -> {out}", flush=True)
        models.append((label, str(out)))
    if a.best:
        models.append(("search's best", a.best))

    rows = []
    for label, folder in models:
        r = score(folder)
        r["label"] = label
        rows.append(r)
        print(f"{label}: STS-B dev {r['stsb_dev']:.2f} SciFact dev {r['scifact_dev']:.2f} | "
              f"test {r['stsb_test']:.2f} / {r['scifact_test']:.2f}", flush=True)
    lines = ["| model | STS-B dev | SciFact dev nDCG@10 | STS-B test | SciFact test nDCG@10 | mean test |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['label']} | {r['stsb_dev']:.2f} | {r['scifact_dev']:.2f} | {r['stsb_test']:.2f} | "
                     f"{r['scifact_test']:.2f} | {r['mean_test']:.2f} |")
    table = "\n".join(lines)
    print(table)
    if a.out:
        Path(a.out).write_text(table + "\n")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
