"""Ray job entrypoint: merge models onto a base as the config's merge section says.

    ray job submit --working-dir . -- python jobs/merge.py --config configs/merge.yaml [--output DIR] [--evaluate]

Writes a sentence-transformers folder with merge_report.json (see codiemb.merge.run).
"""

import argparse
import logging
import sys

from codiemb.errors import UserError
from codiemb.merge.run import main

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--output", default=None)
    ap.add_argument("--evaluate", action="store_true", default=None, help="add fast dev scores to the report")
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        sys.exit(main(a.config, a.overrides, output=a.output, evaluate=a.evaluate))
    except UserError as exc:
        print(f"codiemb: error: {exc}", file=sys.stderr)
        sys.exit(2)
