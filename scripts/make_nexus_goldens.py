#!/usr/bin/env python3
"""Golden logits and gradients for a Nexus projected MoE router, and a dense "branch" fixture.

Why: upmix's Nexus router (Gritsch et al. 2024, "Nexus: Specialization meets
Adaptability for Efficiently Training Mixture of Experts") replaces each MoE layer's
router matrix by a projection of fixed per-expert domain embeddings. upmix's forward is
checked against logits.safetensors within 1e-5 and its backward against
grads.safetensors within 1e-4, so every definition below is exact. The routing itself is
an explicit torch implementation written here, independent of transformers' MoE block
(which is only used to check it, see "Self-check").

Input: tests/golden/models/mixtral (MixtralForCausalLM stored in bfloat16, 2 layers,
hidden H = 64, intermediate I = 96, E = 4 experts, top-k with k = 2), written by
scripts/make_fixtures.py, loaded as make_train_goldens.load does: transformers in float32
(the bfloat16 values become their exact float32 values), the default attention
implementation (sdpa), eval() mode, autograd on for every parameter. CPU, one thread,
deterministic algorithms.

Batch: make_train_goldens.batch_tokens(): tokens = numpy.random.default_rng(0).integers(
0, 256, size=(2, 16)) as int64, one [2, 16] batch (no attention mask, no padding,
positions 0..15 in each row), one forward without a KV cache.

Router parameters (d = 16, h = 32, E = 4; everything float32): rng =
numpy.random.default_rng(17); for layer L = 0, then L = 1, in this order:
    D_L      = rng.standard_normal((4, 16))  * DOMAIN_SCALE   (domain embeddings, [E, d])
    gate_L   = rng.standard_normal((32, 16)) * GATE_SCALE     ([h, d])
    up_L     = rng.standard_normal((32, 16)) * UP_SCALE       ([h, d])
    down_L   = rng.standard_normal((64, 32)) * DOWN_SCALE     ([H, h])
each drawn in float64, multiplied by its scale in float64, then rounded to float32.
DOMAIN_SCALE = 1, GATE_SCALE = UP_SCALE = 1/sqrt(d) = 0.25 (so gate_L d_i and up_L d_i
have entries of about unit size), DOWN_SCALE = 1/h = 1/32 (chosen so that the router
logits z below have a standard deviation of order 1 on the batch, about 1.2 in layer 0
and 0.8 in layer 1: the block inputs are RMS-normed with the fixture's norm weights, so
1/sqrt(h) would give a standard deviation of about 7; the values are in nexus.json).

Model forward: transformers' MixtralForCausalLM with every layer's sparse MoE block
(model.model.layers[L].mlp) replaced by NexusMoeBlock below; everything else (embedding,
attention, RMSNorms, residuals, lm_head) is transformers'. The block's input x is the
output of the layer's post_attention_layernorm, flattened to [T, H], T = 2 * 16 = 32
token positions (row t = b * 16 + s). Per MoE layer L:

    R_L = linear(silu(linear(D_L, gate_L)) * linear(D_L, up_L), down_L)      [E, H]
          i.e. row i is e_i = down_L(silu(gate_L d_i) * up_L d_i),
          R_L = (silu(D_L gate_L^T) * (D_L up_L^T)) down_L^T
    z   = x R_L^T                                      router logits, [T, E]
    p   = softmax(z, -1)                               (float32)
    top-k: (v, idx) = torch.topk(p, k = 2, -1); w = v / v.sum(-1)   (renormalised)
    out[t] = sum_{j < k} w[t, j] * w2_e(silu(w1_e x_t) * w3_e x_t),  e = idx[t, j]

exactly Mixtral's routing with R_L in place of the router matrix. w1_e, w3_e [I, H] and
w2_e [H, I] are the fixture's expert weights (see "Tensor names"); the original router
weights (block_sparse_moe.gate.weight) are not used and get no gradient. The four router
tensors are nn.Parameters of the block (autograd on).

Self-check (asserted): NexusMoeBlock with R_L replaced by the fixture's own router
matrix (mlp.gate.weight) gives transformers' own MoE block output (MixtralSparseMoeBlock,
its default experts implementation, "grouped_mm" in 5.23) within SELF_CHECK_TOL = 1e-6
SELF_CHECK_LOGITS_TOL = 1e-5
max abs for each layer's block input on the batch (recorded by forward hooks on the
unpatched model), and the model patched that way gives the unpatched model's logits
within SELF_CHECK_LOGITS_TOL = 1e-5 (the block's few-ulp summation-order differences,
~6e-7 on outputs of size ~2, grow to ~1.5e-6 through layer 1 and lm_head; transformers'
"eager" experts give the same differences). The measured values are in nexus.json.

Losses (natural log; float32), exactly make_train_goldens' mixtral definitions applied to
the projected router logits z of each layer (its forward_losses is run on the patched
model, the z recorded by the blocks given to it as the router logits):

* ce = mean over all 2 * 15 positions (b, s), s < 15, of the cross-entropy of
  logits[b, s] against tokens[b, s + 1].
* Per layer: p = softmax(z, -1); P_i = mean over t of p[t, i]; f_i = (number of
  (t, slot) pairs whose top-k index is i) / (T * k), a constant (no gradient);
  lb_L = E * sum_i f_i * P_i; z_L = mean over t of logsumexp(z[t])^2.
* load_balance = mean over layers of lb_L; z_loss = mean over layers of z_L.
* loss = ce + 0.01 * load_balance + 0.001 * z_loss.

Near-ties: the smallest gap between the k-th and (k+1)-th largest router logit of any
token in any layer ("min_topk_gap") is asserted > MIN_TOPK_GAP = 1e-4, so float rounding
elsewhere cannot change which experts a token is sent to.

Tensor names: the fixture checkpoint's (model.safetensors), as make_train_goldens.
to_checkpoint_names splits transformers' fused experts: block_sparse_moe.experts.e.w1.
weight = gate_up_proj[e, :I], w3 = gate_up_proj[e, I:], w2 = down_proj[e]. The router
parameters are model.layers.L.mlp.router.domains [4, 16],
model.layers.L.mlp.router.gate_proj.weight [32, 16], ...router.up_proj.weight [32, 16]
and ...router.down_proj.weight [64, 32].

Written to tests/golden/nexus/ (float32 safetensors):

* router.safetensors: the 8 router tensors above.
* logits.safetensors: "logits" [2, 16, 256], the patched model's forward on the batch.
* grads.safetensors: d loss / d parameter, one backward, for every parameter with a
  gradient: every fixture checkpoint tensor except the unused routers
  model.layers.L.block_sparse_moe.gate.weight (omitted), plus the 8 router tensors.
  An expert no token chose in a layer gets all-zero gradients (listed in nexus.json as
  "unrouted_experts", [layer, expert] pairs).
* nexus.json: the versions, the batch, the constants, loss / ce / load_balance / z_loss,
  min_topk_gap, the top-k expert counts per layer, the router logit statistics per
  layer, the self-check differences, the tensor names, and the branch fixture's recipe.

Second output, tests/golden/models/mixtral_branch: a dense LlamaForCausalLM "branch" of
the mixtral, as if its first expert had been trained further on a new domain: the
mixtral's settings (hidden 64, intermediate 96, 4 attention heads, 2 key/value heads,
head_dim 16, 2 layers, vocab 256, max_position_embeddings 128, rope_parameters
{rope_type: default, rope_theta: 1e6}, rms_norm_eps 1e-5, bos 1, eos 2,
tie_word_embeddings false, no attention or MLP bias, no sliding window), stored in
float32. embed_tokens, every attention projection (q/k/v/o_proj), every RMSNorm
(input_layernorm, post_attention_layernorm, model.norm) and lm_head are the mixtral's
values exactly (bfloat16 -> float32 is exact; asserted bit-equal after reloading the
saved model). Each layer L's MLP is the mixtral's expert 0 of layer L plus noise:
rng = numpy.random.default_rng(23); for L = 0, then L = 1, in the order gate_proj
(from w1, [96, 64]), up_proj (from w3, [96, 64]), down_proj (from w2, [64, 96]):
    weight = w + (rng.standard_normal(shape) * 0.02).astype(float32)    (float32 add)
Written with save_pretrained (config.json, model.safetensors), with tokenizer.json and
generation_config.json copied from tests/golden/models/mixtral.

It is deterministic (same bytes on every run with the pinned environment).

Usage: scripts/setup-fixture-env.sh && .venv-fixtures/bin/python scripts/make_nexus_goldens.py
"""

import hashlib
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import transformers
from safetensors import safe_open
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

# scripts/ is the import path of a script run there
from make_fixtures import write_json
from make_train_goldens import (LB_COEF, MIN_TOPK_GAP, ROUTER_SUFFIX, Z_COEF, batch_tokens,
                                checkpoint_tensors, forward_losses, load, save, setup,
                                to_checkpoint_names, values)

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "tests" / "golden" / "models"
OUT = ROOT / "tests" / "golden" / "nexus"
SOURCE = "mixtral"
BRANCH = "mixtral_branch"

ROUTER_SEED = 17
DOMAIN_DIM = 16  # d
PROJ_DIM = 32  # h
DOMAIN_SCALE = 1.0
GATE_SCALE = 1.0 / DOMAIN_DIM ** 0.5
UP_SCALE = 1.0 / DOMAIN_DIM ** 0.5
DOWN_SCALE = 1.0 / PROJ_DIM
SELF_CHECK_TOL = 1e-6
SELF_CHECK_LOGITS_TOL = 1e-5

BRANCH_SEED = 23
BRANCH_EXPERT = 0
BRANCH_NOISE_STD = 0.02
# Llama MLP name <- Mixtral expert name, in the order the noise is drawn
BRANCH_MLP = (("gate_proj", "w1"), ("up_proj", "w3"), ("down_proj", "w2"))


def router_name(layer, part):
    """Checkpoint-style name of one Nexus router tensor."""
    return f"model.layers.{layer}.mlp.router.{part}"


ROUTER_PARTS = ("domains", "gate_proj.weight", "up_proj.weight", "down_proj.weight")


def draw_routers(num_layers, num_experts, hidden):
    """{router name: float32 tensor}, drawn in the documented order."""
    rng = np.random.default_rng(ROUTER_SEED)
    shapes = dict(zip(ROUTER_PARTS, [(num_experts, DOMAIN_DIM), (PROJ_DIM, DOMAIN_DIM),
                                     (PROJ_DIM, DOMAIN_DIM), (hidden, PROJ_DIM)]))
    scales = dict(zip(ROUTER_PARTS, [DOMAIN_SCALE, GATE_SCALE, UP_SCALE, DOWN_SCALE]))
    out = {}
    for layer in range(num_layers):
        for part in ROUTER_PARTS:
            a = (rng.standard_normal(shapes[part]) * scales[part]).astype(np.float32)
            out[router_name(layer, part)] = torch.from_numpy(a)
    return out


class NexusRouter(nn.Module):
    """Domain embeddings D [E, d] and the SwiGLU projection d -> h -> hidden."""

    def __init__(self, domains, gate, up, down):
        super().__init__()
        self.domains = nn.Parameter(domains.clone())
        self.gate_proj = nn.Linear(gate.shape[1], gate.shape[0], bias=False)
        self.up_proj = nn.Linear(up.shape[1], up.shape[0], bias=False)
        self.down_proj = nn.Linear(down.shape[1], down.shape[0], bias=False)
        self.gate_proj.weight = nn.Parameter(gate.clone())
        self.up_proj.weight = nn.Parameter(up.clone())
        self.down_proj.weight = nn.Parameter(down.clone())

    def forward(self):
        """The router matrix R [E, hidden]: row i = down(silu(gate d_i) * up d_i)."""
        d = self.domains
        return F.linear(F.silu(F.linear(d, self.gate_proj.weight))
                        * F.linear(d, self.up_proj.weight), self.down_proj.weight)


class NexusMoeBlock(nn.Module):
    """Mixtral routing with router matrix R (from a NexusRouter, or a fixed tensor).

    Holds transformers' MixtralExperts module (fused gate_up_proj [E, 2I, H], gate rows
    first, and down_proj [E, H, I]) only for its parameters; the experts are computed
    here, per token and slot, from the gathered weights.
    """

    def __init__(self, experts, top_k, router=None, fixed_router=None):
        super().__init__()
        assert (router is None) != (fixed_router is None)
        self.experts = experts
        self.top_k = top_k
        if router is not None:
            self.router = router
        self.fixed_router = fixed_router
        self.last_z = None

    def route(self, x):
        """(z [T, E], renormalised top-k weights [T, k], top-k expert indices [T, k])."""
        r = self.router() if self.fixed_router is None else self.fixed_router
        z = F.linear(x, r)
        p = torch.softmax(z.to(torch.float32), dim=-1)
        top_p, idx = torch.topk(p, self.top_k, dim=-1)
        return z, top_p / top_p.sum(dim=-1, keepdim=True), idx

    def forward(self, hidden_states):
        b, s, hidden = hidden_states.shape
        x = hidden_states.reshape(-1, hidden)
        z, w, idx = self.route(x)
        inter = self.experts.down_proj.shape[-1]
        gate_up = self.experts.gate_up_proj[idx]  # [T, k, 2I, H]
        w1, w3 = gate_up[:, :, :inter], gate_up[:, :, inter:]
        w2 = self.experts.down_proj[idx]  # [T, k, H, I]
        mid = F.silu(torch.einsum("tkih,th->tki", w1, x)) * torch.einsum("tkih,th->tki", w3, x)
        y = torch.einsum("tkhi,tki->tkh", w2, mid)  # each chosen expert's SwiGLU output
        out = (w.unsqueeze(-1).to(y.dtype) * y).sum(dim=1)
        self.last_z = z
        return out.reshape(b, s, hidden)


def patch(model, routers=None, original=False):
    """Replace every layer's MoE block by a NexusMoeBlock; returns the Nexus routers."""
    k = model.config.num_experts_per_tok
    made = {}
    for layer, block in enumerate(model.model.layers):
        old = block.mlp
        if original:
            block.mlp = NexusMoeBlock(old.experts, k, fixed_router=old.gate.weight.detach())
        else:
            r = NexusRouter(*(routers[router_name(layer, p)] for p in ROUTER_PARTS))
            block.mlp = NexusMoeBlock(old.experts, k, router=r)
            made[layer] = r
    return made


class RecordedRouterLogits:
    """The patched model as make_train_goldens.forward_losses expects it: router_logits
    are the z each NexusMoeBlock recorded (transformers records none for them)."""

    def __init__(self, model):
        self.model = model
        self.config = model.config
        self.logits = None

    def __call__(self, input_ids, output_router_logits, use_cache):
        assert output_router_logits and not use_cache
        out = self.model(input_ids=input_ids, output_router_logits=False, use_cache=False)
        self.logits = out.logits
        zs = tuple(layer.mlp.last_z for layer in self.model.model.layers)
        return types.SimpleNamespace(logits=out.logits, router_logits=zs)


@torch.no_grad()
def self_check(tokens):
    """Max abs differences (per layer block outputs, final logits) vs. transformers' MoE."""
    model = load(SOURCE)
    inputs, outputs = [], []

    def record(_module, args, out):  # returns None: the output is kept
        inputs.append(args[0].clone())
        outputs.append(out.clone())

    hooks = [layer.mlp.register_forward_hook(record) for layer in model.model.layers]
    ref_logits = model(input_ids=tokens, use_cache=False).logits
    for h in hooks:
        h.remove()
    originals = [layer.mlp for layer in model.model.layers]
    patch(model, original=True)
    block_diffs = []
    for layer, (x, y) in enumerate(zip(inputs, outputs)):
        assert isinstance(originals[layer], transformers.models.mixtral.modeling_mixtral
                          .MixtralSparseMoeBlock)
        mine = model.model.layers[layer].mlp(x)
        block_diffs.append(float((mine - y).abs().max()))
    logits = model(input_ids=tokens, use_cache=False).logits
    logit_diff = float((logits - ref_logits).abs().max())
    print(f"self-check: block max abs diffs {block_diffs}, logits max abs diff {logit_diff}")
    assert max(block_diffs) <= SELF_CHECK_TOL, block_diffs
    assert logit_diff <= SELF_CHECK_LOGITS_TOL, logit_diff
    return dict(block_output_max_abs_diff=block_diffs, block_tolerance=SELF_CHECK_TOL,
                logits_max_abs_diff=logit_diff, logits_tolerance=SELF_CHECK_LOGITS_TOL)


def make_nexus(tokens, report):
    """The tests/golden/nexus outputs; their entries into report."""
    stored = checkpoint_tensors(SOURCE)
    model = load(SOURCE)
    cfg = model.config
    num_layers, num_experts, k = (cfg.num_hidden_layers, cfg.num_local_experts,
                                  cfg.num_experts_per_tok)
    experts_implementation = cfg._experts_implementation
    routers = draw_routers(num_layers, num_experts, cfg.hidden_size)
    made = patch(model, routers)
    for layer, r in made.items():  # the block owns the drawn values
        for part in ROUTER_PARTS:
            assert torch.equal(dict(r.named_parameters())[part], routers[router_name(layer, part)])

    wrapped = RecordedRouterLogits(model)
    model.zero_grad()
    loss, ce, lb, z_loss, gap, counts = forward_losses(wrapped, tokens, True)
    zs = [layer.mlp.last_z.detach() for layer in model.model.layers]
    logits = wrapped.logits.detach()
    assert logits.shape == (2, 16, cfg.vocab_size) and logits.dtype == torch.float32
    loss.backward()
    print(f"nexus: {values(loss, ce, lb, z_loss)} min_topk_gap {gap} counts {counts}")
    assert gap > MIN_TOPK_GAP, f"near-tie in routing: {gap}"

    named = dict(model.named_parameters())
    grads, router_grads = {}, {}
    for n, p in named.items():
        assert p.grad is not None, f"no gradient for {n}"
        assert torch.isfinite(p.grad).all(), n
        (router_grads if ".mlp.router." in n else grads)[n] = p.grad
    assert sorted(router_grads) == sorted(routers), sorted(router_grads)
    grads = to_checkpoint_names(grads, cfg.intermediate_size)
    expected = sorted(n for n in stored if not n.endswith(ROUTER_SUFFIX))
    assert sorted(grads) == expected, (sorted(grads), expected)
    # the experts the blocks used are the checkpoint's
    params = to_checkpoint_names({n: p for n, p in named.items() if ".mlp.router." not in n},
                                 cfg.intermediate_size)
    for n, v in params.items():
        assert torch.equal(v, stored[n]), f"{n}: loaded values differ from the checkpoint"
    unrouted = []
    for layer in range(num_layers):
        for e in range(num_experts):
            names = [f"model.layers.{layer}.block_sparse_moe.experts.{e}.{w}.weight"
                     for w in ("w1", "w2", "w3")]
            zero = [not torch.any(grads[n] != 0) for n in names]
            assert all(zero) == (counts[layer][e] == 0) and len(set(zero)) == 1, (layer, e)
            if counts[layer][e] == 0:
                unrouted.append([layer, e])
    for n, g in router_grads.items():
        assert torch.any(g != 0), f"router gradient {n} is zero"
    grads.update(router_grads)

    OUT.mkdir(parents=True, exist_ok=True)
    save(OUT / "router.safetensors", routers)
    save(OUT / "logits.safetensors", {"logits": logits})
    save(OUT / "grads.safetensors", grads)

    report.update(values(loss, ce, lb, z_loss))
    report.update(
        loss_formula=f"ce + {LB_COEF} * load_balance + {Z_COEF} * z_loss",
        min_topk_gap=gap,
        min_topk_gap_threshold=MIN_TOPK_GAP,
        topk_counts=counts,
        unrouted_experts=unrouted,
        router_logits=[dict(std=float(z.std()), mean=float(z.mean()),
                            abs_max=float(z.abs().max())) for z in zs],
        num_experts=num_experts,
        top_k=k,
        attn_implementation=cfg._attn_implementation,
        experts_implementation_of_self_check=experts_implementation,
        router_names=sorted(routers),
        grad_names=sorted(grads),
        omitted_unused_routers=sorted(n for n in stored if n.endswith(ROUTER_SUFFIX)),
    )


def make_branch(report):
    """tests/golden/models/mixtral_branch; its recipe into report."""
    src = MODELS / SOURCE
    stored = checkpoint_tensors(SOURCE)
    mcfg = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).config
    config = LlamaConfig(
        hidden_size=mcfg.hidden_size,
        intermediate_size=mcfg.intermediate_size,
        num_attention_heads=mcfg.num_attention_heads,
        num_key_value_heads=mcfg.num_key_value_heads,
        num_hidden_layers=mcfg.num_hidden_layers,
        vocab_size=mcfg.vocab_size,
        max_position_embeddings=mcfg.max_position_embeddings,
        rms_norm_eps=mcfg.rms_norm_eps,
        rope_parameters=dict(mcfg.rope_parameters),
        bos_token_id=mcfg.bos_token_id,
        eos_token_id=mcfg.eos_token_id,
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
    )
    assert config.rope_parameters == dict(rope_type="default", rope_theta=1e6), \
        config.rope_parameters
    assert config.head_dim == mcfg.hidden_size // mcfg.num_attention_heads == 16
    torch.manual_seed(0)  # every tensor is overwritten below; this only fixes the init
    model = LlamaForCausalLM(config).eval()

    rng = np.random.default_rng(BRANCH_SEED)
    state, mlp_names = {}, []
    for layer in range(config.num_hidden_layers):
        for llama, mixtral in BRANCH_MLP:
            w = stored[f"model.layers.{layer}.block_sparse_moe.experts.{BRANCH_EXPERT}."
                       f"{mixtral}.weight"]
            noise = (rng.standard_normal(tuple(w.shape)) * BRANCH_NOISE_STD).astype(np.float32)
            name = f"model.layers.{layer}.mlp.{llama}.weight"
            state[name] = w + torch.from_numpy(noise)
            mlp_names.append(name)
    shared = {n: v for n, v in stored.items() if "block_sparse_moe" not in n}
    state.update(shared)
    assert sorted(state) == sorted(model.state_dict()), (sorted(state),
                                                         sorted(model.state_dict()))
    model.load_state_dict(state, strict=True)
    model.config.dtype = torch.float32

    out = MODELS / BRANCH
    if out.exists():
        shutil.rmtree(out)
    model.save_pretrained(out, max_shard_size="10GB")
    for f in ("tokenizer.json", "generation_config.json"):
        shutil.copyfile(src / f, out / f)
    files = sorted(p.name for p in out.glob("*.safetensors"))
    assert files == ["model.safetensors"], files

    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert type(reloaded).__name__ == "LlamaForCausalLM"
    got = dict(reloaded.named_parameters())
    assert sorted(got) == sorted(state)
    for n, v in shared.items():
        assert torch.equal(got[n], v), f"branch {n} differs from the mixtral"
    for n in mlp_names:
        assert torch.equal(got[n], state[n]), n
    with safe_open(out / "model.safetensors", "pt") as f:
        assert all(f.get_tensor(n).dtype == torch.float32 for n in f.keys())
    report.update(
        path=str(out.relative_to(ROOT)),
        architecture="LlamaForCausalLM",
        source=SOURCE,
        expert=BRANCH_EXPERT,
        noise_seed=BRANCH_SEED,
        noise_std=BRANCH_NOISE_STD,
        mlp_from_expert={llama: mixtral for llama, mixtral in BRANCH_MLP},
        shared_names=sorted(shared),
        mlp_names=mlp_names,
        model_safetensors_sha256=hashlib.sha256(
            (out / "model.safetensors").read_bytes()).hexdigest(),
    )


def main():
    versions = setup()
    tokens_np = batch_tokens()
    tokens = torch.from_numpy(tokens_np)
    report = dict(versions=versions, model=SOURCE, tokens=tokens_np.tolist())
    report["constants"] = dict(
        router_seed=ROUTER_SEED, domain_dim=DOMAIN_DIM, proj_dim=PROJ_DIM,
        domain_scale=DOMAIN_SCALE, gate_scale=GATE_SCALE, up_scale=UP_SCALE,
        down_scale=DOWN_SCALE, load_balance_coef=LB_COEF, z_loss_coef=Z_COEF,
        draw_order=[f"layer L: {p}" for p in ROUTER_PARTS])
    report["self_check"] = self_check(tokens)
    nexus = {}
    make_nexus(tokens, nexus)
    report.update(nexus)
    branch = {}
    make_branch(branch)
    report["branch"] = branch
    write_json(OUT / "nexus.json", report)
    for path in sorted(list(OUT.iterdir()) + list((MODELS / BRANCH).iterdir())):
        print(f"{path.relative_to(ROOT)}: {path.stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
