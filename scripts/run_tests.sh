#!/usr/bin/env bash
# CPU test run (what CI does): make sure redis-server is there, build/reuse
# .venv, run pytest. Extra args go to pytest; if the first one is a path, it
# replaces the default `tests`.  e.g. scripts/run_tests.sh -x -k keys
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# The remote-tier tests start a real redis-server on loopback. Locally they skip
# without one; under CI=true a missing test dependency is a failure (see
# tests/conftest.py), so a failed install stops the run here, before the venv.
ci=0
case ${CI:-} in [Tt][Rr][Uu][Ee] | 1) ci=1 ;; esac
no_redis() {
  if [[ $ci == 1 ]]; then
    echo "== run_tests: ERROR: $1; CI=true needs redis-server for the remote-tier tests" >&2
    exit 1
  fi
  echo "== run_tests: WARNING: $1; redis tests will skip" >&2
}
if ! command -v redis-server >/dev/null 2>&1; then
  if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null 2>&1; then
    echo "== run_tests: installing redis-server"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq redis-server >/dev/null 2>&1 ||
      { apt-get update -qq && apt-get install -y -qq redis-server >/dev/null; } ||
      no_redis "could not install redis-server"
    command -v redis-server >/dev/null 2>&1 || no_redis "redis-server is not on PATH after apt-get install"
  else
    no_redis "no redis-server on PATH, and no root apt-get to install it"
  fi
fi

bash scripts/setup_venv.sh

# Triton kernels are tested on CPU in interpreter mode.
export TRITON_INTERPRET=1

if [[ $# -gt 0 && -e $1 ]]; then set -- "$@"; else set -- tests "$@"; fi
rc=0
.venv/bin/python -m pytest -q "$@" || rc=$?
# Exit code 5 = no tests collected: in CI that means something is broken.
if [[ $rc == 5 ]]; then echo "== run_tests: no tests collected" >&2; exit 1; fi
exit "$rc"
