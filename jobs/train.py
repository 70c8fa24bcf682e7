"""Ray job entrypoint: train from a config on the cluster this job runs on.

    ray job submit --working-dir . -- python jobs/train.py --config configs/codiemb-minilm.yaml
"""

import argparse
import sys

from codiemb.cli import main

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--local", action="store_true")
    a = ap.parse_args()
    argv = ["train", a.config] + [x for o in a.overrides for x in ("--set", o)] + (["--local"] if a.local else [])
    sys.exit(main(argv))
