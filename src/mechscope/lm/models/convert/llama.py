"""The Llama family and its close kin: Llama (SmolLM2...), Mistral, Qwen2/2.5, Qwen3.

All share RoPE, RMSNorm, a SwiGLU MLP and grouped-query attention, and the tensor names
``model.layers.N.self_attn.{q,k,v,o}_proj``; they differ by a few switches: Mistral's sliding
window, Qwen2's biases on Q, K and V (not on the output), Qwen3's RMSNorm on each head's
queries and keys, and Qwen's sliding window on the layers from ``max_window_layers`` on.
"""

from __future__ import annotations

from mechscope.lm.models.convert.common import (
    StateDict,
    activation,
    check_fields,
    first,
    require,
    rope,
    strip_prefix,
    window_layers,
)
from mechscope.lm.models.transformer import TransformerConfig

LLAMA_FIELDS = {
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "max_position_embeddings",
    "rms_norm_eps",
    "rope_theta",
    "rope_scaling",
    "rope_parameters",
    "attention_bias",
    "mlp_bias",
    "tie_word_embeddings",
    "bos_token_id",
    "eos_token_id",
}
MISTRAL_FIELDS = LLAMA_FIELDS - {"attention_bias", "mlp_bias"} | {"sliding_window"}
QWEN2_FIELDS = LLAMA_FIELDS - {"attention_bias", "mlp_bias"} | {
    "use_sliding_window",
    "sliding_window",
    "max_window_layers",
    "layer_types",
    "use_mrope",
}
QWEN3_FIELDS = QWEN2_FIELDS - {"use_mrope"} | {"attention_bias"}


def llama_config(config: dict, family: str, **switches) -> TransformerConfig:
    """Our config for a Llama-shaped checkpoint (the family's switches passed in)."""
    d, h = config["hidden_size"], config["num_attention_heads"]
    base, factor = rope(config, family)
    fields = dict(
        d_model=d,
        n_layers=config["num_hidden_layers"],
        n_heads=h,
        n_kv_heads=config.get("num_key_value_heads") or h,
        d_head=config.get("head_dim") or d // h,
        d_vocab=config["vocab_size"],
        n_ctx=config.get("max_position_embeddings", 2048),
        d_mlp=config["intermediate_size"],
        act=activation(config.get("hidden_act", "silu"), family, "hidden_act"),
        gated_mlp=True,
        norm="rmsnorm",
        norm_eps=config.get("rms_norm_eps", 1e-6),
        positional="rotary",
        rotary_base=base,
        attn_bias=False,
        attn_out_bias=False,
        mlp_bias=False,
        tie_embeddings=bool(config.get("tie_word_embeddings", False)),
        bos_token_id=config.get("bos_token_id"),
        eos_token_id=first(config.get("eos_token_id")),
        family=family,
        name=config.get("_name_or_path", family),
    )
    fields.update(switches)
    if factor != 1.0:
        fields["rotary_dim"] = int(fields["d_head"] * factor)
    return TransformerConfig(**fields)


def llama_tensors(cfg: TransformerConfig, state: StateDict, prefix: str = "model.") -> StateDict:
    """Our tensors from ``model.layers.N.self_attn.q_proj`` ... names (biases and norms where present)."""
    s = strip_prefix(state, prefix)
    out: StateDict = {"W_E": s["embed_tokens.weight"], "ln_final.w": s["norm.weight"]}
    if not cfg.tie_embeddings:
        out["W_U_untied"] = state["lm_head.weight"].T
    for i in range(cfg.n_layers):
        p, q = f"layers.{i}.", f"blocks.{i}."
        for hf, ours in (("q_proj", "q"), ("k_proj", "k"), ("v_proj", "v"), ("o_proj", "o")):
            out[q + f"attn.{ours}.weight"] = s[p + f"self_attn.{hf}.weight"]
            if p + f"self_attn.{hf}.bias" in s:
                out[q + f"attn.{ours}.bias"] = s[p + f"self_attn.{hf}.bias"]
        if cfg.qk_norm:
            out[q + "attn.q_norm.w"] = s[p + "self_attn.q_norm.weight"]
            out[q + "attn.k_norm.w"] = s[p + "self_attn.k_norm.weight"]
        for hf, ours in (("gate_proj", "gate"), ("up_proj", "up"), ("down_proj", "down")):
            out[q + f"mlp.{ours}.weight"] = s[p + f"mlp.{hf}.weight"]
            if p + f"mlp.{hf}.bias" in s:
                out[q + f"mlp.{ours}.bias"] = s[p + f"mlp.{hf}.bias"]
        out[q + "ln1.w"] = s[p + "input_layernorm.weight"]
        out[q + "ln2.w"] = s[p + "post_attention_layernorm.weight"]
    return out


def convert_llama(config: dict, state: StateDict) -> tuple[TransformerConfig, StateDict]:
    """Hugging Face LlamaForCausalLM (Llama, SmolLM2 and kin) to ours."""
    check_fields(config, LLAMA_FIELDS, "Llama")
    bias = bool(config.get("attention_bias", False))
    cfg = llama_config(
        config, "llama", attn_bias=bias, attn_out_bias=bias, mlp_bias=bool(config.get("mlp_bias", False))
    )
    return cfg, llama_tensors(cfg, state)


def convert_mistral(config: dict, state: StateDict) -> tuple[TransformerConfig, StateDict]:
    """MistralForCausalLM: Llama with a sliding window on every layer (v0.1: 4096 tokens)."""
    check_fields(config, MISTRAL_FIELDS, "Mistral")
    n, window = config["num_hidden_layers"], config.get("sliding_window")
    layers = tuple(range(n)) if window is not None else ()
    cfg = llama_config(config, "mistral", sliding_window=window, sliding_window_layers=layers)
    return cfg, llama_tensors(cfg, state)


def _qwen_windows(config: dict, family: str) -> dict:
    n = config["num_hidden_layers"]
    window = config.get("sliding_window") if config.get("use_sliding_window", False) else None
    start = config.get("max_window_layers", 28)  # transformers' Qwen2Config / Qwen3Config default
    default = ["sliding_attention" if window is not None and i >= start else "full_attention" for i in range(n)]
    window, layers = window_layers(config, n, window, default, family)
    return {"sliding_window": window, "sliding_window_layers": layers}


def convert_qwen2(config: dict, state: StateDict) -> tuple[TransformerConfig, StateDict]:
    """Qwen2ForCausalLM (Qwen2, Qwen2.5): biases on Q, K and V, none on the output."""
    check_fields(config, QWEN2_FIELDS, "Qwen2")
    require(config, "use_mrope", False, "Qwen2")
    cfg = llama_config(config, "qwen2", attn_bias=True, attn_out_bias=False, **_qwen_windows(config, "Qwen2"))
    return cfg, llama_tensors(cfg, state)


def convert_qwen3(config: dict, state: StateDict) -> tuple[TransformerConfig, StateDict]:
    """Qwen3ForCausalLM: RMSNorm on each head's queries and keys before RoPE."""
    check_fields(config, QWEN3_FIELDS, "Qwen3")
    bias = bool(config.get("attention_bias", False))
    windows = _qwen_windows(config, "Qwen3")
    cfg = llama_config(config, "qwen3", attn_bias=bias, attn_out_bias=bias, qk_norm=True, **windows)
    return cfg, llama_tensors(cfg, state)
