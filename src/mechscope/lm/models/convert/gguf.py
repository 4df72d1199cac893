"""Llama-architecture GGUF files (SmolLM2 and kin): dequantised weights and the embedded tokenizer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from mechscope.core.errors import MechscopeError
from mechscope.lm.models.convert.common import StateDict
from mechscope.lm.models.transformer import TransformerConfig

GGUF_LLAMA_KEYS = {
    "block_count",
    "context_length",
    "embedding_length",
    "feed_forward_length",
    "attention.head_count",
    "attention.head_count_kv",
    "rope.freq_base",
    "attention.layer_norm_rms_epsilon",
    "vocab_size",
    "rope.dimension_count",
    "attention.key_length",
    "attention.value_length",
}


def unpermute_rope(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (interleaved RoPE pairs -> "rotate half" halves)."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


REQUIRED = ("block_count", "context_length", "embedding_length", "feed_forward_length", "attention.head_count")


def _meta(g, path: Path, key: str, kind: str, default=None, lo=None):
    """Metadata ``key`` checked to be ``kind`` (int or float) and ≥ ``lo``; a one-line error naming it."""
    value = g.meta.get(key, default)
    if value is None:
        raise MechscopeError(f"{path}: GGUF metadata key {key} is missing; expected {_kinds[kind]}")
    ok = isinstance(value, (int, float) if kind == "float" else int) and not isinstance(value, bool)
    if ok and kind == "float":
        ok = bool(np.isfinite(value))
    if not ok or (lo is not None and value < lo) or value > 2**31 - 1:
        raise MechscopeError(f"{path}: GGUF metadata key {key} is {value!r}; expected {_kinds[kind]}"
                             + (f" ≥ {lo}" if lo is not None else ""))  # fmt: skip
    return value


_kinds = {"int": "an integer", "float": "a finite number"}


def gguf_config(g, path: Path) -> TransformerConfig:
    arch = g.meta.get("general.architecture")
    if arch != "llama":
        raise MechscopeError(f"{path}: unsupported GGUF architecture {arch!r}; supported: llama")
    meta = {k.removeprefix("llama."): v for k, v in g.meta.items() if k.startswith("llama.")}
    unknown = sorted(set(meta) - GGUF_LLAMA_KEYS)
    if unknown:
        raise MechscopeError(f"{path}: unsupported GGUF field llama.{unknown[0]}")

    def get(key, kind="int", default=None, lo=1):
        return _meta(g, path, "llama." + key, kind, default, lo)

    tokens = g.meta.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) for t in tokens):
        raise MechscopeError(f"{path}: GGUF metadata key tokenizer.ggml.tokens must be a non-empty list of strings")
    d, h = get("embedding_length"), get("attention.head_count")
    n_layers = get("block_count")
    if n_layers > len(g.tensors):
        raise MechscopeError(
            f"{path}: GGUF metadata key llama.block_count is {n_layers}; the file holds only {len(g.tensors)} tensors"
        )
    kv = get("attention.head_count_kv", default=h)
    if kv > h or h % kv:
        raise MechscopeError(f"{path}: {h} attention heads cannot share {kv} key/value heads (llama.attention.*)")
    d_head = _head_size(get, d, h, path)
    ids = {}
    for key in ("bos_token_id", "eos_token_id"):
        v = g.meta.get("tokenizer.ggml." + key)
        if v is not None and not (isinstance(v, int) and not isinstance(v, bool) and 0 <= v < len(tokens)):
            raise MechscopeError(f"{path}: GGUF metadata key tokenizer.ggml.{key} is {v!r}; expected a token id "
                                 f"from 0 to {len(tokens) - 1}")  # fmt: skip
        ids[key] = v
    name = g.meta.get("general.name", path.stem)
    return TransformerConfig(
        d_model=d,
        n_layers=n_layers,
        n_heads=h,
        n_kv_heads=kv,
        d_head=d_head,
        d_vocab=get("vocab_size", default=len(tokens)),
        n_ctx=get("context_length"),
        d_mlp=get("feed_forward_length"),
        act="silu",
        gated_mlp=True,
        norm="rmsnorm",
        norm_eps=float(get("attention.layer_norm_rms_epsilon", "float", 1e-5, lo=0)),
        positional="rotary",
        rotary_base=float(get("rope.freq_base", "float", 10000.0, lo=1e-9)),
        attn_bias=False,
        attn_out_bias=False,
        mlp_bias=False,
        tie_embeddings="output.weight" not in g.tensors,
        bos_token_id=ids["bos_token_id"],
        eos_token_id=ids["eos_token_id"],
        family="llama",
        name=name if isinstance(name, str) else path.stem,
    )


def _head_size(get, d: int, h: int, path: Path) -> int:
    """The head size as llama.cpp reads it: ``attention.key_length`` (default embedding_length / head_count), the
    same for values, rotated whole (``rope.dimension_count``, default the head size: llama.cpp's Llama permutes each
    head's rows whole, so a partial rotation cannot be undone)."""
    d_head = get("attention.key_length", default=d // h if d % h == 0 else 0, lo=0)
    if d_head < 2 or d_head % 2:
        raise MechscopeError(f"{path}: GGUF head size {d_head} (llama.attention.key_length, or embedding_length / "
                             "head_count); expected an even integer ≥ 2")  # fmt: skip
    for key in ("attention.value_length", "rope.dimension_count"):
        if get(key, default=d_head) != d_head:
            raise MechscopeError(f"{path}: GGUF metadata key llama.{key} is {get(key)} but the key head size is "
                                 f"{d_head}; supported: values and rotary embeddings over the whole head")  # fmt: skip
    return d_head


def expected_shapes(cfg: TransformerConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a Llama GGUF file of this config holds, with its shape (numpy order)."""
    d, v, ff, dh = cfg.d_model, cfg.d_vocab, cfg.d_mlp, cfg.d_head
    q, kv = cfg.n_heads * dh, cfg.kv_heads * dh
    shapes = {"token_embd.weight": (v, d), "output_norm.weight": (d,)}
    if not cfg.tie_embeddings:
        shapes["output.weight"] = (v, d)
    for i in range(cfg.n_layers):
        p = f"blk.{i}."
        shapes |= {
            p + "attn_norm.weight": (d,), p + "ffn_norm.weight": (d,), p + "attn_q.weight": (q, d),
            p + "attn_k.weight": (kv, d), p + "attn_v.weight": (kv, d), p + "attn_output.weight": (d, q),
            p + "ffn_gate.weight": (ff, d), p + "ffn_up.weight": (ff, d), p + "ffn_down.weight": (d, ff),
        }  # fmt: skip
    return shapes


def check_tensors(g, cfg: TransformerConfig) -> None:
    """The file's tensors match the config exactly: none missing, none unexpected, every shape as the config says."""
    shapes = expected_shapes(cfg)
    missing = [k for k in shapes if k not in g.tensors]
    if missing:
        raise MechscopeError(f"{g.path}: tensor {missing[0]} is missing (the metadata says {cfg.n_layers} blocks)")
    extra = sorted(set(g.tensors) - set(shapes))
    if extra:
        raise MechscopeError(
            f"{g.path}: tensor {extra[0]} is not in a {cfg.n_layers}-block Llama of this config "
            f"({len(extra)} unexpected tensor(s)); expected the tensors to match the metadata exactly"
        )
    for k, shape in shapes.items():
        if tuple(g.tensors[k].shape) != shape:
            raise MechscopeError(
                f"{g.path}: tensor {k} has shape {list(g.tensors[k].shape)}; the metadata gives {list(shape)}"
            )


def gguf_tensors(g, cfg: TransformerConfig) -> StateDict:
    check_tensors(g, cfg)

    def t(name: str) -> torch.Tensor:  # dequantised float32, copied into torch's own memory
        return torch.from_numpy(g.tensor(name)).clone()

    def rope_rows(name: str, heads: int) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(unpermute_rope(g.tensor(name), heads)))

    state: StateDict = {"W_E": t("token_embd.weight"), "ln_final.w": t("output_norm.weight")}
    if not cfg.tie_embeddings:
        state["W_U_untied"] = t("output.weight").T
    for i in range(cfg.n_layers):
        p, q = f"blk.{i}.", f"blocks.{i}."
        state[q + "attn.q.weight"] = rope_rows(p + "attn_q.weight", cfg.n_heads)
        state[q + "attn.k.weight"] = rope_rows(p + "attn_k.weight", cfg.kv_heads)
        for ours, theirs in (("attn.v", "attn_v"), ("attn.o", "attn_output"), ("mlp.gate", "ffn_gate")):
            state[q + ours + ".weight"] = t(p + theirs + ".weight")
        state[q + "mlp.up.weight"] = t(p + "ffn_up.weight")
        state[q + "mlp.down.weight"] = t(p + "ffn_down.weight")
        state[q + "ln1.w"] = t(p + "attn_norm.weight")
        state[q + "ln2.w"] = t(p + "ffn_norm.weight")
    return state
