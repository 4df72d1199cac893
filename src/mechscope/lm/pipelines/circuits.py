"""``mechscope lm circuits``: the Mathematical Framework toolkit on one model; circuits.json and report.html."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

from mechscope.core.errors import MechscopeError
from mechscope.core.outputs import atomic_output, check_target, write_json
from mechscope.core.paths import model_out
from mechscope.core.torch_utils import Timer
from mechscope.lm.methods.circuits import CircuitsResult, induction_protocol, read_circuits
from mechscope.lm.methods.scores import check_heads, default_token_range
from mechscope.lm.models.transformer import work_counter
from mechscope.lm.pipelines.loading import load_lm
from mechscope.lm.tokenizer import encode_named

log = logging.getLogger(__name__)

DEFAULT_PROMPT = (
    "Mr and Mrs Dursley, of number four, Privet Drive, were proud to say that they were perfectly normal, thank you "
    "very much. Mr and Mrs Dursley"
)


def _circuits_model(spec: str, device=None, dtype=None, device_map=None, revision=None):
    """A model for weights-only reading: a train-toy run (or one checkpoint), or anything load_model takes,
    partial checkpoints included (:func:`load_lm`). Returns the model, an encoder, a decoder, and a name."""
    model, tok, name = load_lm(spec, device, dtype, device_map, revision, partial_ok=True)
    if tok is None:
        return model, None, str, name
    return model, tok.encode, (lambda i: tok.decode([i])), name


def _prompt_ids(encode, prompt: str | None, n_ctx: int) -> list[int] | None:
    """The prompt's ids; without one, the default prompt's first ``n_ctx``, or None (logged) where a text-trained
    toy cannot read it (a character outside its vocabulary: a given prompt is refused in one line instead)."""
    if prompt is not None:
        return encode_named(encode, prompt, "the prompt")
    try:
        return encode(DEFAULT_PROMPT)[:n_ctx]
    except MechscopeError as e:
        log.warning("no prompt read: the default prompt has %s; give one with --prompt", e)
        return None


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
) -> tuple[Path, CircuitsResult]:
    """The Mathematical Framework toolkit on one model: circuits.json and report.html. Returns (out, the result)."""
    import torch

    from mechscope.lm.models.folding import analysis_weights
    from mechscope.lm.report.circuits import write_report

    out = Path(out) if out is not None else model_out("circuits", model_spec)
    check_target(out, force)
    timer = Timer("lm circuits")
    with timer.section("load"):
        model, encode, decode, label = _circuits_model(model_spec, device, dtype, device_map, revision)
    heads = check_heads(model, heads) if heads is not None else None  # a zip is read once, here
    prompt_ids = None
    if not model.missing_weights:
        if prompt is not None and encode is None:
            raise MechscopeError(f"{model_spec}: no tokenizer to encode --prompt with")
        ids = _prompt_ids(encode, prompt, model.cfg.n_ctx) if encode is not None else None
        if ids is not None:
            if not ids:
                raise MechscopeError("the prompt is empty")
            if len(ids) > model.cfg.n_ctx:
                raise MechscopeError(f"the prompt is {len(ids)} tokens, longer than the context of {model.cfg.n_ctx}")
            prompt_ids = torch.tensor(ids)
    elif prompt is not None:  # a partial checkpoint cannot run the prompt
        raise MechscopeError(f"{model_spec}: --prompt needs a forward pass, which a partial checkpoint cannot run "
                             f"(it lacks {', '.join(model.missing_weights[:2])}...); leave --prompt out for the "
                             "weights-only readings")  # fmt: skip
    view = analysis_weights(model, mlp=False, per_layer=True)  # no second copy of the MLPs or of W_Q, W_K, W_V
    prompt_text = None if prompt_ids is None else [decode(int(i)) for i in prompt_ids]
    counter = work_counter(model)
    with counter.counting():
        result = read_circuits(
            model, view, label, heads, prompt_ids, token_range=default_token_range(model), progress=progress,
            decoder=decode, prompt_text=prompt_text,
        )  # fmt: skip
    if not model.missing_weights:  # in passes over the induction protocol's batch: sequences of BOS + 2n tokens
        p = induction_protocol(model)
        result = replace(result, work=counter.report("lm circuits", p.batch * (1 + 2 * p.n)))
    result = replace(result, seconds={**timer.seconds, **result.seconds})
    with atomic_output(out, force) as tmp:
        write_json(tmp / "circuits.json", result.to_dict())
        write_report(result, tmp / "report.html")
    return out, result
