#!/usr/bin/env bash
# Start the local stack on 127.0.0.1 only: a Ray head (token auth) and an MLflow server on SQLite
# with login required (MLflow's basic-auth app, run by infra/mlflow/start_server.sh).
#
#   infra/local/start_stack.sh && eval "$(infra/local/start_stack.sh --env)"
#   ray job submit --working-dir . -- python jobs/pipeline.py --config configs/quickstart.yaml \
#       --set tracking.uri=http://127.0.0.1:5000
#   infra/local/stop_stack.sh
#
# State lives in .codiemb/stack/ (mode 0700: MLflow databases, artifacts, logs, pid file, and the
# generated admin password and CSRF key, each 0600). Set CODIEMB_STACK_DIR to put it elsewhere,
# MLFLOW_PORT (5000) / RAY_DASHBOARD_PORT (8265) to move ports, CODIEMB_STACK_RAY=0 for the MLflow
# server alone, MLFLOW_ARTIFACTS_DESTINATION=s3://bucket/prefix (+ MLFLOW_S3_ENDPOINT_URL, AWS_* in
# the env) for S3.
#
# MLflow login: user `admin`, the password in .codiemb/stack/mlflow_admin_password. `--env` prints
# MLFLOW_TRACKING_USERNAME and a MLFLOW_TRACKING_PASSWORD that reads that file (the password itself
# is never printed). The Ray head is started with the same variables, so jobs submitted to it log
# to the server; a Ray head that was already running does not have them.
set -euo pipefail
cd "$(dirname "$0")/../.."
REPO="$(pwd)"

STACK="${CODIEMB_STACK_DIR:-.codiemb/stack}"
MLFLOW_PORT="${MLFLOW_PORT:-5000}"
RAY_DASHBOARD_PORT="${RAY_DASHBOARD_PORT:-8265}"
WITH_RAY="${CODIEMB_STACK_RAY:-1}"
BIN="${CODIEMB_BIN:-$(pwd)/.venv/bin}"
[ -x "$BIN/mlflow" ] || BIN="$(dirname "$(command -v mlflow)")"
ADMIN_USER=admin

umask 077
mkdir -p "$STACK/artifacts"
STACK="$(cd "$STACK" && pwd)"
chmod 700 "$STACK"
PASSWORD_FILE="$STACK/mlflow_admin_password"

print_env() {
  echo "export MLFLOW_TRACKING_URI=http://127.0.0.1:${MLFLOW_PORT}"
  echo "export MLFLOW_TRACKING_USERNAME=${ADMIN_USER}"
  printf 'export MLFLOW_TRACKING_PASSWORD="$(cat %q)"\n' "$PASSWORD_FILE"
  if [ "$WITH_RAY" = "1" ]; then
    echo "export RAY_ADDRESS=http://127.0.0.1:${RAY_DASHBOARD_PORT}"
    echo "export RAY_AUTH_MODE=token"
  fi
}
if [ "${1:-}" = "--env" ]; then print_env; exit 0; fi

# Secrets, made once and kept beside the databases (the admin password only counts on the first
# start of an empty user store; MLflow keeps it in its auth database afterwards).
new_secret() { head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n'; }
[ -s "$PASSWORD_FILE" ] || new_secret >"$PASSWORD_FILE"
[ -s "$STACK/mlflow_flask_secret" ] || new_secret >"$STACK/mlflow_flask_secret"
chmod 600 "$PASSWORD_FILE" "$STACK/mlflow_flask_secret"

# Ray: token auth on; the token lives in ~/.ray/auth_token (created once if missing). Jobs inherit
# the head's environment: the MLflow address and login go in here, never into a job's runtime_env.
if [ "$WITH_RAY" = "1" ]; then
  export RAY_AUTH_MODE=token
  "$BIN/ray" get-auth-token --generate >/dev/null
  if ! "$BIN/ray" status >/dev/null 2>&1; then
    MLFLOW_TRACKING_URI="http://127.0.0.1:${MLFLOW_PORT}" MLFLOW_TRACKING_USERNAME="$ADMIN_USER" \
    MLFLOW_TRACKING_PASSWORD="$(cat "$PASSWORD_FILE")" \
      "$BIN/ray" start --head --node-ip-address=127.0.0.1 --dashboard-host=127.0.0.1 \
      --dashboard-port="$RAY_DASHBOARD_PORT" --disable-usage-stats >"$STACK/ray.log" 2>&1
  else
    echo "a Ray head is already running: jobs on it get no MLflow login from this script" >&2
  fi
fi

# MLflow: SQLite backend and user store, artifacts served by the server (local folder or S3),
# started by the production script so that both run the same way (login on, URIs in the env).
if [ -f "$STACK/mlflow.pid" ] && kill -0 "$(cat "$STACK/mlflow.pid")" 2>/dev/null; then
  echo "mlflow server already running (pid $(cat "$STACK/mlflow.pid"))" >&2
else
  MLFLOW_BIN="$BIN/mlflow" MLFLOW_HOST=127.0.0.1 MLFLOW_PORT="$MLFLOW_PORT" MLFLOW_WORKERS=1 \
  MLFLOW_BACKEND_STORE_URI="sqlite:///$STACK/mlflow.db" \
  MLFLOW_AUTH_DATABASE_URI="sqlite:///$STACK/basic_auth.db" \
  MLFLOW_AUTH_CONFIG_DIR="$STACK" \
  MLFLOW_AUTH_ADMIN_USERNAME="$ADMIN_USER" MLFLOW_AUTH_ADMIN_PASSWORD="$(cat "$PASSWORD_FILE")" \
  MLFLOW_FLASK_SERVER_SECRET_KEY="$(cat "$STACK/mlflow_flask_secret")" \
  MLFLOW_ARTIFACTS_DESTINATION="${MLFLOW_ARTIFACTS_DESTINATION:-$STACK/artifacts}" \
    setsid "$REPO/infra/mlflow/start_server.sh" >"$STACK/mlflow.log" 2>&1 &
  echo $! >"$STACK/mlflow.pid"
  for _ in $(seq 1 240); do
    if curl -fs "http://127.0.0.1:${MLFLOW_PORT}/health" >/dev/null 2>&1; then break; fi
    kill -0 "$(cat "$STACK/mlflow.pid")" 2>/dev/null || break
    sleep 0.5
  done
  curl -fs "http://127.0.0.1:${MLFLOW_PORT}/health" >/dev/null || { echo "mlflow did not start; see $STACK/mlflow.log" >&2; exit 1; }
fi

if [ "$WITH_RAY" = "1" ]; then echo "Ray dashboard  http://127.0.0.1:${RAY_DASHBOARD_PORT}" >&2; fi
echo "MLflow UI      http://127.0.0.1:${MLFLOW_PORT}   (user ${ADMIN_USER}, password in ${PASSWORD_FILE})" >&2
print_env
