"""``mechscope lm inspect`` and ``lm generate``: a model's architecture and hooks, and greedy continuation."""

from __future__ import annotations

import typer

from mechscope.core.cli_options import ThreadsOpt
from mechscope.lm.cli.common import (
    DeviceMapOpt,
    DeviceOpt,
    DtypeOpt,
    ModelOpt,
    RevisionOpt,
    app,
    load_for_command,
    parse_tokens,
)


@app.command()
def inspect(
    model: str = ModelOpt,
    hook: list[str] | None = typer.Option(None, "--hook", help="Also run a prompt and show this activation."),
    prompt: str = typer.Option("The quick brown fox jumps over the lazy dog", "--prompt"),
    tokens: str | None = typer.Option(None, "--tokens", help="Token ids to run instead of the prompt, e.g. 1,2,3."),
    device: str | None = DeviceOpt,
    dtype: str | None = DtypeOpt,
    device_map: str | None = DeviceMapOpt,
    revision: str | None = RevisionOpt,
    threads: int | None = ThreadsOpt,
) -> None:
    """Architecture, parameter count, dtype, device and hook names (and, with --hook, activations)."""
    from mechscope.core.errors import MechscopeError
    from mechscope.core.hooks import describe_names
    from mechscope.core.torch_utils import torch_threads
    from mechscope.core.validate import typed_options
    from mechscope.lm.models.transformer import describe

    if tokens is not None and "--prompt" in typed_options():
        raise MechscopeError("give --prompt or --tokens, not both")
    with torch_threads(threads):  # the load (a GGUF's dequantisation), the prompt's run and the hooks' probe
        m, tok, cache, alive, silent = _inspect(model, hook, prompt, tokens, device, dtype, device_map, revision)
    for key, value in describe(m).items():
        typer.echo(f"{key:<12}{value:,}" if isinstance(value, int) else f"{key:<12}{value}")
    typer.echo(f"{'tokenizer':<12}{'yes, ' + format(tok.vocab_size, ',') + ' tokens' if tok else 'none found'}")
    typer.echo("hook points: " + describe_names(alive))
    if silent:
        typer.echo("not computed by this model (their modules exist): " + describe_names(silent))
    if hook:
        for name, act in cache.items():
            typer.echo(f"{name}: shape {list(act.shape)}, mean {act.float().mean():+.4f}, std {act.float().std():.4f}")


def _inspect(model, hook, prompt, tokens, device, dtype, device_map, revision):
    """The model, its tokenizer, the --hook activations, the hook names that fire and those that do not."""
    import torch

    from mechscope.core.errors import MechscopeError
    from mechscope.core.hooks import firing_hooks, hook_points, run_with_cache

    m, tok = load_for_command(model, device, dtype, device_map, revision=revision)
    cache = {}
    if hook:  # before any output: a hook that does not fire for this model is an error, not an empty answer
        if tokens is None and tok is None:  # it ran token ids 1..8 whatever the prompt said
            raise MechscopeError(f"{model}: no tokenizer to read --prompt with; give --tokens IDS to run")
        ids = parse_tokens(tokens) if tokens is not None else tok.encode(prompt)
        if not ids:
            raise MechscopeError("the prompt is empty")
        m.check_tokens(torch.tensor([ids]))  # ids the vocabulary has, a prompt the context holds
        _, cache = run_with_cache(m, torch.tensor([ids]), names=hook)
    probe = torch.zeros(1, min(4, m.cfg.n_ctx), dtype=torch.long)  # token 0 is in every vocabulary
    alive = firing_hooks(m, probe)  # a name is valid only if it fires (see core.hooks)
    fired = set(alive)
    silent = [n for n in hook_points(m) if n not in fired]
    return m, tok, cache, alive, silent


@app.command()
def generate(
    model: str = ModelOpt,
    prompt: str | None = typer.Option(None, "--prompt", help="Text to continue."),
    tokens: str | None = typer.Option(None, "--tokens", help="Token ids to continue instead, e.g. 1,2,3."),
    max_new_tokens: int = typer.Option(20, "--max-new-tokens", help="Tokens to add (greedy decoding)."),
    device: str | None = DeviceOpt,
    dtype: str | None = DtypeOpt,
    device_map: str | None = DeviceMapOpt,
    revision: str | None = RevisionOpt,
    threads: int | None = ThreadsOpt,
) -> None:
    """Continue a prompt greedily and print prompt + continuation."""
    from mechscope.core.errors import MechscopeError
    from mechscope.core.torch_utils import torch_threads

    if max_new_tokens < 0:
        raise MechscopeError(f"--max-new-tokens must be 0 or more, got {max_new_tokens}")
    if (prompt is None) == (tokens is None):
        raise MechscopeError("give exactly one of --prompt and --tokens")
    with torch_threads(threads):  # the load (a GGUF's dequantisation) and the decoding
        out, tok = _generate(model, prompt, tokens, max_new_tokens, device, dtype, device_map, revision)
    typer.echo(tok.decode(out) if tok else " ".join(map(str, out)))


def _generate(model, prompt, tokens, max_new_tokens, device, dtype, device_map, revision):
    """(prompt + continuation ids, the tokenizer or None) of ``lm generate``."""
    import torch

    from mechscope.core.errors import MechscopeError

    m, tok = load_for_command(model, device, dtype, device_map, revision=revision)
    if getattr(m, "tracr", None) is not None:  # its outputs are another vocabulary's, read all at once: no next token
        raise MechscopeError(f"{model}: a tracr model maps a whole input to an output in another vocabulary, not to "
                             "a next token; it does not generate (lm discover and lm graph read it)")  # fmt: skip
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
    m.check_tokens(torch.tensor([ids]))  # ids the vocabulary has, a prompt the context holds
    if len(ids) + max_new_tokens > m.cfg.n_ctx:  # generation stopped at the context without a word
        raise MechscopeError(f"--max-new-tokens {max_new_tokens}: the prompt's {len(ids)} tokens and {max_new_tokens} "
                             f"new ones exceed the model's context of {m.cfg.n_ctx} tokens")  # fmt: skip
    return m.generate(torch.tensor([ids]), max_new_tokens)[0].tolist(), tok
