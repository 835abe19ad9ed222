#!/usr/bin/env python3
"""How far llama.cpp's own logits move between its valid configurations, on one GGUF
(the SmolLM2 Q8_0 file of tests/golden/gguf_out/smollm2_q8_0.ron).

Usage: .venv-fixtures/bin/python scripts/llama_cpp_self_check.py FILE.gguf [OUT_DIR]

Runs the same prompts through llama.cpp (llama-cpp-python, as built by
scripts/setup-fixture-env.sh) with different thread counts, batch sizes (a whole prompt
at once, or token by token), ggml switches and flash attention, each in its own process
(ggml reads its environment once), as scripts/make_gguf_goldens.py does: reset, eval the
prompt, read every position's logits, then 32 greedy steps. Prints, for every pair of
configurations, the largest logit difference, positions whose argmax differs, and
whether greedy continuations agree; writes OUT_DIR/report.json (default: a temporary
directory). This bounds how closely any second implementation can match llama.cpp.
"""

import json
import os
import subprocess
import sys
import tempfile
import time
from itertools import combinations
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if len(sys.argv) > 1 and sys.argv[1] == "--config":
    GGUF, HERE = Path(sys.argv[2]), Path(sys.argv[4])
elif len(sys.argv) > 1:
    GGUF = Path(sys.argv[1])
    HERE = Path(sys.argv[2]) if len(sys.argv) > 2 else Path(tempfile.mkdtemp())
    HERE.mkdir(parents=True, exist_ok=True)
else:
    sys.exit(__doc__)

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Water boils at a temperature of",
    "Once upon a time, in a small village,",
    # about 100 tokens of ordinary English text
    "The old lighthouse stood at the edge of the cliff, its white paint peeling after "
    "decades of wind and salt. Every evening the keeper climbed the narrow spiral stairs, "
    "carrying a lantern and a thermos of tea, to make sure the great lamp was clean and "
    "ready. Ships passing in the night relied on its steady beam to avoid the rocks below. "
    "Although the town had grown and modern instruments now guided most vessels, the "
    "people still felt safer knowing that someone was watching over the harbor, and the",
]
GREEDY = 32

BASE = dict(
    logits_all=True,
    n_ctx=512,
    verbose=False,
    type_k=0,  # f32 KV cache
    type_v=0,
    flash_attn=False,
)
CONFIGS = {
    "A": (dict(BASE, n_threads=1, n_batch=512), {}),
    "A2": (dict(BASE, n_threads=1, n_batch=512), {}),  # A repeated in a fresh process
    "B": (dict(BASE, n_threads=2, n_batch=512), {}),
    "C": (dict(BASE, n_threads=1, n_batch=1, n_ubatch=1), {}),
    "D": (dict(BASE, n_threads=1, n_batch=8, n_ubatch=8), {}),
    # which batch sizes share A's bits; is the 1-token path thread-invariant
    "C_t2": (dict(BASE, n_threads=2, n_batch=1, n_ubatch=1), {}),
    "D2": (dict(BASE, n_threads=1, n_batch=2, n_ubatch=2), {}),
    "D3": (dict(BASE, n_threads=1, n_batch=3, n_ubatch=3), {}),
    "D4": (dict(BASE, n_threads=1, n_batch=4, n_ubatch=4), {}),
    "A_ub8": (dict(BASE, n_threads=1, n_batch=512, n_ubatch=8), {}),
    "E1_tiledoff": (dict(BASE, n_threads=1, n_batch=512), {"GGML_CPU_TILED_MM": "0"}),
    "E2_nofusion": (dict(BASE, n_threads=1, n_batch=512), {"GGML_CPU_DISABLE_FUSION": "1"}),
    "E3_flashattn": (dict(BASE, n_threads=1, n_batch=512, flash_attn=True), {}),
}


def run_config(name):
    import llama_cpp

    args, _env = CONFIGS[name]
    llm = llama_cpp.Llama(model_path=str(GGUF), **args)
    out = {}
    for n, p in enumerate(PROMPTS):
        ids = [int(i) for i in llm.tokenize(p.encode(), add_bos=False, special=False)]
        llm.reset()
        llm.eval(ids)
        assert llm.n_tokens == len(ids)
        greedy = []
        for _ in range(GREEDY):
            nxt = int(np.argmax(llm.scores[llm.n_tokens - 1, :]))
            greedy.append(nxt)
            llm.eval([nxt])
        # logits of the prompt positions and of the continuation (the latter: position
        # len(ids)-1+k predicts greedy[k]; the last eval'd token's row is included)
        allrows = np.array(llm.scores[: llm.n_tokens, :], dtype=np.float32, copy=True)
        out[f"ids{n}"] = np.array(ids, dtype=np.int64)
        out[f"logits{n}"] = allrows[: len(ids)]
        out[f"cont{n}"] = allrows[len(ids):]
        out[f"greedy{n}"] = np.array(greedy, dtype=np.int64)
        out[f"text{n}"] = np.array(llm.detokenize(greedy).decode("utf-8", errors="replace"))
    out["version"] = np.array(llama_cpp.__version__)
    llm.close()
    np.savez(HERE / f"out_{name}.npz", **out)


def compare(a, b, key):
    x, y = a[key], b[key]
    if x.shape != y.shape:
        return None
    d = np.abs(x.astype(np.float64) - y.astype(np.float64))
    return dict(
        max_abs=float(d.max()) if d.size else 0.0,
        argmax_diff=int((np.argmax(x, 1) != np.argmax(y, 1)).sum()) if d.size else 0,
        positions=int(x.shape[0]),
    )


def main():
    timings = {}
    for name, (_args, env) in CONFIGS.items():
        t = time.time()
        subprocess.run([sys.executable, __file__, "--config", str(GGUF), name, str(HERE)],
                       env=dict(os.environ, **env), check=True)
        timings[name] = round(time.time() - t, 1)
    res = {k: dict(np.load(HERE / f"out_{k}.npz")) for k in CONFIGS}
    nprompts = len(PROMPTS)
    report = {"gguf": str(GGUF), "version": str(res["A"]["version"]), "timings_s": timings,
              "configs": {k: dict(llama_args={kk: vv for kk, vv in a.items()}, env=e)
                          for k, (a, e) in CONFIGS.items()},
              "prompts": [], "pairs": {}}
    for n in range(nprompts):
        ids = res["A"][f"ids{n}"]
        for k in CONFIGS:
            assert np.array_equal(res[k][f"ids{n}"], ids), (k, n)
        L = res["A"][f"logits{n}"]
        top1 = L.max(1)
        report["prompts"].append(dict(
            prompt=PROMPTS[n][:60], n_tokens=int(len(ids)),
            top1_logit_min=float(top1.min()), top1_logit_max=float(top1.max()),
            max_abs_logit=float(np.abs(L).max()),
            median_abs_logit=float(np.median(np.abs(L))),
            top1_minus_top2_min=float(np.min(np.sort(L, 1)[:, -1] - np.sort(L, 1)[:, -2])),
            greedy_A=str(res["A"][f"text{n}"]),
        ))
    for p, q in combinations(CONFIGS, 2):
        per = []
        for n in range(nprompts):
            c = compare(res[p], res[q], f"logits{n}")
            same_greedy = bool(np.array_equal(res[p][f"greedy{n}"], res[q][f"greedy{n}"]))
            first_div = None
            if not same_greedy:
                first_div = int(np.argmax(res[p][f"greedy{n}"] != res[q][f"greedy{n}"]))
            cc = compare(res[p], res[q], f"cont{n}") if same_greedy else None
            per.append(dict(prompt=n, **c, greedy_same=same_greedy, greedy_first_diff=first_div,
                            cont_max_abs=None if cc is None else cc["max_abs"]))
        report["pairs"][f"{p} vs {q}"] = dict(
            prompt_max_abs=max(x["max_abs"] for x in per),
            prompt_argmax_diff=sum(x["argmax_diff"] for x in per),
            prompt_positions=sum(x["positions"] for x in per),
            greedy_all_same=all(x["greedy_same"] for x in per),
            cont_max_abs=(max(x["cont_max_abs"] for x in per)
                          if all(x["cont_max_abs"] is not None for x in per) else None),
            per_prompt=per,
        )
    # Compare with the committed golden (same settings as B: n_threads=2, n_batch=512)
    golden = REPO / "tests/golden/gguf_out/smollm2_q8_0.json"
    if golden.exists():
        g = json.loads(golden.read_text())["llama_cpp"]["sequences"]
        for k in ("A", "B", "C", "D"):
            worst, gsame = 0.0, True
            for n, s in enumerate(g):
                L = res[k][f"logits{n}"]
                assert list(res[k][f"ids{n}"]) == s["ids"]
                for row, tids, tl in zip(L, s["top_ids"], s["top_logits"]):
                    worst = max(worst, float(np.abs(row[tids] - np.array(tl, np.float32)).max()))
                gsame &= list(res[k][f"greedy{n}"]) == s["greedy"]
            report.setdefault("vs_golden_json", {})[k] = dict(max_abs_at_top32=worst,
                                                              greedy_same=gsame)
    (HERE / "report.json").write_text(json.dumps(report, indent=1))
    # compact table
    print(f"llama_cpp {report['version']}  file {GGUF}")
    print("timings (s):", timings)
    for pr in report["prompts"]:
        print(f"prompt n_tok={pr['n_tokens']:3d} top1 in [{pr['top1_logit_min']:.3f},"
              f"{pr['top1_logit_max']:.3f}] max|logit|={pr['max_abs_logit']:.3f} "
              f"median|logit|={pr['median_abs_logit']:.3f} min(top1-top2)="
              f"{pr['top1_minus_top2_min']:.2e}  {pr['prompt']!r}")
    print(f"{'pair':28s} {'max|dL| prompt':>15s} {'argmax!=':>9s} {'greedy same':>11s} "
          f"{'max|dL| cont':>13s}  per-prompt max|dL|")
    for k, v in report["pairs"].items():
        cm = "-" if v["cont_max_abs"] is None else f"{v['cont_max_abs']:.3e}"
        pp = " ".join(f"{x['max_abs']:.2e}" for x in v["per_prompt"])
        gd = "" if v["greedy_all_same"] else " first-diff:" + ",".join(
            str(x["greedy_first_diff"]) for x in v["per_prompt"])
        print(f"{k:28s} {v['prompt_max_abs']:15.3e} {v['prompt_argmax_diff']:4d}/"
              f"{v['prompt_positions']:<4d} {str(v['greedy_all_same']):>11s} {cm:>13s}  {pp}{gd}")
    if "vs_golden_json" in report:
        print("vs committed golden json (top-32 logits per position):", report["vs_golden_json"])


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--config":
        run_config(sys.argv[3])
    else:
        main()
