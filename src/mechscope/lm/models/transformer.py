"""A hookable decoder-only transformer: GPT-2, Llama and the families that vary them, in one file.

Glossary of axis names (TransformerLens vocabulary):
    B batch, P position (query), K position (key), H query heads, G key/value heads,
    D d_model, Dh d_head, M d_mlp, V d_vocab

GPT-2: learned positions, LayerNorm, GELU (tanh approximation), biases, tied unembedding.
Llama (SmolLM2 and kin): rotary positions, RMSNorm, SwiGLU MLP, grouped-query attention.
Attention-only models (``attn_only=True``) drop the MLPs, for toy models. ``act='solu_ln'``: the
SoLU MLP of Elhage et al. 2022, x · softmax(x) over the hidden units followed by a LayerNorm over
them (``mlp.ln``, own gain and bias), as TransformerLens' ``solu_ln``.

The other families are the same network with switches, each a config field named for what it
does (defaults: GPT-2/Llama behaviour): ``parallel_attn_mlp`` (GPT-NeoX, GPT-J), ``rotary_dim``
(partial rotary: NeoX, Phi-3, GPT-J), ``rotary_interleaved`` (GPT-J's adjacent pairs),
``attn_bias`` without ``attn_out_bias`` (Qwen2), ``qk_norm`` (Qwen3, Gemma 3), ``sliding_window``
with ``sliding_window_layers`` (Mistral, Gemma 2/3, GPT-Neo's local layers, Qwen, Phi-3),
``rotary_base_local`` (Gemma 3's local layers), ``attn_logit_softcap`` and
``final_logit_softcap`` (Gemma 2), ``embed_scale`` and ``norm_weight_plus_one`` (Gemma),
``post_attn_mlp_norm`` (Gemma 2/3: ``ln1_post``, ``ln2_post``), ``attn_scale`` (GPT-Neo's
unscaled attention, Gemma's query_pre_attn_scalar), ``attn_scores_float32`` (GPT-Neo, GPT-J
compute scores in float32 whatever the dtype), ``norm_after_residual`` and ``final_norm``
(OPT-350m's post-LN), ``unembed_bias`` (GPT-J's ``b_U``), ``causal`` (False: every position attends to the whole
sequence, as tracr's compiled encoders and vision transformers do), ``norm="none"`` (no normalisation at all:
tracr), ``d_vocab_out`` (an unembedding onto other classes than the input vocabulary: tracr's outputs).

Hook points (``blocks.{L}.`` prefix inside blocks)::

    hook_embed [B,P,D]  hook_pos_embed [B,P,D]
    blocks.L.hook_resid_pre / hook_resid_mid / hook_resid_post [B,P,D]
    blocks.L.ln1.hook_normalized, blocks.L.ln2.hook_normalized [B,P,D]
    blocks.L.attn.hook_q [B,P,H,Dh]  hook_k, hook_v [B,P,G,Dh]  hook_rot_q, hook_rot_k (rotary)
    blocks.L.attn.q_norm.hook_normalized, k_norm (qk_norm)  blocks.L.ln1_post, ln2_post (post_attn_mlp_norm)
    blocks.L.attn.hook_attn_scores [B,H,P,K] (masked, before softmax)  hook_pattern [B,H,P,K]
    blocks.L.attn.hook_z [B,P,H,Dh]  hook_result [B,P,H,D] (each head's output; computed only when hooked)
    blocks.L.attn.hook_q_input [B,P,H,D], hook_k_input / hook_v_input [B,P,G,D]: each head's (key/value head's)
        own copy of the residual stream before ln1, which is then applied per head (TransformerLens'
        use_split_qkv_input; active only when one of them is hooked; ln1.hook_normalized then fires three times)
    blocks.L.hook_attn_out [B,P,D]  blocks.L.hook_mlp_in [B,P,D] (the MLP sublayer's input, before ln2)
    blocks.L.mlp.hook_in [B,P,D] (the MLP's own input, after ln2)  blocks.L.mlp.hook_pre / hook_post [B,P,M]
    blocks.L.hook_mlp_out [B,P,D]
    blocks.L.mlp.hook_mid [B,P,M] (act='solu_ln' only: after SoLU, before the MLP's LayerNorm ``mlp.ln``)
    ln_final.hook_normalized [B,P,D]

Per-head weight views (they share storage with the parameters, so an edit through a view edits
the model): ``W_Q`` [H,D,Dh], ``W_K``/``W_V`` [G,D,Dh], ``W_O`` [H,Dh,D]; ``W_E`` [V,D],
``W_pos`` [n_ctx,D], ``W_U`` [D,V], ``b_U`` [V] (unembed_bias). The numerics follow transformers' implementations (no
weight folding). When nothing is hooked on the attention scores or pattern, attention runs
through PyTorch's fused scaled_dot_product_attention; otherwise the explicit path computes
(and exposes) every intermediate; soft-capped and float32-score attention always takes it.
A model spread over devices (``accelerate``'s dispatch) moves the residual stream where each
block lives; ``embed`` and ``unembed`` move it to the embedding's and unembedding's devices.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from mechscope.core.errors import MechscopeError
from mechscope.core.hooks import HookPoint
from mechscope.core.torch_utils import described, n_parameters
from mechscope.core.validate import scalar


def _block_bound(v, n: int) -> int | None:
    """``v`` as a block boundary: an integer (or a 0-d tensor or array of one) of at least 0, past ``n`` read as
    ``n`` as a slice reads it; None otherwise (a negative one was counted from the end without a word)."""
    v = scalar(v)
    if not isinstance(v, numbers.Integral) or isinstance(v, bool) or v < 0:
        return None
    return min(int(v), n)


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


def _finite(v) -> bool:
    try:
        return math.isfinite(v)
    except OverflowError:  # an integer past a float's range (10**400 in a hand-edited record)
        return False


SIZES = ("d_model", "n_layers", "n_heads", "d_head", "d_vocab", "n_ctx", "n_kv_heads", "d_mlp", "rotary_dim",
         "sliding_window", "d_vocab_out")  # fmt: skip


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
        for name in ("bos_token_id", "eos_token_id"):  # a config.json may list several (Llama 3's eos): the first
            v = getattr(self, name)
            if isinstance(v, (list, tuple)) and v:
                object.__setattr__(self, name, v[0])
        for f in fields(self):  # NumPy scalars from the Python API as the Python numbers JSON and checks expect
            v = getattr(self, f.name)
            if type(v).__module__ == "numpy" and getattr(v, "ndim", None) == 0:  # np.int64, np.float32, np.bool_
                object.__setattr__(self, f.name, v.item())

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    def check_types(self) -> None:
        """Each field of its declared type, sizes at least 1 (a train-toy record edited by hand gave tracebacks from
        deep inside torch: n_heads "4", n_ctx -5, norm_eps "x", d_model null)."""
        for f in fields(self):
            v, kind = getattr(self, f.name), str(f.type).replace(" ", "")
            if v is None and kind.endswith("|None"):
                continue
            kind = kind.removesuffix("|None")
            ok = {
                "int": isinstance(v, int) and not isinstance(v, bool),
                "float": isinstance(v, (int, float)) and not isinstance(v, bool) and _finite(v),
                "bool": isinstance(v, bool),
                "str": isinstance(v, str),
            }.get(kind, True)  # tuple[int, ...]: checked by validate against n_layers
            if not ok:
                raise MechscopeError(f"transformer config field {f.name!r} is {v!r}; expected {str(f.type)}")
            if f.name in SIZES and v < 1:
                raise MechscopeError(f"transformer config field {f.name!r} is {v}; expected at least 1")

    def validate(self) -> None:
        self.check_types()
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


class Attention(nn.Module):
    def __init__(self, cfg: TransformerConfig, layer: int = 0) -> None:
        super().__init__()
        self.cfg = cfg
        h, g, dh, d = cfg.n_heads, cfg.kv_heads, cfg.d_head, cfg.d_model
        self.q = nn.Linear(d, h * dh, bias=cfg.attn_bias)
        self.k = nn.Linear(d, g * dh, bias=cfg.attn_bias)
        self.v = nn.Linear(d, g * dh, bias=cfg.attn_bias)
        self.o = nn.Linear(h * dh, d, bias=cfg.attn_out_bias)
        self.scale = dh**-0.5 if cfg.attn_scale is None else cfg.attn_scale
        local = layer in cfg.sliding_window_layers
        self.window = cfg.sliding_window if local else None  # keys fewer than this many positions back
        self.rotary_base = cfg.rotary_base_local if local and cfg.rotary_base_local is not None else cfg.rotary_base
        self.q_norm = make_norm(cfg, dh) if cfg.qk_norm else None
        self.k_norm = make_norm(cfg, dh) if cfg.qk_norm else None
        for name in ("q", "k", "v", "rot_q", "rot_k", "attn_scores", "pattern", "z", "result"):
            setattr(self, f"hook_{name}", HookPoint())
        for name in ("q_input", "k_input", "v_input"):  # split inputs: active only when hooked
            setattr(self, f"hook_{name}", HookPoint())

    def split_inputs(self) -> bool:
        """Whether a split-input hook point is hooked: then each head reads its own copy of the residual stream
        (``hook_q_input`` [B,P,H,D], ``hook_k_input``/``hook_v_input`` [B,P,G,D]) and ln1 is applied per head."""
        return bool(self.hook_q_input._forward_hooks or self.hook_k_input._forward_hooks
                    or self.hook_v_input._forward_hooks)  # fmt: skip

    def _split_qkv(self, x: torch.Tensor, norm: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q [B,P,H,Dh], k, v [B,P,G,Dh] from the residual stream ``x`` [B,P,D], each head (key/value head) through
        its own input hook and the block's norm (TransformerLens' ``use_split_qkv_input``)."""
        cfg = self.cfg
        if self.q.weight.is_meta:
            raise MechscopeError("split q/k/v inputs need the attention weights in memory (not offloaded)")
        b, p, d = x.shape
        out = []
        for lin, hook, n in ((self.q, self.hook_q_input, cfg.n_heads), (self.k, self.hook_k_input, cfg.kv_heads),
                             (self.v, self.hook_v_input, cfg.kv_heads)):  # fmt: skip
            xin = norm(hook(x[:, :, None, :].expand(b, p, n, d)))  # [B,P,N,D]
            w = lin.weight.view(n, cfg.d_head, d)  # [N,Dh,D]
            y = torch.einsum("bpnd,ned->bpne", xin, w)
            out.append(y if lin.bias is None else y + lin.bias.view(n, cfg.d_head))
        return out[0], out[1], out[2]

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
        if self.o.bias is not None:
            return self.o.bias
        return torch.zeros(self.cfg.d_model, dtype=self.o.weight.dtype, device=self.o.weight.device)

    def forward(
        self, x: torch.Tensor, rotary: dict[float, tuple[torch.Tensor, torch.Tensor]] | None, norm=None
    ) -> torch.Tensor:
        """``x`` [B,P,D] (normalised; with ``norm``, the residual stream, split per head and normalised here);
        ``rotary``: cos/sin tables [n,R] by rotary base (None without rotary)."""
        cfg = self.cfg
        b, p, _ = x.shape
        if norm is not None:
            q, k, v = self._split_qkv(x, norm)
            q, k, v = self.hook_q(q), self.hook_k(k), self.hook_v(v)
        else:
            q = self.hook_q(self.q(x).view(b, p, cfg.n_heads, cfg.d_head))  # [B,P,H,Dh]
            k = self.hook_k(self.k(x).view(b, p, cfg.kv_heads, cfg.d_head))  # [B,P,G,Dh]
            v = self.hook_v(self.v(x).view(b, p, cfg.kv_heads, cfg.d_head))  # [B,P,G,Dh]
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rotary is not None:
            cos, sin = (t[:p, None, :] for t in rotary[self.rotary_base])  # [P,1,R]
            q = self.hook_rot_q(apply_rotary(q, cos, sin, cfg.rotary_interleaved))
            k = self.hook_rot_k(apply_rotary(k, cos, sin, cfg.rotary_interleaved))
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B,H|G,P,Dh]
        groups = cfg.n_heads // cfg.kv_heads
        explicit = (
            self.hook_attn_scores._forward_hooks
            or self.hook_pattern._forward_hooks
            or cfg.attn_logit_softcap is not None
            or (cfg.attn_scores_float32 and q.dtype != torch.float32)
        )
        if explicit:
            if groups > 1:
                k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)  # [B,H,K,Dh]
            if cfg.attn_scores_float32:
                q, k = q.float(), k.float()
            scores = softcap(torch.matmul(q, k.transpose(-1, -2)) * self.scale, cfg.attn_logit_softcap)  # [B,H,P,K]
            seen = attention_mask(p, self.window, x.device, cfg.causal)
            scores = self.hook_attn_scores(scores.masked_fill(~seen, float("-inf")))
            soft = torch.promote_types(scores.dtype, torch.float32)  # float32 at least (float64 stays float64)
            pattern = self.hook_pattern(F.softmax(scores, dim=-1, dtype=soft).to(v.dtype))
            z = torch.matmul(pattern, v)  # [B,H,P,Dh]
        else:
            seen = None if self.window is None else attention_mask(p, self.window, x.device)
            z = F.scaled_dot_product_attention(
                q, k, v, attn_mask=seen, is_causal=seen is None and cfg.causal, scale=self.scale,
                enable_gqa=groups > 1,
            )  # fmt: skip
        z = self.hook_z(z.transpose(1, 2))  # [B,P,H,Dh]
        if self.hook_result._forward_hooks:
            result, bias = self.per_head(z)
            return self.hook_result(result).sum(2) + bias
        return self.o(z.reshape(b, p, cfg.n_heads * cfg.d_head))

    def per_head(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each head's output [B,P,H,D] and the output bias. Weights offloaded by accelerate (meta outside
        ``o``'s own forward) are read through one call of ``o``: each head's z alone, and zeros for the bias."""
        if not self.o.weight.is_meta:
            return torch.einsum("bphd,hdm->bphm", z, self.W_O), self.b_O
        H = z.shape[2]
        eye = torch.eye(H + 1, H, dtype=z.dtype, device=z.device)  # the last row: every head zero
        out = self.o((eye[:, :, None] * z[:, :, None]).flatten(-2))  # [B,P,H+1,D]
        bias = out[:, :, H]
        return out[:, :, :H] - bias[:, :, None], bias


class MLP(nn.Module):
    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.up = nn.Linear(cfg.d_model, cfg.d_mlp, bias=cfg.mlp_bias)
        self.gate = nn.Linear(cfg.d_model, cfg.d_mlp, bias=cfg.mlp_bias) if cfg.gated_mlp else None
        self.down = nn.Linear(cfg.d_mlp, cfg.d_model, bias=cfg.mlp_bias)
        self.act = ACTIVATIONS[cfg.act]
        self.hook_in = HookPoint()  # the MLP's input (after ln2): a transcoder's input
        self.hook_pre = HookPoint()  # the pre-activation (the gate's, for a gated MLP)
        self.hook_pre_linear = HookPoint()  # a gated MLP's linear branch
        self.ln = None  # the SoLU MLP's LayerNorm over its hidden units (act='solu_ln'), its own gain and bias
        if cfg.act == SOLU_LN:
            self.hook_mid = HookPoint()  # after SoLU, before the LayerNorm
            self.ln = LayerNorm(cfg.d_mlp, cfg.norm_eps)
        self.hook_post = HookPoint()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.hook_in(x)
        if self.ln is not None:  # SoLU: x · softmax(x), then LayerNorm (hook_post reads its output)
            h = self.hook_post(self.ln(self.hook_mid(self.act(self.hook_pre(self.up(x))))))  # [B,P,M]
        elif self.gate is None:
            h = self.hook_post(self.act(self.hook_pre(self.up(x))))  # [B,P,M]
        else:
            h = self.hook_post(self.act(self.hook_pre(self.gate(x))) * self.hook_pre_linear(self.up(x)))
        return self.down(h)


class Block(nn.Module):
    def __init__(self, cfg: TransformerConfig, layer: int = 0) -> None:
        super().__init__()
        self.cfg = cfg
        self.ln1 = make_norm(cfg)
        self.attn = Attention(cfg, layer)
        self.ln2 = None if cfg.attn_only else make_norm(cfg)
        self.mlp = None if cfg.attn_only else MLP(cfg)
        post = cfg.post_attn_mlp_norm
        self.ln1_post = make_norm(cfg) if post else None
        self.ln2_post = make_norm(cfg) if post and not cfg.attn_only else None
        for name in ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_in", "mlp_out"):
            setattr(self, f"hook_{name}", HookPoint())

    def forward(self, x: torch.Tensor, rotary) -> torch.Tensor:
        x = self.hook_resid_pre(x)
        if self.cfg.norm_after_residual:
            return self._post_norm(x, rotary)
        attn_out = self.attn(x, rotary, self.ln1) if self.attn.split_inputs() else self.attn(self.ln1(x), rotary)
        attn_out = self.hook_attn_out(attn_out if self.ln1_post is None else self.ln1_post(attn_out))
        if self.mlp is None:
            return self.hook_resid_post(self.hook_resid_mid(x + attn_out))
        if self.cfg.parallel_attn_mlp:  # both read the block's input (no resid_mid)
            return self.hook_resid_post(x + attn_out + self._mlp_out(x))
        x = self.hook_resid_mid(x + attn_out)
        return self.hook_resid_post(x + self._mlp_out(x))

    def _mlp_out(self, x: torch.Tensor) -> torch.Tensor:
        out = self.mlp(self.ln2(self.hook_mlp_in(x)))
        return self.hook_mlp_out(out if self.ln2_post is None else self.ln2_post(out))

    def _post_norm(self, x: torch.Tensor, rotary) -> torch.Tensor:
        """Post-LN (OPT-350m): the sublayers read the residual, the norms follow each addition."""
        x = self.hook_resid_mid(self.ln1(x + self.hook_attn_out(self.attn(x, rotary))))
        if self.mlp is not None:
            x = self.ln2(x + self.hook_mlp_out(self.mlp(self.hook_mlp_in(x))))
        return self.hook_resid_post(x)


class HookedTransformer(nn.Module):
    """Decoder-only transformer (or, with ``causal=False``, an encoder); ``forward(tokens [B,P]) -> logits [B,P,V]``
    (``V`` = ``d_vocab_out`` when set)."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.W_E = nn.Parameter(torch.empty(cfg.d_vocab, cfg.d_model))
        self.hook_embed = HookPoint()
        if cfg.positional == "learned":
            self.W_pos = nn.Parameter(torch.empty(cfg.n_ctx, cfg.d_model))
            self.hook_pos_embed = HookPoint()
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.ln_final = make_norm(cfg) if cfg.final_norm else None
        self.W_U_untied = None if cfg.tie_embeddings else nn.Parameter(torch.empty(cfg.d_model, cfg.n_logits))
        self.b_U = nn.Parameter(torch.zeros(cfg.n_logits)) if cfg.unembed_bias else None
        self._rotary: dict[float, tuple[torch.Tensor, torch.Tensor]] | None = None
        self.missing_weights: tuple[str, ...] = ()  # a partial checkpoint's absent parameters (left on meta)
        self.init_weights(torch.Generator().manual_seed(0))

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator, std: float = 0.02) -> None:
        """GPT-2-style initialisation from ``generator`` (for toy models trained from scratch)."""
        if self.W_E.is_meta:  # built to receive a checkpoint: nothing to initialise (and meta-device
            return  # random numbers would pull in torch's symbolic machinery, ~70 MB, for nothing)
        for name, p in self.named_parameters():
            if name.endswith((".w",)):
                p.fill_(0.0 if self.cfg.norm_weight_plus_one else 1.0)  # a gain of one
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

    def rotary(self, n: int, device) -> dict[float, tuple[torch.Tensor, torch.Tensor]] | None:
        """cos/sin tables [>=n, R] (float32, on ``device``) by rotary base; None without rotary."""
        if self.cfg.positional != "rotary":
            return None
        cached = next(iter(self._rotary.values()))[0] if self._rotary else None
        if cached is None or cached.shape[0] < n or cached.device != torch.device(device):
            bases = {block.attn.rotary_base for block in self.blocks}
            self._rotary = {base: rotary_tables(self.cfg, max(n, 256), device, base) for base in bases}
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
        x = F.embedding(tokens.to(self.W_E.device), self.W_E)  # [B,P,D]
        if self.cfg.embed_scale != 1.0:  # as transformers: the scale rounded to the weights' dtype
            x = x * torch.tensor(self.cfg.embed_scale, dtype=x.dtype, device=x.device)
        x = self.hook_embed(x)
        if self.cfg.positional == "learned":
            x = x + self.hook_pos_embed(self.W_pos[:p].to(x.device).unsqueeze(0).expand(b, p, -1))
        return x

    def run_blocks(self, x: torch.Tensor, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Blocks ``start``..``stop`` - 1 (to the last by default) on the residual stream ``x`` [B,P,D]; returns the
        residual after them (the final residual by default)."""
        self.check_complete()
        self._check_resid(x)
        n = self.cfg.n_layers
        a, b = _block_bound(start, n), (n if stop is None else _block_bound(stop, n))
        if a is None or b is None or a > b:
            raise MechscopeError(f"run_blocks runs blocks start..stop - 1 with 0 <= start <= stop, got {start!r}, "
                                 f"{stop!r}")  # fmt: skip
        rotary = self.rotary(x.shape[1], x.device)
        for block in self.blocks[a:b]:
            x = block(x, rotary)
        return x

    def unembed(self, resid: torch.Tensor) -> torch.Tensor:
        """Final norm and unembedding: residual [..., D] -> logits [..., V]."""
        self._check_resid(resid, any_rank=True)
        x = resid if self.ln_final is None else self.ln_final(resid)
        if self.W_U_untied is None:
            logits = F.linear(x.to(self.W_E.device), self.W_E)
        else:
            logits = x.to(self.W_U_untied.device) @ self.W_U_untied
        if self.b_U is not None:
            logits = logits + self.b_U.to(logits.device)
        return softcap(logits, self.cfg.final_logit_softcap)

    def _check_resid(self, x, any_rank: bool = False) -> None:
        """A residual stream [B, P, d_model] ([..., d_model] with ``any_rank``), else one line (a wrong width was
        layer_norm's "normalized_shape" error deep inside the first block)."""
        if not isinstance(x, torch.Tensor) or x.shape[-1:] != (self.cfg.d_model,) or (not any_rank and x.dim() != 3):
            raise MechscopeError(f"expected a residual stream [{'...' if any_rank else 'batch, positions'}, "
                                 f"{self.cfg.d_model}], got {described(x)}")  # fmt: skip

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
            nxt = self(tokens)[:, -1].argmax(-1, keepdim=True).to(tokens.device)
            tokens = torch.cat([tokens, nxt], 1)
            if stop_at_eos and self.cfg.eos_token_id is not None and (nxt == self.cfg.eos_token_id).all():
                break
        return tokens




def work_counter(model: HookedTransformer):
    """A :class:`~mechscope.core.torch_utils.WorkCounter` over the blocks, counting tokens (batch × positions)."""
    from mechscope.core.torch_utils import WorkCounter

    return WorkCounter(model.blocks, "tokens", lambda x: int(x.shape[0] * x.shape[1]))


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
        "variants": ", ".join(c.variants()) or "none",
        "parameters": n_parameters(model),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "device": ", ".join(sorted({str(p.device) for p in model.parameters()})),
    }
