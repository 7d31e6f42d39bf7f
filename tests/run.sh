#!/usr/bin/env bash
# Every test, from a fresh clone, installing what it needs:
#   bash tests/run.sh            # lint, types, then the whole pytest suite
#   bash tests/run.sh -k cancel  # extra arguments go to pytest
# It makes .venv, installs the package with its dev extras, and installs
# Mosquitto, Redis, espeak-ng and python3-venv with apt-get when they are
# missing (as root, or through sudo).
set -euo pipefail
cd "$(dirname "$0")/.."

# apt_install WHAT PACKAGE...: as root, or through sudo; elsewhere say what to install
# and fail (the caller decides whether that stops the run).
apt_install() {
  local what=$1; shift
  echo "== installing $what (apt-get)"
  if [ "$(id -u)" = 0 ]; then SUDO=""; elif command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
    echo "$what is missing and this user cannot run apt-get: install the package(s)" >&2
    echo "'$*' (Debian/Ubuntu: sudo apt-get install $*), then run this again." >&2
    return 1
  fi
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "$@" >/dev/null
}
have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ] || [ -x "/usr/bin/$1" ]; }

have mosquitto || apt_install Mosquitto mosquitto mosquitto-clients || exit 1
# Debian's python3 makes virtual environments only with python3-venv (its ensurepip):
# the README's set-up needs it, and tests/test_readme.py runs that set-up with it.
if [ -x /usr/bin/python3 ] && ! /usr/bin/python3 -c 'import ensurepip' >/dev/null 2>&1; then
  apt_install "Python's venv module" python3-venv || exit 1
fi
# Redis for the worker-group tests (tests/test_scale.py: shared state in Redis).
have redis-server || apt_install Redis redis-server || exit 1
# espeak-ng: the mock API's real speech (docs/protocol.md "Voice"); without it the mock
# speaks a plain tone and the voice tests still run.
have espeak-ng || apt_install espeak-ng espeak-ng || echo "the mock speaks a tone instead" >&2

PY=${PYTHON:-python3}
# (again when a venv made before python3-venv was installed has no pip)
if ! .venv/bin/python -m pip --version >/dev/null 2>&1; then
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
