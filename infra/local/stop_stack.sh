#!/usr/bin/env bash
# Stop what infra/local/start_stack.sh started: the MLflow server (by its pid file) and the Ray head
# (`ray stop`; skipped with CODIEMB_STACK_RAY=0, as for start_stack.sh).
set -euo pipefail
cd "$(dirname "$0")/../.."
STACK="${CODIEMB_STACK_DIR:-.codiemb/stack}"
BIN="${CODIEMB_BIN:-$(pwd)/.venv/bin}"
[ -x "$BIN/ray" ] || BIN="$(dirname "$(command -v ray)")"

if [ -f "$STACK/mlflow.pid" ]; then
  pid="$(cat "$STACK/mlflow.pid")"
  # the server runs in its own session (setsid): stop its whole process group (uvicorn workers)
  kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
  rm -f "$STACK/mlflow.pid"
  rm -rf "$STACK"/mlflow-auth.*   # the rendered basic_auth.ini (it names the auth database)
  echo "mlflow server stopped" >&2
fi
if [ "${CODIEMB_STACK_RAY:-1}" = "1" ]; then
  "$BIN/ray" stop >/dev/null 2>&1 && echo "ray stopped" >&2 || true
fi
