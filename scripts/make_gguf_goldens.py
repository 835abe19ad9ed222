#!/usr/bin/env python3
"""Record what independent software makes of a GGUF file that upmix wrote.

Usage (scripts/check-gguf.sh runs it for every tests/golden/gguf_out/*.ron):

    .venv-fixtures/bin/python scripts/make_gguf_goldens.py WORK/NAME.gguf NAME

Writes tests/golden/gguf_out/NAME.json with:

* "sha256"       of the GGUF file: the Rust test checks that upmix still writes exactly
                 these bytes.
* "gguf_py"      what gguf-py's GGUFReader reads: the architecture, the tensor count,
                 the number of tensors per tensor type name, every tensor dequantized
                 with gguf.quants.dequantize (the script fails if any cannot be; it
                 records how many were read and, per tensor name, the shape of the
                 dequantized array, row-major: the reverse of GGUF's ne order), and
                 <arch>.expert_count / expert_used_count when the file has them.
* "llama_cpp"    llama-cpp-python's version and, per sequence, the token ids, the
                 logits of every position, the argmax of every position and a greedy
                 continuation (the argmax after each `eval`, done here with
                 `llm.eval([next])` and `llm.scores`, not the sampling API, and not
                 stopped at EOS): 16 tokens for the tiny models, 32 for SmolLM2.
  - tiny models (vocabulary of 256, no tokenizer): the fixed id lists TINY_SEQUENCES,
    every logit of every position.
  - SmolLM2 models (NAME starts with "smollm2"): SMOLLM2_PROMPTS tokenized by llama.cpp
    (tokenize(text, add_bos=False, special=False)); per position the top TOP_K token ids
    (descending logit, ties by lower id) and their logits. The full logits of the last
    position go to tests/golden/gguf_out/NAME.last_logits.safetensors (float32 tensors
    prompt0..prompt3, one row of the vocabulary each).
* "transformers" (only for smollm2_q8_0): transformers loads the file
  (AutoModelForCausalLM.from_pretrained(dir, gguf_file=name, torch_dtype=torch.float32),
  default attention implementation, CPU, 2 threads) and runs each prompt's llama.cpp ids;
  per position it records the logits at llama.cpp's top-TOP_K ids and the argmax. If
  transformers cannot load the file, the error string goes under "transformers_error".

llama.cpp runs on the CPU with Llama(logits_all=True, n_ctx=512, n_batch=512,
n_threads=2, type_k=0, type_v=0, flash_attn=False): the KV cache is f32 (GGML type 0)
and flash attention is off (LLAMA_FLASH_ATTN_TYPE_DISABLED), so that only the weights'
quantization differs from an f32 run. Note that llama.cpp's CPU backend, for quantized
weights, quantizes the activations to Q8_0 (Q8_1 for Q4_1 weights) in blocks of 32
before its dot products, so its logits are not those of the dequantized weights in
float32 arithmetic. llama.cpp's model reset between sequences is `llm.reset()`.

Floats are written as plain JSON numbers (each float32 value converted with float()).
Pinned versions (scripts/fixtures-requirements.txt): llama-cpp-python==0.3.36 (built
from source by scripts/setup-fixture-env.sh), gguf==0.19.0, transformers==5.23.0,
torch==2.15.0, numpy==2.4.6, safetensors==0.8.0. It is deterministic: CPU, fixed thread
counts, greedy decoding, no randomness.
"""

import hashlib
import importlib.metadata
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import gguf  # noqa: E402
import llama_cpp  # noqa: E402
import numpy as np  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402

from make_fixtures import GOLDEN, write_json  # noqa: E402

OUT = GOLDEN / "gguf_out"

TINY_SEQUENCES = [[5, 60, 71, 200, 13, 99, 100, 101], [1, 2, 3, 4, 250, 128, 64, 32, 16, 8, 4, 2]]
TINY_GREEDY = 16
SMOLLM2_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Water boils at a temperature of",
    "Once upon a time, in a small village,",
]
SMOLLM2_GREEDY = 32
TOP_K = 32
TRANSFORMERS_MODELS = {"smollm2_q8_0"}

LLAMA_ARGS = dict(
    logits_all=True,
    n_ctx=512,
    n_threads=2,
    n_batch=512,
    verbose=False,
    type_k=0,  # GGML_TYPE_F32: an f32 KV cache
    type_v=0,
    flash_attn=False,  # llama-cpp-python 0.3.36: LLAMA_FLASH_ATTN_TYPE_DISABLED
)


def floats(values):
    """float32 values as a list of plain Python floats."""
    return [float(v) for v in np.asarray(values, dtype=np.float32).reshape(-1)]


def sha256(path):
    """Hex sha256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def field(reader, key):
    """A GGUF metadata value, or None when absent."""
    f = reader.fields.get(key)
    return None if f is None else f.contents()


def read_gguf_py(path):
    """What gguf-py reads: metadata, tensor types, every tensor dequantized."""
    reader = gguf.GGUFReader(str(path))
    arch = field(reader, "general.architecture")
    types = Counter(t.tensor_type.name for t in reader.tensors)
    shapes = {}
    for t in reader.tensors:
        values = gguf.quants.dequantize(t.data, t.tensor_type)
        expected = [int(d) for d in reversed(t.shape)]
        assert list(values.shape) == expected, (t.name, values.shape, expected)
        assert values.size == int(t.n_elements), t.name
        assert np.isfinite(values).all(), t.name
        shapes[t.name] = expected
    out = {
        "architecture": arch,
        "tensor_count": len(reader.tensors),
        "tensor_types": dict(sorted(types.items())),
        "tensors_read": len(shapes),
        "shapes": shapes,
    }
    for key in ("expert_count", "expert_used_count"):
        value = field(reader, f"{arch}.{key}")
        if value is not None:
            out[key] = int(value)
    return out


def run_llama(llm, ids, steps):
    """Logits [len(ids), vocab] of a sequence and its greedy continuation of `steps` ids."""
    llm.reset()
    llm.eval(ids)
    assert llm.n_tokens == len(ids)
    logits = np.array(llm.scores[: llm.n_tokens, :], dtype=np.float32, copy=True)
    greedy = []
    for _ in range(steps):
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1, :]))
        greedy.append(nxt)
        llm.eval([nxt])
    return logits, greedy


def top_k(row):
    """Ids of the TOP_K largest logits, descending, ties by lower id."""
    return [int(i) for i in np.argsort(-row, kind="stable")[:TOP_K]]


def record_llama(path, smollm2):
    """llama.cpp's logits and greedy continuations; for SmolLM2 also the last rows."""
    llm = llama_cpp.Llama(model_path=str(path), **LLAMA_ARGS)
    sequences, last = [], {}
    if smollm2:
        inputs = [llm.tokenize(p.encode(), add_bos=False, special=False) for p in SMOLLM2_PROMPTS]
        steps = SMOLLM2_GREEDY
    else:
        inputs, steps = TINY_SEQUENCES, TINY_GREEDY
    for n, ids in enumerate(inputs):
        ids = [int(i) for i in ids]
        logits, greedy = run_llama(llm, ids, steps)
        assert np.isfinite(logits).all(), n
        seq = {"ids": ids, "argmax": [int(i) for i in np.argmax(logits, axis=1)]}
        if smollm2:
            seq["prompt"] = SMOLLM2_PROMPTS[n]
            tops = [top_k(row) for row in logits]
            seq["top_ids"] = tops
            seq["top_logits"] = [floats(row[t]) for row, t in zip(logits, tops)]
            seq["greedy_text"] = llm.detokenize(greedy).decode("utf-8", errors="replace")
            last[f"prompt{n}"] = np.ascontiguousarray(logits[-1])
        else:
            seq["logits"] = [floats(row) for row in logits]
        seq["greedy"] = greedy
        sequences.append(seq)
    out = {
        "version": llama_cpp.__version__,
        "n_vocab": llm.n_vocab(),
        "settings": {k: v for k, v in LLAMA_ARGS.items() if k != "verbose"},
        "sequences": sequences,
    }
    llm.close()
    return out, last


def record_transformers(path, sequences):
    """transformers' logits at llama.cpp's top ids and its argmax, per position."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(2)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, torch_dtype=torch.float32
        )
    except Exception as e:  # noqa: BLE001 - recorded, not hidden
        return {"transformers_error": f"{type(e).__name__}: {e}"}
    model.eval()
    out = []
    with torch.no_grad():
        for seq in sequences:
            logits = model(torch.tensor([seq["ids"]])).logits[0].to(torch.float32).numpy()
            out.append({
                "ids": seq["ids"],
                "logits_at_top_ids": [floats(row[t]) for row, t in zip(logits, seq["top_ids"])],
                "argmax": [int(i) for i in np.argmax(logits, axis=1)],
            })
    return {"transformers": {
        "version": transformers.__version__,
        "torch": torch.__version__,
        "attn_implementation": model.config._attn_implementation,
        "sequences": out,
    }}


def main():
    """Read argv (GGUF path, golden name) and write the golden."""
    if len(sys.argv) != 3:
        sys.exit("usage: make_gguf_goldens.py GGUF NAME")
    path, name = Path(sys.argv[1]).resolve(), sys.argv[2]
    smollm2 = name.startswith("smollm2")
    golden = {"file": path.name, "sha256": sha256(path), "gguf_py": read_gguf_py(path)}
    golden["gguf_py"]["version"] = importlib.metadata.version("gguf")
    golden["llama_cpp"], last = record_llama(path, smollm2)
    if smollm2:
        save_file(last, str(OUT / f"{name}.last_logits.safetensors"))
    if name in TRANSFORMERS_MODELS:
        golden.update(record_transformers(path, golden["llama_cpp"]["sequences"]))
    write_json(OUT / f"{name}.json", golden)
    print(f"wrote {OUT / f'{name}.json'}")


if __name__ == "__main__":
    main()
