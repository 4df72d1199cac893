"""Gemma 1, 2 and 3 (text): Llama-shaped, with Gemma's own numerics.

* embeddings scaled by sqrt(d_model), rounded to the model's dtype; tied unembedding;
* RMSNorm that scales by (1 + w), computed in float32 (``norm_weight_plus_one``);
* GELU (tanh approximation) gating;
* Gemma 2: norms on the attention and MLP outputs (``ln1_post``, ``ln2_post``), attention
  scaled by ``query_pre_attn_scalar ** -0.5``, attention-logit and final-logit soft-capping,
  sliding-window attention on every other layer;
* Gemma 3: RMSNorm on each head's queries and keys, five local (sliding-window) layers to one
  global, the local layers with their own rotary base (``rope_local_base_freq``). Like
  transformers, Gemma 3 ignores ``attn_logit_softcapping``.
"""

from __future__ import annotations

from mechscope.lm.models.convert.common import StateDict, activation, check_fields, require, rope, window_layers
from mechscope.lm.models.convert.llama import LLAMA_FIELDS, llama_config, llama_tensors
from mechscope.lm.models.transformer import TransformerConfig

GEMMA_FIELDS = LLAMA_FIELDS - {"mlp_bias"} | {"hidden_activation", "use_bidirectional_attention"}
GEMMA2_FIELDS = GEMMA_FIELDS | {
    "query_pre_attn_scalar",
    "sliding_window",
    "layer_types",
    "final_logit_softcapping",
    "attn_logit_softcapping",
}
GEMMA3_FIELDS = GEMMA2_FIELDS | {"rope_local_base_freq", "sliding_window_pattern", "_sliding_window_pattern"}


def _gemma(config: dict, family: str, act: str, **switches) -> TransformerConfig:
    require(config, "use_bidirectional_attention", (None, False), family)
    bias = bool(config.get("attention_bias", False))
    return llama_config(
        {**config, "tie_word_embeddings": config.get("tie_word_embeddings", True), "hidden_act": act},
        family,
        attn_bias=bias,
        attn_out_bias=bias,
        norm_weight_plus_one=True,
        embed_scale=config["hidden_size"] ** 0.5,
        **switches,
    )


def _gemma_tensors(cfg: TransformerConfig, state: StateDict) -> StateDict:
    out = llama_tensors(cfg, state)
    if cfg.post_attn_mlp_norm:  # Gemma 2/3 name their four norms differently
        s = state
        for i in range(cfg.n_layers):
            p, q = f"model.layers.{i}.", f"blocks.{i}."
            out[q + "ln1_post.w"] = out.pop(q + "ln2.w")  # post_attention_layernorm follows attention here
            out[q + "ln2.w"] = s[p + "pre_feedforward_layernorm.weight"]
            out[q + "ln2_post.w"] = s[p + "post_feedforward_layernorm.weight"]
    return out


def convert_gemma(config: dict, state: StateDict) -> tuple[TransformerConfig, StateDict]:
    """GemmaForCausalLM (Gemma 1). ``hidden_act='gelu'`` means the tanh approximation, as in transformers."""
    check_fields(config, GEMMA_FIELDS, "Gemma")
    act = config.get("hidden_act") or "gelu_pytorch_tanh"
    act = "gelu_pytorch_tanh" if act == "gelu" else activation(act, "Gemma", "hidden_act")
    cfg = _gemma(config, "gemma", act)
    return cfg, _gemma_tensors(cfg, state)


def _gemma2_switches(config: dict, family: str, default_types: list[str], final_cap: float | None) -> dict:
    """Gemma 2 and 3's switches; defaults as transformers' configs (a field may be absent)."""
    n = config["num_hidden_layers"]
    window, layers = window_layers(config, n, config.get("sliding_window", 4096), default_types, family)
    return dict(
        post_attn_mlp_norm=True,
        attn_scale=float(config.get("query_pre_attn_scalar", 256)) ** -0.5,
        final_logit_softcap=config.get("final_logit_softcapping", final_cap),
        sliding_window=window,
        sliding_window_layers=layers,
    )


def convert_gemma2(config: dict, state: StateDict) -> tuple[TransformerConfig, StateDict]:
    """Gemma2ForCausalLM."""
    check_fields(config, GEMMA2_FIELDS | {"hidden_act"}, "Gemma2")
    n = config["num_hidden_layers"]
    default = ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(n)]
    act = activation(config.get("hidden_activation") or "gelu_pytorch_tanh", "Gemma2", "hidden_activation")
    switches = _gemma2_switches(config, "Gemma2", default, 30.0)
    cfg = _gemma(config, "gemma2", act, attn_logit_softcap=config.get("attn_logit_softcapping", 50.0), **switches)
    return cfg, _gemma_tensors(cfg, state)


def convert_gemma3_text(config: dict, state: StateDict) -> tuple[TransformerConfig, StateDict]:
    """Gemma3ForCausalLM (``gemma3_text``: Gemma 3 1B, or a larger Gemma 3's language model)."""
    check_fields(config, GEMMA3_FIELDS | {"hidden_act"}, "Gemma3")
    n = config["num_hidden_layers"]
    pattern = config.get("sliding_window_pattern", config.get("_sliding_window_pattern", 6))
    default = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n)]
    act = activation(config.get("hidden_activation") or "gelu_pytorch_tanh", "Gemma3", "hidden_activation")
    params = config.get("rope_parameters") or {}
    per_type = "full_attention" in params or "sliding_attention" in params
    flat = {k: v for k, v in config.items() if k not in ("rope_parameters",)}
    global_base, _ = rope(flat, "Gemma3", 1_000_000.0, params.get("full_attention") if per_type else params)
    local = params.get("sliding_attention") if per_type else {"rope_theta": config.get("rope_local_base_freq", 1e4)}
    local_base, _ = rope({}, "Gemma3", 10_000.0, local)
    switches = _gemma2_switches(config, "Gemma3", default, None)
    cfg = _gemma(
        {k: v for k, v in config.items() if k not in ("rope_parameters", "rope_scaling")},
        "gemma3",
        act,
        qk_norm=True,
        rotary_base=global_base,
        rotary_base_local=local_base,
        **switches,
    )
    return cfg, _gemma_tensors(cfg, state)
