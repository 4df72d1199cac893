"""Zero-shot classification and what the small model learned, and the records of ``clip train`` and ``clip inspect``.

:func:`zero_shot` classifies unit pixels among class prompts. :func:`evaluate_small` measures the small model on
held-out data: MNIST test digits against "a handwritten {digit}", drawn words and numerals in fonts it never saw
against their own captions, and *across* modalities (drawn words against "a handwritten {digit}" prompts, and
handwritten digits against "the word {digit}" prompts): a model whose images of "three" and of 3s meet in one
place classifies across modalities well above chance (10%).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from mechscope.clip.models.views import ZeroShot
from mechscope.core.errors import MechscopeError
from mechscope.core.results import Result, figure_data


def check_prompts(prompts) -> list[str]:
    """Class prompts: at least two, none empty or blank, no repeats."""
    prompts = [p for p in (prompts or [])]
    if not prompts or all(not str(p).strip() for p in prompts):
        raise MechscopeError("the class prompts are empty; give one prompt per class (at least two)")
    blank = [i for i, p in enumerate(prompts) if not isinstance(p, str) or not p.strip()]
    if blank:
        raise MechscopeError(f"class prompt {blank[0] + 1} of {len(prompts)} is empty")
    if len(prompts) < 2:
        raise MechscopeError(f"zero-shot classification needs at least two class prompts, got {prompts}")
    if len(set(prompts)) != len(prompts):
        dup = next(p for p in prompts if prompts.count(p) > 1)
        raise MechscopeError(f"class prompt {dup!r} is given twice")
    return prompts


def zero_shot_model(bundle, prompts: list[str]) -> ZeroShot:
    """A :class:`ZeroShot` view of the bundle's model over ``prompts`` (one per class)."""
    prompts = check_prompts(prompts)
    seen: dict[tuple[int, ...], str] = {}
    for p in prompts:  # two prompts the tokenizer reads alike ("Three", "three"; past the context) are one class
        ids = tuple(bundle.tokenizer.encode(p))
        if ids in seen:
            cut = len(ids) >= bundle.tokenizer.n_ctx
            raise MechscopeError(f"class prompts {seen[ids]!r} and {p!r} are the same tokens to this model"
                                 + (f" (cut to its context of {bundle.tokenizer.n_ctx} tokens)" if cut else ""))
        seen[ids] = p
    return ZeroShot(bundle.model, bundle.preprocess, bundle.text_embeds(prompts)).to(bundle.device)


@torch.no_grad()
def zero_shot(zs: ZeroShot, unit: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Logits over the classes [N,K]."""
    zs.eval()
    return torch.cat([zs(unit[i : i + batch_size]).float().cpu() for i in range(0, len(unit), batch_size)])


@dataclass(frozen=True)
class Accuracy(Result):
    images: str  # what was classified
    prompts: str  # the prompt template
    n: int
    accuracy: float
    confusion: tuple[tuple[int, ...], ...]  # [true][predicted]


def accuracy(zs: ZeroShot, unit: torch.Tensor, labels: torch.Tensor, images: str, prompts: str) -> Accuracy:
    pred = zero_shot(zs, unit).argmax(1)
    k = zs.classes.shape[0]
    conf = np.zeros((k, k), dtype=int)
    for t, p in zip(labels.tolist(), pred.tolist(), strict=True):
        conf[t, p] += 1
    return Accuracy(images, prompts, len(labels), float((pred == labels).float().mean()),
                    tuple(tuple(int(v) for v in row) for row in conf))  # fmt: skip


def evaluate_small(bundle, per_digit: int = 100, seed: int = 0, data_dir=None) -> tuple[Accuracy, ...]:
    """The small model on held-out data, within and across modalities (see the module docstring)."""
    from mechscope.clip.data.digits import BARE, CAPTIONS, DIGIT_WORDS
    from mechscope.clip.data.probes import digit_pictures_for, text_style
    from mechscope.clip.data.render import word_images

    style = text_style(bundle)
    s, c = bundle.preprocess.image_size, bundle.preprocess.channels
    pics, labels = digit_pictures_for(bundle, per_digit, seed, data_dir)
    words, wmeta = word_images(list(DIGIT_WORDS), s, c, style.fonts, style.word_sizes, 3, seed, style.fg, style.bg)
    nums, nmeta = word_images([str(i) for i in range(10)], s, c, style.fonts, style.numeral_sizes, 3, seed,
                              style.fg, style.bg)  # fmt: skip
    wl = torch.tensor([DIGIT_WORDS.index(m["word"]) for m in wmeta])
    nl = torch.tensor([int(m["word"]) for m in nmeta])
    zs = {k: zero_shot_model(bundle, [t.format(w) for w in DIGIT_WORDS]) for k, t in {**CAPTIONS, "bare": BARE}.items()}
    fonts = ", ".join(style.fonts)
    return (
        accuracy(zs["hand"], pics, labels, "MNIST test digits", CAPTIONS["hand"]),
        accuracy(zs["word"], words, wl, f"digit words in {fonts}", CAPTIONS["word"]),
        accuracy(zs["numeral"], nums, nl, f"numerals in {fonts}", CAPTIONS["numeral"]),
        accuracy(zs["hand"], words, wl, f"digit words in {fonts} (across modalities)", CAPTIONS["hand"]),
        accuracy(zs["hand"], nums, nl, f"numerals in {fonts} (across modalities)", CAPTIONS["hand"]),
        accuracy(zs["word"], pics, labels, "MNIST test digits (across modalities)", CAPTIONS["word"]),
        accuracy(zs["bare"], pics, labels, "MNIST test digits", BARE),
        accuracy(zs["bare"], words, wl, f"digit words in {fonts}", BARE),
    )


@dataclass(frozen=True)
class TrainResult(Result):
    """``clip train``: the small image–text model, how it trained and what it learned (train.json)."""

    SCHEMA = "mechscope.clip-train/1"
    FILE = "train.json"

    model: str  # the directory the model was written to
    settings: dict
    parameters: int
    history: tuple[dict, ...]  # step, loss, accuracy (image -> caption within the batch), lr, seconds
    evaluation: tuple[Accuracy, ...]
    train_seconds: float
    seconds: dict  # per section
    weights_sha256: str = ""
    machine: str = ""
    # forward and backward passes of each tower, {"image": ..., "text": ...} (WorkCounter), training and evaluation
    # together, in passes of one training step: its batch of images (``settings["batch"]``) and every caption once
    work: dict | None = None


@dataclass(frozen=True)
class InspectResult(Result):
    """``clip inspect``: the architecture, the hook points, the preprocessing and (with images) zero-shot scores."""

    SCHEMA = "mechscope.clip-inspect/1"
    FILE = "inspect.json"

    model: str
    family: str
    architecture: dict
    hook_points: str  # compact: vision.blocks.{0..11}.mlp.hook_post, ...
    preprocessing: dict
    tokenizer: dict
    images: tuple[str, ...] = ()
    prompts: tuple[str, ...] = ()
    probabilities: tuple[tuple[float, ...], ...] = ()  # [image][prompt]
    weights_sha256: str = ""
    pixels: np.ndarray | None = figure_data()  # [N,C,S,S] unit pixels of the images classified
    # forward and backward passes of each tower, {"image": ..., "text": ...} (WorkCounter), in passes over the images
    # classified and over the class prompts; None without zero-shot scores (the model does not run)
    work: dict | None = None
