"""Score one or more model folders on the dev AND test splits, embedding the SciFact corpus once per model.

Selection uses the dev columns only (STS-B dev, SciFact qrels/dev.tsv); test columns are reported.

    .venv/bin/python benchmarks/score_dev_test.py runs/a/model runs/b/model [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def score(model: str, data_dir: str | None = None, passage_len: int = 256, batch_size: int = 64) -> dict:
    from codiemb.data.beir import load_beir
    from codiemb.evaluate.metrics import ndcg_at_k
    from codiemb.evaluate.retrieval import rank_documents
    from codiemb.evaluate.sts import evaluate_sts
    from codiemb.model.encoder import Encoder
    from codiemb.paths import data_dir as resolve

    root = resolve(data_dir)
    t0 = time.perf_counter()
    enc = Encoder.load(model)
    out = {"model": model}
    out["stsb_dev"] = evaluate_sts(enc, root / "sts/stsb/dev.jsonl", batch_size=batch_size)["spearman"]
    out["stsb_test"] = evaluate_sts(enc, root / "sts/stsb/test.jsonl", batch_size=batch_size)["spearman"]
    dev, test = load_beir(root / "ir/scifact", "dev"), load_beir(root / "ir/scifact", "test")
    doc_ids = list(test.corpus)
    docs = enc.encode([test.corpus[d] for d in doc_ids], batch_size=batch_size, max_length=passage_len, normalize=True)
    for name, split in (("scifact_dev", dev), ("scifact_test", test)):
        qids = list(split.qrels)
        q = enc.encode([split.queries[i] for i in qids], batch_size=batch_size, normalize=True)
        ranked = rank_documents(torch.as_tensor(q), torch.as_tensor(docs), doc_ids, 10)
        out[name] = 100.0 * sum(ndcg_at_k(r, split.qrels[i], 10) for i, r in zip(qids, ranked)) / len(qids)
    out["mean_dev"] = (out["stsb_dev"] + out["scifact_dev"]) / 2
    out["mean_test"] = (out["stsb_test"] + out["scifact_test"]) / 2
    out["seconds"] = time.perf_counter() - t0
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+")
    ap.add_argument("--data-dir")
    ap.add_argument("--json")
    a = ap.parse_args()
    rows = [score(m, a.data_dir) for m in a.models]
    print("| model | STS-B dev | SciFact dev nDCG@10 | STS-B test | SciFact test nDCG@10 |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['stsb_dev']:.2f} | {r['scifact_dev']:.2f} | {r['stsb_test']:.2f} | {r['scifact_test']:.2f} |")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
