#!/usr/bin/env sh
# Serve chatsse under gunicorn with uvicorn workers. Settings come from CHATSSE_* variables
# (see README, "Serving with gunicorn"); extra arguments go to gunicorn.
set -eu
cd "$(dirname "$0")/.."
exec .venv/bin/gunicorn -c gunicorn.conf.py "$@"
