"""The configuration of :class:`~mechscope.lm.models.transformer.HookedTransformer`: the shapes, and the switches
the families set away from GPT-2's or Llama's behaviour (the transformer's module docstring lists them), with the
MLP activations they name.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F

from mechscope.core.errors import MechscopeError


def solu(x: torch.Tensor) -> torch.Tensor:
    """SoLU(x) = x · softmax(x) over the MLP's hidden units (Elhage et al. 2022, "Softmax Linear Units")."""
    return x * F.softmax(x, dim=-1)


SOLU_LN = "solu_ln"  # SoLU followed by a LayerNorm over the hidden units, as the paper uses it (TransformerLens' name)

ACTIVATIONS = {
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "silu": F.silu,
    "relu": F.relu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),  # CLIP (OpenAI's QuickGELU)
    SOLU_LN: solu,  # the MLP adds its LayerNorm (``mlp.ln``) after it
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
    # switches the other families need (defaults: GPT-2 / Llama behaviour)
    parallel_attn_mlp: bool = False  # attention and MLP both read the block's input (GPT-NeoX, GPT-J)
    norm_after_residual: bool = False  # post-LN: ln1/ln2 normalise the residual after each addition (OPT-350m)
    final_norm: bool = True  # a norm before the unembedding (OPT-350m has none)
    post_attn_mlp_norm: bool = False  # ln1_post/ln2_post normalise attention and MLP outputs (Gemma 2/3)
    norm_weight_plus_one: bool = False  # RMSNorm scales by (1 + weight), in float32 (Gemma)
    qk_norm: bool = False  # RMSNorm over d_head on queries and keys, before rotary (Qwen3, Gemma 3)
    rotary_dim: int | None = None  # rotate the first rotary_dim dims of each head; None: all (NeoX, Phi-3)
    rotary_interleaved: bool = False  # rotate adjacent pairs (GPT-J) instead of the two halves
    rotary_base_local: float | None = None  # rotary base of the sliding-window layers (Gemma 3)
    sliding_window: int | None = None  # a query sees the keys fewer than this many positions back
    sliding_window_layers: tuple[int, ...] = ()  # the layers with the sliding window
    attn_scale: float | None = None  # attention-score multiplier; None: d_head ** -0.5
    attn_scores_float32: bool = False  # scores and softmax in float32 whatever the dtype (GPT-Neo, GPT-J)
    attn_logit_softcap: float | None = None  # scores -> cap * tanh(scores / cap) before the mask (Gemma 2)
    final_logit_softcap: float | None = None  # logits -> cap * tanh(logits / cap) (Gemma 2)
    embed_scale: float = 1.0  # token embeddings times this, rounded to the model's dtype (Gemma: sqrt(d_model))
    unembed_bias: bool = False  # a bias b_U on the logits (GPT-J)
    causal: bool = True  # False: every query sees every key (tracr's non-causal programs, vision transformers)
    d_vocab_out: int | None = None  # logits over this many classes instead of the vocabulary (tracr); untied only

    def __post_init__(self) -> None:  # JSON gives lists; keep the config hashable
        object.__setattr__(self, "sliding_window_layers", tuple(self.sliding_window_layers))

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    def validate(self) -> None:
        if self.act not in ACTIVATIONS:
            raise MechscopeError(f"unsupported activation {self.act!r}; supported: {', '.join(ACTIVATIONS)}")
        if self.norm not in ("layernorm", "rmsnorm", "none"):
            raise MechscopeError(f"unsupported norm {self.norm!r}; supported: layernorm, rmsnorm, none")
        if self.d_vocab_out is not None and (self.tie_embeddings or self.d_vocab_out < 1):
            raise MechscopeError("d_vocab_out needs an untied unembedding (tie_embeddings=False) and at least 1 class")
        if not self.causal and self.sliding_window is not None:
            raise MechscopeError("a sliding window needs causal attention")
        if self.positional not in ("learned", "rotary", "none"):
            raise MechscopeError(f"unsupported positional scheme {self.positional!r}")
        if self.n_heads % self.kv_heads:
            raise MechscopeError(f"{self.n_heads} query heads cannot share {self.kv_heads} key/value heads")
        if not self.attn_only and not self.d_mlp:
            raise MechscopeError("d_mlp is required unless attn_only")
        if self.act == SOLU_LN and self.gated_mlp:
            raise MechscopeError("the SoLU MLP (act='solu_ln') is not gated: gated_mlp must be False")
        if self.positional == "rotary" and self.rotary_width % 2:
            raise MechscopeError(f"rotary positions need an even number of rotated dims, got {self.rotary_width}")
        if self.rotary_width > self.d_head:
            raise MechscopeError(f"rotary_dim {self.rotary_dim} is larger than d_head {self.d_head}")
        if (self.sliding_window is None) != (not self.sliding_window_layers):
            raise MechscopeError("sliding_window and sliding_window_layers go together")
        if any(not 0 <= i < self.n_layers for i in self.sliding_window_layers):
            raise MechscopeError(f"sliding_window_layers {self.sliding_window_layers} outside 0..{self.n_layers - 1}")
        if self.norm_weight_plus_one and self.norm != "rmsnorm":
            raise MechscopeError("norm_weight_plus_one needs norm='rmsnorm'")
        if self.norm_after_residual and (self.parallel_attn_mlp or self.post_attn_mlp_norm):
            raise MechscopeError("norm_after_residual cannot combine with parallel_attn_mlp or post_attn_mlp_norm")

    @property
    def n_logits(self) -> int:
        """How many logits the model gives per position (the vocabulary, or ``d_vocab_out``)."""
        return self.d_vocab if self.d_vocab_out is None else self.d_vocab_out

    @property
    def rotary_width(self) -> int:
        """How many dims of each head the rotary embedding turns."""
        return self.d_head if self.rotary_dim is None else self.rotary_dim

    def variants(self) -> list[str]:
        """The family switches set away from their defaults, as ``name=value``."""
        names = [f.name for f in fields(self)]
        switches = fields(self)[names.index("parallel_attn_mlp") :]
        shown = [(f.name, getattr(self, f.name)) for f in switches if getattr(self, f.name) != f.default]
        return [f"{n}={v:.4g}" if isinstance(v, float) else f"{n}={v}" for n, v in shown]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TransformerConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise MechscopeError(f"unknown transformer config fields: {', '.join(unknown)}")
        return cls(**d)
