"""``mechscope lm ...``: the language half."""

from __future__ import annotations

from typing import Optional

import typer

app = typer.Typer(help="Load transformers (GPT-2 and Llama families) and look inside them.", no_args_is_help=True)

ModelOpt = typer.Option(
    ..., "--model", help="smollm2, a .gguf file, a Hugging Face model directory, or a hub id (gpt2, ...)."
)


def parse_tokens(text: str) -> list[int]:
    from mechscope.errors import MechscopeError

    try:
        return [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise MechscopeError(f"--tokens expects integer ids separated by commas, got {text!r}") from None


@app.command()
def inspect(
    model: str = ModelOpt,
    hook: Optional[list[str]] = typer.Option(None, "--hook", help="Also run a prompt and show this activation."),
    prompt: str = typer.Option("The quick brown fox jumps over the lazy dog", "--prompt"),
) -> None:
    """Architecture, parameter count, dtype and hook names (and, with --hook, activations)."""
    import torch

    from mechscope.hooks import describe_names, hook_points, run_with_cache
    from mechscope.models.loading import load_model
    from mechscope.models.transformer import describe

    m, tok = load_model(model)
    for key, value in describe(m).items():
        typer.echo(f"{key:<12}{value:,}" if isinstance(value, int) else f"{key:<12}{value}")
    typer.echo(f"{'tokenizer':<12}{'yes, ' + format(tok.vocab_size, ',') + ' tokens' if tok else 'none found'}")
    typer.echo("hook points: " + describe_names(hook_points(m)))
    if hook:
        ids = tok.encode(prompt) if tok else list(range(1, 9))
        _, cache = run_with_cache(m, torch.tensor([ids]), names=hook)
        for name, act in cache.items():
            typer.echo(f"{name}: shape {list(act.shape)}, mean {act.float().mean():+.4f}, std {act.float().std():.4f}")


@app.command()
def generate(
    model: str = ModelOpt,
    prompt: Optional[str] = typer.Option(None, "--prompt", help="Text to continue."),
    tokens: Optional[str] = typer.Option(None, "--tokens", help="Token ids to continue instead, e.g. 1,2,3."),
    max_new_tokens: int = typer.Option(20, "--max-new-tokens", help="Tokens to add (greedy decoding)."),
) -> None:
    """Continue a prompt greedily and print prompt + continuation."""
    import torch

    from mechscope.errors import MechscopeError
    from mechscope.models.loading import load_model

    if max_new_tokens < 0:
        raise MechscopeError(f"--max-new-tokens must be 0 or more, got {max_new_tokens}")
    if (prompt is None) == (tokens is None):
        raise MechscopeError("give exactly one of --prompt and --tokens")
    m, tok = load_model(model)
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
