"""GPT-Neo (EleutherAI's 125M-2.7B, the TinyStories models): GPT-2-like with local attention layers.

Differences from GPT-2: attention scores are not scaled by 1/sqrt(d_head), and are computed in
float32; alternate layers (``attention_types``) are local, each query seeing the
``window_size`` keys up to itself; Q, K and V have no biases; weights are plain Linear layers.
"""

from __future__ import annotations

from mechscope.core.errors import MechscopeError
from mechscope.lm.models.convert.common import StateDict, activation, check_fields, first, strip_prefix
from mechscope.lm.models.transformer import TransformerConfig

NEO_FIELDS = {
    "vocab_size",
    "max_position_embeddings",
    "hidden_size",
    "num_layers",
    "num_heads",
    "attention_types",
    "attention_layers",
    "intermediate_size",
    "window_size",
    "activation_function",
    "layer_norm_epsilon",
    "tie_word_embeddings",
    "bos_token_id",
    "eos_token_id",
}


def attention_layers(config: dict) -> list[str]:
    """``[[["global", "local"], 12]]`` -> ``["global", "local", ...]`` (or the config's own list)."""
    layers = config.get("attention_layers")
    if not layers:
        types = config.get("attention_types", [[["global", "local"], 12]])
        layers = [kind for kinds, times in types for _ in range(times) for kind in kinds]
    bad = sorted(set(layers) - {"global", "local"})
    if bad or len(layers) != config["num_layers"]:
        n = config["num_layers"]
        raise MechscopeError(f"unsupported GPT-Neo config: attention layers {layers!r} for {n} layers")
    return layers


def convert_gpt_neo(config: dict, state: StateDict) -> tuple[TransformerConfig, StateDict]:
    """GPTNeoForCausalLM to ours."""
    check_fields(config, NEO_FIELDS, "GPT-Neo")
    d, h = config["hidden_size"], config["num_heads"]
    local = tuple(i for i, kind in enumerate(attention_layers(config)) if kind == "local")
    tied = bool(config.get("tie_word_embeddings", True))
    cfg = TransformerConfig(
        d_model=d,
        n_layers=config["num_layers"],
        n_heads=h,
        d_head=d // h,
        d_vocab=config["vocab_size"],
        n_ctx=config.get("max_position_embeddings", 2048),
        d_mlp=config.get("intermediate_size") or 4 * d,
        act=activation(config.get("activation_function", "gelu_new"), "GPT-Neo", "activation_function"),
        norm="layernorm",
        norm_eps=config.get("layer_norm_epsilon", 1e-5),
        positional="learned",
        attn_bias=False,
        attn_out_bias=True,
        attn_scale=1.0,
        attn_scores_float32=True,
        sliding_window=config.get("window_size", 256) if local else None,
        sliding_window_layers=local,
        tie_embeddings=tied,
        bos_token_id=config.get("bos_token_id"),
        eos_token_id=first(config.get("eos_token_id")),
        family="gpt_neo",
        name=config.get("_name_or_path", "gpt_neo"),
    )
    s = strip_prefix(state, "transformer.")
    out: StateDict = {"W_E": s["wte.weight"], "W_pos": s["wpe.weight"], "ln_final.w": s["ln_f.weight"]}
    out["ln_final.b"] = s["ln_f.bias"]
    if not tied:
        out["W_U_untied"] = state["lm_head.weight"].T
    for i in range(cfg.n_layers):
        p, q = f"h.{i}.", f"blocks.{i}."
        for hf, ours in (("q_proj", "q"), ("k_proj", "k"), ("v_proj", "v"), ("out_proj", "o")):
            out[q + f"attn.{ours}.weight"] = s[p + f"attn.attention.{hf}.weight"]
        out[q + "attn.o.bias"] = s[p + "attn.attention.out_proj.bias"]
        for hf, ours in (("c_fc", "up"), ("c_proj", "down")):
            out[q + f"mlp.{ours}.weight"] = s[p + f"mlp.{hf}.weight"]
            out[q + f"mlp.{ours}.bias"] = s[p + f"mlp.{hf}.bias"]
        for hf, ours in (("ln_1", "ln1"), ("ln_2", "ln2")):
            out[q + f"{ours}.w"] = s[p + f"{hf}.weight"]
            out[q + f"{ours}.b"] = s[p + f"{hf}.bias"]
    return cfg, out
