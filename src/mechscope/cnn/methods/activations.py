"""The data an explanation rests on, and the activations every analysis of it shares.

:class:`ExplainData` holds the test images and labels the numbers are measured on, the training
images the mean activations are taken over (the mean-ablation reference) and a held-out set of
training images. :func:`collect` runs the model once over the test images and keeps what the
analyses share: the logits, every stage's output (the ablation and patching sites), every
stage's mean post-activation map per class, and the reference means.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mechscope.core import intervene as A
from mechscope.core.errors import MechscopeError
from mechscope.core.hooks import run_with_cache
from mechscope.core.torch_utils import evaluating


@dataclass(frozen=True)
class ExplainData:
    """Float images [N, C, H, W] and int64 labels [N]; class names index the labels."""

    x: torch.Tensor  # test images the numbers are measured on
    y: torch.Tensor
    x_ref: torch.Tensor  # training images the mean activations are taken over
    x_held: torch.Tensor  # held-out training images (the circuits' held-out check)
    y_held: torch.Tensor
    class_names: tuple[str, ...]
    description: str = ""  # e.g. "the first 2,000 MNIST test images"

    @property
    def n_classes(self) -> int:
        return len(self.class_names)

    @classmethod
    def from_dataset(cls, data, test_limit: int | None = None, n_mean: int = 10_000, held_out: int = 10_000):
        """From an :class:`~mechscope.cnn.data.images.ImageDataset`: the reference set is the first ``n_mean``
        training images (at most half of them), the held-out set the next ``held_out``."""
        n_train = len(data.train_labels)
        n_ref = min(n_mean, max(1, n_train // 2))
        x, y = data.test_float(test_limit), data.test_labels[:test_limit]
        missing = sorted(set(range(data.n_classes)) - set(y.unique().tolist()))
        if missing:
            names = ", ".join(data.class_names[k] for k in missing[:5])
            raise MechscopeError(f"the first {len(y)} test images hold no image of class(es) {names}; use more")
        what = "the" if test_limit is None or test_limit >= len(data.test_labels) else "the first"
        return cls(
            x=x,
            y=y,
            x_ref=data.to_float(data.train_images[:n_ref]),
            x_held=data.to_float(data.train_images[n_ref : n_ref + held_out]),
            y_held=data.train_labels[n_ref : n_ref + held_out],
            class_names=tuple(data.class_names),
            description=f"{what} {len(y):,} {data.name} test images",
        )


@dataclass(frozen=True)
class Activations:
    """What one pass over the test images gives every analysis."""

    logits: torch.Tensor  # [N, K]
    out: dict[str, torch.Tensor]  # stage name -> hook_out activations [N, C, H, W]
    maps: dict[str, torch.Tensor]  # stage name -> mean hook_post map per class [K, C, H, W]
    means: dict[str, torch.Tensor]  # stage name -> mean hook_out activation over data.x_ref [C, H, W]

    @property
    def pred(self) -> torch.Tensor:
        return self.logits.argmax(1)


def logits_and_activations(net, x: torch.Tensor, hook: str, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits [N, K] and one hook's activations [N, ...] over ``x``, a batch at a time: only one batch's other
    activations are ever held (for the default CNN on 10,000 images at once they were 700 MB)."""
    parts = [run_with_cache(net, x[i : i + batch_size], names=[hook]) for i in range(0, len(x), batch_size)]
    return torch.cat([logits for logits, _ in parts]), torch.cat([cache[hook] for _, cache in parts])


def collect(model, spec, data: ExplainData, batch_size: int = 2048) -> Activations:
    """Run the model over ``data.x`` once (in eval mode, restored after) and keep the shared activations."""
    net = spec.model
    outs = {s.name: s.hook_out for s in spec.stages}
    posts = {s.name: s.hook_post for s in spec.stages}
    k = data.n_classes
    chunks: dict[str, list] = {name: [] for name in outs}
    sums: dict[str, torch.Tensor] = {}
    logits = []
    with evaluating(net):
        for s in range(0, len(data.x), batch_size):
            lo, cache = run_with_cache(net, data.x[s : s + batch_size], names=[*outs.values(), *posts.values()])
            logits.append(lo)
            labels = data.y[s : s + batch_size]
            for name, hook in outs.items():
                chunks[name].append(cache[hook])
            for name, hook in posts.items():
                part = torch.zeros(k, *cache[hook].shape[1:], dtype=torch.float64)
                part.index_add_(0, labels, cache[hook].double())
                sums[name] = part if name not in sums else sums[name] + part
        means = A.layer_means(net, data.x_ref, list(outs.values()))
    counts = torch.bincount(data.y, minlength=k).double().clamp(min=1).view(-1, 1, 1, 1)
    return Activations(
        logits=torch.cat(logits),
        out={name: torch.cat(v) for name, v in chunks.items()},
        maps={name: (v / counts).float() for name, v in sums.items()},
        means={name: means[hook] for name, hook in outs.items()},
    )
