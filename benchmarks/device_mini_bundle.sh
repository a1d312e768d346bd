#!/usr/bin/env bash
# A small carry for GPU calls that run the engine alone (no Ray, NIXL or etcd): structured output
# (xgrammar + tvm-ffi), pydantic, and the default model's tokenizer files (smol-tok/: what
# benchmarks/structured_output.py --tokenizer-from takes, since a shape's word-level tokenizer has no
# JSON characters). ~6 MiB. A full bundle with xgrammar is ~60 MiB: with the code it is at the
# 64 MiB carry limit, so keep it out of .devbundle/ (which serve_gpu2.sh and the other scripts carry
# whole) and build this one from it:
#   ../shared/tools/device-bundle xgrammar==0.2.9 apache-tvm-ffi==0.1.15.post2   # -> .devbundle/site.tar.xz
#   mv .devbundle/site.tar.xz .cache/device/site-xgrammar.tar.xz                  # then rebuild the plain one
#   benchmarks/device_mini_bundle.sh [FULL_BUNDLE]                                # -> .cache/device/mini.tar.xz
# On the GPU machine (carry: [".cache/device/mini.tar.xz"]):
#   mkdir -p /tmp/site && tar xJf .cache/device/mini.tar.xz -C /tmp/site && export PYTHONPATH=/tmp/site:$PWD
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
full=$(realpath "${1:-$root/.cache/device/site-xgrammar.tar.xz}")
tok=${TOKENIZER_DIR:-$HOME/.cache/pdserve/models/SmolLM2-135M-Instruct}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
tar xJf "$full" -C "$work"
mkdir -p "$work/smol-tok"
cp "$tok"/tokenizer.json "$tok"/tokenizer_config.json "$work/smol-tok/"
cd "$work"
pkgs=(smol-tok)
for p in xgrammar tvm_ffi pydantic pydantic_core typing_inspection annotated_types; do
  pkgs+=("$p")
done
pkgs+=($(ls -d xgrammar-*.dist-info apache_tvm_ffi-*.dist-info pydantic-*.dist-info pydantic_core-*.dist-info \
  typing_inspection-*.dist-info annotated_types-*.dist-info))
mkdir -p "$root/.cache/device"
tar cJf "$root/.cache/device/mini.tar.xz" "${pkgs[@]}"
ls -la "$root/.cache/device/mini.tar.xz"
