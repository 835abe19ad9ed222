#!/usr/bin/env bash
# Fuzzes every input parser: the property tests frontend/tests/fuzz_*.rs (safetensors,
# GGUF open/load/tokenizer, config.json, tokenizer.json) and tests/fuzz_pipeline.rs (RON
# pipelines), built in release mode with overflow checks and debug assertions kept in
# upmix's own crates, with N cases per parser and a fresh seed.
#
# Usage: scripts/fuzz.sh [N]      (N defaults to 100000)
#        FUZZ_SEED=123 scripts/fuzz.sh 5000   (replays a run's seed)
#
# Prints, per parser, the cases run and the panics and other failures found; a failure
# also prints its minimal (shrunk) input. Exits non-zero if any parser failed.
set -euo pipefail
cd "$(dirname "$0")/.."

cases="${1:-100000}"
seed="${FUZZ_SEED:-$(od -An -N8 -tu8 /dev/urandom | tr -d ' ')}"
export PROPTEST_CASES="$cases" PROPTEST_RNG_SEED="$seed"

checked=()
for pkg in upmix upmix-frontend upmix-ir; do
  checked+=(--config "profile.release.package.${pkg}.overflow-checks=true"
            --config "profile.release.package.${pkg}.debug-assertions=true")
done
frontend=(-p upmix-frontend --test fuzz_safetensors --test fuzz_gguf --test fuzz_config
          --test fuzz_tokenizer)
pipeline=(-p upmix --test fuzz_pipeline)

echo "fuzz: building the fuzz tests (release)"
cargo "${checked[@]}" test --release "${frontend[@]}" --no-run
cargo "${checked[@]}" test --release "${pipeline[@]}" --no-run

echo "fuzz: $cases cases per parser, seed $seed (replay with FUZZ_SEED=$seed)"
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
status=0
start=$(date +%s)
for group in frontend pipeline; do
  declare -n args="$group"
  cargo "${checked[@]}" test --release "${args[@]}" -- --nocapture 2>&1 | tee -a "$log" \
    || status=1
  unset -n args
done

echo
echo "fuzz summary (seed $seed, $(( $(date +%s) - start ))s in all):"
printf '  %-16s %9s %7s %9s %9s\n' parser cases panics failures seconds
results="$(grep -o 'fuzz-result parser=.* seed=[0-9]*' "$log" || true)"
echo "$results" | sed 's/^fuzz-result //' | tr ' ' '\n' | awk -F= '
  $1 == "parser" { p = $2 } $1 == "cases" { c = $2 } $1 == "panics" { n = $2 }
  $1 == "failures" { f = $2 }
  $1 == "seconds" { printf "  %-16s %9s %7s %9s %9s\n", p, c, n, f, $2 }'
expected=7
found=$(echo "$results" | grep -c . || true)
if [ "$found" -ne "$expected" ]; then
  echo "fuzz: $found of $expected parsers reported" >&2
  status=1
fi
if [ "$status" -ne 0 ] || echo "$results" | grep -q ' failures=[1-9]'; then
  echo "fuzz: FAILED (replay with FUZZ_SEED=$seed $0 $cases)" >&2
  exit 1
fi
echo "fuzz: no panics, oversized allocations or unnamed errors"
