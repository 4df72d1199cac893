"""The ``lm`` command group and what its commands share: the options, loading a model, parsing heads and ids."""

from __future__ import annotations

import typer

from mechscope.core.cli_options import DeviceOpt, DistributedOpt, DtypeOpt, ForceOpt  # noqa: F401 (the lm commands' options)

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
    from mechscope.lm.models.loading import load_model

    check_device_map_option(device_map)
    return load_model(model, dtype, partial_ok, device=device, device_map=device_map, revision=revision)


def check_device_map_option(device_map: str | None) -> None:
    from mechscope.core.errors import MechscopeError

    if device_map is not None and device_map != "auto":
        raise MechscopeError(f"--device-map takes 'auto' (a dict of module names is for Python), got {device_map!r}")


def parse_tokens(text: str) -> list[int]:
    from mechscope.core.errors import MechscopeError
    from mechscope.core.validate import int_list

    ids = int_list(text, "--tokens")
    bad = [i for i in ids if not 0 <= i < 2**63]
    if bad:
        raise MechscopeError(f"--tokens: token id {bad[0]} is not a vocabulary index (0 or more, below 2**63)")
    return ids


def parse_pair(text: str, what: str = "head", example: str = "5.1") -> tuple[int, int]:
    """``LAYER.HEAD`` (or ``LAYER.NEURON``, ...) as two integers; anything else is a one-line error."""
    from mechscope.core.errors import MechscopeError
    from mechscope.core.validate import indices

    try:
        return indices(text)
    except ValueError:
        raise MechscopeError(
            f"expected a {what} as LAYER.{what.upper()} (for example {example}), got {text!r}"
        ) from None


def parse_head(text: str) -> tuple[int, int]:
    return parse_pair(text, "head", "5.1")


def parse_heads(texts, flag: str) -> list[tuple[int, int]]:
    """Every ``flag`` value as a head, refusing one given twice (it was read out, or shown, twice)."""
    from mechscope.core.errors import MechscopeError
    from mechscope.core.validate import repeated

    heads = [parse_head(t) for t in texts or []]
    twice = repeated(heads)
    if twice:
        raise MechscopeError(f"{flag} given more than once for head {', '.join(f'{a}.{b}' for a, b in twice)}")
    return heads
