#!/usr/bin/env python3
"""Generate the golden test fixtures under tests/golden/.

What it makes:

* tests/golden/models/<name>/  tiny randomly initialised Hugging Face
  checkpoints (model.safetensors, config.json, generation_config.json and a
  byte-level tokenizer.json) for: llama, llama_tied, qwen2, mixtral,
  mixtral_fused (same weights as mixtral, fused expert layout), llama_b and
  llama_c (llama's config, other seeds), mistral, cohere (Command R:
  LayerNorm, parallel attention and MLP, per-head q/k LayerNorm, logit scale,
  tied embeddings), cohere2 (Command R7B: sliding layers 0-2 and a global
  layer 3 without RoPE) and cohere2_b.
* tests/golden/models/{cohere,cohere2}.gguf  the same cohere and cohere2
  weights (float32) as llama.cpp's converter lays them out (architectures
  `command-r` and `cohere2`), with the byte-level tokenizer as a `gpt2` one.
* tests/golden/<name>/golden.json  reference float32 logits for a fixed
  12-token input and a 16-token greedy continuation of a fixed 5-token prompt,
  computed with transformers from the saved (dtype-rounded) weights.
* tests/golden/merge/  a linear merge of llama (0.3) and llama_b (0.7),
  computed in mergekit's `linear` operation order; tests/golden/merge_cohere2/
  the same for cohere2 and cohere2_b.
* tests/golden/bam/  BAM attention experts (soft Mixture-of-Attention) over
  llama, llama_b and llama_c, computed in plain torch: every layer's attention
  is a routed mixture of the three models' attentions, every other tensor their
  mean. routers.safetensors holds the random routers, golden.json the float32
  logits of the fixed input for expert or shared key/values and soft or top-2
  routing, and how many tokens each layer's top-2 sends to each expert.
* tests/golden/tokenizer.json  sample texts and their token ids.
* tests/golden/smollm2/  reference tokens, logits, greedy ids and perplexity
  of the real SmolLM2-135M-Instruct Q4_1 GGUF (`make_fixtures.py smollm2`; the
  default run skips it when scripts/fetch-models.sh has not fetched the model).
* tests/golden/smollm2_hf/  every file transformers saves with SmolLM2 (model
  and tokenizer save_pretrained) except the weights, and chat.json: chats
  rendered by the saved tokenizer's apply_chat_template
  (`make_fixtures.py smollm2-hf`). With the weights of scripts/gguf_to_hf.py
  (identical to transformers' own, checked by `smollm2`) they make SmolLM2 as
  a transformers 5 user has it on disk.

A second mode checks a checkpoint directory written by upmix against the
goldens and records the result in tests/golden/emitted/<NAME>.json:

    make_fixtures.py model NAME
        Rewrites one tiny model of SPECS and its golden only (e.g. `mistral`),
        with its GGUF copy for cohere and cohere2.

    make_fixtures.py merge NAME
        Rewrites one merge golden of MERGES (`merge` or `merge_cohere2`).

    make_fixtures.py bam
        Rewrites tests/golden/bam/ from the saved llama, llama_b and llama_c
        (`model llama_c` makes the last).

    make_fixtures.py check-emitted DIR NAME

Another checks that a SmolLM2 checkpoint written by upmix still carries what
transformers needs: every saved file but the weights and config.json byte for
byte, config.json's pad/bos/eos ids, and apply_chat_template as in chat.json:

    make_fixtures.py check-smollm2-hf DIR

A third records what transformers computes with a checkpoint that only upmix
can make (e.g. an upcycled MoE) in tests/golden/emitted/<NAME>.json: logits
for the fixed input ids, a 16-token greedy continuation and the files' hashes:

    make_fixtures.py record-emitted DIR NAME

A fourth does the same for a BAM checkpoint written by upmix (attention experts
and FFN experts, run by the remote code upmix writes next to the weights, loaded
with trust_remote_code): the float32 logits for the fixed input ids, then one
AdamW training step on them (labels = the input ids) with its loss and the
gradient norm of every expert and router parameter (each must be nonzero), and
the hashes of the weights, config.json and the two .py files:

    make_fixtures.py record-bam DIR NAME

How to run (from the repository root):

    scripts/setup-fixture-env.sh && .venv-fixtures/bin/python scripts/make_fixtures.py

Everything is deterministic: each model has a fixed torch seed, and the
script runs on the CPU with one thread and float32 compute.
"""

import dataclasses
import hashlib
import json
import math
import os
import shutil
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    Cohere2Config,
    Cohere2ForCausalLM,
    CohereConfig,
    CohereForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
GOLDEN = REPO_ROOT / "tests" / "golden"
MODELS = GOLDEN / "models"

INPUT_IDS = [17, 200, 45, 3, 99, 128, 255, 64, 7, 180, 33, 121]
PROMPT = [72, 101, 108, 108, 111]
GREEDY_STEPS = 16
MIN_TOP_GAP = 1e-3
MIN_DISTINCT_GREEDY = 5
EMITTED_TOLERANCE = 1e-4
MERGE_WEIGHTS = [0.3, 0.7]
TOKENIZER_TEXTS = [
    "Hello, world!",
    "The café opens at 9:30; bring coffee.",
    "Don't panic -- it's only a test (really).",
]

COMMON = dict(
    hidden_size=64,
    num_hidden_layers=2,
    vocab_size=256,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=96,
    max_position_embeddings=128,
    rms_norm_eps=1e-5,
    bos_token_id=1,
    eos_token_id=2,
)

LLAMA3_ROPE = dict(
    rope_type="llama3",
    rope_theta=500000.0,
    factor=8.0,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    original_max_position_embeddings=16,
)

# Command R7B's layout: three sliding-window layers, then one global layer (which skips
# RoPE). The window (4) is shorter than the logits input (12 tokens).
COHERE2 = dict(
    num_hidden_layers=4,
    tie_word_embeddings=True,
    attention_bias=False,
    layer_norm_eps=1e-5,
    logit_scale=0.5,
    sliding_window=4,
    layer_types=["sliding_attention"] * 3 + ["full_attention"],
    rope_parameters=dict(rope_type="default", rope_theta=10000.0),
)

# name -> (config class, model class, extra config, seed, saved dtype). COMMON keys that
# the config class does not declare (rms_norm_eps for Cohere's LayerNorm) are left out;
# extra config overrides COMMON.
SPECS = {
    "llama": (LlamaConfig, LlamaForCausalLM,
              dict(tie_word_embeddings=False,
                   rope_parameters=dict(rope_type="default", rope_theta=10000.0)),
              1001, torch.float32),
    "llama_tied": (LlamaConfig, LlamaForCausalLM,
                   dict(tie_word_embeddings=True, rope_parameters=LLAMA3_ROPE),
                   1007, torch.float16),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM,
              dict(tie_word_embeddings=False,
                   rope_parameters=dict(rope_type="default", rope_theta=1000000.0)),
              1003, torch.bfloat16),
    "mixtral": (MixtralConfig, MixtralForCausalLM,
                dict(tie_word_embeddings=False, num_local_experts=4, num_experts_per_tok=2,
                     rope_parameters=dict(rope_type="default", rope_theta=1000000.0)),
                1004, torch.bfloat16),
    "llama_b": (LlamaConfig, LlamaForCausalLM,
                dict(tie_word_embeddings=False,
                     rope_parameters=dict(rope_type="default", rope_theta=10000.0)),
                1005, torch.float32),
    "llama_c": (LlamaConfig, LlamaForCausalLM,
                dict(tie_word_embeddings=False,
                     rope_parameters=dict(rope_type="default", rope_theta=10000.0)),
                1012, torch.float32),
    # A sliding window shorter than the logits input (12 tokens) and than the prompt plus
    # its greedy continuation (5 + 16).
    "mistral": (MistralConfig, MistralForCausalLM,
                dict(tie_word_embeddings=False, sliding_window=5,
                     rope_parameters=dict(rope_type="default", rope_theta=10000.0)),
                1008, torch.float32),
    "cohere": (CohereConfig, CohereForCausalLM,
               dict(tie_word_embeddings=True, use_qk_norm=True, logit_scale=0.25,
                    attention_bias=False, layer_norm_eps=1e-5,
                    rope_parameters=dict(rope_type="default", rope_theta=10000.0)),
               1009, torch.float32),
    "cohere2": (Cohere2Config, Cohere2ForCausalLM, COHERE2, 1010, torch.float32),
    "cohere2_b": (Cohere2Config, Cohere2ForCausalLM, COHERE2, 1011, torch.float32),
}

# output directory under tests/golden -> the two models merged (weights MERGE_WEIGHTS)
MERGES = {
    "merge": ("llama", "llama_b"),
    "merge_cohere2": ("cohere2", "cohere2_b"),
}


def f32_list(t):
    """Floats of a tensor, each written as the shortest decimal that round-trips as float32."""
    return [float(str(np.float32(x))) for x in t.detach().to(torch.float32).numpy().tolist()]


def to_json(value, level=0):
    """JSON text with nested containers indented and flat lists on one line."""
    pad, inner = "  " * level, "  " * (level + 1)
    if isinstance(value, dict) and value:
        items = [f"{inner}{json.dumps(k)}: {to_json(v, level + 1)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(value, list) and any(isinstance(v, (list, dict)) for v in value):
        items = [inner + to_json(v, level + 1) for v in value]
        return "[\n" + ",\n".join(items) + "\n" + pad + "]"
    return json.dumps(value, ensure_ascii=False)


def write_json(path, obj):
    """Write obj as UTF-8 JSON with a trailing newline."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(to_json(obj) + "\n", encoding="utf-8")


def build_tokenizer():
    """Byte-level BPE over the 256 byte symbols (sorted, ids 0..255), no merges, no specials."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    assert len(alphabet) == 256
    vocab = {sym: i for i, sym in enumerate(alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    assert tok.get_vocab_size(with_added_tokens=True) == 256
    return tok


def reinit_(model):
    """Replace the default (std 0.02) init with one that gives well-spread logits.

    Matrices (Linear weights, router, fused expert tensors) get randn/sqrt(fan_in),
    where fan_in is the last dimension; embeddings get randn; RMSNorm weights
    get 1 + 0.1*randn; biases get 0.1*randn. A tied embedding is also the
    lm_head, so it is initialised as that Linear (randn/sqrt(hidden)): with
    randn embeddings the residual copy of the current token dominates the tied
    logits and greedy decoding just repeats the last prompt token.
    """
    embed_scale = 1.0
    if model.config.tie_word_embeddings:
        embed_scale = 1.0 / math.sqrt(model.config.hidden_size)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            elif "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif "embed_tokens" in name:
                p.copy_(embed_scale * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / math.sqrt(p.shape[-1]))


def load_model(path):
    """Load a checkpoint directory for float32, eager-attention inference."""
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager")
    return model.eval()


@torch.no_grad()
def forward_logits(model, ids):
    """Float32 logits [len(ids), vocab] for a single sequence."""
    return model(torch.tensor([ids])).logits[0].to(torch.float32)


@torch.no_grad()
def greedy(model, prompt, steps):
    """Greedy decoding with a full forward pass per step.

    Asserts that no step has a near-tie between the two best tokens and that
    the continuation is not degenerate; if either fails, change the seed.
    """
    seq = list(prompt)
    for _ in range(steps):
        last = forward_logits(model, seq)[-1]
        top = torch.topk(last, 2).values
        gap = float(top[0] - top[1])
        assert gap > MIN_TOP_GAP, f"near-tie in greedy step {len(seq)}: gap {gap}"
        seq.append(int(torch.argmax(last)))
    out = seq[len(prompt):]
    assert len(set(out)) >= MIN_DISTINCT_GREEDY, f"degenerate greedy continuation {out}"
    return out


def make_golden(name, model_dir):
    """Compute logits and greedy ids from a saved directory; write <name>/golden.json."""
    model = load_model(model_dir)
    logits = forward_logits(model, INPUT_IDS)
    golden = {
        "model": name,
        "input_ids": INPUT_IDS,
        "logits": [f32_list(row) for row in logits],
        "prompt": PROMPT,
        "greedy": greedy(model, PROMPT, GREEDY_STEPS),
    }
    write_json(GOLDEN / name / "golden.json", golden)
    return logits


def config_kwargs(name):
    """Config arguments of a SPECS model: COMMON (the keys its config class declares), then extra."""
    config_cls, _, extra, _, _ = SPECS[name]
    declared = {field.name for field in dataclasses.fields(config_cls)}
    return {**{k: v for k, v in COMMON.items() if k in declared}, **extra}


def save_model(name, tokenizer):
    """Build, re-initialise and save one tiny model; returns its directory."""
    config_cls, model_cls, extra, seed, dtype = SPECS[name]
    torch.manual_seed(seed)
    config = config_cls(**config_kwargs(name), attn_implementation="eager")
    model = model_cls(config).eval()
    reinit_(model)
    model = model.to(dtype)
    model.config.dtype = dtype
    out = MODELS / name
    if out.exists():
        shutil.rmtree(out)
    # transformers 5 always writes safetensors (there is no safe_serialization flag).
    model.save_pretrained(out, max_shard_size="10GB")
    tokenizer.save(str(out / "tokenizer.json"))
    files = sorted(p.name for p in out.glob("*.safetensors"))
    assert files == ["model.safetensors"], files
    return out


def save_mixtral_fused(src, tokenizer):
    """Rewrite the classic mixtral checkpoint in the fused expert layout.

    transformers 5.23 keeps Mixtral experts fused in memory
    (MixtralExperts.gate_up_proj [E, 2F, D], down_proj [E, D, F]) and splits
    gate_up_proj with .chunk(2, dim=-1) on its output: gate rows first, then up
    rows. save_pretrained() however reverts to the classic per-expert layout
    (save_original_format=True by default, via conversion_mapping "mixtral":
    w1/w3 -> gate_up_proj by stacking then concatenating gate, up on dim 1).
    So the classic layout is what transformers writes, and the fused one is
    written here by hand.
    """
    classic = load_file(src / "model.safetensors")
    fused = {}
    n_layers, n_experts = COMMON["num_hidden_layers"], SPECS["mixtral"][2]["num_local_experts"]
    for key, t in classic.items():
        if ".block_sparse_moe." not in key:
            fused[key] = t
    for layer in range(n_layers):
        old = f"model.layers.{layer}.block_sparse_moe."
        new = f"model.layers.{layer}.mlp."
        fused[new + "gate.weight"] = classic[old + "gate.weight"]
        experts = [f"{old}experts.{e}." for e in range(n_experts)]
        fused[new + "experts.gate_up_proj"] = torch.stack(
            [torch.cat([classic[e + "w1.weight"], classic[e + "w3.weight"]], dim=0) for e in experts])
        fused[new + "experts.down_proj"] = torch.stack([classic[e + "w2.weight"] for e in experts])
    out = MODELS / "mixtral_fused"
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in sorted(fused.items())},
              str(out / "model.safetensors"), metadata={"format": "pt"})
    for extra in ("config.json", "generation_config.json"):
        shutil.copy(src / extra, out / extra)
    tokenizer.save(str(out / "tokenizer.json"))
    return out, fused


def check_fused_matches(classic_dir, fused_dir, fused_tensors):
    """Assert that both Mixtral layouts load to the same weights and the same logits."""
    a, b = load_model(classic_dir), load_model(fused_dir)
    state = b.state_dict()
    for key, t in fused_tensors.items():
        assert torch.equal(state[key], t.to(torch.float32)), key
    assert torch.equal(forward_logits(a, INPUT_IDS), forward_logits(b, INPUT_IDS))
    for key, t in a.state_dict().items():
        assert torch.equal(t, state[key]), key


def check_window_matters(name, model_dir):
    """Assert that a model's sliding window changes its golden logits.

    Compares against the same weights with the window widened to
    max_position_embeddings (every layer then sees the whole 12-token input).
    """
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    assert config.sliding_window < len(INPUT_IDS), config.sliding_window
    config.sliding_window = config.max_position_embeddings
    wide = AutoModelForCausalLM.from_pretrained(
        model_dir, config=config, dtype=torch.float32, attn_implementation="eager").eval()
    diff = float((forward_logits(load_model(model_dir), INPUT_IDS)
                  - forward_logits(wide, INPUT_IDS)).abs().max())
    print(f"{name}: sliding window changes the logits by up to {diff:.4g}")
    assert diff > 1e-2, diff


# SPECS model -> gguf.MODEL_ARCH member of its GGUF copy, tests/golden/models/<name>.gguf
GGUF_MODELS = {"cohere": "COMMAND_R", "cohere2": "COHERE2"}
# tokenizer.ggml.pre of the byte-level tokenizer: llama.cpp's name for the GPT-2 regex split
GGUF_TOKENIZER_PRE = "gpt-2"


def gguf_writer_class():
    """gguf-py's GGUFWriter, extended to write an empty typed array.

    GGUF allows arrays of length 0, but gguf-py refuses to pack one. The byte-level
    tokenizer has no merges, and llama.cpp (like upmix) requires tokenizer.ggml.merges
    of a `gpt2` tokenizer, so it is written as an empty array of strings.
    """
    import gguf

    class Writer(gguf.GGUFWriter):
        def _pack_val(self, val, vtype, add_vtype, sub_type=None):
            if vtype == gguf.GGUFValueType.ARRAY and sub_type is not None and len(val) == 0:
                head = self._pack("I", vtype) if add_vtype else b""
                return head + self._pack("I", sub_type) + self._pack("Q", 0)
            return super()._pack_val(val, vtype, add_vtype, sub_type)

    return Writer


def gguf_metadata(name, arch, config, model_dir):
    """Metadata (key -> (value, GGUF type, array item type)) of a tiny model's GGUF copy.

    The keys and values that llama.cpp's convert_hf_to_gguf.py writes for a float32
    conversion: the TextModel base (block count, context, sizes, head counts, RoPE base,
    LayerNorm epsilon, key/value length where the config has head_dim, file type), then
    CommandR2Model (`command-r`: logit_scale, rope scaling type none) or Cohere2Model
    (`cohere2`: logit_scale, sliding_window, vocab_size, rope dimension count = head_dim
    (rotary_pct 1) and rope scaling type none; no sliding-window pattern key, so llama.cpp
    takes its default period of 4: three sliding layers, then a global one). The tokenizer
    is written as a `gpt2` one: the byte symbols of tokenizer.json in id order, all of
    type NORMAL, no merges, the config's bos/eos/pad ids and no BOS added.
    """
    import gguf

    T = gguf.GGUFValueType
    fmt = {"arch": arch}
    llm, att, rope, tok = gguf.Keys.LLM, gguf.Keys.Attention, gguf.Keys.Rope, gguf.Keys.Tokenizer
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    meta = {
        gguf.Keys.General.TYPE: ("model", T.STRING, None),
        gguf.Keys.General.NAME: (name, T.STRING, None),
        llm.BLOCK_COUNT.format(**fmt): (config["num_hidden_layers"], T.UINT32, None),
        llm.CONTEXT_LENGTH.format(**fmt): (config["max_position_embeddings"], T.UINT32, None),
        llm.EMBEDDING_LENGTH.format(**fmt): (config["hidden_size"], T.UINT32, None),
        llm.FEED_FORWARD_LENGTH.format(**fmt): (config["intermediate_size"], T.UINT32, None),
        att.HEAD_COUNT.format(**fmt): (config["num_attention_heads"], T.UINT32, None),
        att.HEAD_COUNT_KV.format(**fmt): (config["num_key_value_heads"], T.UINT32, None),
        rope.FREQ_BASE.format(**fmt): (config["rope_parameters"]["rope_theta"], T.FLOAT32, None),
        att.LAYERNORM_EPS.format(**fmt): (config["layer_norm_eps"], T.FLOAT32, None),
    }
    if "head_dim" in config:
        assert config["head_dim"] == head_dim, config["head_dim"]
        meta[att.KEY_LENGTH.format(**fmt)] = (head_dim, T.UINT32, None)
        meta[att.VALUE_LENGTH.format(**fmt)] = (head_dim, T.UINT32, None)
    meta[gguf.Keys.General.FILE_TYPE] = (int(gguf.LlamaFileType.ALL_F32), T.UINT32, None)
    meta[llm.LOGIT_SCALE.format(**fmt)] = (config["logit_scale"], T.FLOAT32, None)
    if arch == "cohere2":
        meta[att.SLIDING_WINDOW.format(**fmt)] = (config["sliding_window"], T.UINT32, None)
        meta[llm.VOCAB_SIZE.format(**fmt)] = (config["vocab_size"], T.UINT32, None)
        meta[rope.DIMENSION_COUNT.format(**fmt)] = (head_dim, T.UINT32, None)
    meta[rope.SCALING_TYPE.format(**fmt)] = (gguf.RopeScalingType.NONE.value, T.STRING, None)
    meta[gguf.Keys.General.QUANTIZATION_VERSION] = (gguf.GGML_QUANT_VERSION, T.UINT32, None)

    vocab = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))["model"]["vocab"]
    tokens = sorted(vocab, key=vocab.get)
    assert [vocab[t] for t in tokens] == list(range(config["vocab_size"]))
    meta.update({
        tok.MODEL: ("gpt2", T.STRING, None),
        tok.PRE: (GGUF_TOKENIZER_PRE, T.STRING, None),
        tok.LIST: (tokens, T.ARRAY, T.STRING),
        tok.TOKEN_TYPE: ([int(gguf.TokenType.NORMAL)] * len(tokens), T.ARRAY, T.INT32),
        tok.MERGES: ([], T.ARRAY, T.STRING),
        tok.BOS_ID: (config["bos_token_id"], T.UINT32, None),
        tok.EOS_ID: (config["eos_token_id"], T.UINT32, None),
        tok.PAD_ID: (config["pad_token_id"], T.UINT32, None),
        tok.ADD_BOS: (False, T.BOOL, None),
    })
    return meta


def save_gguf(name, model_dir):
    """Write tests/golden/models/<name>.gguf from the saved float32 weights and check it.

    Tensor names come from gguf-py's table for the architecture; tensors keep the
    Hugging Face row order (llama.cpp permutes Q/K rows only for its `llama`-type
    converters; command-r and cohere2 use pairwise RoPE like Cohere's own code). The
    embedding is tied, so there is no output.weight. Reads the file back and asserts
    every metadata value and tensor.
    """
    import gguf

    arch_id = gguf.MODEL_ARCH[GGUF_MODELS[name]]
    arch = gguf.MODEL_ARCH_NAMES[arch_id]
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    assert config["tie_word_embeddings"], name
    tensors = load_file(model_dir / "model.safetensors")
    assert "lm_head.weight" not in tensors
    name_map = gguf.get_tensor_name_map(arch_id, config["num_hidden_layers"])
    arrays = {}
    for key in sorted(tensors):
        gguf_name = name_map.get_name(key, try_suffixes=(".weight", ".bias"))
        assert gguf_name is not None, f"no {arch} name for {key}"
        assert tensors[key].dtype == torch.float32, (key, tensors[key].dtype)
        arrays[gguf_name] = np.ascontiguousarray(tensors[key].numpy())
    assert len(arrays) == len(tensors)

    path = MODELS / f"{name}.gguf"
    meta = gguf_metadata(name, arch, config, model_dir)
    writer = gguf_writer_class()(str(path), arch)
    for key, (value, vtype, sub_type) in meta.items():
        writer.add_key_value(key, value, vtype, sub_type=sub_type)
    for gguf_name, array in arrays.items():
        writer.add_tensor(gguf_name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    reader = gguf.GGUFReader(str(path))
    fields = reader.fields
    assert fields[gguf.Keys.General.ARCHITECTURE].contents() == arch
    for key, (value, vtype, sub_type) in meta.items():
        field = fields[key]
        assert field.types[0] == vtype, key
        if sub_type is not None:
            # parts: key length, key, value type, item type, length, items
            assert field.parts[3][0] == sub_type, key
        got = field.contents()
        if vtype == gguf.GGUFValueType.FLOAT32:
            assert np.float32(got) == np.float32(value), (key, got, value)
        else:
            assert got == value, (key, got, value)
    assert sorted(t.name for t in reader.tensors) == sorted(arrays)
    for t in reader.tensors:
        assert t.tensor_type == gguf.GGMLQuantizationType.F32, t.name
        data = np.asarray(t.data)
        assert data.shape == arrays[t.name].shape, (t.name, data.shape)
        assert np.array_equal(data, arrays[t.name]), t.name
    print(f"{name}: wrote {path.name} ({arch}, {len(arrays)} tensors)")


def make_model_extras(name, model_dir):
    """What goes with some SPECS models: the sliding-window check, the GGUF copy."""
    if name == "cohere2":
        check_window_matters(name, model_dir)
    if name in GGUF_MODELS:
        save_gguf(name, model_dir)


def make_merge(out_name="merge"):
    """Linear merge of the two models of MERGES[out_name], in mergekit's `linear` operation order."""
    name_a, name_b = MERGES[out_name]
    tensors_a = load_file(MODELS / name_a / "model.safetensors")
    tensors_b = load_file(MODELS / name_b / "model.safetensors")
    assert tensors_a.keys() == tensors_b.keys()
    merged = {}
    for key in sorted(tensors_a):
        stacked = torch.stack([tensors_a[key], tensors_b[key]], dim=0).to(torch.float32)
        weights = torch.tensor(MERGE_WEIGHTS, dtype=stacked.dtype)
        while weights.dim() < stacked.dim():
            weights = weights.unsqueeze(-1)
        res = (weights * stacked).sum(dim=0)
        merged[key] = (res / weights.sum(dim=0)).contiguous()
    out = GOLDEN / out_name
    out.mkdir(parents=True, exist_ok=True)
    save_file(merged, str(out / "expected.safetensors"), metadata={"format": "pt"})
    write_json(out / "golden.json", {"models": [name_a, name_b], "weights": MERGE_WEIGHTS})


# --- BAM attention experts (soft Mixture-of-Attention) -----------------------

BAM_GOLDEN = GOLDEN / "bam"
BAM_MODELS = ["llama", "llama_b", "llama_c"]
BAM_ROUTER_SEED = 4242
BAM_ROUTER_SCALE = 0.5
BAM_TOP_K = 2
BAM_VARIANTS = {
    # name -> (shared key/value projections, routing)
    "expert_kv_soft": (False, "soft"),
    "expert_kv_top2": (False, "top2"),
    "shared_kv_soft": (True, "soft"),
    "shared_kv_top2": (True, "top2"),
}
BAM_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
BAM_TOLERANCE = 1e-5
BAM_MIN_VARIANT_DIFF = 1e-3
# smallest allowed gap between a token's second and third router logit (top-2): the
# softmax is monotonic, so this gap decides the pick, far above float32 rounding
BAM_MIN_TOP2_MARGIN = 1e-3


def bam_config():
    """Shapes of the three BAM source models (asserted equal) from their config.json."""
    configs = [json.loads((MODELS / name / "config.json").read_text(encoding="utf-8"))
               for name in BAM_MODELS]
    keys = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "head_dim", "rms_norm_eps", "rope_parameters", "vocab_size", "intermediate_size",
            "tie_word_embeddings", "hidden_act")
    for config in configs[1:]:
        for key in keys:
            assert config[key] == configs[0][key], key
    config = configs[0]
    assert config["rope_parameters"]["rope_type"] == "default", config["rope_parameters"]
    assert config["hidden_act"] == "silu" and not config["tie_word_embeddings"]
    assert not config["attention_bias"] and not config["mlp_bias"]
    return config


def bam_rms_norm(x, weight, eps):
    """Llama's RMSNorm in float32: x * rsqrt(mean(x^2) + eps) * weight."""
    variance = x.pow(2).mean(-1, keepdim=True)
    return weight * (x * torch.rsqrt(variance + eps))


def bam_rope(n_tokens, head_dim, theta):
    """cos, sin [T, head_dim] of the default RoPE, halves repeated (rotate-half layout)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64)
                                .to(torch.float32) / head_dim))
    freqs = torch.arange(n_tokens, dtype=torch.float32)[:, None] * inv_freq[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def bam_rotate_half(x):
    """[-x2, x1] of the two halves of the last dimension."""
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def bam_attention(n, attn, config, cos, sin):
    """Causal grouped-query self-attention with RoPE of one expert; n [T, D] -> [T, D]."""
    n_tokens = n.shape[0]
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config["head_dim"]
    q = (n @ attn["q_proj"].T).view(n_tokens, heads, head_dim).transpose(0, 1)
    k = (n @ attn["k_proj"].T).view(n_tokens, kv_heads, head_dim).transpose(0, 1)
    v = (n @ attn["v_proj"].T).view(n_tokens, kv_heads, head_dim).transpose(0, 1)
    q = q * cos + bam_rotate_half(q) * sin
    k = k * cos + bam_rotate_half(k) * sin
    # query head h reads key/value head h // (heads / kv_heads)
    group = heads // kv_heads
    k = k.repeat_interleave(group, dim=0)
    v = v.repeat_interleave(group, dim=0)
    scores = (q @ k.transpose(1, 2)) / math.sqrt(head_dim)
    future = torch.ones(n_tokens, n_tokens, dtype=torch.bool).triu(1)
    scores = scores.masked_fill(future, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32)
    out = (probs @ v).transpose(0, 1).reshape(n_tokens, heads * head_dim)
    return out @ attn["o_proj"].T


def bam_routing(n, router, routing):
    """Per-token expert weights [T, E]: softmax(n R^T), all kept (soft) or top-2 renormalised.

    For top-2 also returns the picked experts [T, 2] and the smallest gap between
    a token's second and third router logit.
    """
    logits = n @ router.T
    p = torch.softmax(logits, dim=-1)
    if routing == "soft":
        return p, None, None
    assert routing == "top2", routing
    values, picked = torch.topk(p, BAM_TOP_K, dim=-1)
    weights = torch.zeros_like(p).scatter(-1, picked, values / values.sum(-1, keepdim=True))
    ranked = logits.sort(dim=-1, descending=True).values
    margin = float((ranked[:, BAM_TOP_K - 1] - ranked[:, BAM_TOP_K]).min())
    return weights, picked, margin


@torch.no_grad()
def bam_forward(dense, experts, routers, routing, config, ids):
    """Float32 logits [T, vocab] of the attention-expert model.

    dense: the non-attention tensors by transformers name; experts[l][e]: expert e's
    q/k/v/o_proj weights in layer l; routers[l]: [E, D]. routing is "soft", "top2"
    or "dense" (one expert, weight 1, no router). For "top2" also returns, per layer,
    how many tokens picked each expert and the smallest top-2 margin (see bam_routing).
    """
    eps = config["rms_norm_eps"]
    cos, sin = bam_rope(len(ids), config["head_dim"], config["rope_parameters"]["rope_theta"])
    x = dense["model.embed_tokens.weight"][torch.tensor(ids)]
    counts, margins = [], []
    for layer, layer_experts in enumerate(experts):
        pre = f"model.layers.{layer}."
        n = bam_rms_norm(x, dense[pre + "input_layernorm.weight"], eps)
        if routing == "dense":
            assert len(layer_experts) == 1
            a = bam_attention(n, layer_experts[0], config, cos, sin)
        else:
            weights, picked, margin = bam_routing(n, routers[layer], routing)
            a = torch.zeros_like(x)
            for e, attn in enumerate(layer_experts):
                a = a + weights[:, e, None] * bam_attention(n, attn, config, cos, sin)
            if picked is not None:
                counts.append(torch.bincount(picked.flatten(), minlength=len(layer_experts)).tolist())
                margins.append(margin)
        h = x + a
        m = bam_rms_norm(h, dense[pre + "post_attention_layernorm.weight"], eps)
        gate = m @ dense[pre + "mlp.gate_proj.weight"].T
        up = m @ dense[pre + "mlp.up_proj.weight"].T
        x = h + (torch.nn.functional.silu(gate) * up) @ dense[pre + "mlp.down_proj.weight"].T
    x = bam_rms_norm(x, dense["model.norm.weight"], eps)
    return x @ dense["lm_head.weight"].T, ((counts, margins) if routing == "top2" else None)


def bam_split(tensors, n_layers):
    """(non-attention tensors, per-layer attention projections) of one checkpoint."""
    attn = [{proj: tensors[f"model.layers.{layer}.self_attn.{proj}.weight"] for proj in BAM_ATTN}
            for layer in range(n_layers)]
    dense = {key: t for key, t in tensors.items() if ".self_attn." not in key}
    assert len(dense) + 4 * n_layers == len(tensors)
    return dense, attn


def bam_golden_logits(name):
    """The transformers logits of tests/golden/<name>/golden.json as a float32 tensor."""
    golden = json.loads((GOLDEN / name / "golden.json").read_text(encoding="utf-8"))
    assert golden["input_ids"] == INPUT_IDS
    return torch.tensor(golden["logits"], dtype=torch.float32)


def bam_max_diff(a, b):
    """Largest absolute difference of two tensors, as a float."""
    return float((a - b).abs().max())


def make_bam():
    """Write tests/golden/bam/: BAM attention experts over llama, llama_b and llama_c.

    Every layer's attention is a routed mixture of the three models' attentions
    (expert e = model e's q/k/v/o_proj); every other tensor is the float32 mean
    (a + b + c) / 3. Layer l: n = RMSNorm(x); p = softmax(n R_l^T); the weights are
    p (soft) or the two largest p renormalised (top2); x + sum_e w_e Attn_e(n), then
    the averaged MLP block; then the averaged final norm and lm_head. With shared
    key/values every expert uses the mean k_proj and v_proj and its own q/o_proj.
    R_l = 0.5 * randn([3, D]) from torch.Generator seed BAM_ROUTER_SEED, layer 0
    first, saved as routers.safetensors ("layers.{l}.attn.router", float32).
    golden.json holds the float32 logits of INPUT_IDS for the four BAM_VARIANTS and
    the per-layer top-2 pick counts of each expert (expert_kv_top2).
    """
    config = bam_config()
    n_layers, hidden = config["num_hidden_layers"], config["hidden_size"]
    tensors = [load_file(MODELS / name / "model.safetensors") for name in BAM_MODELS]
    for t in tensors:
        assert t.keys() == tensors[0].keys()
        assert all(v.dtype == torch.float32 for v in t.values())
    split = [bam_split(t, n_layers) for t in tensors]

    # The plain forward pass with one expert reproduces transformers on each source model.
    dense_diffs = {}
    for name, (dense, attn) in zip(BAM_MODELS, split):
        logits, _ = bam_forward(dense, [[a] for a in attn], None, "dense", config, INPUT_IDS)
        dense_diffs[name] = bam_max_diff(logits, bam_golden_logits(name))
    print(f"bam: dense plain-torch vs transformers goldens, max abs diff {dense_diffs}")
    assert max(dense_diffs.values()) <= BAM_TOLERANCE, dense_diffs

    generator = torch.Generator().manual_seed(BAM_ROUTER_SEED)
    routers = [BAM_ROUTER_SCALE * torch.randn(len(BAM_MODELS), hidden, generator=generator)
               for _ in range(n_layers)]

    # Three copies of model A's attention, A's own other tensors, soft routing: model A.
    dense_a, attn_a = split[0]
    logits, _ = bam_forward(dense_a, [[a] * len(BAM_MODELS) for a in attn_a], routers, "soft",
                            config, INPUT_IDS)
    copies_diff = bam_max_diff(logits, bam_golden_logits(BAM_MODELS[0]))
    print(f"bam: three copies of {BAM_MODELS[0]}'s attention, soft routing, vs its golden: "
          f"max abs diff {copies_diff:.3g}")
    assert copies_diff <= BAM_TOLERANCE, copies_diff

    mean = {key: (split[0][0][key] + split[1][0][key] + split[2][0][key]) / 3
            for key in split[0][0]}
    shared_kv = [{proj: (split[0][1][layer][proj] + split[1][1][layer][proj]
                         + split[2][1][layer][proj]) / 3 for proj in ("k_proj", "v_proj")}
                 for layer in range(n_layers)]
    results, counts = {}, None
    for variant, (shared, routing) in BAM_VARIANTS.items():
        experts = [[{**attn[layer], **(shared_kv[layer] if shared else {})} for _, attn in split]
                   for layer in range(n_layers)]
        logits, picks = bam_forward(mean, experts, routers, routing, config, INPUT_IDS)
        assert torch.isfinite(logits).all(), variant
        results[variant] = logits
        if routing == "top2":
            counts_of, margin = picks
            print(f"bam: {variant}: smallest top-2 margin per layer {margin}")
            assert min(margin) > BAM_MIN_TOP2_MARGIN, \
                f"{variant}: near-tie in the top-2 routing; change the router seed"
            if variant == "expert_kv_top2":
                counts = counts_of
    names = list(results)
    pair_diffs = {f"{a} vs {b}": bam_max_diff(results[a], results[b])
                  for i, a in enumerate(names) for b in names[i + 1:]}
    for pair, diff in pair_diffs.items():
        print(f"bam: {pair}: max abs diff {diff:.4g}")
    assert min(pair_diffs.values()) > BAM_MIN_VARIANT_DIFF, pair_diffs
    print(f"bam: expert_kv_top2 picks per layer (experts {BAM_MODELS}): {counts}")
    for layer_counts in counts:
        assert sum(layer_counts) == BAM_TOP_K * len(INPUT_IDS), layer_counts
        assert min(layer_counts) > 0, f"an expert is never picked: {counts}; change the router seed"

    BAM_GOLDEN.mkdir(parents=True, exist_ok=True)
    save_file({f"layers.{layer}.attn.router": r.contiguous() for layer, r in enumerate(routers)},
              str(BAM_GOLDEN / "routers.safetensors"), metadata={"format": "pt"})
    write_json(BAM_GOLDEN / "golden.json", {
        "models": BAM_MODELS,
        "input_ids": INPUT_IDS,
        "router_seed": BAM_ROUTER_SEED,
        "logits": {variant: [f32_list(row) for row in logits] for variant, logits in results.items()},
        "per_layer_top2_counts": counts,
    })
    print("wrote bam")


def make_tokenizer_golden(tokenizer):
    """Write sample texts and their ids; check they decode back to the text."""
    ids = [tokenizer.encode(text, add_special_tokens=False).ids for text in TOKENIZER_TEXTS]
    for text, row in zip(TOKENIZER_TEXTS, ids):
        assert tokenizer.decode(row) == text, (text, row)
    write_json(GOLDEN / "tokenizer.json", {"texts": TOKENIZER_TEXTS, "ids": ids})


def generate():
    """Write every fixture under tests/golden/."""
    tokenizer = build_tokenizer()
    make_tokenizer_golden(tokenizer)
    for name in SPECS:
        model_dir = save_model(name, tokenizer)
        make_golden(name, model_dir)
        if name == "mixtral":
            fused_dir, fused = save_mixtral_fused(model_dir, tokenizer)
            check_fused_matches(model_dir, fused_dir, fused)
            make_golden("mixtral_fused", fused_dir)
        make_model_extras(name, model_dir)
        print(f"wrote {name}")
    for out_name in MERGES:
        make_merge(out_name)
        print(f"wrote {out_name}")
    make_bam()


def sha256(path):
    """Hex sha256 of a file."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def weight_file_hashes(directory):
    """sha256 of an emitted directory's config.json and safetensors files, by name."""
    files = sorted(p for p in directory.iterdir()
                   if p.is_file() and (p.suffix == ".safetensors" or p.name == "config.json"))
    return {p.name: sha256(p) for p in files}


def check_emitted(directory, name):
    """Compare an emitted checkpoint against tests/golden/NAME; return the exit code."""
    directory = Path(directory)
    golden = json.loads((GOLDEN / name / "golden.json").read_text(encoding="utf-8"))
    model = load_model(directory)
    logits = forward_logits(model, golden["input_ids"])
    expected = torch.tensor(golden["logits"], dtype=torch.float32)
    diff = float((logits - expected).abs().max())
    report = {
        "name": name,
        "architecture": model.config.architectures[0],
        "max_abs_diff": diff,
        "files": weight_file_hashes(directory),
    }
    write_json(GOLDEN / "emitted" / f"{name}.json", report)
    ok = diff <= EMITTED_TOLERANCE
    print(f"{name}: max_abs_diff {diff:.3g} ({'ok' if ok else 'FAIL'})")
    return 0 if ok else 1


def record_emitted(directory, name):
    """Record transformers' logits and greedy ids for an upmix-made checkpoint."""
    directory = Path(directory)
    model = load_model(directory)
    logits = forward_logits(model, INPUT_IDS)
    report = {
        "name": name,
        "architecture": model.config.architectures[0],
        "input_ids": INPUT_IDS,
        "logits": [[float(v) for v in row] for row in logits],
        "prompt": PROMPT,
        "greedy": greedy(model, PROMPT, 16),
        "files": weight_file_hashes(directory),
    }
    write_json(GOLDEN / "emitted" / f"{name}.json", report)
    print(f"{name}: recorded {report['architecture']} logits and greedy ids")
    return 0


BAM_REMOTE_CODE = ("configuration_upmix_bam.py", "modeling_upmix_bam.py")
BAM_TRAIN_LR = 1e-3


def bam_routed_param(name):
    """Whether a parameter belongs to an expert or a router of a BAM model.

    Attention experts and FFN experts live under `.experts.`; the attention router
    is `self_attn.router`, the FFN router `mlp.gate`.
    """
    return "experts" in name or "router" in name or name.endswith(".mlp.gate.weight")


def f32_value(x):
    """A float32 scalar as the shortest decimal that round-trips (as f32_list)."""
    return float(str(np.float32(float(x))))


def record_bam(directory, name):
    """Record logits, one training step's loss and expert gradients of an upmix BAM checkpoint.

    Loads DIR through its own remote code in float32, computes the logits of
    INPUT_IDS, then takes one torch.optim.AdamW step (lr BAM_TRAIN_LR, all
    parameters) on the next-token loss with labels = INPUT_IDS. Asserts that the
    loss is finite, that every expert and router parameter got a nonzero
    gradient and that every parameter is still finite after the step. Writes
    tests/golden/emitted/NAME.json: the logits, the loss, the gradient norm of
    each expert and router parameter and the sha256 of the weights, config.json
    and the remote code files.
    """
    directory = Path(directory)
    model = AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True, dtype=torch.float32)
    model.eval()
    logits = forward_logits(model, INPUT_IDS)

    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=BAM_TRAIN_LR)
    ids = torch.tensor([INPUT_IDS])
    loss = model(input_ids=ids, labels=ids).loss
    assert torch.isfinite(loss), f"{name}: loss {float(loss)}"
    loss.backward()
    grad_norms = {}
    for param_name, param in model.named_parameters():
        if not bam_routed_param(param_name):
            continue
        assert param.grad is not None, f"{name}: {param_name} got no gradient"
        norm = float(param.grad.norm())
        assert norm > 0 and math.isfinite(norm), f"{name}: {param_name} gradient norm {norm}"
        grad_norms[param_name] = f32_value(norm)
    assert grad_norms, f"{name}: no expert or router parameters; not a BAM model"
    optimizer.step()
    for param_name, param in model.named_parameters():
        assert torch.isfinite(param).all(), f"{name}: {param_name} not finite after the step"

    files = weight_file_hashes(directory)
    for code in BAM_REMOTE_CODE:
        files[code] = sha256(directory / code)
    report = {
        "model": name,
        "input_ids": INPUT_IDS,
        "logits": [f32_list(row) for row in logits],
        "loss": f32_value(loss.detach()),
        "grad_norms": grad_norms,
        "files": files,
    }
    write_json(GOLDEN / "emitted" / f"{name}.json", report)
    print(f"{name}: recorded {model.config.architectures[0]} logits, loss {report['loss']:.6g} "
          f"and {len(grad_norms)} expert/router gradient norms")
    return 0


# --- GGUF block-quantization goldens -----------------------------------------

GGUF_GOLDEN = GOLDEN / "gguf"
GGUF_SEED = 20240611
GGUF_ROWS, GGUF_COLS = 4, 512
# ggml type name -> byte offsets of the f16 fields in one block, as (offset, low, high):
# each is written as a random f16 uniform in [low, high] (finite by construction).
GGUF_SCALE_FIELDS = {
    "Q8_0": [(0, -0.1, 0.1)],
    "Q4_0": [(0, -0.1, 0.1)],
    "Q4_1": [(0, -0.1, 0.1), (2, -0.1, 0.1)],
    "Q4_K": [(0, -0.1, 0.1), (2, 0.0, 0.1)],
    "Q5_K": [(0, -0.1, 0.1), (2, 0.0, 0.1)],
    "Q6_K": [(208, -0.1, 0.1)],
}
GGUF_TYPES = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K"]
SMOLLM2_GGUF = Path("/root/.cache/upmix/SmolLM2-135M-Instruct.Q4_1.gguf")
SMOLLM2_TENSORS = {
    "token_embd.weight": "Q8_0",
    "blk.0.attn_q.weight": "Q4_1",
    "blk.0.attn_k.weight": "Q4_1",
    "blk.0.ffn_down.weight": "Q4_1",
    "blk.29.ffn_gate.weight": "Q4_1",
    "blk.0.attn_norm.weight": "F32",
}


def f32_exact_list(values):
    """Floats of a float32 array as Python floats (repr round-trips the exact f32 value)."""
    return np.asarray(values, dtype=np.float32).astype(np.float64).ravel().tolist()


def exact_sum(values):
    """Correctly rounded f64 sum of the (f64-widened) values, independent of order."""
    import itertools
    flat = np.asarray(values, dtype=np.float64).ravel()
    chunks = (flat[i:i + (1 << 20)].tolist() for i in range(0, flat.size, 1 << 20))
    return math.fsum(itertools.chain.from_iterable(chunks))


def random_gguf_bytes(rng, qtype):
    """Random but valid raw bytes [GGUF_ROWS, row bytes] of one GGUF tensor type.

    Plain floats are standard normal values (bf16 by truncating f32 bits). For block
    types every byte is random except the f16 scale fields of GGUF_SCALE_FIELDS.
    """
    import gguf
    shape = (GGUF_ROWS, GGUF_COLS)
    if qtype == "F32":
        return rng.standard_normal(shape, dtype=np.float32).view(np.uint8)
    if qtype == "F16":
        return rng.standard_normal(shape, dtype=np.float32).astype(np.float16).view(np.uint8)
    if qtype == "BF16":
        bits = rng.standard_normal(shape, dtype=np.float32).view(np.uint32) >> 16
        return bits.astype(np.uint16).view(np.uint8)
    block_elems, block_bytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]]
    n_blocks = GGUF_ROWS * GGUF_COLS // block_elems
    blocks = rng.integers(0, 256, size=(n_blocks, block_bytes), dtype=np.uint8)
    for offset, low, high in GGUF_SCALE_FIELDS[qtype]:
        scale = rng.uniform(low, high, size=n_blocks).astype(np.float16)
        assert np.isfinite(scale).all()
        blocks[:, offset:offset + 2] = scale.view(np.uint8).reshape(n_blocks, 2)
    return blocks.reshape(GGUF_ROWS, -1)


def make_gguf_quant_goldens():
    """Write tests/golden/gguf/{quants.gguf, quants_expected.safetensors, blocks.json}.

    quants.gguf holds one [4, 512] tensor per type of GGUF_TYPES, named
    "quant.<type>" (lower case), with random valid block bytes, plus metadata
    of several value types. quants_expected.safetensors holds gguf-py's f32
    dequantization of each tensor (same names, shape [4, 512]); blocks.json one
    block per quantized type: its raw bytes (hex) and gguf-py's values.
    """
    import gguf
    from safetensors.numpy import save_file as save_numpy

    rng = np.random.default_rng(GGUF_SEED)
    GGUF_GOLDEN.mkdir(parents=True, exist_ok=True)
    path = GGUF_GOLDEN / "quants.gguf"
    raw = {f"quant.{t.lower()}": (t, random_gguf_bytes(rng, t)) for t in GGUF_TYPES}
    metadata = {
        "general.name": "upmix quant fixture",
        "upmix.fixture.u32": 4096,
        "upmix.fixture.f32": 0.125,
        "upmix.fixture.bool": True,
        "upmix.fixture.strings": ["alpha", "", "naïve ✓"],
        "upmix.fixture.i32s": [-3, 0, 7, 2147483647, -2147483648],
    }

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_string("general.name", metadata["general.name"])
    writer.add_uint32("upmix.fixture.u32", metadata["upmix.fixture.u32"])
    writer.add_float32("upmix.fixture.f32", metadata["upmix.fixture.f32"])
    writer.add_bool("upmix.fixture.bool", metadata["upmix.fixture.bool"])
    writer.add_array("upmix.fixture.strings", metadata["upmix.fixture.strings"])
    writer.add_array("upmix.fixture.i32s", metadata["upmix.fixture.i32s"])
    for name, (qtype, data) in raw.items():
        # For a uint8 tensor with raw_dtype, gguf-py reads raw_shape as a byte shape
        # and stores the element shape [4, 512] (GGUF order: ne = [512, 4]).
        writer.add_tensor(name, data, raw_shape=data.shape,
                          raw_dtype=gguf.GGMLQuantizationType[qtype])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    reader = gguf.GGUFReader(str(path))
    fields = reader.fields
    assert fields["general.architecture"].contents() == "llama"
    for key, value in metadata.items():
        assert fields[key].contents() == value, key
    assert fields["upmix.fixture.u32"].types == [gguf.GGUFValueType.UINT32]
    assert fields["upmix.fixture.i32s"].types == [gguf.GGUFValueType.ARRAY,
                                                  gguf.GGUFValueType.INT32]

    expected, blocks = {}, {}
    for tensor in reader.tensors:
        qtype, data = raw[tensor.name]
        assert tensor.tensor_type.name == qtype, tensor.name
        assert tensor.shape.tolist() == [GGUF_COLS, GGUF_ROWS], tensor.shape
        assert np.array_equal(np.asarray(tensor.data).view(np.uint8).reshape(data.shape), data)
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        values = np.ascontiguousarray(values, dtype=np.float32)
        assert values.shape == (GGUF_ROWS, GGUF_COLS), values.shape
        assert np.isfinite(values).all(), tensor.name
        expected[tensor.name] = values
        if qtype in GGUF_SCALE_FIELDS:
            block_elems, block_bytes = gguf.GGML_QUANT_SIZES[tensor.tensor_type]
            per_block = values.reshape(-1, block_elems)
            # The first block whose values take both signs (a stronger test of signs).
            index = next(i for i, v in enumerate(per_block) if v.min() < 0 < v.max())
            blocks[qtype] = {
                "tensor": tensor.name,
                "block": index,
                "hex": data.reshape(-1, block_bytes)[index].tobytes().hex(),
                "values": f32_exact_list(per_block[index]),
            }
    assert sorted(expected) == sorted(raw)
    save_numpy(expected, str(GGUF_GOLDEN / "quants_expected.safetensors"))
    write_json(GGUF_GOLDEN / "blocks.json", {
        "gguf_py_version": gguf_py_version(),
        "blocks": blocks,
    })


def gguf_py_version():
    """Installed gguf-py version string."""
    from importlib.metadata import version
    return version("gguf")


def make_smollm2_dequant_goldens(path=SMOLLM2_GGUF):
    """Write tests/golden/gguf/smollm2_dequant.json from a real Q4_1 GGUF, if present.

    For each tensor of SMOLLM2_TENSORS: gguf-py's dequantization in raw GGUF
    order (no un-permutation of q/k), shaped as numpy row-major [rows, cols]
    (GGUF dims reversed). Records the ggml type, shape, the first 64 values,
    row 7 cols 0..16 (null for 1-D tensors), and the correctly rounded f64 sum
    and sum of squares of all values (squares of f32 values are exact in f64).
    """
    import gguf
    path = Path(path)
    if not path.exists():
        print(f"skipped smollm2 dequant goldens: {path} not found")
        return
    reader = gguf.GGUFReader(str(path))
    by_name = {t.name: t for t in reader.tensors}
    tensors = {}
    for name, qtype in SMOLLM2_TENSORS.items():
        tensor = by_name[name]
        assert tensor.tensor_type.name == qtype, (name, tensor.tensor_type.name)
        values = np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type),
                            dtype=np.float32)
        shape = list(reversed(tensor.shape.tolist()))
        assert list(values.shape) == shape, (values.shape, shape)
        assert np.isfinite(values).all(), name
        wide = values.astype(np.float64)
        tensors[name] = {
            "type": qtype,
            "shape": shape,
            "first64": f32_exact_list(values.ravel()[:64]),
            "row7_cols0_16": f32_exact_list(values[7, :16]) if values.ndim == 2 else None,
            "sum": exact_sum(wide),
            "sum_sq": exact_sum(wide * wide),
        }
    write_json(GGUF_GOLDEN / "smollm2_dequant.json", {
        "file": path.name,
        "file_bytes": path.stat().st_size,
        "gguf_py_version": gguf_py_version(),
        "tensors": tensors,
    })


def generate_gguf():
    """Write every fixture under tests/golden/gguf/."""
    make_gguf_quant_goldens()
    print("wrote gguf quants")
    make_smollm2_dequant_goldens()
    print("wrote gguf smollm2 dequant")


# --- SmolLM2-135M-Instruct goldens (transformers reference) -------------------

SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_GOLDEN = GOLDEN / "smollm2"
SMOLLM2_TOP_K = 10
SMOLLM2_GREEDY_STEPS = 20
SMOLLM2_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Photosynthesis is the process by which green plants, algae and some bacteria use the "
    "energy of sunlight to turn water and carbon dioxide into glucose and oxygen, and it "
    "takes place mainly inside the chloroplasts of leaf cells, where",
]
SMOLLM2_PARAGRAPH = (
    "The Eiffel Tower was built in Paris between 1887 and 1889 as the entrance to the World's "
    "Fair that marked a century since the French Revolution. It was designed and put up by the "
    "engineering company of Gustave Eiffel. The tower is made of wrought iron held together by "
    "millions of rivets, and at about 300 metres it remained the tallest structure on Earth for "
    "four decades. Many artists and writers first attacked it as a useless and ugly eyesore. It "
    "was saved from being torn down because it proved valuable as a mast for radio antennas. "
    "Today it is one of the most visited monuments in the world, with around six million people "
    "going up it each year."
)
SMOLLM2_TOKENIZER_TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "In 2024 there were 1234567 visitors, up 3.5% from 2023.",
    "def add(a, b):\n    return a + b\n\nif x:\n\tprint(x)\t# tab\n",
    "Café naïve résumé — 東京タワー, 你好世界 😀🚀👍🏽",
    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
    "   leading and trailing spaces   ",
    "first line\n\n\nsecond line\n\n\n\nthird\n",
    "Don't stop! It's 9:30 a.m.; they'll say \"hello\" (maybe) <|endoftext|>",
]
SMOLLM2_CHAT = [{"role": "user", "content": "What is the capital of France?"}]


def upmix_model_cache():
    """The real-model cache directory, by the same rule as scripts/fetch-models.sh."""
    cache = os.environ.get("UPMIX_MODEL_CACHE")
    if not cache:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        cache = os.path.join(base, "upmix")
    return Path(cache)


def load_smollm2(cache):
    """Tokenizer and float32 model from the GGUF, through transformers' GGUF loader.

    dequantize=True keeps every weight a dense float32 tensor even where the
    optional `kernels` package would keep them packed, and eager attention
    matches load_model(), which the converter check compares against.
    """
    from transformers import AutoTokenizer, GgufConfig
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(cache, gguf_file=SMOLLM2_GGUF_NAME)
    model = AutoModelForCausalLM.from_pretrained(
        cache, gguf_file=SMOLLM2_GGUF_NAME, dtype=torch.float32, attn_implementation="eager",
        quantization_config=GgufConfig(dequantize=True))
    return tokenizer, model.eval()


def smollm2_ids(tokenizer, text):
    """Token ids of text with the tokenizer's own special-token rule (no BOS here)."""
    return tokenizer(text, add_special_tokens=True)["input_ids"]


@torch.no_grad()
def smollm2_greedy(model, ids):
    """SMOLLM2_GREEDY_STEPS argmax tokens, a full forward pass each (no cache, no EOS stop).

    Also returns the smallest gap between the two best logits over the steps.
    """
    seq, gaps = list(ids), []
    for _ in range(SMOLLM2_GREEDY_STEPS):
        last = forward_logits(model, seq)[-1]
        top = torch.topk(last, 2).values
        gaps.append(float(top[0] - top[1]))
        seq.append(int(torch.argmax(last)))
    return seq[len(ids):], min(gaps)


@torch.no_grad()
def smollm2_perplexity(model, ids):
    """exp of the mean negative log-likelihood of ids[1:], each given its prefix."""
    logits = forward_logits(model, ids)
    logp = torch.log_softmax(logits[:-1], dim=-1)
    nll = -logp.gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    mean = float(nll.to(torch.float64).mean())
    return math.exp(mean), mean


def smollm2_converter_check(gguf_path, model, prompt_ids):
    """Run scripts/gguf_to_hf.py and check its output against the GGUF-loaded model.

    The converted checkpoint must hold the very same tensors (exact) and give
    the very same logits on the prompts.
    """
    import subprocess
    import tempfile

    script = Path(__file__).resolve().parent / "gguf_to_hf.py"
    with tempfile.TemporaryDirectory(prefix="upmix-smollm2-") as tmp:
        out = Path(tmp) / "hf"
        subprocess.run([sys.executable, str(script), str(gguf_path), str(out)], check=True)
        converted = load_model(out)
        ours, theirs = model.state_dict(), converted.state_dict()
        assert sorted(ours) == sorted(theirs), set(ours) ^ set(theirs)
        for key, t in ours.items():
            assert t.dtype == theirs[key].dtype and torch.equal(t, theirs[key]), key
        diff = max(float((forward_logits(model, ids) - forward_logits(converted, ids)).abs().max())
                   for ids in prompt_ids)
    print(f"smollm2: converter state dict equal, max abs logit diff {diff}")
    assert diff == 0.0, diff
    return {"max_abs_logit_diff": diff, "state_dict_equal": True}


def make_smollm2_goldens():
    """Write tests/golden/smollm2/ from the real SmolLM2-135M-Instruct Q4_1 GGUF.

    Reference values are computed by transformers (GGUF loader, float32, eager):
    paragraph.txt (the perplexity text, no trailing newline), last_logits.safetensors
    (float32 [vocab] last-position logits of each prompt, "prompt0".."prompt2") and
    golden.json with, per prompt, its ids, the top SMOLLM2_TOP_K ids and logits at
    every position and SMOLLM2_GREEDY_STEPS greedy ids; the paragraph's perplexity
    ("tokens" is the number of scored tokens, len(ids) - 1); tokenizer samples; the
    chat template rendered for SMOLLM2_CHAT with its ids; and the check of
    scripts/gguf_to_hf.py against the GGUF-loaded model.
    """
    import time
    from safetensors.numpy import save_file as save_numpy

    start = time.monotonic()
    cache = upmix_model_cache()
    gguf_path = cache / SMOLLM2_GGUF_NAME
    if not gguf_path.exists():
        raise SystemExit(f"{gguf_path} not found; run scripts/fetch-models.sh first")
    tokenizer, model = load_smollm2(cache)

    prompts, last_logits, prompt_ids = [], {}, []
    for i, text in enumerate(SMOLLM2_PROMPTS):
        ids = smollm2_ids(tokenizer, text)
        logits = forward_logits(model, ids)
        values, top_ids = torch.topk(logits, SMOLLM2_TOP_K, dim=-1)
        new_ids, min_gap = smollm2_greedy(model, ids)
        prompts.append({
            "text": text,
            "ids": ids,
            "top_k": {"ids": top_ids.tolist(), "logits": [f32_list(row) for row in values]},
            "greedy": new_ids,
            "greedy_text": tokenizer.decode(new_ids),
            "greedy_min_gap": float(str(np.float32(min_gap))),
        })
        last_logits[f"prompt{i}"] = np.ascontiguousarray(logits[-1].numpy(), dtype=np.float32)
        prompt_ids.append(ids)
    assert len(prompt_ids[2]) >= 40, len(prompt_ids[2])

    para_ids = smollm2_ids(tokenizer, SMOLLM2_PARAGRAPH)
    ppl, mean_nll = smollm2_perplexity(model, para_ids)

    samples = []
    for text in SMOLLM2_TOKENIZER_TEXTS:
        ids = smollm2_ids(tokenizer, text)
        assert tokenizer.decode(ids) == text, (text, ids)
        samples.append({"text": text, "ids": ids})

    chat_text = tokenizer.apply_chat_template(SMOLLM2_CHAT, tokenize=False, add_generation_prompt=True)
    chat_ids = tokenizer.apply_chat_template(SMOLLM2_CHAT, tokenize=True, add_generation_prompt=True)
    if not isinstance(chat_ids, list):
        chat_ids = chat_ids["input_ids"]
    assert chat_ids == tokenizer(chat_text, add_special_tokens=False)["input_ids"]

    converter = smollm2_converter_check(gguf_path, model, prompt_ids)

    SMOLLM2_GOLDEN.mkdir(parents=True, exist_ok=True)
    (SMOLLM2_GOLDEN / "paragraph.txt").write_text(SMOLLM2_PARAGRAPH, encoding="utf-8")
    save_numpy(last_logits, str(SMOLLM2_GOLDEN / "last_logits.safetensors"))
    write_json(SMOLLM2_GOLDEN / "golden.json", {
        "model": {"file": SMOLLM2_GGUF_NAME, "bytes": gguf_path.stat().st_size,
                  "sha256": sha256(gguf_path)},
        "prompts": prompts,
        "perplexity": {"text_file": "paragraph.txt", "ids": para_ids, "ppl": ppl,
                       "mean_nll": mean_nll, "tokens": len(para_ids) - 1},
        "tokenizer": samples,
        "chat": {"messages": SMOLLM2_CHAT, "text": chat_text, "ids": chat_ids},
        "converter_check": converter,
    })
    print(f"wrote smollm2 (ppl {ppl:.4f} over {len(para_ids) - 1} tokens, "
          f"{time.monotonic() - start:.1f}s)")


SMOLLM2_HF = GOLDEN / "smollm2_hf"
SMOLLM2_CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You answer in one word."},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another one?"},
    ],
]
SMOLLM2_HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")


def smollm2_chats(tokenizer):
    """SMOLLM2_CHATS rendered by tokenizer.apply_chat_template, with a generation prompt."""
    return [{"messages": chat,
             "text": tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)}
            for chat in SMOLLM2_CHATS]


def make_smollm2_hf_files():
    """Write tests/golden/smollm2_hf/ (see the module doc)."""
    import tempfile

    tokenizer, model = load_smollm2(upmix_model_cache())
    if SMOLLM2_HF.exists():
        shutil.rmtree(SMOLLM2_HF)
    SMOLLM2_HF.mkdir(parents=True)
    with tempfile.TemporaryDirectory(prefix="upmix-smollm2-hf-") as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        saved = sorted(p.name for p in Path(tmp).iterdir())
        for name in saved:
            if name not in SMOLLM2_HF_WEIGHTS:
                src = Path(tmp) / name
                (shutil.copytree if src.is_dir() else shutil.copy)(src, SMOLLM2_HF / name)
    write_json(SMOLLM2_HF / "chat.json", {
        "saved_files": saved,
        "transformers": __import__("transformers").__version__,
        "chats": smollm2_chats(tokenizer),
    })
    print(f"wrote smollm2_hf: {', '.join(saved)}")


def check_smollm2_hf(directory):
    """Check an upmix-written SmolLM2 directory against tests/golden/smollm2_hf/."""
    from transformers import AutoConfig, AutoTokenizer

    directory = Path(directory)
    golden = json.loads((SMOLLM2_HF / "chat.json").read_text(encoding="utf-8"))
    for name in golden["saved_files"]:
        if name in SMOLLM2_HF_WEIGHTS or name == "config.json" or (SMOLLM2_HF / name).is_dir():
            continue
        ours, theirs = (directory / name).read_bytes(), (SMOLLM2_HF / name).read_bytes()
        assert ours == theirs, f"{name} differs"
    config = AutoConfig.from_pretrained(directory)
    base = json.loads((SMOLLM2_HF / "config.json").read_text(encoding="utf-8"))
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        assert getattr(config, key) == base[key], (key, getattr(config, key), base[key])
    tokenizer = AutoTokenizer.from_pretrained(directory)
    assert smollm2_chats(tokenizer) == golden["chats"]
    print(f"check-smollm2-hf: {directory}: files, token ids and chat template as transformers saved them")
    return 0


def make_smollm2_goldens_if_present():
    """make_smollm2_goldens() when the GGUF is in the model cache, else say it was skipped."""
    path = upmix_model_cache() / SMOLLM2_GGUF_NAME
    if not path.exists():
        print(f"skipped smollm2 goldens: {path} not found (run scripts/fetch-models.sh)")
        return
    make_smollm2_goldens()
    make_smollm2_hf_files()


def main(argv):
    """Command-line entry point."""
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    if len(argv) == 0:
        generate()
        generate_gguf()
        make_smollm2_goldens_if_present()
        return 0
    if argv == ["smollm2"]:
        make_smollm2_goldens()
        return 0
    if argv == ["smollm2-hf"]:
        make_smollm2_hf_files()
        return 0
    if len(argv) == 2 and argv[0] == "check-smollm2-hf":
        return check_smollm2_hf(argv[1])
    if argv == ["gguf"]:
        generate_gguf()
        return 0
    if len(argv) == 2 and argv[0] == "model":
        model_dir = save_model(argv[1], build_tokenizer())
        make_golden(argv[1], model_dir)
        make_model_extras(argv[1], model_dir)
        return 0
    if len(argv) == 2 and argv[0] == "merge":
        make_merge(argv[1])
        return 0
    if argv == ["bam"]:
        make_bam()
        return 0
    if len(argv) == 3 and argv[0] == "check-emitted":
        return check_emitted(argv[1], argv[2])
    if len(argv) == 3 and argv[0] == "record-emitted":
        return record_emitted(argv[1], argv[2])
    if len(argv) == 3 and argv[0] == "record-bam":
        return record_bam(argv[1], argv[2])
    print(__doc__, file=sys.stderr)
    print("usage: make_fixtures.py [gguf | model NAME | merge NAME | bam | smollm2 | smollm2-hf | check-smollm2-hf DIR | "
          "check-emitted DIR NAME | record-emitted DIR NAME | record-bam DIR NAME]",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
