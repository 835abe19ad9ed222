"""Configuration of an upmix BAM checkpoint (attention experts and FFN experts).

Written by upmix next to the weights it emits, together with modeling_upmix_bam.py;
config.json's "auto_map" points AutoConfig and AutoModelForCausalLM at them, so

    AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True)

loads the model. The architecture is a Llama-style decoder (RMSNorm, default RoPE,
grouped-query attention, SwiGLU) in which every layer's attention can be a routed
mixture of attention experts and every layer's FFN a routed mixture of FFN experts
(Branch-Attend-Mix, Zhang et al. 2024), whose router may be projected from domain
embeddings (Nexus, Gritsch et al. 2024) and which may have a shared expert. See
modeling_upmix_bam.py for the computation.
"""

from transformers import PretrainedConfig


class UpmixBamConfig(PretrainedConfig):
    r"""
    Configuration of [`UpmixBamForCausalLM`].

    Args:
        vocab_size (`int`): Vocabulary size.
        hidden_size (`int`): Width of the residual stream (D).
        intermediate_size (`int`): Inner size of the dense FFN, or of each FFN expert.
        num_hidden_layers (`int`): Number of decoder layers.
        num_attention_heads (`int`): Query heads (H).
        num_key_value_heads (`int`, *optional*): Key/value heads (KV); query head h reads
            key/value head h // (H / KV). Defaults to `num_attention_heads`.
        head_dim (`int`, *optional*): Size of one head. Defaults to hidden_size // H.
        hidden_act (`str`): Activation of the SwiGLU FFN; only "silu".
        max_position_embeddings (`int`): Longest sequence the model was meant for.
        initializer_range (`float`): Standard deviation of the normal init of weights
            that a checkpoint does not provide.
        rms_norm_eps (`float`): Epsilon of the RMSNorms.
        rope_theta (`float`): Base of the default rotary position embedding.
        rope_parameters (`dict`, *optional*): {"rope_type": "default", "rope_theta": ...};
            only the default RoPE type is supported. Its rope_theta wins over `rope_theta`.
        tie_word_embeddings (`bool`): Whether lm_head shares model.embed_tokens' weight.
        parallel_blocks (`bool`): False: h = x + attn(norm_in(x)); out = h + ffn(norm_post(h)).
            True: n = norm_in(x); out = (x + attn(n)) + ffn(n) (no post-attention norm).
        attention_experts (`int`): 0 for plain attention, E >= 1 for a mixture of E
            attention experts in every layer.
        attention_top_k (`int`): Experts each token keeps in the attention mixture.
        attention_normalize (`bool`): Whether the kept attention routing weights are
            renormalised to sum to 1.
        shared_kv (`bool`): Whether the attention experts share one k_proj and v_proj.
        num_experts (`int`): 0 for a dense SwiGLU FFN, E >= 1 for a mixture of E FFN experts.
        num_experts_per_tok (`int`): Experts each token keeps in the FFN mixture.
        norm_topk_prob (`bool`): Whether the kept FFN routing weights are renormalised.
        shared_expert_intermediate_size (`int`): 0 for none, else the inner size of a
            shared SwiGLU expert that every token takes besides the routed ones, scaled by
            sigmoid(x . shared_expert_gate) (Qwen2-MoE's).
        router_embed_size (`int`): 0 for a router matrix (`mlp.gate`); else the width d of
            the Nexus router's domain embeddings (`mlp.router.domains`, [E, d]), whose
            rows are projected to router rows by a SwiGLU of inner size
            `router_projection_size` (`mlp.router.projection`).
        router_projection_size (`int`): Inner size of the Nexus router's projection.
    """

    model_type = "upmix_bam"
    keys_to_ignore_at_inference = ["past_key_values"]

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_parameters: dict | None = None
    tie_word_embeddings: bool = False
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    parallel_blocks: bool = False
    attention_experts: int = 0
    attention_top_k: int = 1
    attention_normalize: bool = False
    shared_kv: bool = False
    num_experts: int = 0
    num_experts_per_tok: int = 1
    norm_topk_prob: bool = False
    shared_expert_intermediate_size: int = 0
    router_embed_size: int = 0
    router_projection_size: int = 0

    def __post_init__(self, **kwargs):
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        super().__post_init__(**kwargs)
        # The base class has moved rope_theta into rope_parameters (where it takes
        # precedence); keep both views of the one value in step.
        rope_type = self.rope_parameters.get("rope_type", "default")
        if rope_type != "default":
            raise ValueError(f"upmix_bam supports only the default RoPE, not {rope_type!r}")
        self.rope_theta = self.rope_parameters["rope_theta"]
        self._check_settings()

    def _check_settings(self):
        """Raise ValueError on settings the model cannot run."""
        if self.hidden_act != "silu":
            raise ValueError(f"upmix_bam supports only hidden_act 'silu', not {self.hidden_act!r}")
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) is not a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 2 != 0:
            raise ValueError(f"head_dim ({self.head_dim}) must be even for RoPE")
        for experts, top_k, what in ((self.attention_experts, self.attention_top_k, "attention_top_k"),
                                     (self.num_experts, self.num_experts_per_tok, "num_experts_per_tok")):
            if experts < 0:
                raise ValueError(f"a negative number of experts ({experts})")
            if experts > 0 and not 1 <= top_k <= experts:
                raise ValueError(f"{what} ({top_k}) must be between 1 and the number of experts ({experts})")
        if (self.router_embed_size > 0) != (self.router_projection_size > 0):
            raise ValueError(
                f"router_embed_size ({self.router_embed_size}) and router_projection_size "
                f"({self.router_projection_size}) are both 0 (a router matrix) or both positive (Nexus)")


__all__ = ["UpmixBamConfig"]
