#!/usr/bin/env bash
# Installs the llama-cpp-python that pyactadd's engine is compiled against, built once
# from source with the options pyactadd needs, and kept as a wheel for later installs.
#
# Why not a plain `pip install llama-cpp-python==0.3.36`:
# * GGML_RPC=on: `pyactadd worker` and `--rpc` use llama.cpp's RPC backend, which the
#   default build leaves out (the build costs about 4 minutes on two idle cores, up to
#   15 under load; the backend adds a 190 KB libggml-rpc.so).
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
VERSION=0.3.36
FLAGS="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
CPU=$(python3 -c 'import hashlib, pathlib, platform
p = pathlib.Path("/proc/cpuinfo")
text = p.read_text() if p.exists() else platform.processor() + platform.machine()
line = next((l for l in text.splitlines() if l.startswith(("flags", "Features"))), text)
print(hashlib.sha1(line.encode()).hexdigest()[:8])')
W="$HOME/.cache/pyactadd/wheels"
DIR="$W/llama-cpp-python-$VERSION-rpc-noamx-$CPU"
if ! ls "$DIR"/llama_cpp_python-"$VERSION"-*.whl >/dev/null 2>&1; then
  echo "Building llama-cpp-python $VERSION with GGML_RPC into $DIR (once: about 4-15 minutes)" >&2
  mkdir -p "$DIR"
  CMAKE_ARGS="-DGGML_RPC=on -DCMAKE_C_FLAGS='$FLAGS' -DCMAKE_CXX_FLAGS='$FLAGS'" \
    pip wheel --no-cache-dir --no-deps --no-binary llama-cpp-python "llama-cpp-python==$VERSION" -w "$DIR.tmp"
  mv "$DIR.tmp"/llama_cpp_python-"$VERSION"-*.whl "$DIR"/ && rm -rf "$DIR.tmp"
fi
pip install --force-reinstall --no-deps "$DIR"/llama_cpp_python-"$VERSION"-*.whl
# pyactadd's build (pip install -e .) needs this same wheel: point pip at it.
ln -sfn "$DIR" "$W/current"
