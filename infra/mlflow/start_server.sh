#!/usr/bin/env bash
# Run the MLflow tracking server on a database (PostgreSQL) with artifacts in S3.
#
# Everything secret comes from the environment (a Kubernetes Secret, a systemd EnvironmentFile,
# your shell) and is never printed:
#   MLFLOW_BACKEND_STORE_URI      postgresql://USER:PASSWORD@HOST:5432/mlflow   (required)
#   MLFLOW_ARTIFACTS_DESTINATION  s3://BUCKET/mlflow                            (required)
#   AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, or an instance profile / IRSA role (for S3)
#   MLFLOW_S3_ENDPOINT_URL        only for S3-compatible stores (MinIO, moto)
# Optional: MLFLOW_HOST (0.0.0.0), MLFLOW_PORT (5000), MLFLOW_WORKERS (4),
#   MLFLOW_ALLOWED_HOSTS (comma list, needed behind a DNS name), MLFLOW_APP_NAME=basic-auth
#   (username/password login; clients then set MLFLOW_TRACKING_USERNAME/PASSWORD),
#   MLFLOW_DB_UPGRADE=1 (run `mlflow db upgrade` first: needed after upgrading mlflow).
#
# Needs: pip install 'mlflow>=3,<4' psycopg2-binary boto3
set -euo pipefail

: "${MLFLOW_BACKEND_STORE_URI:?set MLFLOW_BACKEND_STORE_URI, e.g. postgresql://USER:PASSWORD@HOST:5432/mlflow}"
: "${MLFLOW_ARTIFACTS_DESTINATION:?set MLFLOW_ARTIFACTS_DESTINATION, e.g. s3://my-bucket/mlflow}"
HOST="${MLFLOW_HOST:-0.0.0.0}"
PORT="${MLFLOW_PORT:-5000}"
WORKERS="${MLFLOW_WORKERS:-4}"
MLFLOW="${MLFLOW_BIN:-mlflow}"

if [ "${MLFLOW_DB_UPGRADE:-0}" = "1" ]; then
  "$MLFLOW" db upgrade "$MLFLOW_BACKEND_STORE_URI"
fi

args=(server --host "$HOST" --port "$PORT" --workers "$WORKERS"
      --backend-store-uri "$MLFLOW_BACKEND_STORE_URI"
      --artifacts-destination "$MLFLOW_ARTIFACTS_DESTINATION")
if [ -n "${MLFLOW_ALLOWED_HOSTS:-}" ]; then
  args+=(--allowed-hosts "$MLFLOW_ALLOWED_HOSTS")
fi
if [ -n "${MLFLOW_APP_NAME:-}" ]; then
  args+=(--app-name "$MLFLOW_APP_NAME")
fi

echo "mlflow server on ${HOST}:${PORT}, artifacts -> ${MLFLOW_ARTIFACTS_DESTINATION} (database URI not shown)" >&2
exec "$MLFLOW" "${args[@]}"
