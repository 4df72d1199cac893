"""The language half for Python and notebooks: small calls that each return a result that shows itself.

::

    import mechscope
    model, tok = mechscope.lm.load_model("smollm2")
    tokens = mechscope.lm.repeated_tokens(model, n=20, batch=4)
    scores = mechscope.lm.head_scores(model, tokens, tokenizer=tok)   # attention scores, one forward pass
    scores.table()                                                    # heads ranked by induction score
    scores.show(17, 3)                                                # that head's attention, hover viewer
    mechscope.attention(model, tokens[0], 17, 3, tokenizer=tok)       # the same on any tokens
    mechscope.lm.ablate_heads(model, tokens, [(17, 3), (17, 4)])      # second-copy loss, heads mean-ablated
    heads = mechscope.lm.find_induction_heads(model)                  # the whole `lm heads` analysis

Every result has ``_repr_html_`` (the report's section, inline) and ``save_html(path)`` (the report).
A user error (a head out of range, tokens of the wrong shape, an id outside the vocabulary) raises
:class:`~mechscope.core.errors.MechscopeError` with the CLI's one-line message.

This module is a facade: it checks what a user passes and calls the methods (:mod:`mechscope.lm.methods`);
it computes nothing itself.
"""

from __future__ import annotations

import weakref

import torch

from mechscope.core.errors import MechscopeError, user_errors

__all__ = [
    "AblationResult",
    "HeadAblationResult",
    "HeadScores",
    "ToyTraining",
    "ablate_heads",
    "attention",
    "circuits",
    "find_induction_heads",
    "head_scores",
    "load_model",
    "repeated_tokens",
    "train_toy",
]

_LAZY = {
    "HeadScores": ("mechscope.lm.methods.scores", "HeadScores"),
    "HeadAblationResult": ("mechscope.lm.methods.ablation", "HeadAblationResult"),
    "AblationResult": ("mechscope.lm.methods.ablation", "HeadAblationResult"),  # its name in the old README
    "ToyTraining": ("mechscope.lm.toy", "ToyTraining"),
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'mechscope.lm' has no attribute {name!r}")


@user_errors
def load_model(spec, dtype=None, *, device=None, device_map=None, revision=None):
    """(model, tokenizer) for ``smollm2``, a .gguf file, a Hugging Face directory or a hub id (as ``--model``)."""
    from mechscope.lm.models.loading import load_model as _load

    return _load(spec, dtype, device=device, device_map=device_map, revision=revision)


# ---- checks shared by every call: the CLI's messages -----------------------------------------


def as_tokens(model, tokens, tokenizer=None) -> torch.Tensor:
    """Token ids [batch, position] from a string (with a tokenizer), a list of ids, or a 1-D/2-D tensor."""
    if isinstance(tokens, str):
        if tokenizer is None:
            raise MechscopeError("text needs a tokenizer: pass tokenizer= (load_model returns one)")
        ids = tokenizer.encode(tokens)
        if not ids:
            raise MechscopeError("the prompt is empty")
        tokens = torch.tensor([ids])
    elif not isinstance(tokens, torch.Tensor):
        try:
            tokens = torch.as_tensor(tokens)
        except (TypeError, ValueError, RuntimeError):
            what = type(tokens).__name__
            raise MechscopeError(f"expected token ids (a tensor or list of ints), got {what}") from None
    if tokens.numel() == 0:  # [] was "expected integer token ids" (an empty list reads as floats)
        raise MechscopeError(f"expected at least one token, got none (shape {list(tokens.shape)})")
    if tokens.ndim == 1:
        tokens = tokens[None]
    model.check_tokens(tokens)  # integer ids [batch, position] inside the vocabulary and the context
    if tokens.shape[1] == 0:
        raise MechscopeError("expected at least one token")
    return tokens


def _decode(tokenizer, ids) -> list[str]:
    return [tokenizer.decode([int(i)]) if tokenizer is not None else str(int(i)) for i in ids]


def _repeated(model, tokens) -> torch.Tensor:
    """Repeated tokens [B, 1 + 2n] (BOS, n tokens, the same n again), checked."""
    tokens = as_tokens(model, tokens)
    p = tokens.shape[1]
    if p % 2 == 0 or p < 3:
        raise MechscopeError(
            f"expected repeated tokens [batch, 1 + 2n] (BOS, n tokens, the same n again), got {list(tokens.shape)}"
        )
    differ = (tokens[:, 1 : 1 + p // 2] != tokens[:, 1 + p // 2 :]).any(1)
    if bool(differ.any()):  # the shape is right: say what is not
        raise MechscopeError(f"expected repeated tokens (BOS, n tokens, the same n again): the two halves of "
                             f"{int(differ.sum())} of the {len(differ)} sequences differ")  # fmt: skip
    return tokens


# ---- the calls -------------------------------------------------------------------------------


@user_errors
def attention(model, tokens, layer: int, head: int, *, tokenizer=None, index: int = 0):
    """Head ``layer.head``'s attention on ``tokens`` (text, ids [P] or [B, P]; ``index`` picks the sequence)
    as an :class:`~mechscope.core.render.viewer.AttentionViewer` (hover a token to see where it attends)."""
    from mechscope.core.render.viewer import AttentionViewer
    from mechscope.core.validate import check_int
    from mechscope.lm.methods.scores import attention_pattern, check_head

    layer, head = check_head(model, layer, head)
    toks = as_tokens(model, tokens, tokenizer)
    if not 0 <= check_int(index, "index") < toks.shape[0]:
        raise MechscopeError(f"index {index} out of range: {toks.shape[0]} sequences")
    seq = toks[index : index + 1]
    return AttentionViewer(_decode(tokenizer, seq[0]), attention_pattern(model, seq, layer, head), layer, head)


@user_errors
def repeated_tokens(model, n: int = 50, batch: int = 8, seed: int = 0, token_range=None) -> torch.Tensor:
    """[batch, 1 + 2n]: BOS, then n seeded random tokens, then the same n again (the induction protocol)."""
    from mechscope.core.validate import check_int, check_seed
    from mechscope.lm.methods.scores import repeated_tokens as _rep
    from mechscope.lm.methods.scores import token_range_of

    check_seed(seed)
    for name, v in (("n", n), ("batch", batch)):
        check_int(v, name)
        if v < 1:
            raise MechscopeError(f"{name} must be at least 1, got {v}")
    if 1 + 2 * n > model.cfg.n_ctx:
        raise MechscopeError(f"n = {n} needs {1 + 2 * n} positions (a BOS and two copies of {n} tokens); the model's "
                             f"context is {model.cfg.n_ctx}")  # fmt: skip
    lo, hi = token_range_of(model, token_range)  # two integers inside the vocabulary, LOW below HIGH
    return _rep(model, n, batch, 2, torch.Generator().manual_seed(seed), (lo, hi))


@user_errors
def head_scores(model, tokens=None, *, n: int = 50, batch: int = 8, seed: int = 0, tokenizer=None, name: str = ""):
    """Induction, previous-token and duplicate-token scores of every head from one pass over repeated random
    tokens (``tokens`` from :func:`repeated_tokens`, or made here from ``n``, ``batch``, ``seed``): a
    :class:`~mechscope.lm.methods.scores.HeadScores`."""
    from mechscope.lm.methods.scores import check_next_token_model
    from mechscope.lm.methods.scores import head_scores as _scores

    check_next_token_model(model)
    if tokens is None:
        tokens = repeated_tokens(model, n, batch, seed)
    tokens = _repeated(model, tokens)
    return _scores(model, tokens, _decode(tokenizer, tokens[0]), name or model.cfg.name or "model")


@user_errors
def ablate_heads(model, tokens, heads, kind: str = "mean"):
    """Second-copy loss on repeated tokens [B, 1 + 2n] with ``heads`` [(layer, head), ...] ablated together:
    ``mean`` (each position's output replaced by its mean over the batch), ``zero`` or ``resample``. A
    :class:`~mechscope.lm.methods.ablation.HeadAblationResult`."""
    from mechscope.lm.methods.ablation import ablate_together
    from mechscope.lm.methods.scores import check_heads, check_next_token_model, model_device

    if kind not in ("mean", "zero", "resample"):
        raise MechscopeError(f"kind must be mean, zero or resample, got {kind!r}")
    check_next_token_model(model)
    heads = check_heads(model, heads)
    if not heads:
        raise MechscopeError("no heads to ablate")
    tokens = _repeated(model, tokens)  # the second copy's loss means nothing on tokens that are not repeated
    if kind != "zero" and tokens.shape[0] < 2:
        b = tokens.shape[0]
        raise MechscopeError(f"batch must be at least 2 (mean- and resample-ablation need others), got {b}")
    return ablate_together(model, tokens.to(model_device(model)), heads, kind)


@user_errors
def find_induction_heads(
    model, *, n: int = 50, batch: int = 8, seed: int = 0, ablation: bool = True, text=None, show=None,
    tokenizer=None, name: str = "", protocol=None,
):  # fmt: skip
    """The whole ``mechscope lm heads`` analysis on ``model`` (scores, labels, ablations, composition, path
    patching): a :class:`~mechscope.lm.methods.heads.HeadsResult`. ``text``: token ids [B, P] of real text for
    the real-text previous-token score; ``show``: extra heads [(layer, head)] kept for the viewer."""
    from dataclasses import replace

    from mechscope.core.validate import check_seed
    from mechscope.lm.methods.heads import HeadProtocol
    from mechscope.lm.methods.heads import find_induction_heads as _find

    if protocol is not None and not isinstance(protocol, HeadProtocol):
        raise MechscopeError(f"protocol must be a HeadProtocol, got {type(protocol).__name__}")
    protocol = protocol or HeadProtocol(n=n, batch=batch, seed=seed, per_head_ablation=ablation)
    check_seed(protocol.seed)
    text_tokens = as_tokens(model, text) if text is not None else None
    result = _find(model, protocol, text_tokens, name=name or model.cfg.name or "model", show=show)
    token_text = {k: _decode(tokenizer, v["tokens"]) for k, v in result.examples.items() if k in ("repeated", "text")}
    return replace(result, token_text=token_text, model_ref=weakref.ref(model))


@user_errors
def circuits(model, heads=None, *, prompt=None, tokenizer=None, name: str = ""):
    """The Mathematical Framework toolkit (``mechscope lm circuits``) on ``model``: a
    :class:`~mechscope.lm.methods.circuits.CircuitsResult`."""
    from mechscope.lm.methods.circuits import read_circuits
    from mechscope.lm.methods.scores import check_heads, default_token_range
    from mechscope.lm.models.folding import analysis_weights

    heads = check_heads(model, heads) or None  # pairs of integers in range, none twice
    ids = as_tokens(model, prompt, tokenizer)[0] if prompt is not None else None
    decoder = (lambda i: tokenizer.decode([i])) if tokenizer is not None else str
    return read_circuits(model, analysis_weights(model, mlp=False, per_layer=True), name or model.cfg.name, heads, ids,
                         token_range=default_token_range(model), decoder=decoder,
                         prompt_text=None if ids is None else _decode(tokenizer, ids))  # fmt: skip


@user_errors
def train_toy(config=None, *, text: str | None = None, control: bool = False, out=None, progress: bool = False,
              force: bool = False, **settings):  # fmt: skip
    """Train ``lm train-toy``'s attention-only model (a :class:`~mechscope.lm.toy.ToyConfig`, or its fields as
    keywords: ``layers``, ``steps``, ``seed``, ``data``...) and measure it at every checkpoint: a
    :class:`~mechscope.lm.toy.ToyTraining`. ``out``: a folder for the checkpoints, absent or empty unless
    ``force``."""
    from dataclasses import replace

    from mechscope.core.outputs import check_target
    from mechscope.core.validate import known_settings
    from mechscope.lm.toy import ToyConfig, train_toy_and_control

    known_settings(ToyConfig, settings, "toy")
    if config is not None and not isinstance(config, ToyConfig):
        raise MechscopeError(f"config must be a ToyConfig (or None, with its fields as keywords), got "
                             f"{type(config).__name__}")  # fmt: skip
    config = replace(config or ToyConfig(), **settings)
    config.validate()
    out = check_target(out, force) if out is not None else None  # a file there was a NotADirectoryError
    return train_toy_and_control(config, text, out, progress, control)
