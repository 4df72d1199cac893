"""GPT-NeoX (Pythia, the GPT-NeoX-20B family): parallel attention and MLP, partial rotary, fused QKV.

``query_key_value`` holds, for each head in turn, its query, key and value rows
([H, 3, Dh, D] once reshaped). ``use_parallel_residual`` (default on) lets attention and MLP
both read the block's input, each through its own LayerNorm; off, the MLP reads the residual
after attention, as in GPT-2. Pythia's training checkpoints are revisions ``step0`` to
``step143000`` of each hub repository.
"""

from __future__ import annotations

from mechscope.lm.models.convert.common import (
    StateDict,
    activation,
    check_fields,
    first,
    rope,
    rotary_dim,
    shaped,
    strip_prefix,
)
from mechscope.lm.models.transformer import TransformerConfig

NEOX_FIELDS = {
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "hidden_act",
    "max_position_embeddings",
    "layer_norm_eps",
    "rotary_pct",
    "rotary_emb_base",
    "rope_parameters",
    "rope_scaling",
    "rope_theta",
    "partial_rotary_factor",
    "use_parallel_residual",
    "attention_bias",
    "tie_word_embeddings",
    "bos_token_id",
    "eos_token_id",
}


def convert_gpt_neox(config: dict, state: StateDict) -> tuple[TransformerConfig, StateDict]:
    """GPTNeoXForCausalLM to ours."""
    check_fields(config, NEOX_FIELDS, "GPT-NeoX")
    d, h = config["hidden_size"], config["num_attention_heads"]
    dh = d // h
    legacy = {  # Pythia's config.json predates rope_parameters
        "rope_theta": config.get("rotary_emb_base", 10000.0),
        "partial_rotary_factor": config.get("rotary_pct", 0.25),
    }
    base, factor = rope({**legacy, **config}, "GPT-NeoX")
    bias = bool(config.get("attention_bias", True))
    cfg = TransformerConfig(
        d_model=d,
        n_layers=config["num_hidden_layers"],
        n_heads=h,
        d_head=dh,
        d_vocab=config["vocab_size"],
        n_ctx=config.get("max_position_embeddings", 2048),
        d_mlp=config["intermediate_size"],
        act=activation(config.get("hidden_act", "gelu"), "GPT-NeoX", "hidden_act"),
        norm="layernorm",
        norm_eps=config.get("layer_norm_eps", 1e-5),
        positional="rotary",
        rotary_base=base,
        rotary_dim=rotary_dim(dh, factor),
        attn_bias=bias,
        attn_out_bias=bias,
        parallel_attn_mlp=bool(config.get("use_parallel_residual", True)),
        tie_embeddings=bool(config.get("tie_word_embeddings", False)),
        bos_token_id=config.get("bos_token_id"),
        eos_token_id=first(config.get("eos_token_id")),
        family="gpt_neox",
        name=config.get("_name_or_path", "gpt_neox"),
    )
    s = strip_prefix(state, "gpt_neox.")
    out: StateDict = {"W_E": s["embed_in.weight"], "ln_final.w": s["final_layer_norm.weight"]}
    out["ln_final.b"] = s["final_layer_norm.bias"]
    if not cfg.tie_embeddings:  # older checkpoints (Pythia) call the unembedding embed_out
        out["W_U_untied"] = (state["embed_out.weight"] if "embed_out.weight" in state else state["lm_head.weight"]).T
    for i in range(cfg.n_layers):
        p, q = f"layers.{i}.", f"blocks.{i}."
        name = p + "attention.query_key_value."
        w = shaped(s[name + "weight"], (3 * d, d), name + "weight").reshape(h, 3, dh, d)
        b = s[name + "bias"].reshape(h, 3, dh) if bias else None
        for j, ours in enumerate("qkv"):
            out[q + f"attn.{ours}.weight"] = w[:, j].reshape(d, d)
            if bias:
                out[q + f"attn.{ours}.bias"] = b[:, j].reshape(d)
        out[q + "attn.o.weight"] = s[p + "attention.dense.weight"]
        if bias:
            out[q + "attn.o.bias"] = s[p + "attention.dense.bias"]
        out[q + "mlp.up.weight"] = s[p + "mlp.dense_h_to_4h.weight"]
        out[q + "mlp.up.bias"] = s[p + "mlp.dense_h_to_4h.bias"]
        out[q + "mlp.down.weight"] = s[p + "mlp.dense_4h_to_h.weight"]
        out[q + "mlp.down.bias"] = s[p + "mlp.dense_4h_to_h.bias"]
        for hf, ours in (("input_layernorm", "ln1"), ("post_attention_layernorm", "ln2")):
            out[q + f"{ours}.w"] = s[p + f"{hf}.weight"]
            out[q + f"{ours}.b"] = s[p + f"{hf}.bias"]
    return cfg, out
