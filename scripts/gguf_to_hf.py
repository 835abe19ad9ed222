#!/usr/bin/env python3
"""Convert a llama-architecture GGUF file into a float32 Hugging Face checkpoint.

    gguf_to_hf.py GGUF OUT_DIR

Writes OUT_DIR/model.safetensors (every tensor dequantized to float32, with
Hugging Face Llama names) and OUT_DIR/config.json (LlamaForCausalLM). The
files are written into OUT_DIR.tmp first and then renamed to OUT_DIR, so an
interrupted run never leaves a half-written OUT_DIR behind; an existing
OUT_DIR is replaced.

Only needs gguf, numpy and safetensors (see scripts/ci-requirements.txt); no
torch or transformers.

llama.cpp's converter reorders the rows of the Q and K projections so that the
two halves of each rotary pair are interleaved (it applies
w.reshape(n_head, 2, rows // n_head // 2, cols).swapaxes(1, 2).reshape(rows, cols),
with n_head = head_count for Q and head_count_kv for K). This script applies
the inverse, so the result matches the rotate-half convention of transformers.
"""

import json
import os
import re
import shutil
import sys
from pathlib import Path

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize
from safetensors.numpy import save_file

ARCH = "llama"

# Per-layer GGUF tensor names -> Hugging Face names (after "model.layers.N.").
LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
LAYER_RE = re.compile(r"^blk\.(\d+)\.(.+)$")


def field(reader, key, default=None):
    """A metadata value as a Python scalar, string or list; default when absent."""
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def required(reader, key):
    """A metadata value that must be present."""
    value = field(reader, key)
    if value is None:
        raise SystemExit(f"gguf_to_hf: missing metadata key {key}")
    return value


def hf_name(name):
    """Hugging Face name of a GGUF tensor name; exits on a name it does not know."""
    if name in GLOBAL_NAMES:
        return GLOBAL_NAMES[name]
    m = LAYER_RE.match(name)
    if m and m.group(2) in LAYER_NAMES:
        return f"model.layers.{int(m.group(1))}.{LAYER_NAMES[m.group(2)]}"
    raise SystemExit(f"gguf_to_hf: no Hugging Face name for tensor {name}")


def unpermute(w, n_head):
    """Inverse of llama.cpp's Q/K row permutation for n_head heads."""
    rows, cols = w.shape
    if rows % (2 * n_head):
        raise SystemExit(f"gguf_to_hf: {rows} rows do not split into {n_head} heads")
    # Forward: (n_head, 2, half, cols) -> swap -> (n_head, half, 2, cols); undo by swapping back.
    return w.reshape(n_head, rows // n_head // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def read_config(reader, has_output):
    """config.json contents from the GGUF metadata."""
    arch = required(reader, "general.architecture")
    if arch != ARCH:
        raise SystemExit(f"gguf_to_hf: architecture {arch!r} is not supported (only {ARCH!r})")
    hidden = int(required(reader, f"{ARCH}.embedding_length"))
    heads = int(required(reader, f"{ARCH}.attention.head_count"))
    kv_heads = int(field(reader, f"{ARCH}.attention.head_count_kv", heads))
    vocab = field(reader, f"{ARCH}.vocab_size")
    if vocab is None:
        vocab = len(required(reader, "tokenizer.ggml.tokens"))
    theta = float(field(reader, f"{ARCH}.rope.freq_base", 10000.0))
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": int(required(reader, f"{ARCH}.feed_forward_length")),
        "num_hidden_layers": int(required(reader, f"{ARCH}.block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": hidden // heads,
        "rms_norm_eps": float(required(reader, f"{ARCH}.attention.layer_norm_rms_epsilon")),
        "rope_theta": theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": theta},
        "vocab_size": int(vocab),
        "max_position_embeddings": int(required(reader, f"{ARCH}.context_length")),
        "tie_word_embeddings": not has_output,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "dtype": "float32",
        "torch_dtype": "float32",
    }
    for key in ("bos", "eos", "padding"):
        value = field(reader, f"tokenizer.ggml.{key}_token_id")
        if value is not None:
            config[f"{'pad' if key == 'padding' else key}_token_id"] = int(value)
    rope_dims = field(reader, f"{ARCH}.rope.dimension_count")
    if rope_dims is not None and int(rope_dims) != config["head_dim"]:
        raise SystemExit(f"gguf_to_hf: partial rotary ({rope_dims} of {config['head_dim']}) is not supported")
    return config


def read_tensors(reader, config):
    """All tensors, dequantized to float32, under Hugging Face names."""
    tensors = {}
    for t in reader.tensors:
        name = hf_name(t.name)
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))
        w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shape)
        if name.endswith("self_attn.q_proj.weight"):
            w = unpermute(w, config["num_attention_heads"])
        elif name.endswith("self_attn.k_proj.weight"):
            w = unpermute(w, config["num_key_value_heads"])
        if name in tensors:
            raise SystemExit(f"gguf_to_hf: tensor {name} appears twice")
        tensors[name] = np.ascontiguousarray(w)
    return tensors


def convert(gguf_path, out_dir):
    """Convert gguf_path into out_dir (replaced atomically)."""
    out_dir = Path(out_dir)
    reader = GGUFReader(str(gguf_path))
    has_output = any(t.name == "output.weight" for t in reader.tensors)
    config = read_config(reader, has_output)
    tensors = read_tensors(reader, config)
    if "model.embed_tokens.weight" not in tensors:
        raise SystemExit("gguf_to_hf: no token_embd.weight in the file")

    tmp = out_dir.with_name(out_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    umask = os.umask(0)
    os.umask(umask)
    for path in tmp.iterdir():
        os.chmod(path, 0o666 & ~umask)  # safetensors creates its file 0600
        with open(path, "rb") as fh:
            os.fsync(fh.fileno())

    old = out_dir.with_name(out_dir.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if out_dir.exists():
        os.rename(out_dir, old)
    os.rename(tmp, out_dir)
    if old.exists():
        shutil.rmtree(old)
    return config, len(tensors)


def main(argv):
    """Command-line entry point."""
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        print("usage: gguf_to_hf.py GGUF OUT_DIR", file=sys.stderr)
        return 2
    config, count = convert(argv[0], argv[1])
    print(f"gguf_to_hf: wrote {count} tensors ({config['num_hidden_layers']} layers, "
          f"tied={config['tie_word_embeddings']}) to {argv[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
