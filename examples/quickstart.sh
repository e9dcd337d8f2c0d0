#!/usr/bin/env bash
# The whole Qwen-Merge pipeline at toy scale (see examples/quickstart.py --help for real-model options).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-$REPO/.venv/bin/python}"
[ -x "$PY" ] || PY=python3
exec "$PY" "$REPO/examples/quickstart.py" "$@"
