"""STS-B Spearman per source (MSRpar, headlines, answers-forums, ...) on the dev and the test split.

Why: merges picked on STS-B dev lose about a point on STS-B test that dev does not show. The two
splits do not hold the same forum data (dev: answers-forums, 2015; test: answer-answer, 2016), and
this table shows, source by source, where a model gains or loses against another.

    .venv/bin/python benchmarks/sts_by_source.py runs/a/model runs/b/model [--json out.json]

Each column is one model; each row a split and a source (``all`` = the whole split, the number
``score_dev_test.py`` reports). Every sentence is embedded once per model; the per-source numbers
come from the same evaluator (``codiemb.evaluate.sts.evaluate_sts``) on that source's rows.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict


class _CachedEncoder:
    """Embeds each distinct text once, so scoring the subsets costs no more than the whole split."""

    def __init__(self, encoder):
        self.encoder, self.cache = encoder, {}

    def encode(self, texts, batch_size=64, max_length=None, normalize=True, show_progress=False, instruction=None):
        import torch

        todo = [t for t in dict.fromkeys(texts) if t not in self.cache]
        if todo:
            emb = self.encoder.encode(todo, batch_size=batch_size, max_length=max_length, normalize=normalize,
                                      instruction=instruction)
            self.cache.update(zip(todo, torch.as_tensor(emb, dtype=torch.float32)))
        return torch.stack([self.cache[t] for t in texts])  # (instruction is the same for all calls here)


def by_source(model: str, data_dir: str | None = None) -> dict[str, dict[str, dict]]:
    """``{split: {source: {"spearman": ρ×100, "n": pairs}}}`` for STS-B dev and test."""
    from codiemb.data.beir import read_jsonl
    from codiemb.evaluate.sts import evaluate_sts
    from codiemb.model.encoder import Encoder
    from codiemb.paths import data_dir as resolve

    root = resolve(data_dir)
    enc = _CachedEncoder(Encoder.load(model))
    out = {}
    for split in ("dev", "test"):
        rows = [row for _, row in read_jsonl(root / f"sts/stsb/{split}.jsonl")]
        groups = defaultdict(list)
        for row in rows:
            groups["all"].append(row)
            groups[row.get("source", "?")].append(row)
        out[split] = {name: {k: evaluate_sts(enc, g)[k] for k in ("spearman", "n")}
                      for name, g in sorted(groups.items(), key=lambda kv: (kv[0] != "all", kv[0]))}
    return out


def table(results: dict[str, dict]) -> str:
    models = list(results)
    lines = ["| split | source | pairs | " + " | ".join(models) + " |",
             "|---|---|---:|" + "---:|" * len(models)]
    first = results[models[0]]
    for split, sources in first.items():
        for name, cell in sources.items():
            vals = " | ".join(f"{results[m][split][name]['spearman']:.2f}" for m in models)
            lines.append(f"| {split} | {name} | {cell['n']} | {vals} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+", help="model folders (or 'minilm')")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--json", default=None, help="also write the numbers here")
    args = ap.parse_args(argv)
    results = {m: by_source(m, args.data_dir) for m in args.models}
    print(table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
