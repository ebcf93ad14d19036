#!/usr/bin/env bash
# Install femurrisk and its test tools into ./.venv, Debian's chromium for the
# browser tests when it is missing, then run the whole test suite.
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x .venv/bin/python ]; then
    "${PYTHON:-python3}" -m venv .venv
fi
.venv/bin/python -m pip install -r requirements-test.txt

# The browser tests drive the system chromium; `playwright install` is never used.
if [ ! -x /usr/bin/chromium ]; then
    if [ "$(id -u)" -eq 0 ]; then SUDO=""; else SUDO="sudo"; fi
    $SUDO apt-get update
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y chromium
fi

exec .venv/bin/python -m pytest -q "$@"
