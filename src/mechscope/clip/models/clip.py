"""A hookable image–text model: CLIP (a ViT image tower and a causal text transformer) and SigLIP, in one file.

Glossary of axis names (TransformerLens vocabulary):
    B batch, C channels, P position (tokens: the class token, then the patches row by row), D d_model,
    M d_mlp, E the shared embedding space (projection_dim), V d_vocab, H heads

Both towers are stacks of the language half's transformer blocks (:class:`mechscope.lm.models.transformer.Block`):
the image tower with ``causal=False`` (every patch sees every patch), CLIP's text tower causal and pooled at its
end-of-text token, SigLIP's text tower bidirectional and pooled at its last position. The switches, each a config
field named for what it does:

* ``class_token`` and ``pre_norm`` (CLIP: a learned class token first, and ``pre_layrnorm`` before the blocks);
  ``pooling`` ``"cls"`` (CLIP: the class token, after ``ln_post``) or ``"map"`` (SigLIP: multihead attention
  pooling with a learned probe, after ``ln_post`` over every token); ``patch_bias`` (SigLIP's patch convolution
  has a bias); ``proj_dim`` None: no projection (SigLIP's image embedding is its pooled output);
* text: ``causal`` and ``pooling`` ``"eos"`` (CLIP: the first end-of-text token; ``"argmax"``: the highest token id,
  transformers' behaviour for old CLIP configs whose ``eos_token_id`` is 2) or ``"last"`` (SigLIP); ``proj_bias``
  (SigLIP's text ``head`` has a bias); ``pad_to_context`` (SigLIP was trained on texts padded to its context);
* ``logit_bias`` (SigLIP: a learned bias on the similarity logits, read through a sigmoid).

Hook points (TransformerLens-style names, ``vision.`` or ``text.`` first)::

    vision.hook_patches [B,P-1,D] (the patch embeddings)  vision.hook_embed [B,P,D]  vision.hook_pos_embed [B,P,D]
    vision.ln_pre.hook_normalized (CLIP)
    vision.blocks.L.hook_resid_pre / hook_resid_mid / hook_resid_post [B,P,D]
    vision.blocks.L.attn.hook_q / hook_k / hook_v / hook_z [B,P,H,Dh]  hook_attn_scores / hook_pattern [B,H,P,P]
    vision.blocks.L.mlp.hook_pre / hook_post [B,P,M] (the MLP neurons)  vision.blocks.L.hook_mlp_out [B,P,D]
    vision.ln_post.hook_normalized  vision.head.hook_pattern [B,H,1,P] (SigLIP's attention pooling)
    vision.hook_pooled [B,D]  vision.hook_embeds [B,E] (the image embedding, before normalisation)
    text.hook_embed / hook_pos_embed [B,P,D]  text.blocks.L.* (as above, causal for CLIP)  text.ln_final...
    text.hook_pooled [B,D]  text.hook_embeds [B,E]

The numerics follow transformers' ``CLIPModel`` and ``SiglipModel``; a test checks the embeddings and logits on
tiny random checkpoints against them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from mechscope.core.errors import MechscopeError
from mechscope.core.hooks import HookPoint
from mechscope.core.torch_utils import described
from mechscope.lm.models.transformer import MLP, Block, TransformerConfig, make_norm


@dataclass(frozen=True)
class VisionConfig:
    d_model: int
    n_layers: int
    n_heads: int
    d_mlp: int
    image_size: int
    patch_size: int
    n_channels: int = 3
    act: str = "quick_gelu"
    norm_eps: float = 1e-5
    class_token: bool = True  # CLIP: a learned class token before the patches
    pre_norm: bool = True  # CLIP: a LayerNorm (pre_layrnorm) on the embeddings before the blocks
    pooling: str = "cls"  # cls (CLIP) | map (SigLIP's multihead attention pooling)
    patch_bias: bool = False  # SigLIP's patch convolution has a bias
    proj_dim: int | None = 512  # None: no projection (SigLIP)
    norm: str = "layernorm"  # none: no normalisation anywhere (hand-built models whose numbers are worked by hand)

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def n_positions(self) -> int:
        return self.grid**2 + int(self.class_token)

    def blocks(self) -> TransformerConfig:
        return _blocks(self.d_model, self.n_layers, self.n_heads, self.d_mlp, self.act, self.norm_eps,
                       self.n_positions, causal=False, norm=self.norm)  # fmt: skip

    def validate(self) -> None:
        _check_tower("vision", self.d_model, self.n_heads, self.n_layers, self.d_mlp)
        if self.pooling not in ("cls", "map"):
            raise MechscopeError(f"vision pooling must be cls or map, got {self.pooling!r}")
        if self.pooling == "cls" and not self.class_token:
            raise MechscopeError("class-token pooling needs a class token")
        if self.patch_size < 1 or self.image_size < self.patch_size:
            raise MechscopeError(f"image_size {self.image_size} and patch_size {self.patch_size}: expected "
                                 "1 <= patch_size <= image_size")  # fmt: skip
        if self.n_channels < 1:
            raise MechscopeError(f"num_channels must be at least 1, got {self.n_channels}")
        self.blocks().validate()


@dataclass(frozen=True)
class TextConfig:
    d_model: int
    n_layers: int
    n_heads: int
    d_mlp: int
    d_vocab: int
    n_ctx: int
    act: str = "quick_gelu"
    norm_eps: float = 1e-5
    causal: bool = True  # CLIP: causal; SigLIP: bidirectional
    pooling: str = "eos"  # eos (the first end-of-text token) | argmax (the highest id) | last (SigLIP)
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    proj_dim: int = 512
    proj_bias: bool = False  # SigLIP's text head has a bias
    pad_to_context: bool = False  # SigLIP: texts are padded to n_ctx, as it was trained
    norm: str = "layernorm"  # none: no normalisation anywhere (hand-built models)

    def blocks(self) -> TransformerConfig:
        return _blocks(self.d_model, self.n_layers, self.n_heads, self.d_mlp, self.act, self.norm_eps, self.n_ctx,
                       causal=self.causal, d_vocab=self.d_vocab, norm=self.norm)  # fmt: skip

    def validate(self) -> None:
        _check_tower("text", self.d_model, self.n_heads, self.n_layers, self.d_mlp)
        if self.pooling not in ("eos", "argmax", "last"):
            raise MechscopeError(f"text pooling must be eos, argmax or last, got {self.pooling!r}")
        if self.pooling == "eos" and self.eos_token_id is None:
            raise MechscopeError("end-of-text pooling needs an eos_token_id")
        self.blocks().validate()


@dataclass(frozen=True)
class CLIPConfig:
    vision: VisionConfig
    text: TextConfig
    family: str = "clip"  # clip | siglip | mechscope (the small model trained here; CLIP's layout)
    logit_bias: bool = False  # SigLIP
    name: str = ""

    def validate(self) -> None:
        self.vision.validate()
        self.text.validate()
        out = self.vision.proj_dim or self.vision.d_model
        if out != self.text.proj_dim:
            raise MechscopeError(f"the towers' embeddings differ in size: image {out}, text {self.text.proj_dim}")

    @property
    def embed_dim(self) -> int:
        return self.text.proj_dim

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> CLIPConfig:
        def build(klass, data):
            known = {f.name for f in fields(klass)}
            unknown = sorted(set(data) - known)
            if unknown:
                raise MechscopeError(f"unknown {klass.__name__} fields: {', '.join(unknown)}")
            return klass(**data)

        rest = {k: v for k, v in d.items() if k not in ("vision", "text")}
        return build(cls, {**rest, "vision": build(VisionConfig, d["vision"]), "text": build(TextConfig, d["text"])})


def _check_tower(which: str, d: int, h: int, n: int, m: int) -> None:
    if min(d, h, m, n) < 1:
        raise MechscopeError(f"{which} tower: sizes must be positive (d_model {d}, heads {h}, d_mlp {m}, layers {n})")
    if d % h:
        raise MechscopeError(f"{which} tower: d_model {d} is not divisible by {h} heads")


def _blocks(d, n, h, m, act, eps, n_ctx, causal, d_vocab=1, norm="layernorm") -> TransformerConfig:
    return TransformerConfig(
        d_model=d, n_layers=n, n_heads=h, d_head=d // h, d_vocab=d_vocab, n_ctx=n_ctx, d_mlp=m, act=act,
        norm=norm, norm_eps=eps, positional="none", tie_embeddings=True, causal=causal, family="clip",
    )  # fmt: skip


class AttentionPool(nn.Module):
    """SigLIP's multihead attention pooling: a learned probe attends over every token, then a residual MLP."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        d, self.n_heads = cfg.d_model, cfg.n_heads
        self.probe = nn.Parameter(torch.zeros(1, 1, d))
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.ln = make_norm(cfg.blocks())
        self.mlp = MLP(cfg.blocks())
        self.hook_pattern = HookPoint()  # [B,H,1,P]
        self.hook_out = HookPoint()  # [B,D]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, p, d = x.shape
        h, dh = self.n_heads, d // self.n_heads
        q = self.q(self.probe.expand(b, 1, d)).view(b, 1, h, dh).transpose(1, 2)  # [B,H,1,Dh]
        k = self.k(x).view(b, p, h, dh).transpose(1, 2)  # [B,H,P,Dh]
        v = self.v(x).view(b, p, h, dh).transpose(1, 2)
        pattern = self.hook_pattern(F.softmax((q @ k.transpose(-1, -2)) * dh**-0.5, dim=-1))  # [B,H,1,P]
        z = (pattern @ v).transpose(1, 2).reshape(b, 1, d)
        out = self.o(z)
        out = out + self.mlp(self.ln(out))
        return self.hook_out(out[:, 0])


class VisionTower(nn.Module):
    """Normalised pixels [B,C,H,W] -> the image embedding [B,E] (before the unit-norm CLIP's similarity takes)."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        d = cfg.d_model
        self.patch_embed = nn.Conv2d(cfg.n_channels, d, cfg.patch_size, cfg.patch_size, bias=cfg.patch_bias)
        self.class_embedding = nn.Parameter(torch.zeros(d)) if cfg.class_token else None
        self.W_pos = nn.Parameter(torch.zeros(cfg.n_positions, d))
        tcfg = cfg.blocks()
        self.ln_pre = make_norm(tcfg) if cfg.pre_norm else None
        self.blocks = nn.ModuleList(Block(tcfg, i) for i in range(cfg.n_layers))
        self.ln_post = make_norm(tcfg)
        self.head = AttentionPool(cfg) if cfg.pooling == "map" else None
        self.proj = nn.Linear(d, cfg.proj_dim, bias=False) if cfg.proj_dim else None
        for name in ("patches", "embed", "pos_embed", "pooled", "embeds"):
            setattr(self, f"hook_{name}", HookPoint())

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.cfg.n_channels, self.cfg.image_size, self.cfg.image_size)

    def check_pixels(self, x: torch.Tensor) -> None:
        c, s = self.cfg.n_channels, self.cfg.image_size
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or tuple(x.shape[1:]) != (c, s, s):
            raise MechscopeError(f"expected pixels shaped [batch, {c}, {s}, {s}], got {described(x)}")

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """The residual stream entering block 0 [B,P,D]."""
        self.check_pixels(pixels)
        w = self.patch_embed.weight
        x = self.hook_patches(self.patch_embed(pixels.to(w.device, w.dtype)).flatten(2).transpose(1, 2))  # [B,P-1,D]
        if self.class_embedding is not None:
            x = torch.cat([self.class_embedding.expand(x.shape[0], 1, -1), x], 1)
        x = self.hook_embed(x) + self.hook_pos_embed(self.W_pos.unsqueeze(0).expand(x.shape[0], -1, -1))
        return x if self.ln_pre is None else self.ln_pre(x)

    def run_blocks(self, x: torch.Tensor, start: int = 0) -> torch.Tensor:
        for block in self.blocks[start:]:
            x = block(x, None)
        return x

    def pool(self, resid: torch.Tensor) -> torch.Tensor:
        """The final residual stream [B,P,D] -> the image embedding [B,E]."""
        # CLIP: the class token, normalised; SigLIP: attention pooling over every normalised token
        pooled = self.ln_post(resid[:, 0]) if self.head is None else self.head(self.ln_post(resid))
        pooled = self.hook_pooled(pooled)
        return self.hook_embeds(pooled if self.proj is None else self.proj(pooled))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.pool(self.run_blocks(self.embed(pixels)))


class TextTower(nn.Module):
    """Token ids [B,P] -> the text embedding [B,E]."""

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        d = cfg.d_model
        self.W_E = nn.Parameter(torch.zeros(cfg.d_vocab, d))
        self.W_pos = nn.Parameter(torch.zeros(cfg.n_ctx, d))
        tcfg = cfg.blocks()
        self.blocks = nn.ModuleList(Block(tcfg, i) for i in range(cfg.n_layers))
        self.ln_final = make_norm(tcfg)
        self.proj = nn.Linear(d, cfg.proj_dim, bias=cfg.proj_bias)
        for name in ("embed", "pos_embed", "pooled", "embeds"):
            setattr(self, f"hook_{name}", HookPoint())

    def check_tokens(self, tokens: torch.Tensor) -> None:
        if not isinstance(tokens, torch.Tensor) or tokens.dtype not in (torch.int64, torch.int32) or tokens.dim() != 2:
            raise MechscopeError("expected integer token ids shaped [batch, position]")
        if tokens.shape[1] > self.cfg.n_ctx:
            raise MechscopeError(f"a text of {tokens.shape[1]} tokens is longer than the context of {self.cfg.n_ctx}")
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= self.cfg.d_vocab):
            raise MechscopeError(f"token ids must lie in 0..{self.cfg.d_vocab - 1}")
        if self.cfg.pooling == "eos" and tokens.numel() and not bool((tokens == self.cfg.eos_token_id).any(1).all()):
            raise MechscopeError(f"every text must hold the end-of-text token (id {self.cfg.eos_token_id}): "
                                 "the embedding is read there")  # fmt: skip

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        self.check_tokens(tokens)
        b, p = tokens.shape
        x = self.hook_embed(F.embedding(tokens.to(self.W_E.device), self.W_E))
        return x + self.hook_pos_embed(self.W_pos[:p].unsqueeze(0).expand(b, p, -1))

    def run_blocks(self, x: torch.Tensor, start: int = 0) -> torch.Tensor:
        for block in self.blocks[start:]:
            x = block(x, None)
        return x

    def read_position(self, tokens: torch.Tensor) -> torch.Tensor:
        """The position each text's embedding is read at [B]."""
        tokens = tokens.to(self.W_E.device)
        if self.cfg.pooling == "last":
            return torch.full((tokens.shape[0],), tokens.shape[1] - 1, device=tokens.device)
        if self.cfg.pooling == "argmax":
            return tokens.argmax(-1)
        return (tokens == self.cfg.eos_token_id).int().argmax(-1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.ln_final(self.run_blocks(self.embed(tokens)))
        pooled = self.hook_pooled(x[torch.arange(x.shape[0], device=x.device), self.read_position(tokens)])
        return self.hook_embeds(self.proj(pooled))


class CLIP(nn.Module):
    """An image–text model: ``vision`` and ``text`` towers and the similarity's scale (and SigLIP's bias).

    ``encode_image(pixels)`` [B,E] and ``encode_text(tokens)`` [B,E] are transformers' ``get_image_features`` and
    ``get_text_features``; ``forward(pixels, tokens)`` gives ``logits_per_image`` [B_images, B_texts].
    """

    def __init__(self, cfg: CLIPConfig) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.vision = VisionTower(cfg.vision)
        self.text = TextTower(cfg.text)
        self.logit_scale = nn.Parameter(torch.tensor(2.6592))
        self.logit_bias = nn.Parameter(torch.zeros(())) if cfg.logit_bias else None

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator) -> None:
        """Random weights from ``generator`` (for models trained from scratch): each weight matrix (and the patch
        convolution) normal with sd 1/sqrt(fan-in), embeddings, positions and the class token sd 0.1 (small towers
        learn far faster from this than from GPT-2's fixed 0.02), gains one, biases zero."""
        for name, p in self.named_parameters():
            if name == "logit_scale":
                p.fill_(2.6592)  # log(1 / 0.07), CLIP's initial temperature
            elif name.endswith(".w"):
                p.fill_(1.0)
            elif name in ("vision.class_embedding", "vision.W_pos", "text.W_pos", "text.W_E", "vision.head.probe"):
                p.copy_(torch.randn(p.shape, generator=generator) * 0.1)
            elif p.dim() <= 1:
                p.zero_()
            else:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=generator) * fan_in**-0.5)

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.vision(pixels)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.text(tokens)

    def similarity(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        """logits_per_image [Bi,Bt]: scale · cos(image, text) (+ SigLIP's bias)."""
        i = F.normalize(image_embeds, dim=-1)
        t = F.normalize(text_embeds.to(i.device, i.dtype), dim=-1)
        logits = (i @ t.T) * self.logit_scale.exp().to(i.device)
        return logits if self.logit_bias is None else logits + self.logit_bias.to(i.device)

    def forward(self, pixels: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return self.similarity(self.encode_image(pixels), self.encode_text(tokens))


def describe(model: CLIP) -> dict:
    c = model.cfg
    v, t = c.vision, c.text
    return {
        "name": c.name,
        "family": c.family,
        "embed_dim": c.embed_dim,
        "vision": f"ViT: {v.n_layers} layers, d_model {v.d_model}, {v.n_heads} heads, d_mlp {v.d_mlp}, "
        f"{v.image_size}px {v.n_channels}-channel images in {v.patch_size}px patches ({v.n_positions} positions), "
        f"{v.act}, pooling {v.pooling}",
        "text": f"{'causal' if t.causal else 'bidirectional'} transformer: {t.n_layers} layers, d_model {t.d_model}, "
        f"{t.n_heads} heads, d_mlp {t.d_mlp}, vocabulary {t.d_vocab}, context {t.n_ctx}, {t.act}, pooling {t.pooling}",
        "vision_neurons": v.n_layers * v.d_mlp,
        "parameters": sum(p.numel() for p in model.parameters()),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "device": ", ".join(sorted({str(p.device) for p in model.parameters()})),
    }


def _tower_layers(tower: nn.Module) -> list[nn.Module]:
    # the blocks one full pass runs once each; a tower without blocks: the tower itself (its input is [B,...] too)
    return list(tower.blocks) or [tower]


def work_counters(model: CLIP, counters: dict | None = None) -> dict:
    """One :class:`~mechscope.core.torch_utils.WorkCounter` per tower: ``"image"`` counts images through the image
    tower's blocks, ``"text"`` texts through the text tower's blocks (each block's input is [B,P,D]: B rows). What
    runs outside the blocks (the patch and token embeddings, SigLIP's attention pooling, the projections) is cheap
    and not counted. ``counters``: counters already counting another copy of the same architecture (the small model
    trained, then reloaded to be evaluated): they go on counting on ``model``'s towers, their counts kept."""
    from mechscope.core.torch_utils import WorkCounter

    towers = {"image": (model.vision, "images"), "text": (model.text, "texts")}
    if counters is None:
        return {k: WorkCounter(_tower_layers(tower), unit) for k, (tower, unit) in towers.items()}
    for k, (tower, _) in towers.items():
        layers = _tower_layers(tower)
        if len(layers) != len(counters[k].layers):
            raise MechscopeError(f"the {k} tower has {len(layers)} blocks, the counter {len(counters[k].layers)}")
        counters[k].layers = layers
    return counters


def report_work(counters: dict, what: str, rows_per_pass: dict) -> dict:
    """Each tower's :meth:`~mechscope.core.torch_utils.WorkCounter.report` (one ``-v`` line each), over the rows of
    one pass of the analysis' main batch of that tower (``rows_per_pass[tower]``): ``{"image": ..., "text": ...}``."""
    return {k: c.report(f"{what} ({k} tower)", rows_per_pass[k]) for k, c in counters.items()}
