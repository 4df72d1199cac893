"""Llama-architecture GGUF files (SmolLM2 and kin): dequantised weights and the embedded tokenizer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from mechscope.errors import MechscopeError
from mechscope.models.convert.common import StateDict
from mechscope.models.transformer import TransformerConfig

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


def gguf_config(g, path: Path) -> TransformerConfig:
    arch = g.meta.get("general.architecture")
    if arch != "llama":
        raise MechscopeError(f"{path}: unsupported GGUF architecture {arch!r}; supported: llama")
    meta = {k.removeprefix("llama."): v for k, v in g.meta.items() if k.startswith("llama.")}
    unknown = sorted(set(meta) - GGUF_LLAMA_KEYS)
    if unknown:
        raise MechscopeError(f"{path}: unsupported GGUF field llama.{unknown[0]}")
    d, h = int(meta["embedding_length"]), int(meta["attention.head_count"])
    return TransformerConfig(
        d_model=d,
        n_layers=int(meta["block_count"]),
        n_heads=h,
        n_kv_heads=int(meta.get("attention.head_count_kv", h)),
        d_head=int(meta.get("rope.dimension_count", d // h)),
        d_vocab=int(meta.get("vocab_size", len(g.meta["tokenizer.ggml.tokens"]))),
        n_ctx=int(meta["context_length"]),
        d_mlp=int(meta["feed_forward_length"]),
        act="silu",
        gated_mlp=True,
        norm="rmsnorm",
        norm_eps=float(meta.get("attention.layer_norm_rms_epsilon", 1e-5)),
        positional="rotary",
        rotary_base=float(meta.get("rope.freq_base", 10000.0)),
        attn_bias=False,
        attn_out_bias=False,
        mlp_bias=False,
        tie_embeddings="output.weight" not in g.tensors,
        bos_token_id=g.meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=g.meta.get("tokenizer.ggml.eos_token_id"),
        family="llama",
        name=str(g.meta.get("general.name", path.stem)),
    )


def gguf_tensors(g, cfg: TransformerConfig) -> StateDict:
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
