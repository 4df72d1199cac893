"""What every converter shares: config-field checks, rotary settings, window layers, fused splits.

A converter is a pure function ``(config: dict, state) -> (TransformerConfig, our state dict)``
with the list of config fields it understands; a field outside the list is an error naming it
(silently ignoring, say, ``scale_attn_by_inverse_layer_idx`` would give wrong logits without a
word). ``state`` is read with plain indexing (``state[name]``), ``name in state`` for optional
tensors, and :func:`strip_prefix`; a partial checkpoint's absent tensors read as placeholders.
"""

from __future__ import annotations

import torch

from mechscope.core.errors import MechscopeError
from mechscope.lm.models.checkpoint import MissingTensor, StateDict, strip_prefix  # noqa: F401
from mechscope.lm.models.transformer import ACTIVATIONS

# config fields that carry no numerics (training, dropout, bookkeeping): accepted and ignored
BOOKKEEPING = {
    "architectures",
    "dtype",
    "torch_dtype",
    "transformers_version",
    "_name_or_path",
    "_model_name_or_path",
    "initializer_range",
    "init_std",
    "use_cache",
    "pad_token_id",
    "model_type",
    "task_specific_params",
    "id2label",
    "label2id",
    "return_dict",
    "output_hidden_states",
    "output_attentions",
    "torchscript",
    "unk_token_id",
    "quantization_config",
    "_attn_implementation_autoset",
    "attn_implementation",
    "pretraining_tp",
    "summary_activation",
    "summary_first_dropout",
    "summary_proj_to_labels",
    "summary_type",
    "summary_use_proj",
    "attn_pdrop",
    "embd_pdrop",
    "resid_pdrop",
    "attention_dropout",
    "hidden_dropout",
    "classifier_dropout",
    "embed_dropout",
    "resid_dropout",
    "dropout",
    "activation_dropout",
    "layerdrop",
    "attention_probs_dropout_prob",
    "hidden_dropout_prob",
    "is_llama_config",
    "use_return_dict",
    "n_ctx",
    "reorder_and_upcast_attn",
    "sep_token_id",
    "decoder_start_token_id",
    "problem_type",
    "_from_model_config",
    "gradient_checkpointing",
    "chunk_size_feed_forward",
    "finetuning_task",
    "prefix",
    "tokenizer_class",
    "is_decoder",
    "auto_map",
    "cache_implementation",
    "generation_config",
}


# the type and range of every config field a converter reads (checked before any converter runs, so a
# wrong type or an absurd value is a one-line error naming the field, never a TypeError or a division
# by zero). kind, lowest, highest, null allowed. Sizes above 2**31 - 1 are taken for corruption.
_SIZE = ("int", 1, 2**31 - 1, False)
_OPT_SIZE = ("int", 1, 2**31 - 1, True)
_EPS = ("number", 0, 1, False)
_BOOL = ("bool", None, None, True)  # null: the default, as transformers reads it
FIELD_TYPES: dict[str, tuple] = {
    **dict.fromkeys(
        ("n_embd", "n_head", "n_layer", "n_positions", "vocab_size", "hidden_size", "num_attention_heads",
         "num_hidden_layers", "intermediate_size", "max_position_embeddings", "ffn_dim", "word_embed_proj_dim",
         "num_heads", "num_layers", "window_size"), _SIZE),  # fmt: skip
    **dict.fromkeys(
        ("n_inner", "num_key_value_heads", "head_dim", "rotary_dim", "sliding_window", "query_pre_attn_scalar",
         "sliding_window_pattern", "_sliding_window_pattern"), _OPT_SIZE),  # fmt: skip
    "max_window_layers": ("int", 0, 2**31 - 1, True),
    **dict.fromkeys(("layer_norm_epsilon", "layer_norm_eps", "rms_norm_eps"), _EPS),
    **dict.fromkeys(("rope_theta", "rotary_emb_base", "rope_local_base_freq"), ("number", 1e-9, 1e30, False)),
    **dict.fromkeys(("partial_rotary_factor", "rotary_pct"), ("number", 1e-9, 1, False)),
    **dict.fromkeys(("attn_logit_softcapping", "final_logit_softcapping"), ("number", 1e-9, 1e30, True)),
    **dict.fromkeys(
        ("tie_word_embeddings", "scale_attn_weights", "scale_attn_by_inverse_layer_idx", "add_cross_attention",
         "use_parallel_residual", "attention_bias", "mlp_bias", "do_layer_norm_before", "enable_bias",
         "layer_norm_elementwise_affine", "use_sliding_window", "use_mrope", "_remove_final_layer_norm",
         "use_bidirectional_attention"), _BOOL),  # fmt: skip
    **dict.fromkeys(("activation_function", "hidden_act", "hidden_activation"), ("str", None, None, True)),
    **dict.fromkeys(("layer_types", "attention_layers", "attention_types"), ("list", None, None, True)),
    **dict.fromkeys(("rope_scaling", "rope_parameters"), ("object", None, None, True)),
    "_name_or_path": ("str", None, None, False),
}
LAYER_COUNTS = ("n_layer", "num_hidden_layers", "num_layers")


def check_types(config: dict, where) -> None:
    """Every field in :data:`FIELD_TYPES` that ``config`` holds, of its type and range; token ids too."""
    from mechscope.core.validate import field

    for key, (kind, lo, hi, nullable) in FIELD_TYPES.items():
        if key in config:
            field(config, key, kind, where, lo=lo, hi=hi, nullable=nullable)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        v = config.get(key)
        ids = v if isinstance(v, list) else [v]
        if v is not None and not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < 2**31 for i in ids):
            raise MechscopeError(f"{where}: field {key!r} is {v!r}; expected a token id (an integer ≥ 0) or null")


def check_fields(config: dict, understood: set[str], family: str) -> None:
    unknown = sorted(set(config) - understood - BOOKKEEPING)
    if unknown:
        raise MechscopeError(
            f"unsupported {family} config field {unknown[0]!r} (mechscope understands: {', '.join(sorted(understood))})"
        )


def require(config: dict, key: str, expected, family: str) -> None:
    if key in config and config[key] not in (expected if isinstance(expected, tuple) else (expected,)):
        raise MechscopeError(f"unsupported {family} config: {key}={config[key]!r} (supported: {expected!r})")


def first(x):
    return x[0] if isinstance(x, list) and x else x


def activation(name: str, family: str, key: str) -> str:
    if name not in ACTIVATIONS:
        raise MechscopeError(f"unsupported {family} config: {key}={name!r} (supported: {', '.join(ACTIVATIONS)})")
    return name


ROPE_KEYS = {"rope_type", "type", "rope_theta", "partial_rotary_factor"}


def rope(config: dict, family: str, base: float = 10000.0, params: dict | None = None) -> tuple[float, float]:
    """(base, partial rotary factor) from ``rope_parameters`` (transformers 5) or the older fields.

    Only unscaled RoPE: a scaling type (linear, dynamic, yarn, longrope, llama3) is an error, in ``params`` or in
    the config's ``rope_scaling`` (also where ``params`` are given: Gemma 3's per-layer-type parameters).
    """
    scaling = config.get("rope_scaling") or {}
    if params is None:  # as transformers: a rope_scaling dict replaces rope_parameters
        params = scaling or config.get("rope_parameters") or {}
    params = dict(params)
    for given in (params, scaling):
        kind = given.get("rope_type", given.get("type", "default"))
        if kind != "default":
            raise MechscopeError(f"unsupported {family} config: rope scaling {kind!r} (only unscaled RoPE)")
    extra = sorted(set(params) - ROPE_KEYS)
    if extra:
        raise MechscopeError(f"unsupported {family} config: rope parameter {extra[0]!r}")
    theta = params.get("rope_theta", config.get("rope_theta", base))
    factor = params.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
    return float(theta), float(factor)


def rotary_dim(d_head: int, factor: float) -> int | None:
    """The rotated dims of each head for a partial rotary factor (None: all)."""
    r = int(d_head * factor)
    return None if r == d_head else r


def window_layers(config: dict, n_layers: int, window: int | None, default_types, family: str):
    """(window, layers): the sliding window and the layers that use it, from ``layer_types``."""
    types = config.get("layer_types") or default_types
    if len(types) != n_layers:
        raise MechscopeError(f"unsupported {family} config: {len(types)} layer_types for {n_layers} layers")
    bad = sorted(set(types) - {"full_attention", "sliding_attention"})
    if bad:
        raise MechscopeError(f"unsupported {family} config: layer type {bad[0]!r}")
    layers = tuple(i for i, t in enumerate(types) if t == "sliding_attention")
    return (window, layers) if window is not None and layers else (None, ())


def shaped(t, shape: tuple[int, ...], name: str):
    """``t`` if it has ``shape`` (a fused tensor, checked before it is split); a one-line error otherwise."""
    if not isinstance(t, MissingTensor) and tuple(t.shape) != tuple(shape):
        raise MechscopeError(f"weight {name} has shape {list(t.shape)}, expected {list(shape)} from the config")
    return t


def ones(d: int) -> torch.Tensor:
    return torch.ones(d)


def zeros(d: int) -> torch.Tensor:
    return torch.zeros(d)
