"""PyTorch model of an upmix BAM checkpoint: attention experts and FFN experts (their
router possibly a Nexus projection of domain embeddings).

Written by upmix next to the weights it emits (with configuration_upmix_bam.py), for

    AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True)

What it computes, for token ids -> logits:

    x = embed_tokens[ids]
    every layer:
        n = RMSNorm_in(x)
        a = attention(n)                       plain, or a routed mixture of experts
        parallel_blocks false:  h = x + a;  x = h + ffn(RMSNorm_post(h))
        parallel_blocks true:   x = (x + a) + ffn(n)
    logits = lm_head(RMSNorm_final(x))

Attention (each expert alike): q, k, v = n Wq^T, n Wk^T, n Wv^T split into heads; the
default rotary embedding (rotate-half layout, inv_freq = 1 / theta^(2i/head_dim) in
float32); query head h reads key/value head h // (H / KV); causal softmax(q k^T /
sqrt(head_dim)) in float32, padding keys of attention_mask excluded; then o_proj.
With attention_experts = E >= 1 the attention is sum_e w_e * Attn_e(n), where the
per-token weights w come from softmax(n R^T) over the E experts (float32), of which
the attention_top_k largest are kept (renormalised to sum 1 if attention_normalize)
and the rest are 0. With shared_kv the experts share one k_proj and v_proj; each
has its own q_proj and o_proj. Every expert attends over every token (its keys and
values are needed at all positions); a token's unpicked experts get weight 0.

FFN: SwiGLU, down(silu(gate x) * up x). With num_experts = E >= 1 it is a mixture
of E SwiGLU experts routed the same way (num_experts_per_tok, norm_topk_prob) by
router rows R from the FFN's input; each expert only runs on the tokens that picked it.
R is mlp.gate's weight, or with router_embed_size > 0 (Nexus) the projection of the
domain embeddings D = mlp.router.domains [E, d] computed on every call,
R = down(silu(D gate^T) * (D up^T)) with mlp.router.projection's weights. With
shared_expert_intermediate_size > 0 the output adds sigmoid(x . w) * shared_expert(x),
w = mlp.shared_expert_gate's weight (Qwen2-MoE's shared expert).

RMSNorm is Llama's: x * rsqrt(mean(x^2) + eps) computed in float32, times weight.

There is no key/value cache: `use_cache` is ignored, `past_key_values` is always
None, and `generate()` reruns the whole sequence at every step.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .configuration_upmix_bam import UpmixBamConfig


class UpmixBamRMSNorm(nn.Module):
    """Llama's RMSNorm: normalised in float32, cast back, times the weight."""

    def __init__(self, hidden_size, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x):
        dtype = x.dtype
        x = x.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rotary_cos_sin(position_ids, head_dim, theta, dtype):
    """cos, sin [B, T, head_dim] of the default RoPE at position_ids [B, T].

    The frequencies are computed in float32 and repeated over both halves of the
    head (the rotate-half layout).
    """
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=position_ids.device)
    inv_freq = 1.0 / (theta ** (exponents.to(torch.float32) / head_dim))
    angles = position_ids.to(torch.float32)[..., None] * inv_freq
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate_half(x):
    """[-x2, x1] for the halves x1, x2 of the last dimension."""
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def apply_rotary(x, cos, sin):
    """RoPE on x [B, heads, T, head_dim] with cos, sin [B, T, head_dim]."""
    cos, sin = cos[:, None], sin[:, None]
    return x * cos + rotate_half(x) * sin


def split_heads(x, num_heads, head_dim):
    """[B, T, heads * head_dim] -> [B, heads, T, head_dim]."""
    batch, length, _ = x.shape
    return x.view(batch, length, num_heads, head_dim).transpose(1, 2)


def route(x, router_weight, top_k, normalize):
    """Per-token expert weights [..., E] (float32) and which experts run [..., E] (bool).

    p = softmax(x R^T) over all E experts, in float32. The top_k largest p are kept
    (ties: lowest index first, as torch.topk), renormalised to sum 1 if normalize;
    the other experts get weight 0.
    """
    logits = F.linear(x.to(torch.float32), router_weight.to(torch.float32))
    probs = torch.softmax(logits, dim=-1)
    num_experts = probs.shape[-1]
    if top_k >= num_experts:
        picked = torch.ones_like(probs, dtype=torch.bool)
        weights = probs
    else:
        values, indices = torch.topk(probs, top_k, dim=-1)
        picked = torch.zeros_like(probs, dtype=torch.bool).scatter(-1, indices, True)
        weights = torch.zeros_like(probs).scatter(-1, indices, values)
    if normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, picked


class UpmixBamAttention(nn.Module):
    """Grouped-query self-attention with RoPE: the plain attention, or one attention expert.

    An expert of a mixture with shared key/value projections has no k_proj and
    v_proj of its own and is given the shared keys and values.
    """

    def __init__(self, config, own_kv=True):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        hidden = config.hidden_size
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=False)
        if own_kv:
            self.k_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=False)
            self.v_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=False)

    def forward(self, n, cos, sin, mask, key_values=None):
        """n [B, T, D] -> [B, T, D]; key_values: the shared (k, v) from keys_values()."""
        if key_values is None:
            key_values = keys_values(self.k_proj, self.v_proj, n, cos, sin, self.num_kv_heads, self.head_dim)
        k, v = key_values
        q = apply_rotary(split_heads(self.q_proj(n), self.num_heads, self.head_dim), cos, sin)
        return self.o_proj(attend(q, k, v, mask))


def keys_values(k_proj, v_proj, n, cos, sin, num_kv_heads, head_dim):
    """Keys (with RoPE) and values [B, KV, T, head_dim] of n [B, T, D]."""
    k = apply_rotary(split_heads(k_proj(n), num_kv_heads, head_dim), cos, sin)
    v = split_heads(v_proj(n), num_kv_heads, head_dim)
    return k, v


def attend(q, k, v, mask):
    """softmax(q k^T / sqrt(head_dim)) v over the allowed keys; returns [B, T, H * head_dim].

    q [B, H, T, hd]; k, v [B, KV, T, hd], query head h reading key/value head
    h // (H / KV); mask [B, 1, T, T] bool, True where a query may see a key.
    """
    batch, num_heads, length, head_dim = q.shape
    group = num_heads // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scores = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(head_dim)
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    out = torch.matmul(probs, v)
    return out.transpose(1, 2).reshape(batch, length, num_heads * head_dim)


class UpmixBamAttentionMixture(nn.Module):
    """A routed mixture of attention experts: sum_e w_e * Attn_e(n)."""

    def __init__(self, config):
        super().__init__()
        self.top_k = config.attention_top_k
        self.normalize = config.attention_normalize
        self.shared_kv = config.shared_kv
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        hidden = config.hidden_size
        self.router = nn.Linear(hidden, config.attention_experts, bias=False)
        if self.shared_kv:
            self.k_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=False)
            self.v_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=False)
        self.experts = nn.ModuleList(
            [UpmixBamAttention(config, own_kv=not self.shared_kv) for _ in range(config.attention_experts)])

    def forward(self, n, cos, sin, mask):
        weights, _ = route(n, self.router.weight, self.top_k, self.normalize)
        weights = weights.to(n.dtype)
        shared = None
        if self.shared_kv:
            shared = keys_values(self.k_proj, self.v_proj, n, cos, sin, self.num_kv_heads, self.head_dim)
        out = torch.zeros_like(n)
        for e, expert in enumerate(self.experts):
            out = out + weights[..., e, None] * expert(n, cos, sin, mask, key_values=shared)
        return out


class UpmixBamMLP(nn.Module):
    """SwiGLU FFN: down(silu(gate x) * up x). The dense FFN, or one FFN expert; other
    widths for a shared expert or a Nexus projection (from `inputs` to `outputs`)."""

    def __init__(self, config, inner=None, inputs=None, outputs=None):
        super().__init__()
        hidden = config.hidden_size
        inner = inner or config.intermediate_size
        self.gate_proj = nn.Linear(inputs or hidden, inner, bias=False)
        self.up_proj = nn.Linear(inputs or hidden, inner, bias=False)
        self.down_proj = nn.Linear(inner, outputs or hidden, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class UpmixBamNexusRouter(nn.Module):
    """Nexus router rows: the SwiGLU projection of each expert's domain embedding."""

    def __init__(self, config):
        super().__init__()
        self.domains = nn.Parameter(torch.zeros(config.num_experts, config.router_embed_size))
        self.projection = UpmixBamMLP(config, inner=config.router_projection_size,
                                      inputs=config.router_embed_size)

    def rows(self):
        """R: [E, hidden]."""
        return self.projection(self.domains)


class UpmixBamMoE(nn.Module):
    """A routed mixture of SwiGLU experts; `gate` is the router matrix, or `router` the
    Nexus router; optionally a gated shared expert."""

    def __init__(self, config):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.normalize = config.norm_topk_prob
        if config.router_embed_size > 0:
            self.router = UpmixBamNexusRouter(config)
        else:
            self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.experts = nn.ModuleList([UpmixBamMLP(config) for _ in range(config.num_experts)])
        if config.shared_expert_intermediate_size > 0:
            self.shared_expert = UpmixBamMLP(config, inner=config.shared_expert_intermediate_size)
            self.shared_expert_gate = nn.Linear(config.hidden_size, 1, bias=False)

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        rows = self.router.rows() if hasattr(self, "router") else self.gate.weight
        weights, picked = route(x, rows, self.top_k, self.normalize)
        weights = weights.to(x.dtype)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            tokens = picked[:, e].nonzero().squeeze(-1)
            if tokens.numel() == 0:
                continue
            out = out.index_add(0, tokens, weights[tokens, e, None] * expert(x[tokens]))
        if hasattr(self, "shared_expert"):
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out.view(shape)


class UpmixBamDecoderLayer(nn.Module):
    """One decoder layer, sequential or parallel (see the module doc)."""

    def __init__(self, config):
        super().__init__()
        self.parallel_blocks = config.parallel_blocks
        self.input_layernorm = UpmixBamRMSNorm(config.hidden_size, config.rms_norm_eps)
        if config.attention_experts > 0:
            self.self_attn = UpmixBamAttentionMixture(config)
        else:
            self.self_attn = UpmixBamAttention(config)
        if not self.parallel_blocks:
            self.post_attention_layernorm = UpmixBamRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = UpmixBamMoE(config) if config.num_experts > 0 else UpmixBamMLP(config)

    def forward(self, x, cos, sin, mask):
        n = self.input_layernorm(x)
        a = self.self_attn(n, cos, sin, mask)
        if self.parallel_blocks:
            return (x + a) + self.mlp(n)
        h = x + a
        return h + self.mlp(self.post_attention_layernorm(h))


class UpmixBamPreTrainedModel(PreTrainedModel):
    """Base of the upmix BAM models: the config class and the init of missing weights."""

    config_class = UpmixBamConfig
    config: UpmixBamConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["UpmixBamDecoderLayer"]

    def _init_weights(self, module):
        """Init of weights a checkpoint lacks: normal(0, initializer_range), norms 1."""
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, UpmixBamRMSNorm):
            nn.init.ones_(module.weight)


class UpmixBamModel(UpmixBamPreTrainedModel):
    """The decoder stack: embeddings, layers and the final RMSNorm (no lm_head)."""

    def __init__(self, config):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([UpmixBamDecoderLayer(config) for _ in range(config.num_hidden_layers)])
        self.norm = UpmixBamRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None,
                past_key_values=None, **kwargs):
        """Final hidden states [B, T, D] of input_ids [B, T] (or inputs_embeds [B, T, D]).

        attention_mask [B, T]: 1 for tokens, 0 for padding (keys that no query sees).
        position_ids [B, T]: RoPE positions, by default 0 .. T-1. There is no key/value
        cache: past_key_values must be None and the output's is None.
        """
        if past_key_values is not None:
            raise ValueError("upmix_bam has no key/value cache; call it without past_key_values")
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        x = inputs_embeds
        batch, length, _ = x.shape
        if position_ids is None:
            position_ids = torch.arange(length, device=x.device)[None].expand(batch, length)
        cos, sin = rotary_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta, x.dtype)
        causal = torch.ones(length, length, dtype=torch.bool, device=x.device).tril()
        mask = causal[None, None].expand(batch, 1, length, length)
        if attention_mask is not None:
            mask = mask & attention_mask.to(torch.bool)[:, None, None, :]
        for layer in self.layers:
            if self.gradient_checkpointing and self.training:
                x = self._gradient_checkpointing_func(layer.__call__, x, cos, sin, mask)
            else:
                x = layer(x, cos, sin, mask)
        return BaseModelOutputWithPast(last_hidden_state=self.norm(x), past_key_values=None)


class UpmixBamForCausalLM(UpmixBamPreTrainedModel, GenerationMixin):
    """UpmixBamModel with the language-model head; the loss is shifted cross-entropy."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config):
        super().__init__(config)
        self.model = UpmixBamModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(self, input_ids=None, attention_mask=None, labels=None, position_ids=None,
                inputs_embeds=None, past_key_values=None, num_items_in_batch=None, **kwargs):
        """Logits [B, T, V] and, given labels [B, T], the next-token cross-entropy loss.

        The loss compares logits at position t with labels[t + 1] (labels -100 are
        ignored), averaged over the counted tokens, or summed and divided by
        num_items_in_batch when that is given (as the Trainer does under gradient
        accumulation). use_cache is not supported: there is no key/value cache, so
        past_key_values must be None and the returned past_key_values is None.
        Other keyword arguments (use_cache, output_attentions, ...) are ignored.
        """
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             inputs_embeds=inputs_embeds, past_key_values=past_key_values)
        logits = self.lm_head(outputs.last_hidden_state)
        loss = None
        if labels is not None:
            shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1]).to(torch.float32)
            shift_labels = labels[:, 1:].reshape(-1).to(logits.device)
            if num_items_in_batch is None:
                loss = F.cross_entropy(shift_logits, shift_labels, ignore_index=-100)
            else:
                loss = F.cross_entropy(shift_logits, shift_labels, ignore_index=-100, reduction="sum")
                loss = loss / num_items_in_batch
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=None)

    def generate(self, *args, **kwargs):
        """GenerationMixin.generate without a key/value cache: each step reruns the whole sequence."""
        kwargs["use_cache"] = False
        return super().generate(*args, **kwargs)


__all__ = ["UpmixBamPreTrainedModel", "UpmixBamModel", "UpmixBamForCausalLM"]
