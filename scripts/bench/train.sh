#!/usr/bin/env bash
# Training benchmark, upmix against PyTorch in one run: training tokens/s of
#   tiny     the committed seed model (examples/models/seed), every weight trained;
#   tiny-moe the 4-expert top-2 mixture upcycled from examples/models/{seed,code,law,math}
#            with a random router (as examples/btx.ron), routers only;
#   smollm2  SmolLM2-135M (float32), every weight trained;
#   smollm2-moe  4 copies of it upcycled into a top-2 mixture with a random router,
#            routers only.
# upmix runs a `Train` pass (its loss CSV gives the time of every step); PyTorch runs
# scripts/bench/train_torch.py (transformers' model classes, torch.optim.AdamW). Both take
# the same model, text (the example corpora joined), batch, sequence length, learning rate
# and thread count, and both leave the first step out as warmup. Mixtures carry the
# load-balancing loss on both sides (upmix adds the z-loss too). Prints a table and the
# upmix / PyTorch ratios.
#
# Needs: scripts/fetch-models.sh, scripts/setup-fixture-env.sh.
# Usage: scripts/bench/train.sh [THREADS]    (default 2)
set -euo pipefail
cd "$(dirname "$0")/../.."
threads="${1:-2}"
cache="${UPMIX_MODEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/upmix}"
venv="${UPMIX_FIXTURE_VENV:-$PWD/.venv-fixtures}"
work="${UPMIX_BENCH_DIR:-$cache/bench-train}"
dense="$cache/SmolLM2-135M-Instruct-f32"
gguf="$cache/SmolLM2-135M-Instruct.Q4_1.gguf"
[ -d "$dense" ] || { echo "missing $dense: run scripts/fetch-models.sh" >&2; exit 1; }
target="${CARGO_TARGET_DIR:-target}"
cargo build --quiet --release --bin upmix
upmix="$target/release/upmix"
data=("$PWD/examples/data/code/train.txt" "$PWD/examples/data/law/train.txt" "$PWD/examples/data/math/train.txt")
mkdir -p "$work"

# SmolLM2 as a checkpoint directory with a tokenizer (the f32 weights and the GGUF's
# tokenizer, written by transformers).
if [ ! -f "$work/smollm2/tokenizer.json" ]; then
  mkdir -p "$work/smollm2"
  ln -sf "$dense/model.safetensors" "$dense/config.json" "$work/smollm2/"
  "$venv/bin/python" - "$gguf" "$work/smollm2" <<'PY'
import os, sys
from transformers import AutoTokenizer
gguf, out = sys.argv[1:]
AutoTokenizer.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf)).save_pretrained(out)
PY
fi

# The mixtures, upcycled by upmix and written as Mixtral checkpoints both tools load.
upcycle() { # NAME EXPERT_DIR... ; the first expert is also the base
  local name="$1"; shift
  [ -f "$work/$name/model.safetensors" ] && return
  local models="" experts="" i=0
  for dir in "$@"; do
    models+="\"e$i\": Hf(\"$dir\"), "; experts+="\"e$i\", "; i=$((i + 1))
  done
  cat > "$work/$name.ron" <<RON
(
    models: { $models },
    passes: [ Upcycle(into: "moe", experts: [$experts], top_k: 2, base: "e0",
                      router: Random(seed: 0, std: 0.02)) ],
    emit: [ Hf(model: "moe", dir: "$work/$name") ],
)
RON
  "$upmix" run "$work/$name.ron" > /dev/null
}
ex="$PWD/examples/models"
upcycle tiny-moe "$ex/seed" "$ex/code" "$ex/law" "$ex/math"
upcycle smollm2-moe "$work/smollm2" "$work/smollm2" "$work/smollm2" "$work/smollm2"

results="$(mktemp)"
trap 'rm -f "$results"' EXIT
# case  model dir  trainable  batch  seq_len  steps
cases=(
  "tiny $ex/seed all 16 128 30"
  "tiny-moe $work/tiny-moe router 16 128 30"
  "smollm2 $work/smollm2 all 4 128 5"
  "smollm2-moe $work/smollm2-moe router 4 128 5"
)
for c in "${cases[@]}"; do
  read -r name dir trainable batch seq steps <<<"$c"
  echo "running $name ($trainable) at $threads thread(s)" >&2
  selector='"all"'; [ "$trainable" = router ] && selector='"ffn.router"'
  cat > "$work/train-$name.ron" <<RON
(
    models: { "m": Hf("$dir") },
    passes: [
        Train(model: "m", data: { "code": "${data[0]}", "law": "${data[1]}", "math": "${data[2]}" },
              steps: $steps, batch: $batch, seq_len: $seq, trainable: [$selector], lr: 1e-3,
              log: "$work/upmix-$name.csv"),
    ],
    emit: [],
)
RON
  /usr/bin/time -f '%M' -o "$work/rss-$name" env RAYON_NUM_THREADS="$threads" \
    "$upmix" run "$work/train-$name.ron" > /dev/null
  python3 - "$work/upmix-$name.csv" "$batch" "$seq" "$threads" "$(cat "$work/rss-$name")" <<'PY' \
    | sed "s/^{/{\"case\": \"$name\", /" >> "$results"
import csv, json, sys
rows = list(csv.DictReader(open(sys.argv[1])))
batch, seq, threads, rss = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
span = float(rows[-1]["seconds"]) - float(rows[0]["seconds"])
print(json.dumps({"tool": "upmix", "threads": threads,
                  "tokens_per_s": (len(rows) - 1) * batch * seq / span,
                  "step_s": span / (len(rows) - 1), "final_loss": float(rows[-1]["loss"]),
                  "peak_rss_mb": rss / 1024}))
PY
  OMP_NUM_THREADS="$threads" "$venv/bin/python" scripts/bench/train_torch.py "$dir" \
    --data "${data[@]}" --threads "$threads" --batch "$batch" --seq-len "$seq" \
    --steps "$steps" --trainable "$trainable" --lr 1e-3 2>/dev/null \
    | sed "s/^{/{\"case\": \"$name\", /" >> "$results"
done

python3 - "$results" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
print(f"{'case':<12} {'tool':<8} {'thr':>3} {'tok/s':>8} {'s/step':>7} {'RSS MB':>7}")
for r in rows:
    print(f"{r['case']:<12} {r['tool']:<8} {r['threads']:>3} {r['tokens_per_s']:>8.1f} "
          f"{r['step_s']:>7.3f} {r['peak_rss_mb']:>7.0f}")
print("upmix / PyTorch training tokens/s (target >= 0.8):")
for case in dict.fromkeys(r["case"] for r in rows):
    u = next(r for r in rows if r["case"] == case and r["tool"] == "upmix")
    p = next(r for r in rows if r["case"] == case and r["tool"] == "pytorch")
    print(f"  {case:<12} {u['tokens_per_s'] / p['tokens_per_s']:.2f}x")
PY
