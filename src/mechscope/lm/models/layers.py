"""The transformer's parts that hold no attention or MLP: the norms (LayerNorm, RMSNorm with Gemma's 1 + w, none),
rotary position tables and rotations (two halves or adjacent pairs, partial), the logit soft-cap and the attention
mask. Each norm exposes ``hook_normalized`` and its ``gain``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mechscope.core.hooks import HookPoint
from mechscope.lm.models.config import TransformerConfig


class LayerNorm(nn.Module):
    def __init__(self, d: int, eps: float) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(d))
        self.b = nn.Parameter(torch.zeros(d))
        self.eps = eps
        self.hook_normalized = HookPoint()

    @property
    def gain(self) -> torch.Tensor:
        """The multiplier applied to the normalised stream [D]."""
        return self.w

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
    """RMSNorm; ``plus_one`` (Gemma): the gain is 1 + w, applied in float32 before casting back."""

    def __init__(self, d: int, eps: float, plus_one: bool = False) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(d) if plus_one else torch.ones(d))
        self.eps, self.plus_one = eps, plus_one
        self.hook_normalized = HookPoint()

    @property
    def gain(self) -> torch.Tensor:
        """The multiplier applied to the normalised stream [D] (1 + w for Gemma's norms)."""
        return 1.0 + self.w if self.plus_one else self.w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()  # as transformers: normalise in float32, then back
        x = self.hook_normalized(x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))
        if self.plus_one:  # Gemma: (x * (1 + w)) in float32, then cast
            return (x * (1.0 + self.w.float())).to(dtype)
        return self.w * x.to(dtype)  # Llama: cast, then scale


class NoNorm(nn.Module):
    """No normalisation (``norm="none"``: tracr's compiled models): the identity, with the same hook point."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.d = d
        self.hook_normalized = HookPoint()

    @property
    def gain(self) -> torch.Tensor:
        return torch.ones(self.d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.hook_normalized(x)


def make_norm(cfg: TransformerConfig, d: int | None = None) -> nn.Module:
    d = d or cfg.d_model
    if cfg.norm == "none":
        return NoNorm(d)
    if cfg.norm == "layernorm":
        return LayerNorm(d, cfg.norm_eps)
    return RMSNorm(d, cfg.norm_eps, cfg.norm_weight_plus_one)


def rotary_tables(
    cfg: TransformerConfig, n: int, device=None, base: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [n, R] for positions 0..n-1, R = the rotated dims (float32).

    The layout matches the rotation: two halves (``[f0..f_{R/2-1}, f0..]``, transformers' "rotate
    half") or adjacent pairs (``[f0, f0, f1, f1, ...]``, GPT-J's "rotate every two").
    """
    r = cfg.rotary_width
    base = cfg.rotary_base if base is None else base
    inv_freq = 1.0 / (base ** (torch.arange(0, r, 2, dtype=torch.int64, device=device).float() / r))
    freqs = torch.arange(n, device=device).float()[:, None] * inv_freq[None, :]  # [n, R/2]
    emb = freqs.repeat_interleave(2, -1) if cfg.rotary_interleaved else torch.cat([freqs, freqs], -1)
    return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat([-b, a], -1)


def rotate_every_two(x: torch.Tensor) -> torch.Tensor:
    """(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...)."""
    return torch.stack([-x[..., 1::2], x[..., ::2]], -1).flatten(-2)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Rotate the first R dims of ``x`` [B,P,N,Dh] by cos/sin [P,1,R] (float32); the rest pass."""
    r = cos.shape[-1]
    head, rest = x[..., :r], x[..., r:]
    turned = (head * cos + (rotate_every_two(head) if interleaved else rotate_half(head)) * sin).to(x.dtype)
    return torch.cat([turned, rest], -1) if rest.shape[-1] else turned


def softcap(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    return x if cap is None else torch.tanh(x / cap) * cap


def attention_mask(p: int, window: int | None, device, causal: bool = True) -> torch.Tensor:
    """Which keys each query sees [P,K] (True: seen): causal (or every key), and within the window if one is set."""
    seen = torch.ones(p, p, dtype=torch.bool, device=device)
    if not causal:
        return seen
    seen = seen.tril()
    return seen if window is None else seen.triu(1 - window)
