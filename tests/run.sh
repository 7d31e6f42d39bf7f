#!/usr/bin/env bash
# Every test, from a fresh clone, installing what it needs:
#   bash tests/run.sh            # lint, types, then the whole pytest suite
#   bash tests/run.sh -k cancel  # extra arguments go to pytest
# It makes .venv, installs the package with its dev extras, and installs
# Mosquitto with apt-get when it is missing (as root, or through sudo).
set -euo pipefail
cd "$(dirname "$0")/.."

have_mosquitto() { command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ]; }
if ! have_mosquitto; then
  echo "== installing Mosquitto (apt-get)"
  if [ "$(id -u)" = 0 ]; then SUDO=""; elif command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
    echo "Mosquitto is missing and this user cannot run apt-get: install the 'mosquitto'" >&2
    echo "package (Debian/Ubuntu: sudo apt-get install mosquitto), then run this again." >&2
    exit 1
  fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq mosquitto mosquitto-clients >/dev/null
fi

# Redis for the worker-group tests (tests/test_scale.py: shared state in Redis).
have_redis() { command -v redis-server >/dev/null 2>&1 || [ -x /usr/bin/redis-server ]; }
if ! have_redis; then
  echo "== installing Redis (apt-get)"
  if [ "$(id -u)" = 0 ]; then SUDO=""; elif command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
    echo "redis-server is missing and this user cannot run apt-get: install the" >&2
    echo "'redis-server' package (Debian/Ubuntu: sudo apt-get install redis-server)." >&2
    exit 1
  fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq redis-server >/dev/null
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "== creating .venv"
  "$PY" -m venv .venv
fi
echo "== installing the package and its dev tools"
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[dev,demo,bench]'

echo "== ruff"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
echo "== mypy"
.venv/bin/mypy
echo "== pytest"
.venv/bin/pytest "$@"
