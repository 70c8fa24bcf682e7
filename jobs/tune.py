"""Ray job entrypoint: a Tune + Optuna search (merge coefficients or loss weights) from a config.

    ray job submit --working-dir . -- python jobs/tune.py --config configs/merge-search.yaml
    ray job submit --working-dir . -- python jobs/tune.py --config configs/loss-search.yaml --set tune.num_samples=8

Re-submitting the same config resumes an interrupted sweep (tune.resume: true).
"""

import argparse
import logging
import sys

from codiemb.errors import UserError
from codiemb.tune.driver import main

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        sys.exit(main(a.config, a.overrides))
    except UserError as exc:
        print(f"codiemb: error: {exc}", file=sys.stderr)
        sys.exit(2)
