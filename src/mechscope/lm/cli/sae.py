"""``mechscope lm sae ...``: sparse dictionaries (harvest, train, evaluate, show)."""

from __future__ import annotations

import typer

from mechscope.core.cli_options import (
    ArchitectureOpt,
    BatchSizeOpt,
    CheckpointEveryOpt,
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
from mechscope.lm.cli.common import DeviceOpt, DistributedOpt, DtypeOpt, ForceOpt, RevisionOpt, app

sae_app = typer.Typer(
    help="Sparse autoencoders and transcoders on a transformer: harvest activations, train, evaluate, show.",
    no_args_is_help=True,
)
app.add_typer(sae_app, name="sae")

Context = typer.Option(
    None, "--context",
    help="Tokens per context, BOS included (default: 128, or the model's context if shorter; at most the model's).",
)
Text = typer.Option(None, "--text", help="Text file (default: tinyshakespeare under the data root).")
Model = typer.Option(
    ..., "--model", help="A train-toy run, smollm2, a .gguf file, a Hugging Face directory or a hub id."
)


def _pair(text: str) -> tuple[str, str]:
    from mechscope.core.errors import MechscopeError

    parts = text.split(":")
    if len(parts) != 2 or not all(parts):
        raise MechscopeError(
            f"--transcoder expects IN:OUT hook names (e.g. blocks.1.mlp.hook_in:blocks.1.hook_mlp_out), got {text!r}"
        )
    return parts[0], parts[1]


def _say(line: str) -> None:
    typer.echo(line)


@sae_app.command("harvest")
def harvest(
    model: str = Model,
    hook: list[str] | None = typer.Option(None, "--hook", help="A hook point to harvest (repeatable): "
                                          "blocks.L.hook_resid_post, blocks.L.attn.hook_z, ..."),  # fmt: skip
    transcoder: list[str] | None = typer.Option(None, "--transcoder", help="A transcoder's IN:OUT hooks (repeatable), "
                                                "e.g. blocks.1.mlp.hook_in:blocks.1.hook_mlp_out."),  # fmt: skip
    out: str | None = typer.Option(None, "--out", help="Output directory (default: runs/sae-harvest/MODEL)."),
    text: str | None = Text,
    context: int | None = Context,
    contexts: int | None = typer.Option(None, "--contexts", help="At most this many contexts (default: all)."),
    batch: int = typer.Option(8, "--batch", help="Contexts per forward pass."),
    shard_rows: int = typer.Option(65536, "--shard-rows", help="Rows per shard file."),
    buffer_shards: int = typer.Option(4, "--buffer-shards", help="Shards shuffled together in memory (the bound)."),
    bos: bool = typer.Option(True, "--bos/--no-bos", help="Start each context with the model's BOS (not harvested)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the shuffle."),
    threads: int | None = ThreadsOpt,
    force: bool = ForceOpt,
    distributed: bool | None = DistributedOpt,
    device: str | None = DeviceOpt,
    dtype: str | None = DtypeOpt,
    revision: str | None = RevisionOpt,
) -> None:
    """Run a text through the model and store the activations at hook points (and transcoder input/target pairs)
    as shuffled safetensors shards, memory bounded; an interrupted harvest resumes (OUT.partial)."""
    from mechscope.core.torch_utils import torch_threads
    from mechscope.lm.pipelines.sae import HarvestSettings, sae_harvest

    settings = HarvestSettings(
        hooks=tuple(hook or ()), transcoders=tuple(_pair(t) for t in transcoder or ()), context=context,
        contexts=contexts, batch=batch, shard_rows=shard_rows, buffer_shards=buffer_shards, seed=seed, bos=bos,
    )  # fmt: skip
    with torch_threads(threads):
        path, r = sae_harvest(model, out, text, settings, force=force, distributed=distributed, device=device,
                              dtype=dtype, revision=revision)  # fmt: skip
    if r is None:
        return
    for s in r.stores:
        _say(f"{s['name']}: {s['rows']:,} rows of width {s['width']} in {s['shards']} shards")
    _say(f"{r.tokens:,} tokens in {r.seconds:.1f} s ({r.tokens_per_second:,.0f} tokens/s, {r.world_size} process(es))")
    _say(f"harvest.json and the stores written to {path}")


@sae_app.command("train")
def train(
    store: str = typer.Option(..., "--store", help="A harvest's output folder (one store) or one of its stores."),
    out: str | None = typer.Option(None, "--out", help="Output directory (default: runs/sae/STORE-ARCH)."),
    architecture: str = ArchitectureOpt,
    d_sae: int | None = typer.Option(None, "--d-sae", help="Latents (default: --expansion x d_in)."),
    expansion: int | None = typer.Option(None, "--expansion", help="Latents per input dimension (default 8)."),
    k: int = typer.Option(32, "--k", help="Active latents per token (topk, batchtopk)."),
    l1: float = L1Opt,
    l0: float = L0Opt,
    skip: bool = typer.Option(False, "--skip", help="A skip connection (transcoders)."),
    normalize: bool = NormalizeOpt,
    batch_size: int = BatchSizeOpt,
    epochs: int = EpochsOpt,
    steps: int | None = StepsOpt,
    lr: float = LrOpt,
    seed: int = SeedOpt,
    checkpoint_every: int = CheckpointEveryOpt,
    resume: bool = ResumeOpt,
    threads: int | None = ThreadsOpt,
    force: bool = ForceOpt,
    distributed: bool | None = DistributedOpt,
    device: str | None = typer.Option(None, "--device", help="cpu or cuda[:N] (default: cpu)."),
) -> None:
    """Train a sparse autoencoder (or, on a transcoder pair, a transcoder) on a harvested store; saved in
    SAELens' layout (cfg.json, sae_weights.safetensors) with training.json."""
    from mechscope.core.dictionaries.parallel import is_main
    from mechscope.core.torch_utils import torch_threads
    from mechscope.lm.pipelines.sae import sae_train

    with torch_threads(threads):
        path, r = sae_train(store, out, architecture=architecture, d_sae=d_sae, expansion=expansion, k=k,
                            l1_coefficient=l1, l0_coefficient=l0, skip=skip, normalize=normalize, batch_size=batch_size,
                            epochs=epochs, steps=steps, lr=lr, seed=seed, checkpoint_every=checkpoint_every,
                            resume=resume, force=force, distributed=distributed, device=device)  # fmt: skip
    if not is_main():
        return
    f = r.final
    _say(f"{r.architecture} {'transcoder' if r.target else 'SAE'} {r.d_in} -> {r.d_sae} latents on {r.hook}: "
         f"{r.steps} steps, {r.rows:,} rows in {r.seconds:.1f} s ({r.rows_per_second:,.0f} rows/s)")  # fmt: skip
    if f:
        _say(f"last: loss {f['loss']:.4g}, L0 {f['l0']:.1f}, explained variance {f['explained_variance']:.3f}, "
             f"dead {100 * f['dead_fraction']:.1f}%")  # fmt: skip
    _say(f"cfg.json, sae_weights.safetensors and training.json written to {path}")


def _read(context, contexts, batch, bos):
    from mechscope.lm.pipelines.sae import ReadSettings

    return ReadSettings(context=context, contexts=contexts, batch=batch, bos=bos)


@sae_app.command("evaluate")
def evaluate(
    model: str = Model,
    sae: str = typer.Option(..., "--sae", help="A dictionary directory in SAELens' layout (ours or SAELens')."),
    out: str | None = typer.Option(None, "--out", help="Output directory (default: SAE/evaluation)."),
    hook: str | None = typer.Option(None, "--hook", help="Splice at this hook (default: cfg.json's hook_name)."),
    target: str | None = typer.Option(None, "--target", help="A transcoder's output hook (default: hook_name_out)."),
    text: str | None = Text,
    context: int | None = Context,
    contexts: int = typer.Option(64, "--contexts", help="Contexts from the end of the text."),
    batch: int = typer.Option(8, "--batch"),
    bos: bool = typer.Option(True, "--bos/--no-bos"),
    threads: int | None = ThreadsOpt,
    force: bool = ForceOpt,
    device: str | None = DeviceOpt,
    dtype: str | None = DtypeOpt,
    revision: str | None = RevisionOpt,
) -> None:
    """Splice the dictionary into the model: L0, explained variance, dead latents, CE loss recovered and KL to the
    clean model (evaluation.json, report.html)."""
    from mechscope.core.torch_utils import torch_threads
    from mechscope.lm.pipelines.sae import sae_evaluate

    with torch_threads(threads):
        path, r = sae_evaluate(model, sae, out, text, _read(context, contexts, batch, bos), hook=hook, target=target,
                               force=force, device=device, dtype=dtype, revision=revision)  # fmt: skip
    m, e = r.metrics, r.effect
    _say(f"L0 {m['l0']:.1f}, explained variance {m['explained_variance']:.3f}, dead {100 * m['dead_fraction']:.1f}% "
         f"over {m['tokens']:,} positions")  # fmt: skip
    _say(f"CE loss: clean {e.loss_clean:.4f}, spliced {e.loss_spliced:.4f}, zero-ablated {e.loss_zero_ablated:.4f}: "
         f"{100 * e.ce_loss_recovered:.1f}% recovered; KL to clean {e.kl_spliced:.4f} nats")  # fmt: skip
    _say(f"evaluation.json and report.html written to {path}")


@sae_app.command("show")
def show(
    model: str = Model,
    sae: str = typer.Option(..., "--sae", help="A dictionary directory in SAELens' layout (ours or SAELens')."),
    out: str | None = typer.Option(None, "--out", help="Output directory (default: SAE/dashboards)."),
    latent: list[int] | None = typer.Option(None, "--latent", help="A latent to show (repeatable)."),
    n_random: int = typer.Option(6, "--random", help="Alive latents drawn at random (seeded) to show."),
    n_induction: int = typer.Option(6, "--induction", help="Most induction-like latents to show."),
    hook: str | None = typer.Option(None, "--hook", help="Read at this hook (default: cfg.json's hook_name)."),
    target: str | None = typer.Option(None, "--target", help="A transcoder's output hook (default: hook_name_out)."),
    text: str | None = Text,
    context: int | None = Context,
    contexts: int = typer.Option(256, "--contexts", help="Contexts from the end of the text."),
    batch: int = typer.Option(8, "--batch"),
    bos: bool = typer.Option(True, "--bos/--no-bos"),
    seed: int = typer.Option(0, "--seed"),
    threads: int | None = ThreadsOpt,
    force: bool = ForceOpt,
    device: str | None = DeviceOpt,
    dtype: str | None = DtypeOpt,
    revision: str | None = RevisionOpt,
) -> None:
    """Dashboards of latents: top contexts coloured by activation, quantile samples, histogram and density, the
    tokens each promotes and suppresses, what it mixes, induction-like latents (dashboards.json, report.html)."""
    from mechscope.core.torch_utils import torch_threads
    from mechscope.lm.pipelines.sae import sae_show

    with torch_threads(threads):
        path, r = sae_show(model, sae, out, text, _read(context, contexts, batch, bos), hook=hook, target=target,
                           latents=tuple(latent or ()), n_random=n_random, n_induction=n_induction, seed=seed,
                           force=force, device=device, dtype=dtype, revision=revision)  # fmt: skip
    for line in r.summary:
        _say(line)
    _say(f"dashboards.json and report.html written to {path}")
