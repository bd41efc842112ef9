#!/usr/bin/env bash
# CPU test run (what CI does): build/reuse .venv, make sure redis-server is
# there, run pytest. Extra args go to pytest; if the first one is a path, it
# replaces the default `tests`.  e.g. scripts/run_tests.sh -x -k keys
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash scripts/setup_venv.sh

# The remote-tier tests start a real redis-server on loopback; without one they
# skip, so a failed install is a warning, not an error.
if ! command -v redis-server >/dev/null 2>&1; then
  if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null 2>&1; then
    echo "== run_tests: installing redis-server"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq redis-server >/dev/null 2>&1 ||
      { apt-get update -qq && apt-get install -y -qq redis-server >/dev/null; } ||
      echo "== run_tests: WARNING: could not install redis-server; redis tests will skip"
  else
    echo "== run_tests: WARNING: no redis-server; redis tests will skip"
  fi
fi

# Triton kernels are tested on CPU in interpreter mode.
export TRITON_INTERPRET=1

if [[ $# -gt 0 && -e $1 ]]; then set -- "$@"; else set -- tests "$@"; fi
rc=0
.venv/bin/python -m pytest -q "$@" || rc=$?
# Exit code 5 = no tests collected: in CI that means something is broken.
if [[ $rc == 5 ]]; then echo "== run_tests: no tests collected" >&2; exit 1; fi
exit "$rc"
