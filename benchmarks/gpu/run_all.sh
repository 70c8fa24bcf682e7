#!/usr/bin/env bash
# One command for the GPU machine (one H100 or H200; torch, transformers, sentence-transformers,
# datasets, accelerate; no Ray, no codiemb install). Run from anywhere inside a copy of the repo
# that carries benchmarks/gpu/assets (written on the data machine by `bench_gpu.py prepare`).
#
#   bash benchmarks/gpu/run_all.sh                 # all datasets, all variants, results into benchmarks/gpu/results
#   OUT_DIR=$OUT bash benchmarks/gpu/run_all.sh --pairs 2 --steps 8
#
# Extra arguments go to `bench_gpu.py run`. Writes gpu_throughput_<device>.{json,md}, run.log and
# environment.txt into $OUT_DIR (default benchmarks/gpu/results).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python}
OUT=${OUT_DIR:-benchmarks/gpu/results}
mkdir -p "$OUT"
if [ ! -f benchmarks/gpu/assets/vocab.txt ]; then
  echo "benchmarks/gpu/assets is missing: run 'python benchmarks/gpu/bench_gpu.py prepare' where the shared data is, and carry it" >&2
  exit 2
fi
{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>/dev/null || echo "nvidia-smi: not available"
  "$PY" - <<'PYEOF'
import importlib, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none")
for m in ("transformers", "sentence_transformers", "datasets", "accelerate", "flash_attn"):
    try:
        print(m, importlib.import_module(m).__version__)
    except Exception as exc:  # noqa: BLE001
        print(m, "absent", type(exc).__name__)
try:
    from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    print("torch.nn.attention.varlen: present")
except Exception as exc:  # noqa: BLE001
    print("torch.nn.attention.varlen: absent", type(exc).__name__)
PYEOF
} 2>&1 | tee "$OUT/environment.txt"
"$PY" benchmarks/gpu/bench_gpu.py run --out "$OUT" "$@" 2>&1 | tee "$OUT/run.log"
