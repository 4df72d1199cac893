"""OPT (facebook/opt-125m ... 66b): learned positions offset by 2, ReLU, pre- or post-LN.

* positions: ``embed_positions`` has two extra rows in front (a fairseq legacy); position p
  reads row p + 2, so ``W_pos`` is the table from row 2 on;
* ``do_layer_norm_before=False`` (OPT-350m) is post-LN: each norm follows a residual addition
  (``norm_after_residual``) and there is no final norm;
* ``word_embed_proj_dim`` smaller than ``hidden_size`` (OPT-350m): the embedding lives in a
  smaller space with ``project_in``/``project_out`` around the stack; both are folded into
  ``W_E`` and ``W_U`` (untied), in float32, so the model's function is unchanged.
"""

from __future__ import annotations

from mechscope.lm.models.convert.common import (
    MissingTensor,
    StateDict,
    activation,
    check_fields,
    first,
    ones,
    strip_prefix,
    zeros,
)
from mechscope.lm.models.transformer import TransformerConfig

OPT_FIELDS = {
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "ffn_dim",
    "max_position_embeddings",
    "do_layer_norm_before",
    "_remove_final_layer_norm",
    "word_embed_proj_dim",
    "num_attention_heads",
    "activation_function",
    "enable_bias",
    "layer_norm_elementwise_affine",
    "tie_word_embeddings",
    "bos_token_id",
    "eos_token_id",
}


def _matmul(a, b):
    """a @ b in float32 (a missing operand stays missing)."""
    return a if isinstance(a, MissingTensor) else b if isinstance(b, MissingTensor) else a.float() @ b.float()


def opt_config(config: dict) -> TransformerConfig:
    d, h = config["hidden_size"], config["num_attention_heads"]
    pre = bool(config.get("do_layer_norm_before", True))
    projected = config.get("word_embed_proj_dim", d) not in (None, d)
    bias = bool(config.get("enable_bias", True))
    return TransformerConfig(
        d_model=d,
        n_layers=config["num_hidden_layers"],
        n_heads=h,
        d_head=d // h,
        d_vocab=config["vocab_size"],
        n_ctx=config.get("max_position_embeddings", 2048),
        d_mlp=config["ffn_dim"],
        act=activation(config.get("activation_function", "relu"), "OPT", "activation_function"),
        norm="layernorm",
        norm_eps=1e-5,
        positional="learned",
        attn_bias=bias,
        attn_out_bias=bias,
        mlp_bias=bias,
        norm_after_residual=not pre,
        final_norm=pre and not config.get("_remove_final_layer_norm", False),
        tie_embeddings=bool(config.get("tie_word_embeddings", True)) and not projected,
        bos_token_id=config.get("bos_token_id"),
        eos_token_id=first(config.get("eos_token_id")),
        family="opt",
        name=config.get("_name_or_path", "opt"),
    )


def convert_opt(config: dict, state: StateDict) -> tuple[TransformerConfig, StateDict]:
    """OPTForCausalLM to ours."""
    check_fields(config, OPT_FIELDS, "OPT")
    cfg = opt_config(config)
    d, affine = cfg.d_model, config.get("layer_norm_elementwise_affine", True)
    s = strip_prefix(strip_prefix(state, "model."), "decoder.")
    emb = s["embed_tokens.weight"]
    out: StateDict = {"W_pos": s["embed_positions.weight"][2:]}
    if "project_in.weight" in s or "project_out.weight" in s:  # fold the projections around the stack
        out["W_E"] = _matmul(emb, s["project_in.weight"].T)
        lm = emb if config.get("tie_word_embeddings", True) else state["lm_head.weight"]
        out["W_U_untied"] = _matmul(lm, s["project_out.weight"]).T
    else:
        out["W_E"] = emb
        if not cfg.tie_embeddings:
            out["W_U_untied"] = state["lm_head.weight"].T

    def norm(ours: str, hf: str) -> None:
        out[ours + ".w"] = s[hf + ".weight"] if affine else ones(d)
        out[ours + ".b"] = s[hf + ".bias"] if affine else zeros(d)

    if cfg.final_norm:
        norm("ln_final", "final_layer_norm")
    for i in range(cfg.n_layers):
        p, q = f"layers.{i}.", f"blocks.{i}."
        for hf, ours in (("q_proj", "q"), ("k_proj", "k"), ("v_proj", "v"), ("out_proj", "o")):
            out[q + f"attn.{ours}.weight"] = s[p + f"self_attn.{hf}.weight"]
            if cfg.attn_bias:
                out[q + f"attn.{ours}.bias"] = s[p + f"self_attn.{hf}.bias"]
        for hf, ours in (("fc1", "up"), ("fc2", "down")):
            out[q + f"mlp.{ours}.weight"] = s[p + f"{hf}.weight"]
            if cfg.mlp_bias:
                out[q + f"mlp.{ours}.bias"] = s[p + f"{hf}.bias"]
        norm(q + "ln1", p + "self_attn_layer_norm")
        norm(q + "ln2", p + "final_layer_norm")
    return cfg, out
