#!/usr/bin/env bash
# Run here, before a GPU session's first device call: downloads into .whl/ the wheels the lent GPU
# machine lacks (it has torch, accelerate, safetensors, numpy, pillow, opencv, onnxruntime, but no
# diffusers or compel, and older transformers / huggingface_hub), at the versions this project's
# venv resolved, so the benchmarks run there on the code the tests run here. No registry is
# reachable from that machine; scripts/gpu_session.sh installs these there (docs/performance.md).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
test -x "$PY" || { echo "make install first: the versions come from .venv" >&2; exit 1; }
# The runtime and reference packages the benchmarks import, then what those need that the machine
# lacks or holds at a version they refuse (transformers checks regex's at import); open-clip-torch
# only for the CLIP vocabulary file it ships (scripts/build_tiny_weights.py).
NAMES="diffusers transformers huggingface-hub compel peft prodigyopt lion-pytorch lycoris-lora toml
httpx2 httpcore2 truststore importlib-metadata regex click open-clip-torch"
rm -rf .whl && mkdir .whl
for name in $NAMES; do
    version=$("$PY" -c "import importlib.metadata as m; print(m.version('$name'))")
    # The machine's Python is 3.12; pip matches a manylinux tag exactly, so several are named.
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 -d .whl "$name==$version" 2>&1 \
        | { grep -v "is ignored: it is neither a file nor a directory" || true; }
done
du -sh .whl
