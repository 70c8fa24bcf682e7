"""Ray job entrypoint: the whole pipeline (train -> merge search -> evaluate -> register -> gate).

    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . \
        -- python jobs/pipeline.py --config configs/quickstart.yaml
"""

import argparse
import sys

from codiemb.cli import main

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--local", action="store_true", help="train in the job's driver process, without Ray workers")
    a = ap.parse_args()
    argv = ["pipeline", a.config] + [x for o in a.overrides for x in ("--set", o)] + (["--local"] if a.local else [])
    sys.exit(main(argv))
