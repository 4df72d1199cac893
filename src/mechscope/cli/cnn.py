"""``mechscope mnist ...``: the vision half."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from mechscope.config import TrainConfig

_D = TrainConfig()  # the CLI's defaults are the library's defaults
app = typer.Typer(help="Train and explain a small CNN on MNIST.", no_args_is_help=True)

DataDir = typer.Option(
    None, "--data-dir", help="Data root holding mnist/ (default: $MECHSCOPE_DATA, else ~/.cache/mechscope/data)."
)


@app.command()
def train(
    out: Path = typer.Option(Path("runs/mnist"), "--out", help="Run directory to write."),
    epochs: int = typer.Option(_D.epochs, "--epochs", help="Passes over the 60,000 training images."),
    seed: int = typer.Option(_D.seed, "--seed", help="Seed for initial weights and batch order."),
    data_dir: Optional[Path] = DataDir,
    batch_size: int = typer.Option(_D.batch_size, "--batch-size"),
    lr: float = typer.Option(_D.lr, "--lr", help="Peak learning rate of the one-cycle schedule."),
    shift: int = typer.Option(_D.shift, "--shift", help="Augmentation: shift each image by up to this many pixels."),
    train_limit: Optional[int] = typer.Option(None, "--train-limit", help="Use only the first N training images."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Stop after N optimiser steps."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing run directory's files."),
) -> None:
    """Train the CNN and write model.safetensors, config.json and metrics.json."""
    from mechscope.pipelines import train_mnist

    config = TrainConfig(
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        shift=shift,
        seed=seed,
        train_limit=train_limit,
        max_steps=max_steps,
    )
    path, metrics = train_mnist(out, config, data_dir=data_dir, force=force)
    typer.echo(
        f"test accuracy {metrics['test_accuracy']:.4f} after {metrics['train_seconds']:.1f} s of training "
        f"({metrics['n_parameters']:,} parameters)"
    )
    typer.echo(f"run written to {path}")


@app.command()
def evaluate(
    run: Path = typer.Option(..., "--run", help="Run directory written by `mechscope mnist train`."),
    data_dir: Optional[Path] = DataDir,
) -> None:
    """Reload a run and measure its accuracy on the 10,000 test images."""
    from mechscope.data.mnist import MNIST, load_mnist
    from mechscope.runs import load_run
    from mechscope.training import evaluate as evaluate_model

    loaded = load_run(run)
    data = load_mnist(data_dir)
    ev = evaluate_model(loaded.model, MNIST.to_float(data.test_images), data.test_labels)
    typer.echo(f"test accuracy {ev.accuracy:.4f} (loss {ev.loss:.4f})")
    typer.echo("per class: " + "  ".join(f"{d}:{a:.3f}" for d, a in enumerate(ev.per_class_accuracy)))


@app.command()
def attribute(
    run: Path = typer.Option(..., "--run", help="Run directory written by `mechscope mnist train`."),
    method: Optional[list[str]] = typer.Option(
        None, "--method", help="Method name; repeat for several (default: all eight)."
    ),
    n: int = typer.Option(16, "--n", help="Test images shown in the grids."),
    n_faithfulness: int = typer.Option(64, "--n-faithfulness", help="Test images for the faithfulness checks."),
    target: str = typer.Option("pred", "--target", help="What to explain: pred, label, or a class 0-9."),
    layer: str = typer.Option("conv2.hook_post", "--layer", help="Conv layer for Grad-CAM (a hook name)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output directory (default: RUN/attribution)."),
    data_dir: Optional[Path] = DataDir,
    force: bool = typer.Option(False, "--force", help="Overwrite an existing output directory's files."),
) -> None:
    """Attribution grids (PNG) per method and faithfulness.json ranking the methods."""
    from mechscope.pipelines import attribute_mnist

    path, result = attribute_mnist(
        run,
        out,
        methods=method,
        n=n,
        n_faithfulness=n_faithfulness,
        data_dir=data_dir,
        force=force,
        target=target,
        layer=layer,
    )
    rnd = result["random_order"]
    typer.echo(
        f"faithfulness on {result['n_inputs']} test images (random pixel order: deletion AUC "
        f"{rnd['deletion_auc']:.3f}, insertion AUC {rnd['insertion_auc']:.3f})"
    )
    layers = result["randomisation_layers_top_down"]
    typer.echo(
        f"{'rank':<5}{'method':<22}{'deletion':>9}{'insertion':>10}  "
        f"Spearman ρ after randomising {' → '.join(layers)}: whole image | digit pixels only"
    )
    for i, name in enumerate(result["ranking"], 1):
        m = result["methods"][name]
        rho = " ".join(f"{v:+.2f}" for v in m["randomisation_spearman"].values())
        rho_in = " ".join(f"{v:+.2f}" for v in m["randomisation_spearman_on_input_pixels"].values())
        flag = "" if m["passes_randomisation_check"] else "  fails sanity check"
        typer.echo(f"{i:<5}{name:<22}{m['deletion_auc']:>9.3f}{m['insertion_auc']:>10.3f}  {rho} | {rho_in}{flag}")
    typer.echo(
        f"ranking: methods passing the randomisation check (whole-image |ρ| < {result['sanity_threshold']}) "
        "first, then by insertion − deletion area"
    )
    typer.echo(f"grids and faithfulness.json written to {path}")


@app.command()
def visualize(
    run: Path = typer.Option(..., "--run", help="Run directory written by `mechscope mnist train`."),
    layer: Optional[list[str]] = typer.Option(None, "--layer", help="conv1, conv2, logits or a hook name; repeat."),
    units: Optional[str] = typer.Option(None, "--units", help="Unit indices, e.g. 0,3,7 (default: all)."),
    steps: int = typer.Option(512, "--steps", help="Optimisation steps."),
    param: str = typer.Option("fourier", "--param", help="Parameterisation: fourier or pixel."),
    seed: int = typer.Option(0, "--seed"),
    out: Optional[Path] = typer.Option(None, "--out", help="Output directory (default: RUN/featvis)."),
    data_dir: Optional[Path] = DataDir,
    force: bool = typer.Option(False, "--force", help="Overwrite an existing output directory's files."),
) -> None:
    """Feature visualisation of every unit beside its top test images; featvis.json with honesty figures."""
    from mechscope.errors import MechscopeError
    from mechscope.pipelines import visualize_mnist

    try:
        unit_list = [int(u) for u in units.replace(",", " ").split()] if units else None
    except ValueError:
        raise MechscopeError(f"--units expects integers separated by commas, got {units!r}") from None
    path, result = visualize_mnist(
        run, out, layers=layer, units=unit_list, steps=steps, param=param, seed=seed, data_dir=data_dir, force=force
    )
    s = result["summary"]
    typer.echo(
        f"{s['units']} units visualised; {s['exceed_dataset_max']} exceed their maximum over the 10,000 test "
        f"images (median ratio {s['median_ratio_to_dataset_max']:.2f})"
    )
    if s["logit_visualisations"]:
        typer.echo(
            f"logit visualisations classified as their own digit: {s['logit_visualisations_classified_as_their_digit']}"
            f"/{s['logit_visualisations']}"
        )
    typer.echo(f"grids and featvis.json written to {path}")


@app.command()
def explain(
    run: Path = typer.Option(..., "--run", help="Run directory written by `mechscope mnist train`."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output directory (default: RUN/explain)."),
    digit: Optional[list[int]] = typer.Option(
        None, "--digit", help="Digit to find a circuit for; repeat for several (default: all ten)."
    ),
    patch: str = typer.Option("8,3", "--patch", help="Activation patching pair CLEAN,CORRUPTED, e.g. 8,3."),
    pairs: int = typer.Option(16, "--pairs", help="Image pairs averaged in activation patching."),
    tolerance: float = typer.Option(
        0.01, "--tolerance", help="A circuit keeps the digit's accuracy within this much of the full model's."
    ),
    test_limit: Optional[int] = typer.Option(
        None, "--test-limit", help="Use only the first N test images (quick looks; default: all 10,000)."
    ),
    data_dir: Optional[Path] = DataDir,
    force: bool = typer.Option(False, "--force", help="Overwrite an existing output directory's files."),
) -> None:
    """Ablations, weights, selectivity, patching and per-digit circuits: mechanisms.json and report.html."""
    from mechscope.errors import MechscopeError
    from mechscope.pipelines.explain import explain_mnist

    try:
        clean, corrupted = (int(v) for v in patch.replace(" ", "").split(","))
    except ValueError:
        raise MechscopeError(f"--patch expects two digits CLEAN,CORRUPTED such as 8,3, got {patch!r}") from None
    path, result = explain_mnist(
        run,
        out,
        digits=digit,
        patch_classes=(clean, corrupted),
        n_pairs=pairs,
        tolerance=tolerance,
        data_dir=data_dir,
        force=force,
        test_limit=test_limit,
    )
    whole = result["ablation"]["whole_layer"]
    typer.echo(
        f"test accuracy {result['test_accuracy']:.4f}; mean-ablating all of conv1 leaves "
        f"{whole['conv1']['mean']['test_accuracy']:.4f}, all of conv2 {whole['conv2']['mean']['test_accuracy']:.4f}"
    )
    for c in result["circuits"]:
        flag = "" if c["meets_criterion"] else "  (criterion NOT met)"
        typer.echo(
            f"digit {c['digit']}: {c['size']:>2} conv2 channels {c['channels']}: alone {c['sufficiency']:.3f} "
            f"(full {c['full_accuracy']:.3f}), mean-ablated {c['necessity']:.3f}, "
            f"resample-ablated {c['necessity_resample']:.3f}{flag}"
        )
    typer.echo(f"analysis took {sum(result['seconds'].values()):.0f} s")
    typer.echo(f"report: {path / 'report.html'}")
    typer.echo(f"mechanisms.json written to {path}")
