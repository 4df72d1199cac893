"""A hookable decoder-only transformer: the GPT-2 family and the Llama family in one file.

Glossary of axis names (TransformerLens vocabulary):
    B batch, P position (query), K position (key), H query heads, G key/value heads,
    D d_model, Dh d_head, M d_mlp, V d_vocab

GPT-2: learned positions, LayerNorm, GELU (tanh approximation), biases, tied unembedding.
Llama (SmolLM2 and kin): rotary positions, RMSNorm, SwiGLU MLP, grouped-query attention.
Attention-only models (``attn_only=True``) drop the MLPs, for toy models.

Hook points (``blocks.{L}.`` prefix inside blocks)::

    hook_embed [B,P,D]  hook_pos_embed [B,P,D]
    blocks.L.hook_resid_pre / hook_resid_mid / hook_resid_post [B,P,D]
    blocks.L.ln1.hook_normalized, blocks.L.ln2.hook_normalized [B,P,D]
    blocks.L.attn.hook_q [B,P,H,Dh]  hook_k, hook_v [B,P,G,Dh]  hook_rot_q, hook_rot_k (rotary)
    blocks.L.attn.hook_attn_scores [B,H,P,K] (masked, before softmax)  hook_pattern [B,H,P,K]
    blocks.L.attn.hook_z [B,P,H,Dh]  hook_result [B,P,H,D] (each head's output; computed only when hooked)
    blocks.L.hook_attn_out [B,P,D]  blocks.L.mlp.hook_pre / hook_post [B,P,M]  blocks.L.hook_mlp_out [B,P,D]
    ln_final.hook_normalized [B,P,D]

Per-head weight views (they share storage with the parameters, so an edit through a view edits
the model): ``W_Q`` [H,D,Dh], ``W_K``/``W_V`` [G,D,Dh], ``W_O`` [H,Dh,D]; ``W_E`` [V,D],
``W_pos`` [n_ctx,D], ``W_U`` [D,V]. The numerics follow transformers' implementations (no
weight folding). When nothing is hooked on the attention scores or pattern, attention runs
through PyTorch's fused scaled_dot_product_attention; otherwise the explicit path computes
(and exposes) every intermediate.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from mechscope.errors import MechscopeError
from mechscope.hooks import HookPoint

ACTIVATIONS = {
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "silu": F.silu,
    "relu": F.relu,
}


@dataclass(frozen=True)
class TransformerConfig:
    d_model: int
    n_layers: int
    n_heads: int
    d_head: int
    d_vocab: int
    n_ctx: int
    n_kv_heads: int | None = None  # None: as many as query heads
    d_mlp: int | None = None
    act: str = "gelu_new"
    gated_mlp: bool = False
    norm: str = "layernorm"  # layernorm | rmsnorm
    norm_eps: float = 1e-5
    positional: str = "learned"  # learned | rotary | none
    rotary_base: float = 10000.0
    attn_bias: bool = True  # biases on Q, K, V
    attn_out_bias: bool = True
    mlp_bias: bool = True
    tie_embeddings: bool = True
    attn_only: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    family: str = "gpt2"
    name: str = ""

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    def validate(self) -> None:
        if self.act not in ACTIVATIONS:
            raise MechscopeError(f"unsupported activation {self.act!r}; supported: {', '.join(ACTIVATIONS)}")
        if self.norm not in ("layernorm", "rmsnorm"):
            raise MechscopeError(f"unsupported norm {self.norm!r}; supported: layernorm, rmsnorm")
        if self.positional not in ("learned", "rotary", "none"):
            raise MechscopeError(f"unsupported positional scheme {self.positional!r}")
        if self.n_heads % self.kv_heads:
            raise MechscopeError(f"{self.n_heads} query heads cannot share {self.kv_heads} key/value heads")
        if not self.attn_only and not self.d_mlp:
            raise MechscopeError("d_mlp is required unless attn_only")
        if self.positional == "rotary" and self.d_head % 2:
            raise MechscopeError(f"rotary positions need an even d_head, got {self.d_head}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TransformerConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise MechscopeError(f"unknown transformer config fields: {', '.join(unknown)}")
        return cls(**d)


class LayerNorm(nn.Module):
    def __init__(self, d: int, eps: float) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(d))
        self.b = nn.Parameter(torch.zeros(d))
        self.eps = eps
        self.hook_normalized = HookPoint()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (
            F.layer_norm(x, x.shape[-1:], self.w, self.b, self.eps)
            if not self.hook_normalized._forward_hooks
            else self._explicit(x)
        )

    def _explicit(self, x: torch.Tensor) -> torch.Tensor:
        x = x - x.mean(-1, keepdim=True)
        x = self.hook_normalized(x / (x.pow(2).mean(-1, keepdim=True) + self.eps).sqrt())
        return x * self.w + self.b


class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(d))
        self.eps = eps
        self.hook_normalized = HookPoint()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()  # as transformers: normalise in float32, then back
        x = self.hook_normalized(x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))
        return self.w * x.to(dtype)


def make_norm(cfg: TransformerConfig) -> nn.Module:
    return LayerNorm(cfg.d_model, cfg.norm_eps) if cfg.norm == "layernorm" else RMSNorm(cfg.d_model, cfg.norm_eps)


def rotary_tables(cfg: TransformerConfig, n: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [n, Dh] for positions 0..n-1 (the "rotate half" layout transformers uses)."""
    inv_freq = 1.0 / (
        cfg.rotary_base ** (torch.arange(0, cfg.d_head, 2, dtype=torch.int64, device=device).float() / cfg.d_head)
    )
    freqs = torch.arange(n, device=device).float()[:, None] * inv_freq[None, :]  # [n, Dh/2]
    emb = torch.cat([freqs, freqs], -1)
    return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat([-b, a], -1)


class Attention(nn.Module):
    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        h, g, dh, d = cfg.n_heads, cfg.kv_heads, cfg.d_head, cfg.d_model
        self.q = nn.Linear(d, h * dh, bias=cfg.attn_bias)
        self.k = nn.Linear(d, g * dh, bias=cfg.attn_bias)
        self.v = nn.Linear(d, g * dh, bias=cfg.attn_bias)
        self.o = nn.Linear(h * dh, d, bias=cfg.attn_out_bias)
        self.scale = dh**-0.5
        for name in ("q", "k", "v", "rot_q", "rot_k", "attn_scores", "pattern", "z", "result"):
            setattr(self, f"hook_{name}", HookPoint())

    # per-head views of the weights (no copies)
    @property
    def W_Q(self) -> torch.Tensor:
        return self.q.weight.view(self.cfg.n_heads, self.cfg.d_head, -1).transpose(1, 2)

    @property
    def W_K(self) -> torch.Tensor:
        return self.k.weight.view(self.cfg.kv_heads, self.cfg.d_head, -1).transpose(1, 2)

    @property
    def W_V(self) -> torch.Tensor:
        return self.v.weight.view(self.cfg.kv_heads, self.cfg.d_head, -1).transpose(1, 2)

    @property
    def W_O(self) -> torch.Tensor:
        return self.o.weight.view(-1, self.cfg.n_heads, self.cfg.d_head).permute(1, 2, 0)

    @property
    def b_O(self) -> torch.Tensor:
        return self.o.bias if self.o.bias is not None else torch.zeros(self.cfg.d_model)

    def forward(self, x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        cfg = self.cfg
        b, p, _ = x.shape
        q = self.hook_q(self.q(x).view(b, p, cfg.n_heads, cfg.d_head))  # [B,P,H,Dh]
        k = self.hook_k(self.k(x).view(b, p, cfg.kv_heads, cfg.d_head))  # [B,P,G,Dh]
        v = self.hook_v(self.v(x).view(b, p, cfg.kv_heads, cfg.d_head))  # [B,P,G,Dh]
        if rotary is not None:
            cos, sin = rotary[0][:p, None, :], rotary[1][:p, None, :]  # [P,1,Dh]
            q = self.hook_rot_q((q * cos + rotate_half(q) * sin).to(x.dtype))
            k = self.hook_rot_k((k * cos + rotate_half(k) * sin).to(x.dtype))
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B,H|G,P,Dh]
        groups = cfg.n_heads // cfg.kv_heads
        explicit = bool(self.hook_attn_scores._forward_hooks or self.hook_pattern._forward_hooks)
        if explicit:
            if groups > 1:
                k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)  # [B,H,K,Dh]
            scores = torch.matmul(q, k.transpose(-1, -2)) * self.scale  # [B,H,P,K]
            causal = torch.ones(p, p, dtype=torch.bool, device=x.device).tril()
            scores = self.hook_attn_scores(scores.masked_fill(~causal, float("-inf")))
            pattern = self.hook_pattern(F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype))
            z = torch.matmul(pattern, v)  # [B,H,P,Dh]
        else:
            z = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale, enable_gqa=groups > 1)
        z = self.hook_z(z.transpose(1, 2))  # [B,P,H,Dh]
        if self.hook_result._forward_hooks:
            result = self.hook_result(torch.einsum("bphd,hdm->bphm", z, self.W_O))  # [B,P,H,D]
            return result.sum(2) + self.b_O
        return self.o(z.reshape(b, p, cfg.n_heads * cfg.d_head))


class MLP(nn.Module):
    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.up = nn.Linear(cfg.d_model, cfg.d_mlp, bias=cfg.mlp_bias)
        self.gate = nn.Linear(cfg.d_model, cfg.d_mlp, bias=cfg.mlp_bias) if cfg.gated_mlp else None
        self.down = nn.Linear(cfg.d_mlp, cfg.d_model, bias=cfg.mlp_bias)
        self.act = ACTIVATIONS[cfg.act]
        self.hook_pre = HookPoint()  # the pre-activation (the gate's, for a gated MLP)
        self.hook_pre_linear = HookPoint()  # a gated MLP's linear branch
        self.hook_post = HookPoint()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate is None:
            h = self.hook_post(self.act(self.hook_pre(self.up(x))))  # [B,P,M]
        else:
            h = self.hook_post(self.act(self.hook_pre(self.gate(x))) * self.hook_pre_linear(self.up(x)))
        return self.down(h)


class Block(nn.Module):
    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.ln1 = make_norm(cfg)
        self.attn = Attention(cfg)
        self.ln2 = None if cfg.attn_only else make_norm(cfg)
        self.mlp = None if cfg.attn_only else MLP(cfg)
        for name in ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out"):
            setattr(self, f"hook_{name}", HookPoint())

    def forward(self, x: torch.Tensor, rotary) -> torch.Tensor:
        x = self.hook_resid_pre(x)
        x = self.hook_resid_mid(x + self.hook_attn_out(self.attn(self.ln1(x), rotary)))
        if self.mlp is not None:
            x = x + self.hook_mlp_out(self.mlp(self.ln2(x)))
        return self.hook_resid_post(x)


class HookedTransformer(nn.Module):
    """Decoder-only transformer; ``forward(tokens [B,P]) -> logits [B,P,V]``."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.W_E = nn.Parameter(torch.empty(cfg.d_vocab, cfg.d_model))
        self.hook_embed = HookPoint()
        if cfg.positional == "learned":
            self.W_pos = nn.Parameter(torch.empty(cfg.n_ctx, cfg.d_model))
            self.hook_pos_embed = HookPoint()
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_final = make_norm(cfg)
        self.W_U_untied = None if cfg.tie_embeddings else nn.Parameter(torch.empty(cfg.d_model, cfg.d_vocab))
        self._rotary: tuple[torch.Tensor, torch.Tensor] | None = None
        self.missing_weights: tuple[str, ...] = ()  # a partial checkpoint's absent parameters (left on meta)
        self.init_weights(torch.Generator().manual_seed(0))

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator, std: float = 0.02) -> None:
        """GPT-2-style initialisation from ``generator`` (for toy models trained from scratch)."""
        for name, p in self.named_parameters():
            if name.endswith((".w",)):
                p.fill_(1.0)
            elif p.dim() == 1:
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=generator) * std)

    @property
    def W_U(self) -> torch.Tensor:
        return self.W_E.T if self.W_U_untied is None else self.W_U_untied

    def check_tokens(self, tokens: torch.Tensor) -> None:
        if not isinstance(tokens, torch.Tensor) or tokens.dtype not in (torch.int64, torch.int32):
            raise MechscopeError("expected integer token ids")
        if tokens.dim() != 2:
            raise MechscopeError(f"expected tokens shaped [batch, position], got {list(tokens.shape)}")
        if tokens.shape[1] > self.cfg.n_ctx:
            raise MechscopeError(
                f"sequence of {tokens.shape[1]} tokens is longer than the context window of {self.cfg.n_ctx}"
            )
        if tokens.numel() and (tokens.min() < 0 or tokens.max() >= self.cfg.d_vocab):
            bad = int(tokens[(tokens < 0) | (tokens >= self.cfg.d_vocab)][0])
            raise MechscopeError(f"token id {bad} outside the vocabulary 0..{self.cfg.d_vocab - 1}")

    def rotary(self, n: int, device) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self.cfg.positional != "rotary":
            return None
        if self._rotary is None or self._rotary[0].shape[0] < n or self._rotary[0].device != device:
            self._rotary = rotary_tables(self.cfg, max(n, 256), device)
        return self._rotary

    def check_complete(self) -> None:
        """Refuse a forward pass on a partial checkpoint (weights-only analysis only)."""
        if self.missing_weights:
            import re

            names = list(dict.fromkeys(re.sub(r"\.\d+\.", ".*.", n) for n in self.missing_weights))
            raise MechscopeError(
                f"{self.cfg.name or 'this model'} is a partial checkpoint without {', '.join(names[:4])}"
                f"{' and more' if len(names) > 4 else ''}: it cannot run a forward pass; "
                "weights-only analyses (mechscope lm circuits) work on it"
            )

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token (and learned position) embeddings: the residual stream entering block 0, [B,P,D]."""
        self.check_complete()
        self.check_tokens(tokens)
        b, p = tokens.shape
        x = self.hook_embed(F.embedding(tokens, self.W_E))  # [B,P,D]
        if self.cfg.positional == "learned":
            x = x + self.hook_pos_embed(self.W_pos[:p].unsqueeze(0).expand(b, p, -1))
        return x

    def run_blocks(self, x: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Blocks ``start``.. on the residual stream ``x`` [B,P,D]; returns the final residual."""
        self.check_complete()
        rotary = self.rotary(x.shape[1], x.device)
        for block in self.blocks[start:]:
            x = block(x, rotary)
        return x

    def unembed(self, resid: torch.Tensor) -> torch.Tensor:
        """Final norm and unembedding: residual [..., D] -> logits [..., V]."""
        x = self.ln_final(resid)
        return F.linear(x, self.W_E) if self.W_U_untied is None else x @ self.W_U_untied

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.unembed(self.run_blocks(self.embed(tokens)))  # [B,P,V]

    @torch.no_grad()
    def generate(self, tokens: torch.Tensor, max_new_tokens: int = 20, stop_at_eos: bool = True) -> torch.Tensor:
        """Greedy decoding (argmax at every step); returns prompt and continuation [B, P+new]."""
        if max_new_tokens < 0:
            raise MechscopeError(f"max_new_tokens must be 0 or more, got {max_new_tokens}")
        self.check_tokens(tokens)
        for _ in range(max_new_tokens):
            if tokens.shape[1] >= self.cfg.n_ctx:
                break
            nxt = self(tokens)[:, -1].argmax(-1, keepdim=True)
            tokens = torch.cat([tokens, nxt], 1)
            if stop_at_eos and self.cfg.eos_token_id is not None and (nxt == self.cfg.eos_token_id).all():
                break
        return tokens


def n_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def describe(model: HookedTransformer) -> dict:
    c = model.cfg
    return {
        "name": c.name,
        "family": c.family,
        "n_layers": c.n_layers,
        "d_model": c.d_model,
        "n_heads": c.n_heads,
        "n_kv_heads": c.kv_heads,
        "d_head": c.d_head,
        "d_mlp": c.d_mlp,
        "d_vocab": c.d_vocab,
        "n_ctx": c.n_ctx,
        "positional": c.positional,
        "norm": c.norm,
        "act": c.act,
        "parameters": n_parameters(model),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
    }
