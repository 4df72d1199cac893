"""The small image–text model trained here: a tiny CLIP on handwritten digits and drawn digit words and numerals.

A ViT image tower (32 × 32 grey images in 4 × 4 patches) and a causal character-level text transformer, both
mechscope's :class:`~mechscope.clip.models.clip.CLIP` (CLIP's own layout, so the directory it is saved to is an
ordinary Hugging Face CLIP checkpoint that transformers' ``CLIPModel`` loads too), trained with CLIP's contrastive
loss on the pairs of :mod:`mechscope.clip.data.digits`.

The loss is CLIP's symmetric cross-entropy with one change for a small caption vocabulary: a batch holds the same
caption many times, so the captions are merged: each image is classified among the distinct captions of the batch
(image → text) and each distinct caption picks among the batch's images, every image with that caption a right
answer (text → image, a uniform target over them). With every caption distinct this is CLIP's loss exactly.

Seeded and deterministic: the weights from a ``torch.Generator``, the pairs from a seeded ``numpy`` generator, and
one torch thread.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from mechscope.clip.data.digits import (
    BARE,
    CAPTIONS,
    DIGIT_WORDS,
    HELD_OUT_FONTS,
    SCENE_HELD_OUT,
    TRAIN_FONTS,
    PairSampler,
    all_captions,
)
from mechscope.clip.models.clip import CLIP, CLIPConfig, TextConfig, VisionConfig, work_counters
from mechscope.clip.models.tokenizer import CHARS, char_ids, char_tokenizer
from mechscope.core.errors import MechscopeError
from mechscope.core.torch_utils import counting
from mechscope.core.validate import check_count, check_lr, check_seed, check_types

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SmallSettings:
    steps: int = 2000
    batch: int = 128
    lr: float = 4e-3
    warmup: int = 100
    weight_decay: float = 0.05
    seed: int = 0
    image_size: int = 32
    patch_size: int = 8
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    d_mlp: int = 256
    text_d_model: int = 64
    text_layers: int = 2
    embed_dim: int = 64
    mix: tuple[float, float, float, float] = (0.45, 0.25, 0.2, 0.1)  # handwritten, word, numeral, scene
    bare: float = 0.3  # pairs captioned by the digit's name alone ("three")
    train_limit: int = 60000

    def validate(self) -> None:
        check_types(self, {"steps": "--steps", "batch": "--batch", "seed": "--seed", "lr": "--lr"})
        check_count(self.steps, "--steps", 1, 1_000_000)
        check_count(self.batch, "--batch", 2, 65_536)
        check_lr(self.lr)
        check_seed(self.seed)
        check_count(self.train_limit, "--train-limit", 100, 60_000)
        for name in ("warmup",):
            check_count(getattr(self, name), name, 0)
        if self.image_size % self.patch_size or self.image_size < 28:
            raise MechscopeError(f"image_size {self.image_size} must be at least 28 and a multiple of the patch size "
                                 f"{self.patch_size}")  # fmt: skip
        if not 0.0 <= self.bare <= 1.0:
            raise MechscopeError(f"bare must be a fraction from 0 to 1, got {self.bare}")
        if len(self.mix) != 4 or not all(math.isfinite(w) and w >= 0 for w in self.mix) or sum(self.mix) <= 0:
            raise MechscopeError(f"mix must be four non-negative weights (handwritten, word, numeral, scene), got "
                                 f"{self.mix}")  # fmt: skip

    def model_config(self) -> CLIPConfig:
        ids = char_ids(CHARS)
        vision = VisionConfig(self.d_model, self.n_layers, self.n_heads, self.d_mlp, self.image_size, self.patch_size,
                              n_channels=1, act="quick_gelu", proj_dim=self.embed_dim)  # fmt: skip
        text = TextConfig(self.text_d_model, self.text_layers, self.n_heads, 4 * self.text_d_model, ids["vocab"], 32,
                          act="quick_gelu", bos_token_id=ids["bos"], eos_token_id=ids["eos"],
                          pad_token_id=ids["eos"], proj_dim=self.embed_dim)  # fmt: skip
        return CLIPConfig(vision, text, family="mechscope", name="small-digits-clip")


@dataclass
class Trained:
    model: CLIP
    history: list[dict] = field(default_factory=list)  # per logged step: step, loss, accuracy, lr
    seconds: float = 0.0
    # WorkCounters of the training steps, one per tower (:func:`mechscope.clip.models.clip.work_counters`)
    counters: dict | None = None


def contrastive_loss(logits: torch.Tensor, caption: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """CLIP's symmetric loss with repeated captions merged. ``logits`` [B,K] (images × the batch's distinct
    captions), ``caption`` [B] (each image's column). Returns (loss, image → text accuracy)."""
    i2t = F.cross_entropy(logits, caption)
    target = torch.zeros_like(logits).scatter_(1, caption[:, None], 1.0)  # [B,K]
    target = target / target.sum(0, keepdim=True).clamp(min=1)  # uniform over the images of each caption
    t2i = -(target * F.log_softmax(logits, 0)).sum(0)  # [K]
    present = target.sum(0) > 0
    loss = 0.5 * (i2t + t2i[present].mean())
    return loss, (logits.argmax(1) == caption).float().mean()


def lr_at(step: int, s: SmallSettings) -> float:
    if step < s.warmup:
        return s.lr * (step + 1) / s.warmup
    t = (step - s.warmup) / max(1, s.steps - s.warmup)
    return s.lr * 0.5 * (1 + math.cos(math.pi * t))


def train(s: SmallSettings, images: torch.Tensor, labels: torch.Tensor,
          progress: Callable[[int, dict], None] | None = None) -> Trained:  # fmt: skip
    """Train the small model on ``images`` [N,28,28] (MNIST's training digits) and drawn words; deterministic."""
    s.validate()
    cfg = s.model_config()
    model = CLIP(cfg)
    model.init_weights(torch.Generator().manual_seed(s.seed))
    backend = char_tokenizer(CHARS)
    from mechscope.clip.models.tokenizer import ClipTokenizer

    ids = char_ids(CHARS)
    tok = ClipTokenizer(backend, cfg.text.n_ctx, ids["bos"], ids["eos"], ids["eos"])
    cap_tokens = tok.batch(all_captions())  # [40,P]
    sampler = PairSampler(images[: s.train_limit], labels[: s.train_limit], s.image_size, s.seed + 1, s.mix,
                          bare=s.bare)  # fmt: skip
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "W_pos" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "W_pos" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": s.weight_decay}, {"params": rest, "weight_decay": 0.0}],
                            lr=s.lr, betas=(0.9, 0.98))  # fmt: skip
    history: list[dict] = []
    counters = work_counters(model)  # s.batch images and the batch's distinct captions per step, forward and back
    start = time.perf_counter()
    model.train()
    mean = torch.tensor(0.5)
    with counting(counters):
        for step in range(s.steps):
            for group in opt.param_groups:
                group["lr"] = lr_at(step, s)
            x, cap, _, _ = sampler.batch(s.batch)
            present, column = torch.unique(cap, return_inverse=True)
            img = model.encode_image((x - mean) / 0.5)
            txt = model.encode_text(cap_tokens[present])
            logits = model.similarity(img, txt)
            loss, acc = contrastive_loss(logits, column)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))
            if step % 25 == 0 or step == s.steps - 1:
                row = {"step": step, "loss": round(loss.item(), 5), "accuracy": round(acc.item(), 4),
                       "lr": lr_at(step, s), "seconds": round(time.perf_counter() - start, 2)}  # fmt: skip
                history.append(row)
                if progress is not None:
                    progress(step, row)
    model.eval()
    return Trained(model, history, time.perf_counter() - start, counters)


def hf_config(cfg: CLIPConfig) -> dict:
    """transformers' ``CLIPConfig`` fields for the small model (its directory loads in transformers too)."""
    v, t = cfg.vision, cfg.text

    def tower(c, extra):
        return {"hidden_size": c.d_model, "intermediate_size": c.d_mlp, "num_hidden_layers": c.n_layers,
                "num_attention_heads": c.n_heads, "hidden_act": c.act, "layer_norm_eps": c.norm_eps,
                "projection_dim": cfg.embed_dim, **extra}  # fmt: skip

    return {
        "architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": cfg.embed_dim,
        "logit_scale_init_value": 2.6592,
        "vision_config": tower(v, {"image_size": v.image_size, "patch_size": v.patch_size, "num_channels": v.n_channels,
                                   "model_type": "clip_vision_model"}),
        "text_config": tower(t, {"vocab_size": t.d_vocab, "max_position_embeddings": t.n_ctx,
                                 "bos_token_id": t.bos_token_id, "eos_token_id": t.eos_token_id,
                                 "pad_token_id": t.pad_token_id, "model_type": "clip_text_model"}),
    }  # fmt: skip


def hf_state_dict(model: CLIP) -> dict[str, torch.Tensor]:
    """This module's weights under transformers' CLIPModel names (the inverse of the loader's conversion)."""
    from mechscope.clip.models.loading import _BLOCK, _FIXED

    fixed = {ours: theirs for theirs, ours in _FIXED.items() if not theirs.startswith("text_model.head")}
    block = {ours: theirs for theirs, ours in _BLOCK.items()}
    out = {}
    for name, t in model.state_dict().items():
        tower, _, rest = name.partition(".")
        if rest.startswith("blocks."):
            _, i, part = rest.split(".", 2)
            out[f"{tower}_model.encoder.layers.{i}.{block[part]}"] = t
        elif name in fixed:
            out[fixed[name]] = t
        else:
            raise MechscopeError(f"no transformers name for {name}")
    return {k: v.detach().contiguous().clone() for k, v in out.items()}


def save_small(directory: Path, trained: Trained, s: SmallSettings, extra: dict | None = None) -> None:
    """Write the model as a Hugging Face CLIP directory: config.json, model.safetensors, tokenizer.json,
    preprocessor_config.json, and mechscope.json (the captions, class words and fonts it was trained with)."""
    from mechscope.clip.models.loading import SMALL_FILE
    from mechscope.clip.models.tokenizer import write_json_tokenizer
    from mechscope.core.outputs import save_tensors, write_json

    cfg = trained.model.cfg
    write_json(directory / "config.json", hf_config(cfg))
    save_tensors(directory / "model.safetensors", hf_state_dict(trained.model), {"format": "pt"})
    write_json_tokenizer(char_tokenizer(CHARS), directory / "tokenizer.json")
    write_json(directory / "preprocessor_config.json", {
        "do_resize": True, "size": {"shortest_edge": s.image_size}, "resample": 3, "do_center_crop": True,
        "crop_size": {"height": s.image_size, "width": s.image_size}, "do_rescale": True, "rescale_factor": 1 / 255,
        "do_normalize": True, "image_mean": [0.5], "image_std": [0.5], "do_convert_rgb": False,
        "image_processor_type": "CLIPImageProcessor",
    })  # fmt: skip
    record = {
        "kind": "mechscope small image–text model",
        "captions": {**CAPTIONS, "bare": BARE}, "class_words": list(DIGIT_WORDS),
        "numerals": [str(i) for i in range(10)], "scene_held_out": [list(p) for p in SCENE_HELD_OUT],
        "train_fonts": list(TRAIN_FONTS), "held_out_fonts": list(HELD_OUT_FONTS), "settings": asdict(s),
        "text": {"fg": 1.0, "bg": 0.0}, **(extra or {}),
    }  # fmt: skip
    (directory / SMALL_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
