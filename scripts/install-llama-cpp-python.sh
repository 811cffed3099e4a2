#!/usr/bin/env bash
# Installs the llama-cpp-python that pyactadd's engine is compiled against, built once
# from source with the options pyactadd needs, and kept as a wheel for later installs.
#
# The version is the one pyproject.toml pins (`llama-cpp-python==X.Y.Z`, the single
# place it is written); `--print-version` prints it and exits.
#
# Why not a plain `pip install llama-cpp-python==X.Y.Z`:
# * GGML_RPC=on: `pyactadd worker` and `--rpc` use llama.cpp's RPC backend, which the
#   default build leaves out (building it takes minutes, once; docs/ has the figures).
# * -mno-amx-*: this llama.cpp's AMX matrix kernels (compiled in by the default
#   -march=native on Intel CPUs with AMX) crash with a segfault in ggml_backend_amx_mul_mat
#   on the default Q4_1 model; without them those CPUs use their AVX-512 kernels.
# * pip's own wheel cache is keyed by the source archive, not by CMAKE_ARGS, so it would
#   silently hand back a wheel built with other options. The wheel is kept in a folder
#   named for the version, the options and this CPU (the build is -march=native).
#
# Prints nothing else on success but pip's output; the wheel folder is also used by
# `pip install --find-links` in the README so pyactadd's own build reuses this wheel.
set -euo pipefail
PYPROJECT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/pyproject.toml"
PINS=$(sed -n 's/.*"llama-cpp-python==\([^"]*\)".*/\1/p' "$PYPROJECT" | sort -u)
if [ -z "$PINS" ] || [ "$(printf '%s\n' "$PINS" | wc -l)" -ne 1 ]; then
  echo "install-llama-cpp-python.sh: $PYPROJECT must pin llama-cpp-python==X.Y.Z, one version (found: ${PINS:-none})" >&2
  exit 1
fi
VERSION=$PINS
if [ "${1:-}" = "--print-version" ]; then
  echo "$VERSION"
  exit 0
fi
FLAGS="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
CPU=$(python3 -c 'import hashlib, pathlib, platform
p = pathlib.Path("/proc/cpuinfo")
text = p.read_text() if p.exists() else platform.processor() + platform.machine()
line = next((l for l in text.splitlines() if l.startswith(("flags", "Features"))), text)
print(hashlib.sha1(line.encode()).hexdigest()[:8])')
W="$HOME/.cache/pyactadd/wheels"
DIR="$W/llama-cpp-python-$VERSION-rpc-noamx-$CPU"
if ! ls "$DIR"/llama_cpp_python-"$VERSION"-*.whl >/dev/null 2>&1; then
  echo "Building llama-cpp-python $VERSION with GGML_RPC into $DIR (once, takes minutes)" >&2
  mkdir -p "$DIR"
  CMAKE_ARGS="-DGGML_RPC=on -DCMAKE_C_FLAGS='$FLAGS' -DCMAKE_CXX_FLAGS='$FLAGS'" \
    pip wheel --no-cache-dir --no-deps --no-binary llama-cpp-python "llama-cpp-python==$VERSION" -w "$DIR.tmp"
  mv "$DIR.tmp"/llama_cpp_python-"$VERSION"-*.whl "$DIR"/ && rm -rf "$DIR.tmp"
fi
pip install --force-reinstall --no-deps "$DIR"/llama_cpp_python-"$VERSION"-*.whl
# pyactadd's build (pip install -e .) needs this same wheel: point pip at it.
ln -sfn "$DIR" "$W/current"
