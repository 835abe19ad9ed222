"""Golden router rows for `Upcycle`'s `Hidden` mode, made by mergekit-moe itself.

Runs mergekit-moe (gate_mode `hidden`, float32) on the example models in
examples/models: `seed` is the base model whose hidden states are read, `code`, `law`
and `math` are the experts. Reads the router matrices from the MoE that mergekit wrote
and stores them, with the prompts, in tests/golden/upcycle_hidden/router.json, which
tests/upcycle_hidden.rs compares with the rows upmix computes.

Two deliberate settings:
- mergekit loads the model for its hidden states in bfloat16. The golden needs float32
  hidden states to be comparable within 1e-4, so `from_pretrained` is made to load
  float32; everything else is mergekit's own code path.
- mergekit batches an expert's prompts with right padding and then reads the last
  position, which for a shorter prompt is a pad token. The prompts of one expert here all
  have the same token count (checked below), so every last position is a real token.

Usage: $VENV/bin/python scripts/make_router_golden.py   (venv: scripts/setup-fixture-env.sh)
"""

import json
import tempfile
from pathlib import Path

import torch
import transformers
from safetensors import safe_open

import mergekit.moe.router as router
from mergekit.scripts.moe import main as mergekit_moe

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "examples" / "models"
OUT = ROOT / "tests" / "golden" / "upcycle_hidden" / "router.json"

# Two prompts for one expert (averaging) and a negative prompt for another (subtraction).
PROMPTS = {
    "code": ["fn main() {"],
    "law": ["the terms of this License"],
    "math": ["347 + 58 = ", "900 - 123 = "],
}
NEGATIVE = {"law": ["0"]}


def equal_lengths(tokenizer, prompts):
    lengths = {len(tokenizer(tokenizer.bos_token + p, add_special_tokens=False).input_ids) for p in prompts}
    return len(lengths) == 1


def main():
    tokenizer = transformers.AutoTokenizer.from_pretrained(MODELS / "seed")
    for expert, ps in list(PROMPTS.items()) + list(NEGATIVE.items()):
        assert equal_lengths(tokenizer, ps), f"{expert}: prompts of different token lengths"

    original = transformers.AutoModelForCausalLM.from_pretrained

    def float32_from_pretrained(*args, **kwargs):
        kwargs.pop("torch_dtype", None)
        kwargs["dtype"] = torch.float32
        return original(*args, **kwargs)

    router.AutoModelForCausalLM.from_pretrained = float32_from_pretrained

    with tempfile.TemporaryDirectory() as work:
        config = {
            "base_model": str(MODELS / "seed"),
            "gate_mode": "hidden",
            "dtype": "float32",
            "experts_per_token": 2,
            "experts": [
                {
                    "source_model": str(MODELS / e),
                    "positive_prompts": PROMPTS[e],
                    **({"negative_prompts": NEGATIVE[e]} if e in NEGATIVE else {}),
                }
                for e in PROMPTS
            ],
        }
        path = Path(work) / "config.json"
        path.write_text(json.dumps(config))  # YAML is a superset of JSON
        out = Path(work) / "moe"
        mergekit_moe(
            [str(path), str(out), "--device", "cpu", "--quiet",
             "--i-understand-this-is-not-useful-without-training"],
            standalone_mode=False,
        )
        routers = {}
        for f in sorted(out.glob("*.safetensors")):
            with safe_open(f, "pt") as st:
                for name in st.keys():
                    parts = name.split(".")
                    if name.endswith(".gate.weight") and "layers" in parts:
                        layer = int(parts[parts.index("layers") + 1])
                        routers[layer] = st.get_tensor(name).float().tolist()
        arch = json.loads((out / "config.json").read_text())["architectures"][0]

    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({
        "tool": "mergekit-moe 0.1.5 (gate_mode hidden, float32 hidden states)",
        "architecture": arch,
        "base": "seed",
        "experts": list(PROMPTS),
        "prompts": PROMPTS,
        "negative_prompts": NEGATIVE,
        "routers": [routers[i] for i in sorted(routers)],
    }, indent=1) + "\n")
    print(f"wrote {OUT}: {len(routers)} layers")


if __name__ == "__main__":
    main()
