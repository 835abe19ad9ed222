#!/usr/bin/env bash
# Forward-pass benchmark: upmix's runtime against PyTorch (transformers, float32, sdpa) on
# SmolLM2-135M (GGUF), at 1 and 2 threads, in one run; prints tok/s and the ratios.
#
# Needs: scripts/fetch-models.sh (the model) and scripts/setup-fixture-env.sh (torch).
# Usage: scripts/bench/forward.sh [--device cpu]
set -euo pipefail
cd "$(dirname "$0")/../.."
device="${1:-cpu}"; [ "$device" = "--device" ] && device="$2"
cache="${UPMIX_MODEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/upmix}"
model="${UPMIX_SMOLLM2_GGUF:-$cache/SmolLM2-135M-Instruct.Q4_1.gguf}"
venv="${UPMIX_FIXTURE_VENV:-.venv-fixtures}"
cargo build --quiet --release --example bench_forward
results="$(mktemp)"
trap 'rm -f "$results"' EXIT
for threads in 1 2; do
  RAYON_NUM_THREADS=$threads ./target/release/examples/bench_forward "$model" --device "$device" >> "$results"
  OMP_NUM_THREADS=$threads "$venv/bin/python" scripts/bench/forward_torch.py "$model" --threads "$threads" 2>/dev/null >> "$results"
done
python3 - "$results" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
print(f"{'tool':<8} {'threads':>7} {'prefill tok/s':>14} {'decode tok/s':>13}")
for r in rows:
    print(f"{r['tool']:<8} {r['threads']:>7} {r['prefill_tok_s']:>14.1f} {r['decode_tok_s']['16']:>13.1f}")
for t in sorted({str(r['threads']) for r in rows}):
    u = next(r for r in rows if r['tool'] == 'upmix' and str(r['threads']) == t)
    p = next(r for r in rows if r['tool'] == 'pytorch' and str(r['threads']) == t)
    print(f"threads {t}: upmix/pytorch prefill {u['prefill_tok_s'] / p['prefill_tok_s']:.2f}x, "
          f"decode {u['decode_tok_s']['16'] / p['decode_tok_s']['16']:.2f}x")
PY
