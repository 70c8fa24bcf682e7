"""A written model folder scored by sentence-transformers' own ``encode`` against ``codiemb``'s
evaluator on STS-B test (the training-core issue asks for agreement within ±0.01).

    .venv/bin/python benchmarks/st_parity.py runs/quality/codiemb-joint/model
"""

from __future__ import annotations

import json
import sys


def main() -> None:
    from scipy.stats import spearmanr
    from sentence_transformers import SentenceTransformer

    from codiemb.evaluate.sts import evaluate_sts
    from codiemb.model.encoder import Encoder
    from codiemb.paths import data_dir

    folder = sys.argv[1]
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


if __name__ == "__main__":
    main()
