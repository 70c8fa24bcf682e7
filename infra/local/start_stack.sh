#!/usr/bin/env bash
# Start the local stack on 127.0.0.1: a Ray head (token auth) and an MLflow server on SQLite.
#
#   infra/local/start_stack.sh            # then: eval "$(infra/local/start_stack.sh --env)"
#   ray job submit --working-dir . -- python jobs/pipeline.py --config configs/quickstart.yaml
#   infra/local/stop_stack.sh
#
# State lives in .codiemb/stack/ (MLflow database, artifacts, logs, pid file). Set
# CODIEMB_STACK_DIR to put it elsewhere, MLFLOW_PORT (5000) / RAY_DASHBOARD_PORT (8265) to move ports,
# MLFLOW_ARTIFACTS_DESTINATION=s3://bucket/prefix (+ MLFLOW_S3_ENDPOINT_URL, AWS_* in the env) for S3.
set -euo pipefail
cd "$(dirname "$0")/../.."

STACK="${CODIEMB_STACK_DIR:-.codiemb/stack}"
MLFLOW_PORT="${MLFLOW_PORT:-5000}"
RAY_DASHBOARD_PORT="${RAY_DASHBOARD_PORT:-8265}"
BIN="${CODIEMB_BIN:-$(pwd)/.venv/bin}"
[ -x "$BIN/mlflow" ] || BIN="$(dirname "$(command -v mlflow)")"

print_env() {
  echo "export MLFLOW_TRACKING_URI=http://127.0.0.1:${MLFLOW_PORT}"
  echo "export RAY_ADDRESS=http://127.0.0.1:${RAY_DASHBOARD_PORT}"
  echo "export RAY_AUTH_MODE=token"
}
if [ "${1:-}" = "--env" ]; then print_env; exit 0; fi

mkdir -p "$STACK/artifacts"
STACK="$(cd "$STACK" && pwd)"

# Ray: token auth on; the token lives in ~/.ray/auth_token (created once if missing).
export RAY_AUTH_MODE=token
"$BIN/ray" get-auth-token --generate >/dev/null
if ! "$BIN/ray" status >/dev/null 2>&1; then
  "$BIN/ray" start --head --node-ip-address=127.0.0.1 --dashboard-host=127.0.0.1 \
    --dashboard-port="$RAY_DASHBOARD_PORT" --disable-usage-stats >"$STACK/ray.log" 2>&1
fi

# MLflow: SQLite backend, artifacts served by the server (local folder or S3).
if [ -f "$STACK/mlflow.pid" ] && kill -0 "$(cat "$STACK/mlflow.pid")" 2>/dev/null; then
  echo "mlflow server already running (pid $(cat "$STACK/mlflow.pid"))" >&2
else
  DEST="${MLFLOW_ARTIFACTS_DESTINATION:-$STACK/artifacts}"
  setsid "$BIN/mlflow" server --host 127.0.0.1 --port "$MLFLOW_PORT" --workers 1 \
    --backend-store-uri "sqlite:///$STACK/mlflow.db" --artifacts-destination "$DEST" \
    >"$STACK/mlflow.log" 2>&1 &
  echo $! >"$STACK/mlflow.pid"
  for _ in $(seq 1 120); do
    if curl -fs "http://127.0.0.1:${MLFLOW_PORT}/health" >/dev/null 2>&1; then break; fi
    sleep 0.5
  done
  curl -fs "http://127.0.0.1:${MLFLOW_PORT}/health" >/dev/null || { echo "mlflow did not start; see $STACK/mlflow.log" >&2; exit 1; }
fi

echo "Ray dashboard  http://127.0.0.1:${RAY_DASHBOARD_PORT}" >&2
echo "MLflow UI      http://127.0.0.1:${MLFLOW_PORT}" >&2
print_env
