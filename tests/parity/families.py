"""Tiny random checkpoints of every family, built offline by transformers (``from_config``).

Each config sets every variant switch of its family away from the default (partial rotary,
parallel blocks, sliding windows shorter than the test sequence, soft-capping, QK-norm...),
and :func:`save_random` perturbs norms and biases so that a mix-up shows in the logits.
"""

from __future__ import annotations

import torch

SEQ = 24  # test sequences are longer than every sliding window below (5)
V = 256
INIT = 0.1  # weights 5x transformers' default scale: attention scores large enough for every switch to show


def configs(transformers, d: int = 64, layers: int = 2, vocab: int = V, ff: int = 96, window: int = 5) -> dict:
    """Family name -> transformers config (the keys are the test ids); 4 heads of d/4 dims each.

    The defaults make the tiny test checkpoints; bench/lm.py asks for larger ones.
    """
    t = transformers
    dh = d // 4
    common = dict(vocab_size=vocab, hidden_size=d, num_hidden_layers=layers, num_attention_heads=4)
    common["max_position_embeddings"] = max(64, 4 * SEQ, 512 if d > 64 else 64)
    llama_like = dict(common, intermediate_size=ff, num_key_value_heads=2, bos_token_id=1, eos_token_id=2)
    gemma_like = dict(llama_like, head_dim=dh, query_pre_attn_scalar=dh + 4, sliding_window=window)
    alternate = [["sliding_attention", "full_attention"][i % 2] for i in range(layers)]
    return {
        "gpt_neox-parallel": t.GPTNeoXConfig(
            **common, intermediate_size=ff, rotary_pct=0.5, rotary_emb_base=5000, use_parallel_residual=True
        ),
        "gpt_neox-sequential": t.GPTNeoXConfig(
            **common, intermediate_size=ff, rotary_pct=0.25, use_parallel_residual=False, tie_word_embeddings=True
        ),
        "gpt_neo": t.GPTNeoConfig(
            vocab_size=vocab,
            hidden_size=d,
            num_layers=layers,
            num_heads=4,
            intermediate_size=ff,
            max_position_embeddings=common["max_position_embeddings"],
            attention_types=[[["global", "local"], layers // 2]],
            window_size=window,
            bos_token_id=0,
            eos_token_id=0,
        ),
        "gptj": t.GPTJConfig(
            vocab_size=vocab,
            n_embd=d,
            n_layer=layers,
            n_head=4,
            n_inner=ff,
            rotary_dim=dh // 2,
            n_positions=common["max_position_embeddings"],
            bos_token_id=0,
            eos_token_id=0,
        ),
        "opt": t.OPTConfig(**common, ffn_dim=ff, word_embed_proj_dim=d, enable_bias=True),
        "opt-postln-projected": t.OPTConfig(
            **common, ffn_dim=ff, do_layer_norm_before=False, word_embed_proj_dim=d // 2, activation_function="gelu"
        ),
        "llama-biases": t.LlamaConfig(**llama_like, attention_bias=True, mlp_bias=True),  # every Linear's bias
        "qwen2": t.Qwen2Config(**llama_like, use_sliding_window=True, sliding_window=window, max_window_layers=1),
        "qwen3": t.Qwen3Config(**llama_like, head_dim=dh, rope_theta=20000.0, tie_word_embeddings=True),
        "mistral": t.MistralConfig(**llama_like, sliding_window=window),
        "gemma": t.GemmaConfig(**dict(llama_like, num_key_value_heads=1), head_dim=dh),
        "gemma2": t.Gemma2Config(**gemma_like, attn_logit_softcapping=2.0, final_logit_softcapping=3.0),
        "gemma3": t.Gemma3TextConfig(
            **gemma_like,
            layer_types=alternate,
            final_logit_softcapping=3.0,
            rope_parameters={
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                "full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
            },
        ),
        "phi3": t.Phi3Config(**llama_like, sliding_window=window, partial_rotary_factor=0.5, pad_token_id=0),
    }


def save_random(transformers, config, path, seed: int = 0):
    """A random model (eager attention) saved with ``save_pretrained``; norms and biases perturbed."""
    config.initializer_range = config.init_std = INIT
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(path)
    return model


def tokens(n: int = 2, p: int = SEQ, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, V, (n, p), generator=torch.Generator().manual_seed(seed))
