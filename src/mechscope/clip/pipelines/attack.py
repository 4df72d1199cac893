"""``clip attack``: a typographic attack on zero-shot classification, and the image-tower neurons that carry it.

The images are MNIST test digits of one class (``--true``, default seven) or a folder of the user's images (all of
class ``--true``); the word (default "three") is written on each; the classes are the digit words (or ``--classes``)
with one prompt each (``--prompt`` a template with ``{}``, or ``--prompts`` given one per class).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from mechscope.clip.data.render import Placement
from mechscope.clip.methods.attack import AttackResult
from mechscope.core.errors import MechscopeError
from mechscope.core.outputs import atomic_output, check_target, weights_hash, write_json
from mechscope.core.paths import model_out
from mechscope.core.torch_utils import Timer, torch_threads
from mechscope.core.validate import check_count, check_seed, check_types, settings_or

log = logging.getLogger(__name__)
GENERAL_PROMPT = "a photo of the number {}"


@dataclass(frozen=True)
class AttackSettings:
    word: str = "three"
    target: str | None = None  # the class the word names (None: the word itself, when it is a class)
    true: str = "seven"  # the images' class
    classes: tuple[str, ...] | None = None  # None: the ten digit words
    prompt: str | None = None  # a template per class (None: the small model's "a handwritten {}", else a photo's)
    prompts: tuple[str, ...] | None = None  # one prompt per class, instead of a template
    n: int = 200  # MNIST test images of the true class
    layers: tuple[int, ...] | None = None
    k: int = 5  # neurons ablated together
    candidates: int = 20  # neurons ablated one by one to rank them
    font: str = "sans"
    size: int | None = None  # px (None: a third of the image for the small model's 32 px, scaled otherwise)
    x: float = 0.5
    y: float = 0.75
    label: bool = False  # on a label of the background colour (else painted over the image)
    ablation: str = "mean"
    controls: int = 10
    seed: int = 0
    ablate: tuple[tuple[int, int], ...] = ()  # neurons (layer, unit) to ablate as well, e.g. multimodal ones

    def validate(self) -> None:
        check_types(self, {"n": "--n", "k": "--k", "candidates": "--candidates", "controls": "--controls",
                           "seed": "--seed", "x": "--x", "y": "--y"})  # fmt: skip
        check_count(self.n, "--n", 2, 10_000)
        check_count(self.k, "--k", 1, 10_000)
        check_count(self.candidates, "--candidates", 1, 100_000)
        check_count(self.controls, "--controls", 0, 1000)
        check_seed(self.seed)
        if self.size is not None:
            check_count(self.size, "--size", 4, 1000)
        for name, v in (("--x", self.x), ("--y", self.y)):
            if not 0.0 <= v <= 1.0:
                raise MechscopeError(f"{name} must be between 0 and 1 (a fraction of the image), got {v}")
        if self.ablation not in ("mean", "zero"):
            raise MechscopeError(f"--ablation must be mean or zero, got {self.ablation!r}")
        if self.prompt is not None and self.prompt.count("{}") != 1:
            raise MechscopeError(f"--prompt {self.prompt!r} must hold one {{}}, where the class goes")
        if self.k > self.candidates:  # the top k of fewer candidates would be all of them, and so the controls
            raise MechscopeError(f"--k {self.k} is more than the --candidates {self.candidates} ranked to choose from")


def class_prompts(s: AttackSettings, bundle) -> tuple[list[str], list[str]]:
    """(classes, one prompt per class) from the settings; empty or mismatched prompts are one-line errors."""
    from mechscope.clip.data.digits import DIGIT_WORDS
    from mechscope.clip.methods.evaluate import check_prompts

    classes = list(s.classes) if s.classes is not None else list(DIGIT_WORDS)
    if not [c for c in classes if c.strip()]:
        raise MechscopeError("the class prompts are empty: --classes names no class")
    if any(not c.strip() for c in classes):
        raise MechscopeError(f"--classes holds an empty class name: {classes}")
    if s.prompts is not None:
        prompts = check_prompts(list(s.prompts))
        if len(prompts) != len(classes):
            raise MechscopeError(f"{len(prompts)} prompts for {len(classes)} classes; give one prompt per class")
    else:
        template = (
            s.prompt or (bundle.small.get("captions", {}).get("hand") if bundle.small else None) or GENERAL_PROMPT
        )
        prompts = check_prompts([template.replace("{}", c) for c in classes])  # other braces stay as typed
    return classes, prompts


def attack(model, out=None, settings: AttackSettings | None = None, images=None, data_dir=None, device=None,
           dtype=None, force: bool = False, threads: int = 1) -> tuple[Path, AttackResult]:  # fmt: skip
    """``clip attack`` on the model directory ``model``; writes attack.json and report.html into ``out``."""
    from mechscope.clip.models.loading import load_clip

    s = settings_or(settings, AttackSettings)
    s.validate()
    out = check_target(out or model_out("clip-attack", model), force)
    with torch_threads(threads):
        timer = Timer("clip attack")
        with timer.section("load"):
            bundle = load_clip(model, device, dtype)
        result = attack_model(bundle, s, images, data_dir, timer)
        with atomic_output(out, force) as tmp:
            write_json(tmp / AttackResult.FILE, result.to_dict())
            result.save_html(tmp / "report.html")
    return out, result


def attack_model(bundle, s: AttackSettings, images=None, data_dir=None, timer: Timer | None = None) -> AttackResult:
    """The attack on a loaded :class:`~mechscope.clip.models.loading.ClipBundle` (the Python API's door)."""
    from mechscope.clip.data.folder import read_folder
    from mechscope.clip.data.probes import digit_pictures_for, text_style
    from mechscope.clip.data.render import check_word
    from mechscope.clip.methods.attack import typographic_attack
    from mechscope.clip.methods.evaluate import zero_shot_model
    from mechscope.clip.methods.neurons import check_layers, check_neuron
    from mechscope.clip.models.clip import report_work, work_counters
    from mechscope.clip.models.views import ImageModel
    from mechscope.core.torch_utils import counting

    s.validate()
    timer = timer or Timer("clip attack")
    classes, prompts = class_prompts(s, bundle)
    style = text_style(bundle)
    check_word(s.word, (s.font,))
    target = s.target if s.target is not None else s.word
    if target not in classes:
        raise MechscopeError(f"the target {target!r} is not a class ({', '.join(classes)}); name it with --target")
    if s.true not in classes:
        raise MechscopeError(f"the images' class {s.true!r} is not a class ({', '.join(classes)})")
    if s.true == target:
        raise MechscopeError(f"the images' class and the target are both {target!r}: nothing to attack")
    t_idx, true_idx = classes.index(target), classes.index(s.true)
    view = ImageModel(bundle.model, bundle.preprocess)
    layers = check_layers(view, s.layers)
    for layer, unit in s.ablate:
        check_neuron(view, layer, unit)
    with timer.section("images"):
        if images is not None:
            unit, _ = read_folder(images, bundle.preprocess)
            what = f"{images} ({len(unit)} images of class {s.true!r})"
        else:
            from mechscope.clip.data.digits import DIGIT_WORDS

            if s.true not in DIGIT_WORDS:
                raise MechscopeError(f"--true {s.true!r}: without --images the images are MNIST digits, so the true "
                                     f"class must be a digit word ({', '.join(DIGIT_WORDS)})")  # fmt: skip
            pics, labels = digit_pictures_for(bundle, s.n, s.seed, data_dir)
            unit = pics[labels == DIGIT_WORDS.index(s.true)][: s.n]
            what = f"MNIST test digits of class {s.true!r} ({len(unit)})"
        true = torch.full((len(unit),), true_idx, dtype=torch.long)
    size = s.size or max(4, round(bundle.preprocess.image_size * 10 / 32))
    counters = work_counters(bundle.model)
    with timer.section("attack"), counting(counters):
        zs = zero_shot_model(bundle, prompts)
        finding = typographic_attack(
            zs, unit, true, t_idx, s.word, layers, s.k, s.candidates, s.font, size,
            Placement(s.x, s.y), style.fg, style.bg if s.label else None, s.ablation, s.controls, s.seed,
            given=tuple(s.ablate),
        )  # fmt: skip
    work = report_work(counters, "clip attack", {"image": len(unit), "text": len(prompts)})
    from mechscope.clip.pipelines.train import machine

    settings = {**asdict(s), "size": size, "ablate": [f"{x}.{u}" for x, u in s.ablate]}
    return AttackResult(
        bundle.name, bundle.model.cfg.family, s.word, target, tuple(classes), tuple(prompts), what,
        tuple(true.tolist()), tuple(layers), s.ablation, settings, finding,
        {k: round(v, 2) for k, v in timer.seconds.items()}, weights_hash(bundle.model), machine(), work,
    )  # fmt: skip
