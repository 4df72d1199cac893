"""``mechscope lm ...``: the language half."""

from __future__ import annotations

import typer

app = typer.Typer(help="Load transformers (GPT-2 and Llama families) and look inside them.", no_args_is_help=True)

ModelOpt = typer.Option(
    ..., "--model", help="smollm2, a .gguf file, a Hugging Face model directory, or a hub id (gpt2, ...)."
)


@app.command()
def inspect(model: str = ModelOpt) -> None:
    """Architecture, parameter count, dtype and hook names."""
    from mechscope.hooks import describe_names, hook_points
    from mechscope.models.loading import load_model
    from mechscope.models.transformer import describe

    m, tok = load_model(model)
    for key, value in describe(m).items():
        typer.echo(f"{key:<12}{value:,}" if isinstance(value, int) else f"{key:<12}{value}")
    typer.echo(f"{'tokenizer':<12}{'yes, ' + format(tok.vocab_size, ',') + ' tokens' if tok else 'none found'}")
    typer.echo("hook points: " + describe_names(hook_points(m)))


@app.command()
def generate(
    model: str = ModelOpt,
    prompt: str = typer.Option(..., "--prompt", help="Text to continue."),
    max_new_tokens: int = typer.Option(20, "--max-new-tokens", help="Tokens to add (greedy decoding)."),
) -> None:
    """Continue a prompt greedily and print prompt + continuation."""
    import torch

    from mechscope.errors import MechscopeError
    from mechscope.models.loading import load_model

    if max_new_tokens < 0:
        raise MechscopeError(f"--max-new-tokens must be 0 or more, got {max_new_tokens}")
    m, tok = load_model(model)
    if tok is None:
        raise MechscopeError(
            f"{model}: no tokenizer found beside the weights (vocab.json + merges.txt or tokenizer.json)"
        )
    ids = tok.encode(prompt)
    if not ids:
        raise MechscopeError("the prompt is empty")
    out = m.generate(torch.tensor([ids]), max_new_tokens)
    typer.echo(tok.decode(out[0].tolist()))
