#!/usr/bin/env bash
# Create the Python environment used by scripts/make_fixtures.py.
#
# Usage: scripts/setup-fixture-env.sh
# The venv goes to .venv-fixtures at the repository root unless
# UPMIX_FIXTURE_VENV names another path.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${UPMIX_FIXTURE_VENV:-${repo_root}/.venv-fixtures}"

if [ ! -x "${venv}/bin/python" ]; then
    python3 -m venv "${venv}"
fi
# llama-cpp-python is built from its sdist, never a prebuilt wheel, with a
# fixed x86-64 AVX2/FMA/F16C CPU backend (not -march=native) so the GGUF
# goldens do not depend on the build machine. Set CMAKE_ARGS to override
# (e.g. on a CPU without AVX2). The build takes ~12 min on 2 cores; pip
# skips it once the pinned version is installed.
export CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF}"
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"
"${venv}/bin/python" -m pip install --no-binary llama-cpp-python \
    -r "${repo_root}/scripts/fixtures-requirements.txt"
echo "fixture environment ready: ${venv}"
