"""Pipelines of the language half: induction heads, toy training (strings steps together)."""

from __future__ import annotations

import logging
import re
from pathlib import Path

from mechscope.config import check_seed
from mechscope.outputs import atomic_output, check_target

log = logging.getLogger(__name__)


def _text_tokens(tokenizer, text_file: Path | None, protocol, n_ctx: int, seed: int):
    """Seeded windows of real text for the previous-token protocol; None when no text is at hand."""
    import torch

    from mechscope.data.mnist import resolve_data_dir
    from mechscope.errors import MechscopeError

    if tokenizer is None:
        log.warning("no tokenizer: the real-text previous-token score is not measured")
        return None
    path = Path(text_file) if text_file else resolve_data_dir() / "tinyshakespeare" / "input.txt"
    if not path.is_file():
        if text_file:
            raise MechscopeError(f"{path}: text file not found")
        log.warning("%s not found: the real-text previous-token score is not measured", path)
        return None
    from mechscope.validate import read_text_file

    ids = torch.tensor(tokenizer.encode(read_text_file(path)[:300_000]))
    length = min(protocol.text_len, n_ctx)
    if len(ids) < length + 1:
        raise MechscopeError(f"{path}: {len(ids)} tokens, too short for windows of {length}")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - length, (protocol.text_batch,), generator=g)
    return torch.stack([ids[s : s + length] for s in starts])


def induction_heads(
    model_spec: str,
    out: str | Path | None = None,
    protocol=None,
    text_file: str | Path | None = None,
    show: list[tuple[int, int]] | None = None,
    force: bool = False,
    progress=None,
    device=None,
    dtype=None,
    device_map=None,
    revision=None,
) -> tuple[Path, dict]:
    """Find the induction heads of a model; write heads.json and report.html."""
    import time

    from mechscope.methods.heads import HeadProtocol, find_induction_heads
    from mechscope.models.loading import load_model
    from mechscope.report.heads import write_report
    from mechscope.runs import write_json

    protocol = protocol or HeadProtocol()
    check_seed(protocol.seed)
    out = Path(out) if out is not None else Path("runs") / "heads" / re.sub(r"[^A-Za-z0-9_.-]+", "_", str(model_spec))
    check_target(out, force)  # before minutes of work
    t = time.perf_counter()
    model, tok = load_model(model_spec, dtype, device=device, device_map=device_map, revision=revision)
    load_seconds = time.perf_counter() - t
    text = _text_tokens(tok, text_file, protocol, model.cfg.n_ctx, protocol.seed)
    result = find_induction_heads(model, protocol, text, name=str(model_spec), show=show, progress=progress)
    result.seconds = {"load": load_seconds, **result.seconds}
    data = result.to_dict()

    def as_text(ids):
        return [tok.decode([i]) if tok else str(i) for i in ids]

    token_text = {k: as_text(v["tokens"]) for k, v in result.examples.items() if k in ("repeated", "text")}
    with atomic_output(out, force) as tmp:
        write_json(tmp / "heads.json", data)
        write_report(result, token_text, tmp / "report.html")
    return out, data


def train_toy_run(
    config,
    out: str | Path | None = None,
    text_file: str | Path | None = None,
    control: bool = True,
    force: bool = False,
    progress: bool = True,
) -> tuple[Path, dict]:
    """Train a toy model (attention-only unless ``config.mlp``; and its 1-layer control); write training.json
    and training.html."""
    from dataclasses import replace

    from mechscope.data.mnist import resolve_data_dir
    from mechscope.errors import MechscopeError
    from mechscope.report.toy import write_training_report
    from mechscope.runs import write_json
    from mechscope.toy import train_toy

    config.validate()
    text = None
    if config.data == "text":
        path = Path(text_file) if text_file else resolve_data_dir() / "tinyshakespeare" / "input.txt"
        if not path.is_file():
            raise MechscopeError(f"{path}: text file not found")
        from mechscope.validate import read_text_file

        text = read_text_file(path)
    mlp = "" if config.mlp == "none" else f"-{config.mlp}"
    out = Path(out) if out is not None else Path("runs") / f"toy-{config.data}-{config.layers}L{mlp}"
    check_target(out, force)  # before minutes of training
    with atomic_output(out, force) as tmp:  # checkpoints too: an interrupted run leaves nothing behind
        result = train_toy(config, text, tmp, progress)
        if control and config.layers == 2:
            result["control"] = train_toy(replace(config, layers=1), text, tmp / "control", progress)
        write_json(tmp / "training.json", result)
        write_training_report(result, tmp / "training.html")
    return out, result


DEFAULT_PROMPT = (
    "Mr and Mrs Dursley, of number four, Privet Drive, were proud to say that they were perfectly normal, thank you "
    "very much. Mr and Mrs Dursley"
)


def _circuits_model(spec: str, device=None, dtype=None, device_map=None, revision=None):
    """A model for weights-only reading: a train-toy run (or one checkpoint), or anything load_model takes,
    partial checkpoints included. Returns the model, an encoder, a decoder, and a name."""
    from mechscope.models.loading import load_model
    from mechscope.toy import is_toy_run, load_toy

    if is_toy_run(spec):
        model, chars, name = load_toy(spec)
        if chars:
            lookup = {c: i for i, c in enumerate(chars)}
            return model, (lambda text: [lookup[c] for c in text if c in lookup]), (lambda i: chars[i]), name
        return model, None, str, name
    model, tok = load_model(spec, dtype, True, device=device, device_map=device_map, revision=revision)
    if tok is None:
        return model, None, str, str(spec)
    return model, tok.encode, (lambda i: tok.decode([i])), str(spec)


def model_out(command: str, model_spec) -> Path:
    """A command's default output directory for a model: runs/COMMAND/MODEL (the spec made a safe name)."""
    return Path("runs") / command / re.sub(r"[^A-Za-z0-9_.-]+", "_", str(model_spec).rstrip("/"))


def circuits(
    model_spec: str,
    out: str | Path | None = None,
    heads: list[tuple[int, int]] | None = None,
    prompt: str | None = None,
    force: bool = False,
    progress=None,
    device=None,
    dtype=None,
    device_map=None,
    revision=None,
) -> tuple[Path, dict]:
    """The Mathematical Framework toolkit on one model: circuits.json and report.html."""
    import torch

    from mechscope.errors import MechscopeError
    from mechscope.methods.heads import check_heads, default_token_range
    from mechscope.methods.transformer_circuits import read_circuits
    from mechscope.models.folding import analysis_weights
    from mechscope.report.circuits import write_report
    from mechscope.runs import write_json

    out = Path(out) if out is not None else model_out("circuits", model_spec)
    check_target(out, force)
    model, encode, decode, label = _circuits_model(model_spec, device, dtype, device_map, revision)
    check_heads(model, heads)
    prompt_ids = None
    if not model.missing_weights:
        if prompt is not None and encode is None:
            raise MechscopeError(f"{model_spec}: no tokenizer to encode --prompt with")
        if encode is not None:
            ids = encode(prompt if prompt is not None else DEFAULT_PROMPT)
            if not ids:
                raise MechscopeError("the prompt is empty")
            if len(ids) > model.cfg.n_ctx:
                raise MechscopeError(f"the prompt is {len(ids)} tokens, longer than the context of {model.cfg.n_ctx}")
            prompt_ids = torch.tensor(ids)
    elif prompt is not None:
        model.check_complete()  # one line: a partial checkpoint cannot run the prompt
    view = analysis_weights(model)
    result = read_circuits(
        model, view, label, heads, prompt_ids, token_range=default_token_range(model), progress=progress
    )
    data = result.to_dict(decode)
    prompt_text = None if prompt_ids is None else [decode(int(i)) for i in prompt_ids]
    with atomic_output(out, force) as tmp:
        write_json(tmp / "circuits.json", data)
        write_report(result, decode, prompt_text, tmp / "report.html")
    return out, data
