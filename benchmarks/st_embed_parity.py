"""Does ``SentenceTransformer(path)`` embed like codiemb? Max |difference| per saved prompt.

Embeds the first ``--n`` STS-B dev sentences (both columns, batches of mixed lengths, so padding
is exercised) with sentence-transformers' own ``encode`` and with ``codiemb``'s ``Encoder``, once
without a prompt and once per prompt the folder saves (``query``, ``document``, ``sts``: codiemb's
instructions), and fails (exit 1) when any element differs by more than ``--atol``::

    .venv/bin/python benchmarks/st_embed_parity.py runs/acc-qwen3/model runs/acc-mpnet/model
"""

from __future__ import annotations

import argparse
import json
import sys


def parity(folder: str, texts: list[str], batch_size: int = 16) -> dict[str, float]:
    """``{prompt name or "none": max |ST - codiemb|}`` for ``folder``."""
    import numpy as np
    from sentence_transformers import SentenceTransformer

    from codiemb.model.encoder import _ST_PROMPT_NAMES, Encoder

    st = SentenceTransformer(folder, device="cpu")
    enc = Encoder.load(folder)
    out = {}
    kinds = {"none": None, **{_ST_PROMPT_NAMES[k]: k for k in enc.instructions}}
    for name, kind in kinds.items():
        theirs = st.encode(texts, prompt_name=None if kind is None else name, batch_size=batch_size)
        ours = enc.encode(texts, instruction=enc.instructions.get(kind) if kind else None, batch_size=batch_size,
                          convert_to_numpy=True)
        out[name] = float(np.abs(theirs - ours).max())
    return out


def main(argv: list[str] | None = None) -> int:
    from codiemb.paths import data_dir

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folders", nargs="+")
    ap.add_argument("--n", type=int, default=64, help="STS-B dev rows (2 sentences each)")
    ap.add_argument("--atol", type=float, default=1e-5)
    args = ap.parse_args(argv)
    rows = [json.loads(line) for line in (data_dir() / "sts/stsb/dev.jsonl").read_text().splitlines()[: args.n]]
    texts = [r["sentence1"] for r in rows] + [r["sentence2"] for r in rows]
    ok = True
    for folder in args.folders:
        res = parity(folder, texts)
        worst = max(res.values())
        ok &= worst <= args.atol
        print(json.dumps({"model": folder, "texts": len(texts), "max_abs_diff": res,
                          "pass": worst <= args.atol, "atol": args.atol}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
