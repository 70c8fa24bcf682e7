#!/usr/bin/env bash
# Run the MLflow tracking server with login required (MLflow's basic-auth app) on a database
# (PostgreSQL) with artifacts in S3.
#
# Everything secret comes from the environment (a Kubernetes Secret, a systemd EnvironmentFile,
# your shell) and is never printed nor put on a command line (`ps` shows none of it):
#   MLFLOW_BACKEND_STORE_URI        postgresql://USER:PASSWORD@HOST:5432/mlflow       (required)
#                                   `mlflow server` reads it from the environment itself
#   MLFLOW_AUTH_DATABASE_URI        postgresql://USER:PASSWORD@HOST:5432/mlflow_auth  (required)
#                                   users and permissions; written into a private (0600) copy of
#                                   basic_auth.ini that MLflow reads (MLFLOW_AUTH_CONFIG_PATH)
#   MLFLOW_AUTH_ADMIN_USERNAME      the admin user MLflow creates on the first start (required)
#   MLFLOW_AUTH_ADMIN_PASSWORD      its password (required; MLflow has no default password)
#   MLFLOW_FLASK_SERVER_SECRET_KEY  CSRF key of the auth app; the same on every replica (required)
#   MLFLOW_ARTIFACTS_DESTINATION    s3://BUCKET/mlflow                                (required)
#   AWS credentials for S3: an instance profile / IRSA role (or AWS_* variables; default chain)
#   MLFLOW_S3_ENDPOINT_URL          only for S3-compatible stores (MinIO, moto)
# Optional: MLFLOW_HOST (127.0.0.1; 0.0.0.0 in a container), MLFLOW_PORT (5000), MLFLOW_WORKERS (4),
#   MLFLOW_ALLOWED_HOSTS (comma list: the DNS names clients use; MLflow rejects other Host headers),
#   MLFLOW_AUTH_CONFIG_DIR (the rendered basic_auth.ini goes to a fresh 0700 folder in it; $TMPDIR or /tmp),
#   MLFLOW_DB_UPGRADE=1 (run `mlflow db upgrade` first, in-process: needed after upgrading mlflow),
#   MLFLOW_BIN (mlflow), MLFLOW_PYTHON (the python beside MLFLOW_BIN).
#
# Clients sign in with MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD from their environment.
# Needs: pip install 'mlflow[auth]>=3,<4' psycopg2-binary boto3   ([auth]: Flask-WTF, which basic-auth needs)
set -euo pipefail
umask 077

: "${MLFLOW_BACKEND_STORE_URI:?set MLFLOW_BACKEND_STORE_URI, e.g. postgresql://USER:PASSWORD@HOST:5432/mlflow}"
: "${MLFLOW_ARTIFACTS_DESTINATION:?set MLFLOW_ARTIFACTS_DESTINATION, e.g. s3://my-bucket/mlflow}"
: "${MLFLOW_AUTH_DATABASE_URI:?set MLFLOW_AUTH_DATABASE_URI, e.g. postgresql://USER:PASSWORD@HOST:5432/mlflow_auth}"
: "${MLFLOW_AUTH_ADMIN_USERNAME:?set MLFLOW_AUTH_ADMIN_USERNAME (the admin user; MLflow creates it on the first start)}"
: "${MLFLOW_AUTH_ADMIN_PASSWORD:?set MLFLOW_AUTH_ADMIN_PASSWORD (from a Secret; MLflow has no default password)}"
: "${MLFLOW_FLASK_SERVER_SECRET_KEY:?set MLFLOW_FLASK_SERVER_SECRET_KEY (e.g. openssl rand -hex 32, from a Secret)}"
export MLFLOW_BACKEND_STORE_URI MLFLOW_ARTIFACTS_DESTINATION MLFLOW_AUTH_ADMIN_USERNAME \
       MLFLOW_AUTH_ADMIN_PASSWORD MLFLOW_FLASK_SERVER_SECRET_KEY
HOST="${MLFLOW_HOST:-127.0.0.1}"
PORT="${MLFLOW_PORT:-5000}"
WORKERS="${MLFLOW_WORKERS:-4}"
MLFLOW="${MLFLOW_BIN:-mlflow}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
TEMPLATE="${MLFLOW_AUTH_CONFIG_TEMPLATE:-$HERE/basic_auth.ini}"

# basic_auth.ini with the auth database filled in, readable by this user only. configparser
# interpolates '%', so a URL-encoded password's '%' is doubled; a newline could inject settings.
case "$MLFLOW_AUTH_DATABASE_URI" in *$'\n'*|*$'\r'*) echo "MLFLOW_AUTH_DATABASE_URI must be one line" >&2; exit 2 ;; esac
auth_db="${MLFLOW_AUTH_DATABASE_URI//\%/%%}"
AUTH_BASE="${MLFLOW_AUTH_CONFIG_DIR:-${TMPDIR:-/tmp}}"
mkdir -p "$AUTH_BASE"
CONFIG_DIR="$(mktemp -d "$AUTH_BASE/mlflow-auth.XXXXXX")"   # mode 0700, a fresh one per start
CONFIG="$CONFIG_DIR/basic_auth.ini"
placeholder='database_uri = ${MLFLOW_AUTH_DATABASE_URI}'
grep -qxF "$placeholder" "$TEMPLATE" || { echo "$TEMPLATE: no line '$placeholder'" >&2; exit 2; }
: >"$CONFIG"
chmod 600 "$CONFIG"
while IFS= read -r line || [ -n "$line" ]; do
  if [ "$line" = "$placeholder" ]; then
    printf 'database_uri = %s\n' "$auth_db"
  else
    printf '%s\n' "$line"
  fi
done <"$TEMPLATE" >"$CONFIG"
unset auth_db MLFLOW_AUTH_DATABASE_URI   # MLflow reads the file; the variable is not needed any more
export MLFLOW_AUTH_CONFIG_PATH="$CONFIG"

if [ "${MLFLOW_DB_UPGRADE:-0}" = "1" ]; then
  # `mlflow db upgrade URL` would put the URI on a command line: run the same CLI in-process,
  # the URI read from the environment inside Python.
  PYTHON="${MLFLOW_PYTHON:-$(dirname "$(command -v "$MLFLOW")")/python}"
  [ -x "$PYTHON" ] || PYTHON=python3
  "$PYTHON" - <<'EOF'
import os
from mlflow.cli import cli

cli.main(["db", "upgrade", os.environ["MLFLOW_BACKEND_STORE_URI"]], prog_name="mlflow", standalone_mode=False)
EOF
fi

# No --backend-store-uri: `mlflow server` takes it from $MLFLOW_BACKEND_STORE_URI (its click envvar).
args=(server --app-name basic-auth --host "$HOST" --port "$PORT" --workers "$WORKERS"
      --artifacts-destination "$MLFLOW_ARTIFACTS_DESTINATION")
if [ -n "${MLFLOW_ALLOWED_HOSTS:-}" ]; then
  args+=(--allowed-hosts "$MLFLOW_ALLOWED_HOSTS")
fi

echo "mlflow server (login required) on ${HOST}:${PORT}, artifacts -> ${MLFLOW_ARTIFACTS_DESTINATION} (database URIs not shown)" >&2
exec "$MLFLOW" "${args[@]}"
