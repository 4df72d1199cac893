"""Views of an image–text model for image analyses: modules that take *unit pixels* (the model's size, [0, 1]).

* :class:`ImageModel`: unit pixels [B,C,S,S] -> the image embedding [B,E]; it states its ``input_shape``, so the
  CNN half's feature visualisation (:func:`mechscope.cnn.methods.featvis.render`) optimises images for it;
* :class:`ZeroShot`: unit pixels -> zero-shot logits over a fixed set of class prompts [B,K] (the prompts' text
  embeddings computed once): what a typographic attack moves, and what ablations act on through
  :mod:`mechscope.core.intervene`.

Both hold the model's own image tower as ``vision``, so their hook points carry the model's names
(``vision.blocks.3.mlp.hook_post``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mechscope.clip.models.clip import CLIP
from mechscope.clip.models.preprocess import Preprocessor


class ImageModel(nn.Module):
    def __init__(self, model: CLIP, preprocess: Preprocessor) -> None:
        super().__init__()
        self.vision = model.vision
        self.register_buffer("mean", torch.tensor(preprocess.mean, dtype=torch.float32).view(1, -1, 1, 1), False)
        self.register_buffer("std", torch.tensor(preprocess.std, dtype=torch.float32).view(1, -1, 1, 1), False)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return self.vision.input_shape

    def normalize(self, unit: torch.Tensor) -> torch.Tensor:
        return (unit.float() - self.mean.to(unit.device)) / self.std.to(unit.device)

    def forward(self, unit: torch.Tensor) -> torch.Tensor:
        w = self.vision.patch_embed.weight
        return self.vision(self.normalize(unit.to(w.device)).to(w.dtype)).float()


class ZeroShot(ImageModel):
    def __init__(self, model: CLIP, preprocess: Preprocessor, class_embeds: torch.Tensor) -> None:
        super().__init__(model, preprocess)
        self.register_buffer("classes", F.normalize(class_embeds.float(), dim=-1), False)  # [K,E]
        self.scale = float(model.logit_scale.detach().float().exp())
        self.bias = 0.0 if model.logit_bias is None else float(model.logit_bias.detach().float())

    def forward(self, unit: torch.Tensor) -> torch.Tensor:
        emb = F.normalize(super().forward(unit), dim=-1)
        return emb @ self.classes.to(emb.device).T * self.scale + self.bias  # [B,K]
