"""Ray job entrypoint: evaluate a model (folder, alias or models:/NAME@ALIAS) on a suite.

    ray job submit --working-dir . -- python jobs/evaluate.py --model models:/codiemb-minilm@champion --suite default

``--ray`` embeds the retrieval corpora with Ray Data on the cluster's workers (one GPU per actor
where the cluster has GPUs) instead of in this driver process.
"""

import argparse
import sys

from codiemb.cli import main

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--suite", default="default")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--ray", action="store_true", help="embed retrieval corpora with Ray Data on the cluster's workers")
    a = ap.parse_args()
    sys.exit(main(["evaluate", a.model, "--suite", a.suite] + (["--json"] if a.json else [])
                  + (["--ray"] if a.ray else [])))
