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
"${venv}/bin/python" -m pip install -r "${repo_root}/scripts/fixtures-requirements.txt"
echo "fixture environment ready: ${venv}"
