"""``clip neurons``: an image tower's multimodal neurons, each against controls, and a few neurons read in full.

Strings the steps of :mod:`mechscope.clip.methods.neurons` together: load the model, respond to each concept's
pictures and drawn name, score every neuron's multimodality, pick the neurons to read (those asked for, then each
multimodal concept's best neuron), and read each: its feature visualisation, its top dataset images with the patch
where it fires, its text probe and the words its contribution aligns with.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from mechscope.clip.methods.neurons import NeuronReading, NeuronsResult
from mechscope.core.errors import MechscopeError
from mechscope.core.outputs import atomic_output, check_target, weights_hash, write_json
from mechscope.core.paths import model_out
from mechscope.core.torch_utils import Timer, torch_threads
from mechscope.core.validate import check_count, check_seed, check_types, repeated, settings_or, usable_path

log = logging.getLogger(__name__)

DISTRACTORS = ("cat", "dog", "apple", "ipod", "tree", "car", "house", "hello")
GENERAL_TEMPLATES = ("{}", "a photo of {}.", "the word {}")


@dataclass(frozen=True)
class NeuronSettings:
    layers: tuple[int, ...] | None = None  # None: every layer of the image tower
    neurons: tuple[tuple[int, int], ...] = ()  # read in full first
    read: int = 3  # neurons read in full (asked ones first, then each multimodal concept's best)
    reduce: str = "mean"
    per_digit: int = 50  # pictures per digit concept
    positions: int = 2  # places per drawn word (and font and size)
    controls: int = 100  # control neurons drawn at random
    min_score: float = 1.0
    k: int = 8  # top dataset images per neuron read
    steps: int = 256  # feature-visualisation steps
    featvis_lr: float = 0.05
    featvis_param: str = "pixel"  # pixel or fourier (the CNN half's parameterisations)
    diverse: int = 4  # diverse feature visualisations per neuron read (the CNN half's diversity term); 0: none
    words: tuple[str, ...] | None = None  # probe words (None: digit words, numerals and a few others)
    templates: tuple[str, ...] | None = None  # text-alignment prompt templates (None: the model's captions)
    seed: int = 0

    def validate(self) -> None:
        check_types(self, {"read": "--read", "per_digit": "--per-digit", "controls": "--controls", "k": "--k",
                           "steps": "--steps", "seed": "--seed", "positions": "--positions",
                           "min_score": "--min-score"})  # fmt: skip
        check_count(self.read, "--read", 0, 64)
        if not math.isfinite(self.min_score):
            raise MechscopeError(f"--min-score must be a finite number, got {self.min_score}")
        check_count(self.per_digit, "--per-digit", 2, 1000)
        check_count(self.positions, "--positions", 1, 20)
        check_count(self.controls, "--controls", 1, 100_000)
        check_count(self.k, "--k", 1, 100)
        check_count(self.steps, "--steps", 1, 100_000)
        check_count(self.diverse, "--diverse", 0, 16)
        if self.diverse == 1:
            raise MechscopeError("--diverse 1 has nothing to be diverse from: give 0 (none) or at least 2")
        check_seed(self.seed)
        if self.featvis_param not in ("pixel", "fourier"):
            raise MechscopeError(f"--param must be pixel or fourier, got {self.featvis_param!r}")
        if self.reduce not in ("mean", "max", "cls"):
            raise MechscopeError(f"--reduce must be mean, max or cls, got {self.reduce!r}")
        if self.words is not None and not [w for w in self.words if w.strip()]:
            raise MechscopeError("--words is empty; give at least one word to probe with")
        twice = repeated(tuple(n) for n in self.neurons or ())
        if twice:  # a neuron asked twice was read, and listed, twice
            raise MechscopeError(f"--neuron {twice[0][0]}.{twice[0][1]} given more than once")
        twice = repeated(self.words or ())
        if twice:  # a probe word twice is one row drawn twice
            raise MechscopeError(f"--words: {twice[0]!r} given more than once")
        for t in self.templates or ():
            if t.count("{}") != 1:
                raise MechscopeError(f"template {t!r} must hold one {{}}, where the word goes")


def neurons(model, out=None, settings: NeuronSettings | None = None, images=None, concepts=None, data_dir=None,
            device=None, dtype=None, force: bool = False, threads: int = 1) -> tuple[Path, NeuronsResult]:  # fmt: skip
    """``clip neurons`` on the model directory ``model``; writes neurons.json and report.html into ``out``."""
    from mechscope.clip.models.loading import load_clip

    s = settings_or(settings, NeuronSettings)
    s.validate()
    usable_path(model, "model")  # before a default folder is named after it
    out = check_target(out or model_out("clip-neurons", model), force)
    with torch_threads(threads):
        timer = Timer("clip neurons")
        with timer.section("load"):
            bundle = load_clip(model, device, dtype)
        result = read_model(bundle, s, images, concepts, data_dir, timer)
        with atomic_output(out, force) as tmp:
            write_json(tmp / NeuronsResult.FILE, result.to_dict())
            result.save_html(tmp / "report.html")
    return out, result


def read_model(bundle, s: NeuronSettings, images=None, concepts=None, data_dir=None,
               timer: Timer | None = None) -> NeuronsResult:  # fmt: skip
    """The analysis on a loaded :class:`~mechscope.clip.models.loading.ClipBundle` (the Python API's door)."""
    from mechscope.clip.data.digits import DIGIT_WORDS, NUMERALS
    from mechscope.clip.data.folder import read_folder
    from mechscope.clip.data.probes import digit_dataset, text_style
    from mechscope.clip.data.render import check_word
    from mechscope.clip.methods import neurons as N
    from mechscope.clip.models.clip import report_work, work_counters
    from mechscope.clip.models.views import ImageModel
    from mechscope.core.torch_utils import counting

    s.validate()
    timer = timer or Timer("clip neurons")
    view = ImageModel(bundle.model, bundle.preprocess).to(bundle.device).eval()
    layers = N.check_layers(view, s.layers)
    N.check_reduce(view, s.reduce)
    for layer, unit in s.neurons:
        N.check_neuron(view, layer, unit)
        if layer not in layers:
            raise MechscopeError(f"neuron {layer}.{unit}: layer {layer} is not among the layers read ({layers})")
    style = text_style(bundle)
    words = [w for w in (s.words or (*DIGIT_WORDS, *NUMERALS, *DISTRACTORS)) if w.strip()]
    for w in words:
        check_word(w, style.fonts)
    if s.templates:
        templates = tuple(s.templates)
    elif bundle.small:
        templates = tuple(bundle.small.get("captions", {}).values()) or GENERAL_TEMPLATES
    else:
        templates = GENERAL_TEMPLATES
    for t in templates:  # a word the tokenizer cannot read is refused now, not after the feature visualisations
        for w in words:
            bundle.tokenizer.encode(t.replace("{}", w))
    with timer.section("dataset"):  # first: a bad folder is refused before any long step
        if images is not None:
            data, names = read_folder(images, bundle.preprocess)
            source = str(images)
        else:
            data, names = digit_dataset(bundle, data_dir=data_dir)
            source = "MNIST test digits (30 per digit) and drawn digit words and numerals"
    counters = work_counters(bundle.model)
    with counting(counters):
        con, mm, readings = _analyse(view, bundle, s, layers, style, words, templates, data, names, concepts, data_dir,
                                     timer)  # fmt: skip
    # the main batches: the dataset read for top images, and the probe words in every template (embedded once)
    work = report_work(counters, "clip neurons", {"image": len(data), "text": len(words) * len(templates)})
    settings = asdict(s)
    return NeuronsResult(
        bundle.name, bundle.model.cfg.family, tuple(layers), s.reduce, settings, con.source, source, len(data), mm,
        tuple(readings), tuple(words), templates, {k: round(v, 2) for k, v in timer.seconds.items()},
        weights_hash(bundle.model), _machine(), work,
    )  # fmt: skip


def _analyse(view, bundle, s: NeuronSettings, layers, style, words, templates, data, names, concepts, data_dir,
             timer: Timer) -> tuple:  # fmt: skip
    """Every step that runs the model: the concepts' multimodality, the dataset's responses, and the neurons read
    in full; returns (concepts, multimodality, readings)."""
    import torch.nn.functional as F

    from mechscope.clip.data.probes import concepts_from_folder, digit_concepts
    from mechscope.clip.data.render import word_images
    from mechscope.clip.methods import neurons as N
    from mechscope.core.validate import check_finite

    d_mlp = view.vision.cfg.d_mlp
    with timer.section("concepts"):
        if concepts is not None:
            con = concepts_from_folder(concepts, bundle, s.positions, s.seed)
        else:
            con = digit_concepts(bundle, s.per_digit, s.positions, s.seed, data_dir)
        pa = N.activations(view, con.pictures, layers, s.reduce)
        wa = N.activations(view, con.words, layers, s.reduce)
        check_finite(pa, "the image tower's activations")
        mm = N.multimodality(pa, con.picture_labels, wa, con.word_labels, con.names, con.forms, layers, d_mlp,
                             s.controls, s.min_score, s.seed)  # fmt: skip
    with timer.section("dataset"):
        da = N.activations(view, data, layers, s.reduce)

    chosen: list[tuple[tuple[int, int], str]] = [((x, u), "asked for") for x, u in s.neurons]
    ranked = sorted(mm.concepts, key=lambda c: -c.score)
    for c in ranked:
        why = f"most multimodal neuron for {c.concept!r}" if c.multimodal else _not_multimodal(c, s.min_score)
        if len(chosen) < s.read and (c.layer, c.unit) not in [n for n, _ in chosen] and (c.multimodal or not chosen):
            chosen.append(((c.layer, c.unit), why))
    chosen = chosen[: max(s.read, len(s.neurons))]

    readings = []
    if chosen:
        with timer.section("feature visualisation"):
            vis = N.visualise(view, [n for n, _ in chosen], s.steps, s.seed, s.featvis_lr, s.featvis_param, s.reduce)
            div = (N.visualise(view, [n for n, _ in chosen], s.steps, s.seed, s.featvis_lr, s.featvis_param, s.reduce,
                               s.diverse) if s.diverse >= 2 else None)  # fmt: skip
            div_resp = N.activations(view, div.images.detach(), layers, s.reduce) if div is not None else None
        with timer.section("text probes"):
            # numerals at the numeral sizes (as in the concepts and the dataset), every other word at word sizes
            groups = (([w for w in words if not w.isdigit()], style.word_sizes),
                      ([w for w in words if w.isdigit()], style.numeral_sizes))  # fmt: skip
            parts = [word_images(group, bundle.preprocess.image_size, bundle.preprocess.channels, style.fonts,
                                 sizes, s.positions, s.seed, style.fg, style.bg)
                     for group, sizes in groups if group]  # fmt: skip
            wimg = torch.cat([x for x, _ in parts])
            wmeta = [m for _, ms in parts for m in ms]
            wlab = torch.tensor([words.index(m["word"]) for m in wmeta])
            cols = [layers.index(x) * d_mlp + u for (x, u), _ in chosen]
            probe = N.text_probe(view, wimg, wlab, words, cols, layers, s.reduce)  # [W, n]
            embeds = torch.stack([F.normalize(bundle.text_embeds([t.replace("{}", w) for t in templates]),
                                              dim=-1).mean(0) for w in words])  # fmt: skip
        with timer.section("readings"):
            for i, (((x, u), why), col) in enumerate(zip(chosen, cols, strict=True)):
                top, vals = N.top_examples(da, col, s.k)
                boxes = N.hot_patch(view, data[top], x, u)
                order = probe[:, i].argsort(descending=True)
                align = N.text_alignment(view, data[top], x, u, embeds)
                aorder = align.argsort(descending=True)
                attr, delta = N.pixel_attribution(view, data[top], x, u, s.reduce)
                readings.append(NeuronReading(
                    f"{x}.{u}", x, u, why, float(da[:, col].max()), float(vis.final[i]), tuple(names[j] for j in top),
                    tuple(vals), tuple(boxes), tuple(words[j] for j in order), tuple(float(probe[j, i]) for j in order),
                    tuple(words[j] for j in aorder), tuple(float(align[j]) for j in aorder),
                    vis.images[i].cpu().numpy(), data[top].cpu().numpy(),
                    diverse_responses=tuple(float(v) for v in div_resp[i * s.diverse : (i + 1) * s.diverse, col])
                    if div_resp is not None else (),
                    attribution_delta=float(delta.abs().max()),
                    diverse=div.images[i * s.diverse : (i + 1) * s.diverse].cpu().numpy() if div is not None else None,
                    top_attribution=attr.cpu().numpy(),
                ))  # fmt: skip
    return con, mm, tuple(readings)


def _machine() -> str:
    from mechscope.clip.pipelines.train import machine

    return machine()


def _not_multimodal(c, min_score: float) -> str:
    """Why the best neuron for a concept is not multimodal: the test it fails (the threshold, or a mismatched
    pairing that scores as high)."""
    fails = []
    if c.score < min_score:
        fails.append(f"below the threshold {min_score:g}")
    if c.score <= c.null_max:
        fails.append(f"not above the best mismatched pairing {c.null_max:.2f}")
    return f"best multimodality score for {c.concept!r}, {c.score:.2f}: " + " and ".join(fails or ["not multimodal"])
