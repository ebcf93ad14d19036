#!/usr/bin/env bash
# Install femurrisk into ./.venv and start the web app on http://127.0.0.1:7860
# with the bundled example CT preselected. Extra arguments go to app.py
# (e.g. --port 8080, --device cuda, --host 0.0.0.0 with a login; see README.md).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x .venv/bin/python ]; then
    "${PYTHON:-python3}" -m venv .venv
fi
# torch is pinned (torch==2.13.0) in requirements.txt; see the comment there.
.venv/bin/python -m pip install -r requirements.txt
exec .venv/bin/python app.py "$@"
