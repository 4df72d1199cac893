"""mechscope.clip: image–text models (CLIP, SigLIP, and a small model trained here), multimodal neurons and
typographic attacks (Goh et al. 2021, "Multimodal Neurons in Artificial Neural Networks").

The facade: it checks what a user passes and calls the pipelines; it computes nothing itself.

* :func:`load` — a CLIP or SigLIP checkpoint directory (Hugging Face layout) as a hookable model with its tokenizer
  and image preprocessing (:class:`~mechscope.clip.models.loading.ClipBundle`);
* :func:`train_small` — the small image–text model on MNIST digits and drawn digit words (``clip train``);
* :func:`neurons` — multimodal neurons against controls and neurons read in full (``clip neurons``);
* :func:`attack` — a typographic attack and the neurons that carry it (``clip attack``);
* :func:`inspect` — architecture, hook points, preprocessing and zero-shot probabilities (``clip inspect``);
* :func:`render_word` — a word drawn as an image (fonts matplotlib ships).

``neurons`` and ``attack`` take a loaded bundle (returning the result) or a directory with ``out=`` (writing the
report and JSON, returning ``(path, result)``).
"""

from __future__ import annotations

from mechscope.core.errors import MechscopeError, user_errors
from mechscope.core.validate import known_settings

__all__ = ["attack", "inspect", "load", "neurons", "render_word", "train_small"]


@user_errors
def load(path, device=None, dtype=None):
    """A CLIP/SigLIP directory as a :class:`~mechscope.clip.models.loading.ClipBundle`."""
    from mechscope.clip.models.loading import load_clip

    return load_clip(path, device, dtype)


@user_errors
def train_small(out=None, force: bool = False, data_dir=None, threads: int = 1, **settings):
    """Train the small model (settings: steps, batch, lr, seed, ... of ``SmallSettings``); returns (path, result)."""
    from mechscope.clip.pipelines.train import train_small as run
    from mechscope.clip.training import SmallSettings

    known_settings(SmallSettings, settings, "clip.train_small")
    return run(out, SmallSettings(**settings), data_dir, force, threads)


@user_errors
def neurons(model, out=None, images=None, concepts=None, data_dir=None, device=None, dtype=None, force: bool = False,
            **settings):  # fmt: skip
    """Multimodal neurons of ``model`` (a bundle: returns the result; a directory: writes ``out``, returns
    (path, result)); settings as ``NeuronSettings`` (layers, neurons, read, reduce, per_digit, ...)."""
    from mechscope.clip.pipelines.neurons import NeuronSettings, read_model
    from mechscope.clip.pipelines.neurons import neurons as run

    known_settings(NeuronSettings, settings, "clip.neurons")
    s = NeuronSettings(**settings)
    if hasattr(model, "model") and hasattr(model, "tokenizer"):
        from mechscope.core.torch_utils import torch_threads

        with torch_threads(1):
            return read_model(model, s, images, concepts, data_dir)
    return run(model, out, s, images, concepts, data_dir, device, dtype, force)


@user_errors
def attack(model, out=None, images=None, data_dir=None, device=None, dtype=None, force: bool = False, **settings):
    """A typographic attack on ``model`` (a bundle: returns the result; a directory: writes ``out``, returns
    (path, result)); settings as ``AttackSettings`` (word, target, true, classes, prompt, k, ablate, ...)."""
    from mechscope.clip.pipelines.attack import AttackSettings, attack_model
    from mechscope.clip.pipelines.attack import attack as run

    known_settings(AttackSettings, settings, "clip.attack")
    s = AttackSettings(**settings)
    if hasattr(model, "model") and hasattr(model, "tokenizer"):
        from mechscope.core.torch_utils import torch_threads

        with torch_threads(1):
            return attack_model(model, s, images, data_dir)
    return run(model, out, s, images, data_dir, device, dtype, force)


@user_errors
def inspect(model, out=None, images=None, prompts=None, device=None, dtype=None, force: bool = False):
    """``clip inspect`` of ``model`` (a bundle: returns the result; a directory: writes ``out``)."""
    from mechscope.clip.pipelines.inspect import inspect as run
    from mechscope.clip.pipelines.inspect import inspect_bundle

    if hasattr(model, "model") and hasattr(model, "tokenizer"):
        return inspect_bundle(model, images, prompts)
    return run(model, out, images, prompts, device, dtype, force)


@user_errors
def render_word(word: str, image_size: int = 64, channels: int = 1, font: str = "sans", size: int = 16, x=0.5, y=0.5,
                fg=1.0, bg=0.0):  # fmt: skip
    """``word`` drawn on a plain background: unit pixels [C,S,S]."""
    import math
    import numbers

    from mechscope.clip.data.render import Placement
    from mechscope.clip.data.render import render_word as draw
    from mechscope.core.validate import check_int

    if not isinstance(word, str):
        raise MechscopeError(f"word must be a string, got {type(word).__name__}")
    check_int(image_size, "image_size", 1, 16_384)  # too small for the word: coverage says so
    check_int(channels, "channels", 1, 1024)
    check_int(size, "size", 1, 1024)
    for name, v in (("x", x), ("y", y)):  # the word's centre, as fractions of the image
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not (math.isfinite(v) and 0 <= v <= 1):
            raise MechscopeError(f"{name} must be a fraction of the image in [0, 1], got {v!r}")
    return draw(word, image_size, channels, font, size, Placement(float(x), float(y)), fg, bg)
