"""Issue 5's fusion bars, checked on the dev splits and on the test splits, from score files.

Each file is what ``benchmarks/score_dev_test.py --json`` writes for one model (a one-item list,
or a dict): STS-B and SciFact nDCG@10, dev and test. The bars, per split:

- the merge is within ``--gap`` (0.5) points of the STS specialist on STS-B,
- and within ``--gap`` of the IR specialist on SciFact,
- and beats the uniform soup on the mean of the two (when ``--soup`` is given);
- on test only, the absolute floors ``--sts-floor`` (86.5) and ``--ir-floor`` (68.0).

    .venv/bin/python benchmarks/score_dev_test.py IR/model --json ir.json   (and so on for each model)
    .venv/bin/python benchmarks/fusion_bars.py --ir ir.json --sts sts.json --merge merge.json [--soup soup.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def load_score(path: str | Path) -> dict:
    data = json.loads(Path(path).read_text())
    if isinstance(data, list):
        if len(data) != 1:
            raise SystemExit(f"{path}: holds {len(data)} scores; give one model's file")
        data = data[0]
    missing = [k for k in ("stsb_dev", "stsb_test", "scifact_dev", "scifact_test") if k not in data]
    if missing:
        raise SystemExit(f"{path}: missing {', '.join(missing)} (not a score_dev_test.py file?)")
    return data


def check(ir: dict, sts: dict, merge: dict, soup: dict | None = None, gap: float = 0.5,
          sts_floor: float = 86.5, ir_floor: float = 68.0) -> list[dict]:
    """One row per bar and split: the merge's value, the value it is held to, and whether it holds."""
    rows = []
    for split in ("dev", "test"):
        s, r = f"stsb_{split}", f"scifact_{split}"
        rows.append({"split": split, "bar": f"STS-B within {gap} of the STS specialist",
                     "merge": merge[s], "needs": sts[s] - gap, "holds": merge[s] >= sts[s] - gap})
        rows.append({"split": split, "bar": f"SciFact within {gap} of the IR specialist",
                     "merge": merge[r], "needs": ir[r] - gap, "holds": merge[r] >= ir[r] - gap})
        if soup is not None:
            m, u = (merge[s] + merge[r]) / 2, (soup[s] + soup[r]) / 2
            rows.append({"split": split, "bar": "mean above the uniform soup's", "merge": m, "needs": u,
                         "holds": m > u})
        if split == "test":
            rows.append({"split": split, "bar": f"STS-B at least {sts_floor}", "merge": merge[s],
                         "needs": sts_floor, "holds": merge[s] >= sts_floor})
            rows.append({"split": split, "bar": f"SciFact at least {ir_floor}", "merge": merge[r],
                         "needs": ir_floor, "holds": merge[r] >= ir_floor})
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| split | bar | merge | needs | holds |", "|---|---|---:|---:|---|"]
    for row in rows:
        lines.append(f"| {row['split']} | {row['bar']} | {row['merge']:.2f} | {row['needs']:.2f} | "
                     f"{'yes' if row['holds'] else '**no**'} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ir", required=True, help="the IR specialist's score file")
    ap.add_argument("--sts", required=True, help="the STS specialist's score file")
    ap.add_argument("--merge", required=True, help="the merge's score file")
    ap.add_argument("--soup", help="the uniform soup's score file")
    ap.add_argument("--gap", type=float, default=0.5)
    ap.add_argument("--sts-floor", type=float, default=86.5)
    ap.add_argument("--ir-floor", type=float, default=68.0)
    args = ap.parse_args()
    rows = check(load_score(args.ir), load_score(args.sts), load_score(args.merge),
                 load_score(args.soup) if args.soup else None, args.gap, args.sts_floor, args.ir_floor)
    print(table(rows))


if __name__ == "__main__":
    main()
