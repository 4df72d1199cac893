"""``mechscope cnn sae ...``: sparse dictionaries (harvest, train, evaluate, show)."""

from __future__ import annotations

from pathlib import Path

import typer

from mechscope.cnn.cli.common import DataDir, Dataset, Force, RunDir, app
from mechscope.core.cli_options import (
    ArchitectureOpt,
    BatchSizeOpt,
    CheckpointEveryOpt,
    DistributedOpt,
    EpochsOpt,
    L0Opt,
    L1Opt,
    LrOpt,
    NormalizeOpt,
    ResumeOpt,
    SeedOpt,
    StepsOpt,
    ThreadsOpt,
)

sae_app = typer.Typer(
    help="Sparse autoencoders on a CNN stage's channel vectors: harvest activations, train, evaluate, show.",
    no_args_is_help=True,
)
app.add_typer(sae_app, name="sae")

Sae = typer.Option(..., "--sae", help="A dictionary directory in SAELens' layout (cnn sae train's, or SAELens').")
Hook = typer.Option(None, "--hook", help="Hook point (default: the last stage's hook_out; conv2.hook_post, ...).")


@sae_app.command("harvest")
def harvest(
    run: Path = RunDir,
    out: Path | None = typer.Option(None, "--out", help="Output directory (default: RUN/sae-harvest)."),
    hook: str | None = Hook,
    split: str = typer.Option("train", "--split", help="train or test images."),
    limit: int | None = typer.Option(None, "--limit", help="Only the first N images."),
    batch: int = typer.Option(512, "--batch", help="Images per forward pass."),
    shard_rows: int = typer.Option(65536, "--shard-rows", help="Rows per shard file."),
    buffer_shards: int = typer.Option(4, "--buffer-shards", help="Shards shuffled together in memory (the bound)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the shuffle."),
    dataset: str | None = Dataset,
    data_dir: Path | None = DataDir,
    threads: int | None = ThreadsOpt,
    force: bool = Force,
    distributed: bool | None = DistributedOpt,
) -> None:
    """Store the channel vector at every position of a hook over the images (one row per image position) as
    shuffled safetensors shards, memory bounded; an interrupted harvest resumes (OUT.partial)."""
    from mechscope.cnn.pipelines.sae import sae_harvest_run
    from mechscope.core.torch_utils import torch_threads

    with torch_threads(threads):
        path, r = sae_harvest_run(run, out, hook, dataset=dataset, data_dir=data_dir, split=split, limit=limit,
                                  batch=batch, shard_rows=shard_rows, buffer_shards=buffer_shards, seed=seed,
                                  force=force, distributed=distributed)  # fmt: skip
    if r is None:
        return
    typer.echo(f"{r.hook} {list(r.activation_shape)}: {r.rows:,} rows of width {r.width} from {r.images:,} images "
               f"in {r.shards} shards")  # fmt: skip
    typer.echo(f"{r.seconds:.1f} s: {r.images_per_second:,.0f} images/s ({r.rows_per_second:,.0f} rows/s, "
               f"{r.world_size} process(es))")  # fmt: skip
    typer.echo(f"harvest.json and the store written to {path}")


@sae_app.command("train")
def train(
    store: Path = typer.Option(..., "--store", help="A `cnn sae harvest` output folder."),
    out: Path | None = typer.Option(
        None, "--out", help="Output directory (default: sae-ARCH beside the harvest folder; RUN/sae-ARCH for a harvest "
        "in its default place).",
    ),  # fmt: skip
    architecture: str = ArchitectureOpt,
    d_sae: int | None = typer.Option(None, "--d-sae", help="Latents (default: --expansion x channels)."),
    expansion: int | None = typer.Option(None, "--expansion", help="Latents per channel (default 16)."),
    k: int = typer.Option(8, "--k", help="Active latents per position (topk, batchtopk)."),
    l1: float = L1Opt,
    l0: float = L0Opt,
    normalize: bool = NormalizeOpt,
    batch_size: int = BatchSizeOpt,
    epochs: int = EpochsOpt,
    steps: int | None = StepsOpt,
    lr: float = LrOpt,
    seed: int = SeedOpt,
    checkpoint_every: int = CheckpointEveryOpt,
    resume: bool = ResumeOpt,
    threads: int | None = ThreadsOpt,
    force: bool = Force,
    distributed: bool | None = DistributedOpt,
) -> None:
    """Train a sparse autoencoder on a harvested store; saved in SAELens' layout (cfg.json,
    sae_weights.safetensors) with training.json."""
    from mechscope.cnn.pipelines.sae import sae_train_run
    from mechscope.core.dictionaries.parallel import is_main
    from mechscope.core.torch_utils import torch_threads

    with torch_threads(threads):
        path, r = sae_train_run(store, out, architecture=architecture, d_sae=d_sae, expansion=expansion, k=k,
                                l1_coefficient=l1, l0_coefficient=l0, normalize=normalize, batch_size=batch_size,
                                epochs=epochs, steps=steps, lr=lr, seed=seed, checkpoint_every=checkpoint_every,
                                resume=resume, force=force, distributed=distributed)  # fmt: skip
    if not is_main():
        return
    f = r.final
    typer.echo(f"{r.architecture} SAE {r.d_in} -> {r.d_sae} latents on {r.hook}: {r.steps} steps, {r.rows:,} rows "
               f"in {r.seconds:.1f} s ({r.rows_per_second:,.0f} rows/s)")  # fmt: skip
    if f:
        typer.echo(f"last: loss {f['loss']:.4g}, L0 {f['l0']:.1f}, explained variance {f['explained_variance']:.3f}, "
                   f"dead {100 * f['dead_fraction']:.1f}%")  # fmt: skip
    typer.echo(f"cfg.json, sae_weights.safetensors and training.json written to {path}")


@sae_app.command("evaluate")
def evaluate(
    run: Path = RunDir,
    sae: Path = Sae,
    out: Path | None = typer.Option(None, "--out", help="Output directory (default: SAE/evaluation)."),
    hook: str | None = typer.Option(None, "--hook", help="Splice at this hook (default: cfg.json's hook_name)."),
    limit: int | None = typer.Option(None, "--limit", help="Only the first N test images."),
    dataset: str | None = Dataset,
    data_dir: Path | None = DataDir,
    threads: int | None = ThreadsOpt,
    force: bool = Force,
) -> None:
    """Splice the SAE into the CNN: L0, explained variance, dead latents, test accuracy recovered and logit KL
    (evaluation.json, report.html)."""
    from mechscope.cnn.pipelines.sae import sae_evaluate_run
    from mechscope.core.torch_utils import torch_threads

    with torch_threads(threads):
        path, r = sae_evaluate_run(run, sae, out, dataset=dataset, data_dir=data_dir, hook=hook, limit=limit,
                                   force=force)  # fmt: skip
    m, e = r.metrics, r.effect
    typer.echo(f"L0 {m['l0']:.2f}, explained variance {m['explained_variance']:.3f}, dead "
               f"{100 * m['dead_fraction']:.1f}% over {m['tokens']:,} positions")  # fmt: skip
    share = (f"{100 * e.accuracy_recovered:.1f}% recovered" if e.accuracy_recovered == e.accuracy_recovered
             else "zeroing changes nothing, so no share to recover")  # NaN: it printed "nan% recovered"
    typer.echo(f"test accuracy: clean {e.acc_clean:.4f}, spliced {e.acc_spliced:.4f}, zero-ablated "
               f"{e.acc_ablated:.4f}: {share}; logit KL {e.kl_spliced:.4f} nats")  # fmt: skip
    typer.echo(f"evaluation.json and report.html written to {path}")


@sae_app.command("show")
def show(
    run: Path = RunDir,
    sae: Path = Sae,
    out: Path | None = typer.Option(None, "--out", help="Output directory (default: SAE/dashboards)."),
    latent: list[int] | None = typer.Option(None, "--latent", help="A latent to show (repeatable)."),
    n_selective: int = typer.Option(6, "--selective", help="Most class-selective latents to show."),
    n_random: int = typer.Option(6, "--random", help="Alive latents drawn at random (seeded) to show."),
    hook: str | None = typer.Option(None, "--hook", help="Read at this hook (default: cfg.json's hook_name)."),
    limit: int | None = typer.Option(None, "--limit", help="Only the first N test images."),
    tuning: bool = typer.Option(True, "--tuning/--no-tuning", help="Stroke tuning of channels and latents."),
    featvis_steps: int = typer.Option(256, "--featvis-steps", help="Feature visualisation steps (0: none)."),
    seed: int = typer.Option(0, "--seed"),
    dataset: str | None = Dataset,
    data_dir: Path | None = DataDir,
    threads: int | None = ThreadsOpt,
    force: bool = Force,
) -> None:
    """Latents against channels (class selectivity, stroke tuning) and a dashboard per latent: top image patches
    at the receptive field, quantile samples, histogram, class profile and effect, feature visualisation
    (dashboards.json, report.html)."""
    from mechscope.cnn.pipelines.sae import sae_show_run
    from mechscope.core.torch_utils import torch_threads

    with torch_threads(threads):
        path, r = sae_show_run(run, sae, out, dataset=dataset, data_dir=data_dir, hook=hook,
                               latents=tuple(latent or ()), n_selective=n_selective, n_random=n_random, limit=limit,
                               tuning=tuning,
                               featvis_steps=featvis_steps, seed=seed, force=force)  # fmt: skip
    for line in r.summary:
        typer.echo(line)
    typer.echo(f"dashboards.json and report.html written to {path}")
