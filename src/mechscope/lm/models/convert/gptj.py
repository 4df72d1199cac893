"""GPT-J (6B and kin): parallel attention and MLP sharing one LayerNorm, interleaved partial rotary.

GPT-J rotates the first ``rotary_dim`` dims of each head in adjacent pairs (``rotate_every_two``),
base 10000; attention scores are computed in float32; the unembedding is untied and has a bias.
Attention and MLP read the same normalised input: ``ln_1`` becomes both our ``ln1`` and
``ln2`` (two copies of one tensor, as TransformerLens does), so both hook points exist.
"""

from __future__ import annotations

from mechscope.lm.models.convert.common import StateDict, activation, check_fields, first, require, strip_prefix
from mechscope.lm.models.transformer import TransformerConfig

GPTJ_FIELDS = {
    "vocab_size",
    "n_positions",
    "n_embd",
    "n_layer",
    "n_head",
    "rotary_dim",
    "rotary",
    "n_inner",
    "activation_function",
    "layer_norm_epsilon",
    "scale_attn_weights",
    "tie_word_embeddings",
    "bos_token_id",
    "eos_token_id",
}


def convert_gptj(config: dict, state: StateDict) -> tuple[TransformerConfig, StateDict]:
    """GPTJForCausalLM to ours."""
    check_fields(config, GPTJ_FIELDS, "GPT-J")
    require(config, "rotary", True, "GPT-J")
    require(config, "scale_attn_weights", True, "GPT-J")
    d, h = config["n_embd"], config["n_head"]
    rd = config.get("rotary_dim")
    tied = bool(config.get("tie_word_embeddings", False))
    cfg = TransformerConfig(
        d_model=d,
        n_layers=config["n_layer"],
        n_heads=h,
        d_head=d // h,
        d_vocab=config["vocab_size"],
        n_ctx=config.get("n_positions", 2048),
        d_mlp=config.get("n_inner") or 4 * d,
        act=activation(config.get("activation_function", "gelu_new"), "GPT-J", "activation_function"),
        norm="layernorm",
        norm_eps=config.get("layer_norm_epsilon", 1e-5),
        positional="rotary",
        rotary_base=10000.0,
        rotary_dim=None if rd is None or rd == d // h else rd,
        rotary_interleaved=True,
        attn_bias=False,
        attn_out_bias=False,
        attn_scores_float32=True,
        parallel_attn_mlp=True,
        tie_embeddings=tied,
        unembed_bias=True,
        bos_token_id=config.get("bos_token_id"),
        eos_token_id=first(config.get("eos_token_id")),
        family="gptj",
        name=config.get("_name_or_path", "gptj"),
    )
    s = strip_prefix(state, "transformer.")
    out: StateDict = {"W_E": s["wte.weight"], "ln_final.w": s["ln_f.weight"], "ln_final.b": s["ln_f.bias"]}
    if not tied:
        out["W_U_untied"] = state["lm_head.weight"].T
    out["b_U"] = state["lm_head.bias"]
    for i in range(cfg.n_layers):
        p, q = f"h.{i}.", f"blocks.{i}."
        for hf, ours in (("q_proj", "q"), ("k_proj", "k"), ("v_proj", "v"), ("out_proj", "o")):
            out[q + f"attn.{ours}.weight"] = s[p + f"attn.{hf}.weight"]
        for hf, ours in (("fc_in", "up"), ("fc_out", "down")):
            out[q + f"mlp.{ours}.weight"] = s[p + f"mlp.{hf}.weight"]
            out[q + f"mlp.{ours}.bias"] = s[p + f"mlp.{hf}.bias"]
        for ours in ("ln1", "ln2"):  # one norm feeds both
            out[q + f"{ours}.w"] = s[p + "ln_1.weight"]
            out[q + f"{ours}.b"] = s[p + "ln_1.bias"]
    return cfg, out
