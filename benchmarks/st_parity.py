"""A written model folder scored by sentence-transformers' own ``encode`` against ``codiemb``'s
evaluator: STS-B test (the training-core issue asks for agreement within ±0.01), or SciFact test
(the models issue: all-mpnet-base-v2 65.57 ± 0.2 both ways).

    .venv/bin/python benchmarks/st_parity.py runs/quality/codiemb-joint/model
    .venv/bin/python benchmarks/st_parity.py ~/.cache/codiemb/models/all-mpnet-base-v2 --suite scifact \
        [--codiemb-json runs/logs/mpnet-scifact.json]

SciFact through sentence-transformers: queries and documents (``title + " " + text``, streamed from
``corpus.jsonl`` in chunks) embedded by ``SentenceTransformer.encode`` at the model's own
``max_seq_length``, normalised; exact inner-product search and pytrec_eval's nDCG@10, the same
protocol as ``codiemb.evaluate.retrieval``. Embedding the corpus is the whole cost (mpnet on 2 CPU
cores: tens of minutes), so ``--codiemb-json`` takes codiemb's side from the JSON that
``codiemb evaluate MODEL --suite scifact --json`` wrote for the same folder instead of embedding it
a second time; without it, this script runs codiemb's evaluator too.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def stsb(folder: str) -> None:
    from scipy.stats import spearmanr
    from sentence_transformers import SentenceTransformer

    from codiemb.evaluate.sts import evaluate_sts
    from codiemb.model.encoder import Encoder
    from codiemb.paths import data_dir

    test = data_dir() / "sts/stsb/test.jsonl"
    rows = [json.loads(line) for line in test.read_text().splitlines() if line.strip()]
    st = SentenceTransformer(folder, device="cpu")
    a = st.encode([r["sentence1"] for r in rows], batch_size=64, normalize_embeddings=True)
    b = st.encode([r["sentence2"] for r in rows], batch_size=64, normalize_embeddings=True)
    ours = evaluate_sts(Encoder.load(folder), test)["spearman"]
    theirs = 100 * spearmanr((a * b).sum(1), [r["score"] for r in rows]).statistic
    print(f"modules: {[type(m).__name__ for m in st]}")
    print(f"STS-B test Spearman x100: sentence-transformers encode {theirs:.4f}, codiemb {ours:.4f}, "
          f"difference {abs(theirs - ours):.4f}")


def scifact(folder: str, codiemb_json: str | None) -> None:
    from sentence_transformers import SentenceTransformer

    from codiemb.data.beir import load_beir
    from codiemb.evaluate.index import ExactIndex
    from codiemb.evaluate.metrics import retrieval_metrics
    from codiemb.paths import data_dir

    split = load_beir(data_dir() / "ir/scifact", "test", corpus=False)
    st = SentenceTransformer(folder, device="cpu")
    t0 = time.perf_counter()
    query_ids = list(split.qrels)
    q = st.encode([split.queries[i] for i in query_ids], batch_size=64, normalize_embeddings=True,
                  convert_to_tensor=True)
    index = ExactIndex(q.shape[1])
    n_docs = 0
    for ids, texts in split.iter_corpus(1024):
        index.add(ids, st.encode(texts, batch_size=64, normalize_embeddings=True, convert_to_tensor=True))
        n_docs += len(ids)
    run = dict(zip(query_ids, index.search(q, 100)))
    theirs = retrieval_metrics(run, split.qrels, (10, 100))["ndcg@10"]
    st_seconds = time.perf_counter() - t0
    if codiemb_json:
        ours_res = json.loads(Path(codiemb_json).read_text())["results"]["scifact"]
        source = codiemb_json
    else:
        from codiemb.evaluate.suites import evaluate_model

        ours_res = evaluate_model(folder, "scifact", show_progress=False)["results"]["scifact"]
        source = "codiemb.evaluate.suites.evaluate_model (this run)"
    ours = ours_res["ndcg@10"]
    print(f"modules: {[type(m).__name__ for m in st]}; max_seq_length {st.max_seq_length}; "
          f"{len(query_ids)} queries, {n_docs} documents; sentence-transformers side {st_seconds:.0f} s")
    print(f"SciFact test nDCG@10 x100: sentence-transformers encode {theirs:.4f}, codiemb {ours:.4f} ({source}), "
          f"difference {abs(theirs - ours):.4f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folder")
    ap.add_argument("--suite", choices=("stsb", "scifact"), default="stsb")
    ap.add_argument("--codiemb-json", help="scifact: codiemb's result from `codiemb evaluate ... --json`")
    args = ap.parse_args()
    if args.suite == "stsb":
        stsb(args.folder)
    else:
        scifact(args.folder, args.codiemb_json)


if __name__ == "__main__":
    main()
