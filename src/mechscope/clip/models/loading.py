"""A Hugging Face CLIP or SigLIP directory (or the small model trained here) -> a hookable :class:`CLIP`.

The directory holds ``config.json`` (``model_type`` ``clip`` or ``siglip``), the weights (``model.safetensors``,
sharded safetensors with their index, or ``pytorch_model.bin``), the tokenizer (``tokenizer.json``, or CLIP's
``vocab.json`` + ``merges.txt``) and, optionally, ``preprocessor_config.json`` (else the family's defaults at the
model's size). The small model trained here is a CLIP directory like any other (transformers' ``CLIPModel`` loads
it) with a ``mechscope.json`` beside it: its caption templates and class words.

Weight conversion is a pure function (:func:`convert_state_dict`) over a list of understood names; a name it does
not understand, or a missing one, is a one-line error. Variants that are not CLIP's or SigLIP's layout (a single
tower, SigLIP 2, Chinese-CLIP, AltCLIP, OWL-ViT, ...) are refused in one line.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mechscope.clip.models.clip import CLIP, CLIPConfig, TextConfig, VisionConfig
from mechscope.clip.models.preprocess import Preprocessor, read_preprocessor
from mechscope.clip.models.tokenizer import ClipTokenizer, own_special_tokens
from mechscope.clip.models.tokenizer import from_dir as tokenizer_from_dir
from mechscope.core.errors import MechscopeError

log = logging.getLogger(__name__)

SUPPORTED = ("clip", "siglip")
SMALL_FILE = "mechscope.json"  # beside the small model's weights: its captions and class words
DEFAULTS = {  # transformers' defaults, for configs that leave fields out
    "clip": {
        "vision": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
                   "num_channels": 3, "image_size": 224, "patch_size": 32, "hidden_act": "quick_gelu",
                   "layer_norm_eps": 1e-5},
        "text": {"vocab_size": 49408, "hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 12,
                 "num_attention_heads": 8, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
                 "layer_norm_eps": 1e-5, "pad_token_id": 1, "bos_token_id": 49406, "eos_token_id": 49407},
        "projection_dim": 512,
    },
    "siglip": {
        "vision": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
                   "num_channels": 3, "image_size": 224, "patch_size": 16, "hidden_act": "gelu_pytorch_tanh",
                   "layer_norm_eps": 1e-6, "vision_use_head": True},
        "text": {"vocab_size": 32000, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                 "num_attention_heads": 12, "max_position_embeddings": 64, "hidden_act": "gelu_pytorch_tanh",
                 "layer_norm_eps": 1e-6, "pad_token_id": 1, "bos_token_id": 49406, "eos_token_id": 49407},
    },
}  # fmt: skip
REFUSED = {
    "clip_vision_model": "a CLIP image tower alone (CLIPVisionModel); mechscope clip needs both towers",
    "clip_text_model": "a CLIP text tower alone (CLIPTextModel); mechscope clip needs both towers",
    "siglip_vision_model": "a SigLIP image tower alone; mechscope clip needs both towers",
    "siglip_text_model": "a SigLIP text tower alone; mechscope clip needs both towers",
    "siglip2": "SigLIP 2 (its NaFlex patches and variable resolutions are not supported)",
}


@dataclass
class ClipBundle:
    """A loaded image–text model with what reads its inputs: the tokenizer and the image preprocessor."""

    model: CLIP
    tokenizer: ClipTokenizer
    preprocess: Preprocessor
    name: str
    directory: Path | None = None
    small: dict = field(default_factory=dict)  # the small model's mechscope.json ({} for other checkpoints)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def tokens(self, texts: list[str]) -> torch.Tensor:
        return self.tokenizer.batch(texts).to(self.device)

    @torch.no_grad()
    def text_embeds(self, texts: list[str], batch_size: int = 256) -> torch.Tensor:
        """Unnormalised text embeddings [N,E] (float32, on the CPU)."""
        out = [self.model.encode_text(self.tokens(texts[i : i + batch_size])).float().cpu()
               for i in range(0, len(texts), batch_size)]  # fmt: skip
        return torch.cat(out) if out else torch.zeros(0, self.model.cfg.embed_dim)

    @torch.no_grad()
    def image_embeds(self, unit: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        """Unit pixels [N,C,S,S] -> unnormalised image embeddings [N,E] (float32, on the CPU)."""
        out = []
        for i in range(0, len(unit), batch_size):
            x = self.preprocess.normalize(unit[i : i + batch_size].to(self.device, self.dtype))
            out.append(self.model.encode_image(x).float().cpu())
        return torch.cat(out) if out else torch.zeros(0, self.model.cfg.embed_dim)


def read_config(directory: Path) -> tuple[CLIPConfig, dict]:
    """The model's config from ``config.json`` (and the small model's ``mechscope.json``)."""
    from mechscope.core.validate import read_json_object

    directory = Path(directory)
    if not directory.exists():
        raise MechscopeError(f"{directory}: not found (expected a CLIP checkpoint directory)")
    if not directory.is_dir():
        raise MechscopeError(f"{directory}: not a directory (expected a CLIP checkpoint directory with config.json)")
    path = directory / "config.json"
    if not path.is_file():
        from mechscope.core.paths import other_wing

        raise MechscopeError(f"{directory}: not a CLIP checkpoint (no config.json){other_wing(directory, 'clip')}")
    raw = read_json_object(path, "model config")
    kind = raw.get("model_type")
    if kind in REFUSED:
        raise MechscopeError(f"{path}: unsupported variant: {REFUSED[kind]}")
    if kind not in SUPPORTED:
        from mechscope.core.paths import other_wing

        elsewhere = other_wing(directory, "clip")
        if elsewhere:
            raise MechscopeError(f"{directory}: not an image–text model{elsewhere}")
        raise MechscopeError(f"{path}: model_type {kind!r} is not a supported image–text model; supported: "
                             f"{', '.join(SUPPORTED)} (Hugging Face CLIPModel, SiglipModel)")  # fmt: skip
    small = read_json_object(directory / SMALL_FILE, "small-model record") if (directory / SMALL_FILE).is_file() else {}
    cfg = clip_config(raw, kind, str(path), name=directory.name, small=bool(small))
    return cfg, small


def _tower(raw: dict, key: str, kind: str, where: str) -> dict:
    sub = raw.get(f"{key}_config") or {}
    if not isinstance(sub, dict):
        raise MechscopeError(f"{where}: {key}_config must be an object")
    if not sub:  # transformers takes the defaults too; say so, or a later size mismatch comes unexplained
        log.warning("%s: no %s_config: the %s tower takes %s's default sizes", where, key, key, kind)
    merged = {**DEFAULTS[kind][key], **{k: v for k, v in sub.items() if v is not None}}
    for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        v = merged[name]
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise MechscopeError(f"{where}: {key}_config.{name} must be a positive integer, got {v!r}")
    if key == "text":  # special tokens inside the vocabulary (a wrong eos_token_id surfaced as a bad token range)
        # as the config gives them (not defaults); SigLIP's bidirectional tower never reads a start token, and
        # transformers 5 saves its default 49406 whatever the vocabulary (it loads such a file, warning only)
        read = ("bos_token_id", "eos_token_id", "pad_token_id") if kind == "clip" else ("eos_token_id", "pad_token_id")
        for name in read:
            v = sub.get(name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < merged["vocab_size"]):
                raise MechscopeError(f"{where}: text_config.{name} {v!r} is not a token of the "
                                     f"{merged['vocab_size']}-token vocabulary")  # fmt: skip
    eps = merged.get("layer_norm_eps")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < 1:  # a negative one gave NaN
        raise MechscopeError(f"{where}: {key}_config.layer_norm_eps must be a small positive number, got {eps!r}")
    return merged


def clip_config(raw: dict, kind: str, where: str = "config.json", name: str = "", small: bool = False) -> CLIPConfig:
    """transformers' ``CLIPConfig`` / ``SiglipConfig`` fields -> :class:`CLIPConfig`."""
    v, t = _tower(raw, "vision", kind, where), _tower(raw, "text", kind, where)
    try:
        if kind == "clip":
            proj = raw.get("projection_dim", DEFAULTS["clip"]["projection_dim"])
            vision = VisionConfig(v["hidden_size"], v["num_hidden_layers"], v["num_attention_heads"],
                                  v["intermediate_size"], v["image_size"], v["patch_size"], v["num_channels"],
                                  v["hidden_act"], float(v["layer_norm_eps"]), proj_dim=proj)  # fmt: skip
            eos = t.get("eos_token_id")
            text = TextConfig(t["hidden_size"], t["num_hidden_layers"], t["num_attention_heads"],
                              t["intermediate_size"], t["vocab_size"], t["max_position_embeddings"], t["hidden_act"],
                              float(t["layer_norm_eps"]),
                              causal=True, pooling="argmax" if eos == 2 else "eos", bos_token_id=t.get("bos_token_id"),
                              eos_token_id=eos, pad_token_id=t.get("pad_token_id"), proj_dim=proj)  # fmt: skip
            cfg = CLIPConfig(vision, text, family="mechscope" if small else "clip", name=name)
        else:
            if not v.get("vision_use_head", True):
                raise MechscopeError(f"{where}: unsupported variant: a SigLIP image tower without its pooling head "
                                     "(vision_use_head false) gives no image embedding")  # fmt: skip
            vision = VisionConfig(v["hidden_size"], v["num_hidden_layers"], v["num_attention_heads"],
                                  v["intermediate_size"], v["image_size"], v["patch_size"], v["num_channels"],
                                  v["hidden_act"], float(v["layer_norm_eps"]), class_token=False, pre_norm=False,
                                  pooling="map", patch_bias=True, proj_dim=None)  # fmt: skip
            text = TextConfig(t["hidden_size"], t["num_hidden_layers"], t["num_attention_heads"],
                              t["intermediate_size"], t["vocab_size"], t["max_position_embeddings"], t["hidden_act"],
                              float(t["layer_norm_eps"]),
                              causal=False, pooling="last", bos_token_id=t.get("bos_token_id"),
                              eos_token_id=t.get("eos_token_id"), pad_token_id=t.get("pad_token_id"),
                              proj_dim=t.get("projection_size") or t["hidden_size"], proj_bias=True,
                              pad_to_context=True)  # fmt: skip
            cfg = CLIPConfig(vision, text, family="siglip", logit_bias=True, name=name)
    except (KeyError, TypeError, ValueError) as e:
        raise MechscopeError(f"{where}: not a readable {kind} config ({type(e).__name__}: {e})") from None
    try:
        cfg.validate()
    except MechscopeError as e:
        raise MechscopeError(f"{where}: {e}") from None
    return cfg


# ---- weights ------------------------------------------------------------------------------------

_BLOCK = {
    "layer_norm1.weight": "ln1.w", "layer_norm1.bias": "ln1.b", "layer_norm2.weight": "ln2.w",
    "layer_norm2.bias": "ln2.b", "self_attn.q_proj.weight": "attn.q.weight", "self_attn.q_proj.bias": "attn.q.bias",
    "self_attn.k_proj.weight": "attn.k.weight", "self_attn.k_proj.bias": "attn.k.bias",
    "self_attn.v_proj.weight": "attn.v.weight", "self_attn.v_proj.bias": "attn.v.bias",
    "self_attn.out_proj.weight": "attn.o.weight", "self_attn.out_proj.bias": "attn.o.bias",
    "mlp.fc1.weight": "mlp.up.weight", "mlp.fc1.bias": "mlp.up.bias", "mlp.fc2.weight": "mlp.down.weight",
    "mlp.fc2.bias": "mlp.down.bias",
}  # fmt: skip
_FIXED = {
    "vision_model.embeddings.class_embedding": "vision.class_embedding",
    "vision_model.embeddings.patch_embedding.weight": "vision.patch_embed.weight",
    "vision_model.embeddings.patch_embedding.bias": "vision.patch_embed.bias",
    "vision_model.embeddings.position_embedding.weight": "vision.W_pos",
    "vision_model.pre_layrnorm.weight": "vision.ln_pre.w", "vision_model.pre_layrnorm.bias": "vision.ln_pre.b",
    "vision_model.post_layernorm.weight": "vision.ln_post.w", "vision_model.post_layernorm.bias": "vision.ln_post.b",
    "visual_projection.weight": "vision.proj.weight",
    "vision_model.head.probe": "vision.head.probe",
    "vision_model.head.attention.out_proj.weight": "vision.head.o.weight",
    "vision_model.head.attention.out_proj.bias": "vision.head.o.bias",
    "vision_model.head.layernorm.weight": "vision.head.ln.w", "vision_model.head.layernorm.bias": "vision.head.ln.b",
    "vision_model.head.mlp.fc1.weight": "vision.head.mlp.up.weight",
    "vision_model.head.mlp.fc1.bias": "vision.head.mlp.up.bias",
    "vision_model.head.mlp.fc2.weight": "vision.head.mlp.down.weight",
    "vision_model.head.mlp.fc2.bias": "vision.head.mlp.down.bias",
    "text_model.embeddings.token_embedding.weight": "text.W_E",
    "text_model.embeddings.position_embedding.weight": "text.W_pos",
    "text_model.final_layer_norm.weight": "text.ln_final.w", "text_model.final_layer_norm.bias": "text.ln_final.b",
    "text_projection.weight": "text.proj.weight",
    "text_model.head.weight": "text.proj.weight", "text_model.head.bias": "text.proj.bias",
    "logit_scale": "logit_scale", "logit_bias": "logit_bias",
}  # fmt: skip
_IGNORED = re.compile(r".*position_ids$")  # buffers older checkpoints saved


def convert_state_dict(sd: dict[str, torch.Tensor], cfg: CLIPConfig) -> dict[str, torch.Tensor]:
    """transformers' CLIPModel / SiglipModel weight names -> this module's (a pure function)."""
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for name, t in sd.items():
        if _IGNORED.match(name):
            continue
        m = re.match(r"(vision|text)_model\.encoder\.layers\.(\d+)\.(.+)$", name)
        if m and m.group(3) in _BLOCK:
            out[f"{m.group(1)}.blocks.{m.group(2)}.{_BLOCK[m.group(3)]}"] = t
        elif name in ("vision_model.head.attention.in_proj_weight", "vision_model.head.attention.in_proj_bias"):
            for part, chunk in zip("qkv", t.chunk(3, 0), strict=True):
                out[f"vision.head.{part}.{'weight' if name.endswith('weight') else 'bias'}"] = chunk
        elif name in _FIXED:
            out[_FIXED[name]] = t.reshape(()) if name in ("logit_scale", "logit_bias") else t
        else:
            unknown.append(name)
    if unknown:
        raise MechscopeError(f"unexpected weights for a {cfg.family} model: {', '.join(unknown[:4])}"
                             f"{' and more' if len(unknown) > 4 else ''} (an unsupported variant?)")  # fmt: skip
    return out


def read_weights(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint: safetensors (one file or shards) or ``pytorch_model.bin``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from mechscope.core.validate import read_json_object

    directory = Path(directory)
    single, index = directory / "model.safetensors", directory / "model.safetensors.index.json"
    try:
        if single.is_file():
            return load_file(str(single))
        if index.is_file():
            shards = read_json_object(index, "safetensors index").get("weight_map", {})
            if not isinstance(shards, dict) or not shards:
                raise MechscopeError(f"{index}: no weight_map")
            out = {}
            for shard in sorted(set(shards.values())):
                out.update(load_file(str(directory / str(shard))))
            return out
    except (SafetensorError, OSError, ValueError) as e:
        raise MechscopeError(f"{directory}: unreadable safetensors weights ({str(e).splitlines()[0][:120]})") from None
    binary = directory / "pytorch_model.bin"
    if binary.is_file():
        try:
            return torch.load(binary, map_location="cpu", weights_only=True)
        except Exception as e:
            raise MechscopeError(f"{binary}: unreadable weights ({type(e).__name__})") from None
    raise MechscopeError(f"{directory}: no weights (model.safetensors, its shards, or pytorch_model.bin)")


def load_clip(path, device=None, dtype=None) -> ClipBundle:
    """A CLIP or SigLIP checkpoint directory as a :class:`ClipBundle` on ``device`` in ``dtype`` (as ``--device``
    and ``--dtype`` of the lm commands: default the best device present, float32 on the CPU)."""
    from mechscope.core.validate import usable_path
    from mechscope.lm.models.devices import resolve_device, resolve_dtype

    directory = usable_path(path, "model")
    cfg, small = read_config(directory)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    where = f"{directory / 'preprocessor_config.json'}: "
    pre = Preprocessor.from_config(read_preprocessor(directory), cfg.vision.image_size, cfg.vision.n_channels,
                                   cfg.family, where)  # fmt: skip
    t = cfg.text
    tok = tokenizer_from_dir(directory, t.n_ctx, t.bos_token_id if t.causal else None, t.eos_token_id,
                             t.pad_token_id, t.pad_to_context)  # fmt: skip
    if t.pooling == "argmax":  # an old config (eos_token_id 2, bos 0, pad 1: openai/clip-vit-base-patch32's) names
        tok = own_special_tokens(tok, directory)  # no token of this vocabulary; the tokenizer's own are used
    if tok.vocab_size > t.d_vocab:
        raise MechscopeError(f"{directory}: the tokenizer has {tok.vocab_size} tokens but the model {t.d_vocab}")
    sd = convert_state_dict(read_weights(directory), cfg)
    with torch.device("meta"):
        model = CLIP(cfg)
    expected = dict(model.state_dict())
    missing = sorted(set(expected) - set(sd))
    if missing:
        raise MechscopeError(f"{directory}: weights missing for {', '.join(missing[:4])}"
                             f"{' and more' if len(missing) > 4 else ''}")  # fmt: skip
    for k, v in sd.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise MechscopeError(f"{directory}: weight {k} is shaped {list(v.shape)}, the config says "
                                 f"{list(expected[k].shape)}")  # fmt: skip
    model.load_state_dict({k: v.to(dt) for k, v in sd.items()}, assign=True)
    model = model.to(dev).eval()
    log.info("loaded %s (%s) on %s in %s", directory.name, cfg.family, dev, dt)
    return ClipBundle(model, tok, pre, directory.name or str(directory), directory, small)
