"""``mechscope cnn train``, ``evaluate``, ``attribute``, ``visualize`` and ``explain``."""

from __future__ import annotations

from pathlib import Path

import typer

from mechscope.cnn.cli.common import _D, _M, ClassNames, DataDir, Dataset, Force, RunDir, _ints, app
from mechscope.cnn.config import TrainConfig
from mechscope.cnn.models.cnn import CNNConfig
from mechscope.core.cli_options import ThreadsOpt


@app.command()
def train(
    out: Path | None = typer.Option(None, "--out", help="Run directory to write (default: runs/DATASET)."),
    dataset: str = typer.Option("mnist", "--dataset", help=Dataset.help),
    data_dir: Path | None = DataDir,
    class_names: Path | None = ClassNames,
    epochs: int = typer.Option(_D.epochs, "--epochs", help="Passes over the training images."),
    seed: int = typer.Option(_D.seed, "--seed", help="Seed for initial weights and batch order."),
    batch_size: int = typer.Option(_D.batch_size, "--batch-size"),
    lr: float = typer.Option(_D.lr, "--lr", help="Peak learning rate of the one-cycle schedule."),
    shift: int = typer.Option(_D.shift, "--shift", help="Augmentation: shift each image by up to this many pixels."),
    train_limit: int | None = typer.Option(None, "--train-limit", help="Use only the first N training images."),
    max_steps: int | None = typer.Option(None, "--max-steps", help="Stop after N optimiser steps."),
    channels: str = typer.Option("16,32", "--channels", help="Channels per conv stage, 1 to 4 stages, e.g. 16,32,32."),
    kernel_size: int = typer.Option(_M.kernel_size, "--kernel-size", help="Kernel size of every convolution."),
    padding: int = typer.Option(_M.padding, "--padding", help="Zero padding of every convolution."),
    batchnorm: bool = typer.Option(_M.batchnorm, "--batchnorm/--no-batchnorm", help="BatchNorm after each conv."),
    activation: str = typer.Option(_M.activation, "--activation", help="relu, gelu or solu (SoLU + LayerNorm)."),
    pool: int = typer.Option(_M.pool, "--pool", help="Max-pooling window after each stage (1: none)."),
    hidden: int | None = typer.Option(None, "--hidden", help="Width of a hidden linear layer before the read-out."),
    malloc_tuning: bool = typer.Option(
        True, "--malloc-tuning/--no-malloc-tuning", help="Keep freed memory in glibc for speed (this process only)."
    ),
    threads: int | None = ThreadsOpt,
    force: bool = Force,
) -> None:
    """Train the CNN and write model.safetensors, config.json and metrics.json."""
    from mechscope.cnn.pipelines.train import train as train_pipeline
    from mechscope.cnn.training import keep_freed_memory
    from mechscope.core.torch_utils import torch_threads

    if malloc_tuning:
        keep_freed_memory()  # the CLI's explicit opt-in: the library never changes the allocator
    shape = CNNConfig(
        channels=tuple(_ints(channels, "--channels") or ()), kernel_size=kernel_size, padding=padding,
        batchnorm=batchnorm, activation=activation, pool=pool, hidden=hidden,
    )  # fmt: skip
    config = TrainConfig(
        epochs=epochs, batch_size=batch_size, lr=lr, shift=shift, seed=seed, train_limit=train_limit,
        max_steps=max_steps,
    )  # fmt: skip
    out = out if out is not None else Path("runs") / Path(dataset).stem
    with torch_threads(threads):
        path, metrics = train_pipeline(out, config, shape, dataset, data_dir, class_names, force=force)
    typer.echo(
        f"test accuracy {metrics.test_accuracy:.4f} after {metrics.train_seconds:.1f} s of training "
        f"({metrics.n_parameters:,} parameters)"
    )
    typer.echo(f"run written to {path}")


@app.command()
def evaluate(
    run: Path = RunDir,
    dataset: str | None = Dataset,
    data_dir: Path | None = DataDir,
    class_names: Path | None = ClassNames,
    threads: int | None = ThreadsOpt,
) -> None:
    """Reload a run and measure its accuracy on its test images."""
    from mechscope.cnn.runs import load_run, load_run_data
    from mechscope.cnn.training import evaluate as evaluate_model
    from mechscope.core.torch_utils import torch_threads

    loaded = load_run(run)
    data = load_run_data(loaded, dataset, data_dir, class_names)
    with torch_threads(threads):
        ev = evaluate_model(loaded.model, data.test_float(), data.test_labels, data.n_classes)
    typer.echo(f"test accuracy {ev.accuracy:.4f} (loss {ev.loss:.4f})")
    per = zip(data.class_names, ev.per_class_accuracy, strict=True)
    typer.echo("per class: " + "  ".join(f"{n}:{a:.3f}" for n, a in per))


@app.command()
def attribute(
    run: Path = RunDir,
    method: list[str] | None = typer.Option(
        None, "--method", help="Method name; repeat for several (default: all eight that apply)."
    ),
    n: int = typer.Option(16, "--n", help="Test images shown in the grids."),
    n_faithfulness: int = typer.Option(64, "--n-faithfulness", help="Test images for the faithfulness checks."),
    target: str = typer.Option("pred", "--target", help="What to explain: pred, label, or a class (index or name)."),
    layer: str | None = typer.Option(None, "--layer", help="Conv layer for Grad-CAM (default: the last stage)."),
    out: Path | None = typer.Option(None, "--out", help="Output directory (default: RUN/attribution)."),
    dataset: str | None = Dataset,
    data_dir: Path | None = DataDir,
    class_names: Path | None = ClassNames,
    threads: int | None = ThreadsOpt,
    force: bool = Force,
) -> None:
    """Attribution grids (PNG) per method and faithfulness.json ranking the methods."""
    from mechscope.cnn.pipelines.attribute import attribute_run
    from mechscope.core.torch_utils import torch_threads

    with torch_threads(threads):
        path, result = attribute_run(
            run, out, method, n, n_faithfulness, dataset, data_dir, class_names, force, target=target, layer=layer
        )
    rep = result.faithfulness
    typer.echo(
        f"faithfulness on {rep.n_inputs} test images (random pixel order: deletion AUC "
        f"{rep.random_deletion_auc:.3f}, insertion AUC {rep.random_insertion_auc:.3f})"
    )
    typer.echo(
        f"{'rank':<5}{'method':<22}{'deletion':>9}{'insertion':>10}  "
        f"Spearman ρ after randomising {' → '.join(rep.layers)}: whole image | foreground pixels only"
    )
    for i, m in enumerate(rep.ranking(), 1):
        rho = " ".join(f"{v:+.2f}" for v in m.randomisation.values())
        rho_in = " ".join(f"{v:+.2f}" for v in m.randomisation_on_input.values())
        flag = "" if rep.passes(m) else "  fails sanity check"
        typer.echo(f"{i:<5}{m.method:<22}{m.deletion_auc:>9.3f}{m.insertion_auc:>10.3f}  {rho} | {rho_in}{flag}")
    for name, why in result.skipped.items():
        typer.echo(f"skipped {name}: {why}")
    typer.echo(
        f"ranking: methods passing the randomisation check (|ρ| < {rep.sanity_threshold} on the foreground pixels "
        "with every layer randomised: the black background agrees for free) first, then by insertion − deletion "
        "area (curves over the pixels that differ from the baseline)"
    )
    typer.echo(f"grids and faithfulness.json written to {path}")


@app.command()
def visualize(
    run: Path = RunDir,
    layer: list[str] | None = typer.Option(None, "--layer", help="A stage (conv1...), logits or a hook; repeat."),
    units: str | None = typer.Option(None, "--units", help="Unit indices, e.g. 0,3,7 (default: all)."),
    steps: int = typer.Option(512, "--steps", help="Optimisation steps."),
    param: str = typer.Option("fourier", "--param", help="Parameterisation: fourier or pixel."),
    seed: int = typer.Option(0, "--seed"),
    out: Path | None = typer.Option(None, "--out", help="Output directory (default: RUN/featvis)."),
    dataset: str | None = Dataset,
    data_dir: Path | None = DataDir,
    class_names: Path | None = ClassNames,
    threads: int | None = ThreadsOpt,
    force: bool = Force,
) -> None:
    """Feature visualisation of every unit beside its top test images; featvis.json with honesty figures."""
    from mechscope.cnn.pipelines.visualize import visualize_run
    from mechscope.core.torch_utils import torch_threads

    unit_list = _ints(units, "--units")
    with torch_threads(threads):
        path, result = visualize_run(
            run, out, layer, unit_list, steps, param, seed, dataset=dataset, data_dir=data_dir,
            class_names=class_names, force=force,
        )  # fmt: skip
    s = result.summary
    typer.echo(
        f"{s.units} units visualised; {s.exceed_dataset_max} exceed their maximum over the test images "
        f"(median ratio {s.median_ratio_to_dataset_max:.2f})"
    )
    if s.logit_visualisations:
        typer.echo(
            f"logit visualisations classified as their own class: {s.logit_visualisations_classified_as_their_class}"
            f"/{s.logit_visualisations}"
        )
    typer.echo(f"grids and featvis.json written to {path}")


@app.command()
def explain(
    run: Path = RunDir,
    out: Path | None = typer.Option(None, "--out", help="Output directory (default: RUN/explain)."),
    classes: list[str] | None = typer.Option(
        None, "--class", "--digit", help="Class (index or name) to find a circuit for; repeat (default: all)."
    ),
    patch: str | None = typer.Option(
        None, "--patch", help="Activation patching pair CLEAN,CORRUPTED, e.g. 8,3 (default: 8,3 on MNIST, else the "
        "pair the model confuses most).",
    ),  # fmt: skip
    pairs: int = typer.Option(16, "--pairs", help="Image pairs averaged in activation patching."),
    tolerance: float = typer.Option(
        0.01, "--tolerance", help="A circuit keeps the class's accuracy within this much of the full model's."
    ),
    circuit_layer: str | None = typer.Option(
        None, "--circuit-layer", help="The stage circuits are made of, e.g. conv1 (default: the last)."
    ),
    test_limit: int | None = typer.Option(
        None, "--test-limit", help="Use only the first N test images (quick looks; default: all)."
    ),
    dataset: str | None = Dataset,
    data_dir: Path | None = DataDir,
    class_names: Path | None = ClassNames,
    threads: int | None = ThreadsOpt,
    force: bool = Force,
) -> None:
    """Ablations, weights, selectivity, patching and per-class circuits: mechanisms.json and report.html."""
    from mechscope.cnn.config import ExplainSettings
    from mechscope.cnn.pipelines.explain import explain_run
    from mechscope.core.errors import MechscopeError
    from mechscope.core.torch_utils import torch_threads

    pair = None
    if patch is not None:
        pair = tuple(v.strip() for v in patch.split(","))
        if len(pair) != 2 or not all(pair):
            raise MechscopeError(f"--patch expects two classes CLEAN,CORRUPTED such as 8,3, got {patch!r}")
    settings = ExplainSettings(
        classes=tuple(classes) if classes else None, patch=pair, n_pairs=pairs, tolerance=tolerance,
        test_limit=test_limit, circuit_layer=circuit_layer,
    )  # fmt: skip
    with torch_threads(threads):
        path, r = explain_run(
            run, out, settings, dataset=dataset, data_dir=data_dir, class_names=class_names, force=force
        )
    names = r.class_names
    whole = ", ".join(f"all of {s} {r.ablation.whole_stage(s, 'mean').test_accuracy:.4f}" for s in r.stage_names)
    typer.echo(f"test accuracy {r.overview.test_accuracy:.4f}; mean-ablating {whole}")
    for c in r.circuits.circuits:
        flag = "" if c.meets_criterion else "  (criterion NOT met)"
        held = r.circuits.held_out_met(c)
        if held is not None:
            flag += (
                f"; held-out alone {c.held_out_sufficiency:.3f} (full {c.held_out_full_accuracy:.3f}), others called "
                f"{names[c.target]} {c.held_out_other_classes_called_circuit:.3f} (full "
                f"{c.held_out_other_classes_called_full:.3f})" + ("" if held else ": criterion NOT met")
            )
        typer.echo(
            f"{names[c.target]}: {c.size:>2} {r.circuits.stage} channels {list(c.channels)}: alone {c.sufficiency:.3f} "
            f"(full {c.full_accuracy:.3f}), mean-ablated {c.necessity:.3f}, "
            f"resample-ablated {c.necessity_resample:.3f}{flag}"
        )
    typer.echo(f"analysis took {sum(r.seconds.values()):.0f} s")
    typer.echo(f"report: {path / 'report.html'}")
    typer.echo(f"mechanisms.json written to {path}")
