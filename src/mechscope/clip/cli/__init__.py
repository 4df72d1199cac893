"""``mechscope clip ...``: image–text models (CLIP, SigLIP, and the small model trained here). Parsing only; the work
is in :mod:`mechscope.clip.pipelines`; each command prints its result's fields."""

from __future__ import annotations

import typer

from mechscope.core.cli_options import DeviceOpt, DtypeOpt, ForceOpt, ThreadsOneOpt

app = typer.Typer(
    help="Image–text models (CLIP, SigLIP, a small model trained here): multimodal neurons and typographic attacks.",
    no_args_is_help=True,
)

ModelOpt = typer.Option(..., "--model", help="A CLIP or SigLIP checkpoint directory (Hugging Face layout), or one "
                        "written by `mechscope clip train`.")  # fmt: skip
DataOpt = typer.Option(None, "--data-dir", help="Data root holding mnist/ (default: $MECHSCOPE_DATA).")


def _split(text: str | None, what: str) -> tuple[str, ...] | None:
    from mechscope.core.validate import name_list

    return None if text is None else name_list(text, what)


@app.command()
def train(
    out: str | None = typer.Option(None, "--out", help="Output directory (default: runs/clip/small)."),
    steps: int = typer.Option(2000, "--steps", help="Training steps."),
    batch: int = typer.Option(128, "--batch", help="Image–caption pairs per step."),
    lr: float = typer.Option(4e-3, "--lr", help="Peak learning rate (AdamW, warm-up then cosine)."),
    seed: int = typer.Option(0, "--seed"),
    train_limit: int = typer.Option(60000, "--train-limit", help="MNIST training digits used (100 to 60,000)."),
    data_dir: str | None = DataOpt,
    threads: int = ThreadsOneOpt,
    force: bool = ForceOpt,
) -> None:
    """Train the small image–text model (MNIST digits, drawn digit words and numerals, and their captions) here."""
    from mechscope.clip.pipelines.train import train_small
    from mechscope.clip.training import SmallSettings

    s = SmallSettings(steps=steps, batch=batch, lr=lr, seed=seed, train_limit=train_limit)
    path, r = train_small(out, s, data_dir, force, threads, progress=True)
    last = r.history[-1]
    typer.echo(f"trained {r.parameters:,} parameters in {r.train_seconds:.0f} s ({s.steps} steps): final loss "
               f"{last['loss']:.3f}, batch accuracy {last['accuracy']:.1%}")  # fmt: skip
    for a in r.evaluation:
        typer.echo(f"  {a.images} with '{a.prompts}': {a.accuracy:.1%} of {a.n}")
    typer.echo(f"model, train.json and report.html written to {path}")


@app.command()
def inspect(
    model: str = ModelOpt,
    out: str | None = typer.Option(None, "--out", help="Output directory (default: runs/clip-inspect/MODEL)."),
    images: str | None = typer.Option(None, "--images", help="A folder of images to classify among --prompts."),
    prompts: str | None = typer.Option(None, "--prompts", help="Class prompts, separated by commas."),
    device: str | None = DeviceOpt,
    dtype: str | None = DtypeOpt,
    threads: int = ThreadsOneOpt,
    force: bool = ForceOpt,
) -> None:
    """Architecture, hook points, preprocessing and tokenizer (and zero-shot probabilities of --images)."""
    from mechscope.clip.pipelines.inspect import inspect as run

    path, r = run(model, out, images, _split(prompts, "--prompts"), device, dtype, force, threads)
    typer.echo(f"{r.model} ({r.family})")
    for k, v in r.architecture.items():
        typer.echo(f"  {k}: {v}")
    typer.echo(f"  hook points: {r.hook_points}")
    for name, row in zip(r.images, r.probabilities, strict=True):
        best = max(range(len(row)), key=lambda j: row[j])
        typer.echo(f"  {name}: {r.prompts[best]!r} {row[best]:.1%}")
    typer.echo(f"inspect.json and report.html written to {path}")


@app.command()
def neurons(
    model: str = ModelOpt,
    out: str | None = typer.Option(None, "--out", help="Output directory (default: runs/clip-neurons/MODEL)."),
    layer: list[int] | None = typer.Option(
        None, "--layer", help="Image-tower layer to read (repeatable; default all)."
    ),
    neuron: list[str] | None = typer.Option(None, "--neuron", help="A neuron LAYER.UNIT to read in full (repeatable)."),
    read: int = typer.Option(3, "--read", help="Neurons read in full (asked ones, then the most multimodal)."),
    images: str | None = typer.Option(
        None,
        "--images",
        help="A folder of images for the top dataset images (default: MNIST test digits and drawn digit words).",
    ),  # fmt: skip
    concepts: str | None = typer.Option(
        None,
        "--concepts",
        help="A folder of concept folders (pictures; the folder name is the concept's word); default: the ten digits.",
    ),  # fmt: skip
    words: str | None = typer.Option(None, "--words", help="Probe words, separated by commas."),
    reduce: str = typer.Option("mean", "--reduce", help="A neuron's response to an image: mean, max or cls token."),
    per_digit: int = typer.Option(50, "--per-digit", help="Pictures per digit concept."),
    controls: int = typer.Option(100, "--controls", help="Control neurons drawn at random."),
    min_score: float = typer.Option(1.0, "--min-score", help="Least multimodality score to count as multimodal."),
    k: int = typer.Option(8, "--k", help="Top dataset images per neuron read."),
    steps: int = typer.Option(256, "--steps", help="Feature-visualisation steps."),
    param: str = typer.Option("pixel", "--param", help="Feature-visualisation parameterisation: pixel or fourier."),
    diverse: int = typer.Option(4, "--diverse", help="Diverse feature visualisations per neuron read (0: none)."),
    seed: int = typer.Option(0, "--seed"),
    data_dir: str | None = DataOpt,
    device: str | None = DeviceOpt,
    dtype: str | None = DtypeOpt,
    threads: int = ThreadsOneOpt,
    force: bool = ForceOpt,
) -> None:
    """Multimodal neurons of the image tower (pictures and written names of a concept), against random control
    neurons, and a few neurons read in full: neurons.json and a self-contained report.html."""
    from mechscope.clip.methods.neurons import parse_neuron
    from mechscope.clip.pipelines.neurons import NeuronSettings
    from mechscope.clip.pipelines.neurons import neurons as run

    s = NeuronSettings(layers=tuple(layer) if layer else None, neurons=tuple(parse_neuron(n) for n in neuron or []),
                       read=read, reduce=reduce, per_digit=per_digit, controls=controls, min_score=min_score, k=k,
                       steps=steps, featvis_param=param, diverse=diverse, words=_split(words, "--words"),
                       seed=seed)  # fmt: skip
    path, r = run(model, out, s, images, concepts, data_dir, device, dtype, force, threads)
    mm = r.multimodality
    typer.echo(f"{r.model}: {mm.n_multimodal} of {len(mm.concepts)} concepts have a multimodal neuron "
               f"({mm.n_neurons:,} neurons, {mm.n_controls} controls)")  # fmt: skip
    for c in mm.concepts:
        mark = "multimodal" if c.multimodal else "-"
        typer.echo(f"  {c.concept:>8}: neuron {c.neuron:>7} score {c.score:6.2f} (pictures {c.picture_d:.2f}, name "
                   f"{c.word_d:.2f}); controls {c.control_mean:.2f} ± {c.control_sd:.2f}, mismatched max "
                   f"{c.null_max:.2f}  {mark}")  # fmt: skip
    for rd in r.readings:
        typer.echo(f"  neuron {rd.neuron}: probe words {', '.join(rd.probe_words[:4])}; aligned text "
                   f"{', '.join(rd.aligned_words[:4])}")  # fmt: skip
    typer.echo(f"neurons.json and report.html written to {path}")


@app.command()
def attack(
    model: str = ModelOpt,
    out: str | None = typer.Option(None, "--out", help="Output directory (default: runs/clip-attack/MODEL)."),
    word: str = typer.Option("three", "--word", help="The word written on the images."),
    target: str | None = typer.Option(None, "--target", help="The class the word names (default: the word)."),
    true: str = typer.Option("seven", "--true", help="The images' class (MNIST digits of it, or --images)."),
    images: str | None = typer.Option(None, "--images", help="A folder of images of class --true."),
    classes: str | None = typer.Option(None, "--classes", help="Class names, separated by commas (default: digits)."),
    prompt: str | None = typer.Option(None, "--prompt", help="Prompt template with {} (default: the model's)."),
    prompts: str | None = typer.Option(None, "--prompts", help="One prompt per class, separated by commas."),
    n: int = typer.Option(200, "--n", help="MNIST images of the true class attacked."),
    layer: list[int] | None = typer.Option(None, "--layer", help="Image-tower layers searched (default all)."),
    k: int = typer.Option(5, "--k", help="Neurons ablated together."),
    candidates: int = typer.Option(20, "--candidates", help="Neurons ablated one by one to rank them."),
    font: str = typer.Option("sans", "--font", help="sans, serif, mono (and -bold ...), or a .ttf file."),
    size: int | None = typer.Option(None, "--size", help="Text size in pixels (default: scaled to the image)."),
    x: float = typer.Option(0.5, "--x", help="Centre of the word, a fraction of the width."),
    y: float = typer.Option(0.75, "--y", help="Centre of the word, a fraction of the height."),
    label: bool = typer.Option(False, "--label", help="Write the word on a label of plain background."),
    ablation: str = typer.Option("mean", "--ablation", help="mean or zero."),
    controls: int = typer.Option(
        10, "--controls", help="Random sets of k neurons (never the found ones) ablated as a control."
    ),
    ablate: list[str] | None = typer.Option(
        None, "--ablate", help="A neuron LAYER.UNIT, e.g. a multimodal one (repeatable): the named neurons are "
        "ablated together on the held-out half, a measurement of their own beside the found top k's."
    ),
    seed: int = typer.Option(0, "--seed"),
    data_dir: str | None = DataOpt,
    device: str | None = DeviceOpt,
    dtype: str | None = DtypeOpt,
    threads: int = ThreadsOneOpt,
    force: bool = ForceOpt,
) -> None:
    """A typographic attack on zero-shot classification and the image-tower neurons that carry it (ablating them
    should undo it): attack.json and a self-contained report.html."""
    from mechscope.clip.methods.neurons import parse_neuron
    from mechscope.clip.pipelines.attack import AttackSettings
    from mechscope.clip.pipelines.attack import attack as run
    from mechscope.clip.report.context import control_words, heldout_clean_ablated

    s = AttackSettings(word=word, target=target, true=true, classes=_split(classes, "--classes"), prompt=prompt,
                       prompts=_split(prompts, "--prompts"), n=n, layers=tuple(layer) if layer else None, k=k,
                       candidates=candidates,
                       font=font, size=size, x=x, y=y, label=label, ablation=ablation, controls=controls,
                       seed=seed, ablate=tuple(parse_neuron(a) for a in ablate or []))  # fmt: skip
    path, r = run(model, out, s, images, data_dir, device, dtype, force, threads)
    sm = r.finding.summary
    typer.echo(f"{r.model}: {r.word!r} written on {r.images}")
    typer.echo(f"  clean accuracy {sm.clean_accuracy:.1%}, attacked {sm.attacked_accuracy:.1%}; attack success "
               f"(-> {r.target!r}) {sm.success_rate:.1%} of {sm.n_counted}")  # fmt: skip
    top = ", ".join(nn.neuron for nn in r.finding.neurons[: sm.k])
    typer.echo(f"  top {sm.k} neurons {top}: held-out success {sm.heldout_success:.1%} -> "
               f"{sm.heldout_success_ablated:.1%} ablated ({sm.undone:.0%} of the margin shift undone; clean accuracy "
               f"{heldout_clean_ablated(r)}); {control_words(r)}")  # fmt: skip
    typer.echo(f"  held-out attacked images classified as {s.true!r}: {sm.heldout_accuracy:.1%} -> "
               f"{sm.heldout_accuracy_ablated:.1%} with the top {sm.k} ablated")  # fmt: skip
    if sm.given:
        typer.echo(f"  given neurons {', '.join(sm.given)} ablated: held-out success {sm.heldout_success:.1%} -> "
                   f"{sm.given_success:.1%}, classified as {s.true!r} {sm.given_accuracy:.1%} ({sm.given_undone:.0%} "
                   f"of the margin shift undone; clean accuracy {sm.given_clean_accuracy:.1%} ablated)")  # fmt: skip
    typer.echo(f"attack.json and report.html written to {path}")
