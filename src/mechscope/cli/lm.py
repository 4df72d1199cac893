"""``mechscope lm ...``: the language half."""

from __future__ import annotations

from typing import Optional

import typer

app = typer.Typer(
    help="Load transformers (GPT-2, Llama, Pythia, GPT-Neo, GPT-J, OPT, Qwen, Mistral, Gemma, Phi-3) and look inside.",
    no_args_is_help=True,
)

ModelOpt = typer.Option(
    ...,
    "--model",
    help="smollm2, a .gguf file, a Hugging Face model directory, or a hub id (gpt2, EleutherAI/pythia-70m, ...).",
)
# shared by every command that loads a model (lm circuits and later commands reuse them)
DeviceOpt = typer.Option(None, "--device", help="cpu, cuda, cuda:N or mps (default: the best one present).")
DtypeOpt = typer.Option(
    None, "--dtype", help="float32, bfloat16 or float16 (default: float32 on the CPU, bfloat16 on a GPU)."
)
DeviceMapOpt = typer.Option(
    None, "--device-map", help="auto: spread the blocks over every GPU, then CPU memory, then disk (accelerate)."
)
RevisionOpt = typer.Option(
    None, "--revision", help="Hub branch, tag or commit of a hub id (Pythia's training steps: step3000, ...)."
)


def load_for_command(
    model: str,
    device: str | None = None,
    dtype: str | None = None,
    device_map: str | None = None,
    partial_ok: bool = False,
    revision: str | None = None,
):
    """The model and tokenizer a command asked for, on its device and in its dtype (user errors: one line)."""
    from mechscope.models.loading import load_model

    check_device_map_option(device_map)
    return load_model(model, dtype, partial_ok, device=device, device_map=device_map, revision=revision)


def check_device_map_option(device_map: str | None) -> None:
    from mechscope.errors import MechscopeError

    if device_map is not None and device_map != "auto":
        raise MechscopeError(f"--device-map takes 'auto' (a dict of module names is for Python), got {device_map!r}")


def parse_tokens(text: str) -> list[int]:
    from mechscope.errors import MechscopeError

    try:
        ids = [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise MechscopeError(f"--tokens expects integer ids separated by commas, got {text!r}") from None
    bad = [i for i in ids if not 0 <= i < 2**63]
    if bad:
        raise MechscopeError(f"--tokens: token id {bad[0]} is not a vocabulary index (0 or more, below 2**63)")
    return ids


@app.command()
def inspect(
    model: str = ModelOpt,
    hook: Optional[list[str]] = typer.Option(None, "--hook", help="Also run a prompt and show this activation."),
    prompt: str = typer.Option("The quick brown fox jumps over the lazy dog", "--prompt"),
    device: Optional[str] = DeviceOpt,
    dtype: Optional[str] = DtypeOpt,
    device_map: Optional[str] = DeviceMapOpt,
    revision: Optional[str] = RevisionOpt,
) -> None:
    """Architecture, parameter count, dtype, device and hook names (and, with --hook, activations)."""
    import torch

    from mechscope.hooks import describe_names, hook_points, run_with_cache
    from mechscope.models.transformer import describe

    m, tok = load_for_command(model, device, dtype, device_map, revision=revision)
    cache = {}
    if hook:  # before any output: a hook that does not fire for this model is an error, not an empty answer
        ids = tok.encode(prompt) if tok else list(range(1, 9))
        _, cache = run_with_cache(m, torch.tensor([ids]), names=hook)
    for key, value in describe(m).items():
        typer.echo(f"{key:<12}{value:,}" if isinstance(value, int) else f"{key:<12}{value}")
    typer.echo(f"{'tokenizer':<12}{'yes, ' + format(tok.vocab_size, ',') + ' tokens' if tok else 'none found'}")
    typer.echo("hook points: " + describe_names(hook_points(m)))
    if hook:
        for name, act in cache.items():
            typer.echo(f"{name}: shape {list(act.shape)}, mean {act.float().mean():+.4f}, std {act.float().std():.4f}")


@app.command()
def generate(
    model: str = ModelOpt,
    prompt: Optional[str] = typer.Option(None, "--prompt", help="Text to continue."),
    tokens: Optional[str] = typer.Option(None, "--tokens", help="Token ids to continue instead, e.g. 1,2,3."),
    max_new_tokens: int = typer.Option(20, "--max-new-tokens", help="Tokens to add (greedy decoding)."),
    device: Optional[str] = DeviceOpt,
    dtype: Optional[str] = DtypeOpt,
    device_map: Optional[str] = DeviceMapOpt,
    revision: Optional[str] = RevisionOpt,
) -> None:
    """Continue a prompt greedily and print prompt + continuation."""
    import torch

    from mechscope.errors import MechscopeError

    if max_new_tokens < 0:
        raise MechscopeError(f"--max-new-tokens must be 0 or more, got {max_new_tokens}")
    if (prompt is None) == (tokens is None):
        raise MechscopeError("give exactly one of --prompt and --tokens")
    m, tok = load_for_command(model, device, dtype, device_map, revision=revision)
    if tokens is not None:
        ids = parse_tokens(tokens)
    else:
        if tok is None:
            raise MechscopeError(
                f"{model}: no tokenizer beside the weights (vocab.json + merges.txt or tokenizer.json)"
            )
        ids = tok.encode(prompt)
    if not ids:
        raise MechscopeError("the prompt is empty")
    out = m.generate(torch.tensor([ids]), max_new_tokens)[0].tolist()
    typer.echo(tok.decode(out) if tok else " ".join(map(str, out)))


def parse_pair(text: str, what: str = "head", example: str = "5.1") -> tuple[int, int]:
    """``LAYER.HEAD`` (or ``LAYER.NEURON``, ...) as two integers; anything else is a one-line error."""
    from mechscope.errors import MechscopeError

    try:
        layer, index = text.split(".")
        return int(layer), int(index)
    except ValueError:
        raise MechscopeError(
            f"expected a {what} as LAYER.{what.upper()} (for example {example}), got {text!r}"
        ) from None


def parse_head(text: str) -> tuple[int, int]:
    return parse_pair(text, "head", "5.1")


@app.command()
def heads(
    model: str = ModelOpt,
    out: Optional[str] = typer.Option(None, "--out", help="Output directory (default: runs/heads/MODEL)."),
    n: int = typer.Option(50, "--n", help="Random tokens per half of the repeated sequence."),
    batch: int = typer.Option(8, "--batch", help="Repeated sequences."),
    seed: int = typer.Option(0, "--seed"),
    top_k: Optional[int] = typer.Option(
        None, "--top-k", help="Induction heads ablated together against as many random heads (default 5)."
    ),
    show: Optional[list[str]] = typer.Option(None, "--show", help="A head (LAYER.HEAD) for the pattern viewer."),
    text: Optional[str] = typer.Option(None, "--text", help="Real text for the previous-token score."),
    no_ablation: bool = typer.Option(False, "--no-ablation", help="Skip the per-head ablations (the slow part)."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing output directory's files."),
    device: Optional[str] = DeviceOpt,
    dtype: Optional[str] = DtypeOpt,
    device_map: Optional[str] = DeviceMapOpt,
    revision: Optional[str] = RevisionOpt,
) -> None:
    """Find the induction heads: write heads.json and a self-contained report.html."""
    from mechscope.methods.heads import HeadProtocol
    from mechscope.pipelines.lm import induction_heads

    check_device_map_option(device_map)
    protocol = HeadProtocol(n=n, batch=batch, seed=seed, top_k=top_k, per_head_ablation=not no_ablation)
    shown = [parse_head(h) for h in show or []]
    path, data = induction_heads(
        model,
        out,
        protocol,
        text_file=text,
        show=shown,
        force=force,
        progress=lambda step: typer.echo(f"  {step}...", err=True),
        device=device,
        dtype=dtype,
        device_map=device_map,
        revision=revision,
    )
    typer.echo(
        f"loss on repeated random tokens: first copy {data['loss_first_half']:.3f}, "
        f"second copy {data['loss_second_half']:.3f}"
    )
    ind = data["induction_heads"]
    typer.echo(
        f"induction heads ({len(ind)}): " + ", ".join(f"{h['layer']}.{h['head']} ({h['score']:.2f})" for h in ind[:10])
    )
    prev = data["previous_token_heads"]
    typer.echo(
        f"previous-token heads ({len(prev)}): "
        + ", ".join(f"{h['layer']}.{h['head']} ({h['score']:.2f})" for h in prev[:10])
    )
    k = data["top_k_ablation"]
    typer.echo(
        f"ablating the top {k['k']} induction heads: +{k['induction_heads_loss_increase']:.3f} loss; "
        f"{k['k']} random heads: +{k['random_heads_loss_increase_mean']:.3f} "
        f"± {k['random_heads_loss_increase_std']:.3f}"
    )
    typer.echo(f"heads.json and report.html written to {path} ({sum(data['seconds'].values()):.0f} s)")


@app.command("train-toy")
def train_toy_cmd(
    layers: int = typer.Option(2, "--layers", help="Attention layers: 1 or 2."),
    data: str = typer.Option("synthetic", "--data", help="synthetic (repeated spans) or text (characters)."),
    text: Optional[str] = typer.Option(None, "--text", help="Text file for --data text (default: tinyshakespeare)."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Training steps (default 2,500 synthetic, 8,000 text)."),
    seed: int = typer.Option(0, "--seed"),
    mlp: str = typer.Option(
        "none", "--mlp", help="none (attention-only), gelu or solu (SoLU + LayerNorm, Elhage et al. 2022) MLPs."
    ),
    d_mlp: Optional[int] = typer.Option(
        None, "--d-mlp", help="MLP neurons per layer (default 4 × d_model; with --mlp)."
    ),
    control: bool = typer.Option(True, "--control/--no-control", help="Also train the 1-layer control."),
    out: Optional[str] = typer.Option(None, "--out", help="Output directory (default: runs/toy-DATA-NL)."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing output directory's files."),
    device: Optional[str] = typer.Option("cpu", "--device", help="cpu (toy models train in seconds there)."),
    dtype: Optional[str] = typer.Option("float32", "--dtype", help="float32 (training in lower precision: not yet)."),
) -> None:
    """Train a small transformer (attention-only unless --mlp) and watch its induction heads form."""
    import torch

    from mechscope.errors import MechscopeError
    from mechscope.models.devices import resolve_device, resolve_dtype
    from mechscope.pipelines.lm import train_toy_run
    from mechscope.toy import ToyConfig

    where = resolve_device(device)  # a device that is not there, or a dtype it cannot do: one line
    if where.type != "cpu" or resolve_dtype(dtype, where) != torch.float32:
        raise MechscopeError(f"lm train-toy trains on the CPU in float32 only, not {where} in {dtype}")

    config = ToyConfig(layers=layers, data=data, steps=steps, seed=seed, mlp=mlp, d_mlp=d_mlp)
    path, r = train_toy_run(config, out, text, control, force)
    p, f = r["phase_change"], r["final"]
    if p.get("detected"):
        typer.echo(
            f"phase change between steps {p['window'][0]} and {p['window'][1]}: induction +{p['induction_jump']:.2f}, "
            f"in-context-learning score {p['icl_jump']:+.2f}"
        )
    else:
        typer.echo("no phase change detected")
    typer.echo(
        f"final: best induction score {f['max_induction_last_layer']:.2f}, best previous-token score "
        f"{f['max_previous_token_layer0']:.2f}, held-out loss {f['held_out_loss']:.3f}"
    )
    if "control" in r:
        typer.echo(f"1-layer control: best induction score {r['control']['final']['max_induction_last_layer']:.2f}")
    typer.echo(f"training.json, training.html and checkpoints written to {path}")
