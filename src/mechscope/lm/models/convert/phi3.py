"""Phi-3 (and Phi-3.5, Phi-4-mini): Llama-shaped with fused Q/K/V and gate/up matrices, partial rotary."""

from __future__ import annotations

from mechscope.lm.models.convert.common import StateDict, check_fields, shaped, strip_prefix
from mechscope.lm.models.convert.llama import LLAMA_FIELDS, llama_config
from mechscope.lm.models.transformer import TransformerConfig

PHI3_FIELDS = LLAMA_FIELDS - {"attention_bias", "mlp_bias"} | {
    "partial_rotary_factor",
    "sliding_window",
    "original_max_position_embeddings",  # read only by longrope scaling, which is refused
}


def convert_phi3(config: dict, state: StateDict) -> tuple[TransformerConfig, StateDict]:
    """Phi3ForCausalLM. ``qkv_proj`` splits into Q, K, V rows; ``gate_up_proj`` into gate, then up."""
    check_fields(config, PHI3_FIELDS, "Phi3")
    window = config.get("sliding_window")
    layers = tuple(range(config["num_hidden_layers"])) if window is not None else ()
    cfg = llama_config(config, "phi3", sliding_window=window, sliding_window_layers=layers)
    d, dh, h, g, m = cfg.d_model, cfg.d_head, cfg.n_heads, cfg.kv_heads, cfg.d_mlp
    s = strip_prefix(state, "model.")
    out: StateDict = {"W_E": s["embed_tokens.weight"], "ln_final.w": s["norm.weight"]}
    if not cfg.tie_embeddings:
        out["W_U_untied"] = state["lm_head.weight"].T
    for i in range(cfg.n_layers):
        p, q = f"layers.{i}.", f"blocks.{i}."
        qkv = shaped(s[p + "self_attn.qkv_proj.weight"], ((h + 2 * g) * dh, d), p + "self_attn.qkv_proj.weight")
        out[q + "attn.q.weight"] = qkv[: h * dh]
        out[q + "attn.k.weight"] = qkv[h * dh : (h + g) * dh]
        out[q + "attn.v.weight"] = qkv[(h + g) * dh :]
        out[q + "attn.o.weight"] = s[p + "self_attn.o_proj.weight"]
        gate_up = shaped(s[p + "mlp.gate_up_proj.weight"], (2 * m, d), p + "mlp.gate_up_proj.weight")
        out[q + "mlp.gate.weight"] = gate_up[:m]
        out[q + "mlp.up.weight"] = gate_up[m:]
        out[q + "mlp.down.weight"] = s[p + "mlp.down_proj.weight"]
        out[q + "ln1.w"] = s[p + "input_layernorm.weight"]
        out[q + "ln2.w"] = s[p + "post_attention_layernorm.weight"]
    return cfg, out
