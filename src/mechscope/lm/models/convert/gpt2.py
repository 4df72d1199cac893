"""GPT-2 (gpt2, gpt2-medium/large/xl, distilgpt2): learned positions, LayerNorm, Conv1D weights."""

from __future__ import annotations

from mechscope.core.errors import MechscopeError
from mechscope.lm.models.convert.common import StateDict, check_fields, require, shaped, strip_prefix
from mechscope.lm.models.transformer import TransformerConfig

GPT2_FIELDS = {
    "vocab_size",
    "n_positions",
    "n_embd",
    "n_layer",
    "n_head",
    "n_inner",
    "activation_function",
    "layer_norm_epsilon",
    "bos_token_id",
    "eos_token_id",
    "scale_attn_weights",
    "scale_attn_by_inverse_layer_idx",
    "add_cross_attention",
    "tie_word_embeddings",
}


def convert_gpt2(config: dict, state: StateDict) -> tuple[TransformerConfig, StateDict]:
    """Hugging Face GPT2LMHeadModel to ours."""
    check_fields(config, GPT2_FIELDS, "GPT-2")
    require(config, "scale_attn_weights", True, "GPT-2")
    require(config, "scale_attn_by_inverse_layer_idx", False, "GPT-2")
    require(config, "add_cross_attention", False, "GPT-2")
    require(config, "tie_word_embeddings", True, "GPT-2")
    act = config.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu", "relu"):
        raise MechscopeError(f"unsupported GPT-2 config: activation_function={act!r}")
    d, h = config["n_embd"], config["n_head"]
    cfg = TransformerConfig(
        d_model=d,
        n_layers=config["n_layer"],
        n_heads=h,
        d_head=d // h,
        d_vocab=config["vocab_size"],
        n_ctx=config["n_positions"],
        d_mlp=config.get("n_inner") or 4 * d,
        act=act,
        norm="layernorm",
        norm_eps=config.get("layer_norm_epsilon", 1e-5),
        positional="learned",
        family="gpt2",
        bos_token_id=config.get("bos_token_id"),
        eos_token_id=config.get("eos_token_id"),
        name=config.get("_name_or_path", "gpt2"),
    )
    s = strip_prefix(state, "transformer.")
    out: StateDict = {
        "W_E": s["wte.weight"],
        "W_pos": s["wpe.weight"],
        "ln_final.w": s["ln_f.weight"],
        "ln_final.b": s["ln_f.bias"],
    }
    for i in range(cfg.n_layers):
        p, q = f"h.{i}.", f"blocks.{i}."
        w = shaped(s[p + "attn.c_attn.weight"], (d, 3 * d), p + "attn.c_attn.weight")  # Conv1D: x @ W
        b = s[p + "attn.c_attn.bias"]
        for j, name in enumerate("qkv"):
            out[q + f"attn.{name}.weight"] = w[:, j * d : (j + 1) * d].T
            out[q + f"attn.{name}.bias"] = b[j * d : (j + 1) * d]
        out[q + "attn.o.weight"] = s[p + "attn.c_proj.weight"].T
        out[q + "attn.o.bias"] = s[p + "attn.c_proj.bias"]
        out[q + "mlp.up.weight"] = s[p + "mlp.c_fc.weight"].T
        out[q + "mlp.up.bias"] = s[p + "mlp.c_fc.bias"]
        out[q + "mlp.down.weight"] = s[p + "mlp.c_proj.weight"].T
        out[q + "mlp.down.bias"] = s[p + "mlp.c_proj.bias"]
        for a, ours in (("ln_1", "ln1"), ("ln_2", "ln2")):
            out[q + f"{ours}.w"] = s[p + f"{a}.weight"]
            out[q + f"{ours}.b"] = s[p + f"{a}.bias"]
    return cfg, out
