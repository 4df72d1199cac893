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
:class:`~mechscope.errors.MechscopeError` with the CLI's one-line message.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import numpy as np
import torch

from mechscope.errors import MechscopeError, user_errors
from mechscope.results import Shown

__all__ = [
    "HeadScores",
    "AblationResult",
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


@user_errors
def load_model(spec, dtype=None, *, device=None, device_map=None, revision=None):
    """(model, tokenizer) for ``smollm2``, a .gguf file, a Hugging Face directory or a hub id (as ``--model``)."""
    from mechscope.models.loading import load_model as _load

    return _load(spec, dtype, device=device, device_map=device_map, revision=revision)


# ---- checks shared by every call: the CLI's messages -----------------------------------------


def check_head(model, layer, head) -> tuple[int, int]:
    from mechscope.methods.heads import check_heads

    for name, v in (("layer", layer), ("head", head)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise MechscopeError(f"{name} must be an integer, got {v!r}")
    check_heads(model, [(int(layer), int(head))])
    return int(layer), int(head)


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
    if tokens.ndim == 1:
        tokens = tokens[None]
    model.check_tokens(tokens)  # integer ids [batch, position] inside the vocabulary and the context
    if tokens.shape[1] == 0:
        raise MechscopeError("expected at least one token")
    return tokens


def _decode(tokenizer, ids) -> list[str]:
    return [tokenizer.decode([int(i)]) if tokenizer is not None else str(int(i)) for i in ids]


def _device(model) -> torch.device:
    from mechscope.methods.heads import model_device

    return model_device(model)


def _pattern(model, tokens: torch.Tensor, layer: int, head: int) -> np.ndarray:
    from mechscope.hooks import run_with_cache

    name = f"blocks.{layer}.attn.hook_pattern"
    _, cache = run_with_cache(model, tokens.to(_device(model)), names=[name])
    return cache[name][0, head].float().cpu().numpy()


# ---- the calls -------------------------------------------------------------------------------


@user_errors
def attention(model, tokens, layer: int, head: int, *, tokenizer=None, index: int = 0):
    """Head ``layer.head``'s attention on ``tokens`` (text, ids [P] or [B, P]; ``index`` picks the sequence)
    as an :class:`~mechscope.notebook.AttentionViewer` (hover a token to see where it attends)."""
    from mechscope.notebook.viewer import AttentionViewer

    layer, head = check_head(model, layer, head)
    toks = as_tokens(model, tokens, tokenizer)
    if not 0 <= index < toks.shape[0]:
        raise MechscopeError(f"index {index} out of range: {toks.shape[0]} sequences")
    seq = toks[index : index + 1]
    return AttentionViewer(_decode(tokenizer, seq[0]), _pattern(model, seq, layer, head), layer, head)


@user_errors
def repeated_tokens(model, n: int = 50, batch: int = 8, seed: int = 0, token_range=None) -> torch.Tensor:
    """[batch, 1 + 2n]: BOS, then n seeded random tokens, then the same n again (the induction protocol)."""
    from mechscope.config import check_seed
    from mechscope.methods.heads import default_token_range
    from mechscope.methods.heads import repeated_tokens as _rep

    check_seed(seed)
    for name, v in (("n", n), ("batch", batch)):
        if v < 1:
            raise MechscopeError(f"{name} must be at least 1, got {v}")
    if 1 + 2 * n > model.cfg.n_ctx:
        raise MechscopeError(f"N = {n} needs {1 + 2 * n} positions; the model's context is {model.cfg.n_ctx}")
    lo, hi = token_range or default_token_range(model)
    if not 0 <= lo < hi <= model.cfg.d_vocab:
        raise MechscopeError(f"token range [{lo}, {hi}) outside the vocabulary 0..{model.cfg.d_vocab - 1}")
    return _rep(model, n, batch, 2, torch.Generator().manual_seed(seed), (lo, hi))


@dataclass
class HeadScores(Shown):
    """Attention scores of every head on repeated random tokens, from one forward pass (no ablations).

    ``scores``: name -> [layers, heads] (``induction``, ``previous_token``, ``duplicate_token``);
    ``loss_per_position`` [P - 1]; ``tokens`` [B, 1 + 2n] and their text; ``patterns``: the attention of
    the strongest heads on the first sequence, kept for :meth:`show`.
    """

    model: str
    n: int
    tokens: torch.Tensor = field(repr=False)
    token_text: list[str] = field(repr=False)
    scores: dict[str, np.ndarray] = field(repr=False)
    loss_per_position: list[float] = field(repr=False)
    loss_first_half: float = 0.0
    loss_second_half: float = 0.0
    patterns: dict[tuple[int, int], np.ndarray] = field(default_factory=dict, repr=False)
    _model: object = field(default=None, repr=False, compare=False)

    def ranked(self, score: str = "induction") -> list[tuple[int, int]]:
        s = self.scores[score]
        return [divmod(int(i), s.shape[1]) for i in np.argsort(-s.ravel(), kind="stable")]

    def table(self, n: int | None = 20):
        """The heads ranked by induction score, as a :class:`~mechscope.notebook.Table`."""
        from mechscope.notebook.viewer import Table

        rows = [
            {"head": f"{layer}.{h}", **{k: float(v[layer, h]) for k, v in self.scores.items()}}
            for layer, h in self.ranked("induction")[:n]
        ]
        return Table(rows, title=f"{self.model}: heads ranked by induction score (repeated random tokens)")

    @user_errors
    def show(self, layer: int, head: int, model=None):
        """Head ``layer.head``'s attention on the first repeated-token sequence, as a hover viewer."""
        from mechscope.notebook.viewer import AttentionViewer

        model = model if model is not None else (self._model() if self._model is not None else None)
        if (layer, head) not in self.patterns:
            if model is None:
                raise MechscopeError(f"head {layer}.{head} was not kept; pass model= to compute it")
            layer, head = check_head(model, layer, head)
            self.patterns[(layer, head)] = _pattern(model, self.tokens[:1], layer, head)
        return AttentionViewer(self.token_text, self.patterns[(layer, head)], layer, head,
                               f"head {layer}.{head} on repeated random tokens")  # fmt: skip


@user_errors
def head_scores(model, tokens=None, *, n: int = 50, batch: int = 8, seed: int = 0, tokenizer=None, name: str = ""):
    """Induction, previous-token and duplicate-token scores of every head from one pass over repeated random
    tokens (``tokens`` from :func:`repeated_tokens`, or made here from ``n``, ``batch``, ``seed``)."""
    import torch.nn.functional as F

    from mechscope.hooks import hooks
    from mechscope.methods.heads import duplicate_mask, induction_mask, masked_score, previous_token_mask

    if tokens is None:
        tokens = repeated_tokens(model, n, batch, seed)
    tokens = as_tokens(model, tokens)
    p = tokens.shape[1]
    if p % 2 == 0 or p < 3 or not torch.equal(tokens[:, 1 : 1 + p // 2], tokens[:, 1 + p // 2 :]):
        raise MechscopeError(
            f"expected repeated tokens [batch, 1 + 2n] (BOS, n tokens, the same n again), got {list(tokens.shape)}"
        )
    n = p // 2
    cfg = model.cfg
    masks = {"induction": induction_mask(p, n), "previous_token": previous_token_mask(p),
             "duplicate_token": duplicate_mask(tokens)}  # fmt: skip
    scores = {k: np.zeros((cfg.n_layers, cfg.n_heads)) for k in masks}
    kept: dict[int, torch.Tensor] = {}

    def scorer(layer):
        def hook(pattern, hp):
            for k, (target, queries) in masks.items():
                scores[k][layer] = masked_score(pattern, target, queries).numpy()
            kept[layer] = pattern[0].detach().float().cpu()  # [H, P, P] of the first sequence

        return hook

    fwd = [(f"blocks.{i}.attn.hook_pattern", scorer(i)) for i in range(cfg.n_layers)]
    with torch.no_grad(), hooks(model, fwd=fwd):
        logits = model(tokens.to(_device(model)))
    loss = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), tokens[:, 1:].to(logits.device), reduction="none")
    loss = loss.mean(0).cpu()
    result = HeadScores(
        model=name or cfg.name or "model", n=n, tokens=tokens.cpu(), token_text=_decode(tokenizer, tokens[0]),
        scores=scores,
        loss_per_position=loss.tolist(), loss_first_half=float(loss[1:n].mean()),
        loss_second_half=float(loss[n + 1 : 2 * n].mean()),
        _model=weakref.ref(model),
    )  # fmt: skip
    for layer, h in result.ranked("induction")[:3] + result.ranked("previous_token")[:2]:
        result.patterns[(layer, h)] = kept[layer][h].numpy()
    return result


@dataclass
class AblationResult(Shown):
    """Loss on the second copy of repeated tokens with ``heads`` ablated together, against the clean model."""

    heads: list[tuple[int, int]]
    kind: str
    clean_loss: float
    ablated_loss: float
    per_sequence: list[float] = field(repr=False)  # loss increase per sequence

    @property
    def loss_increase(self) -> float:
        return self.ablated_loss - self.clean_loss


@user_errors
def ablate_heads(model, tokens, heads, kind: str = "mean") -> AblationResult:
    """Second-copy loss on repeated tokens [B, 1 + 2n] with ``heads`` [(layer, head), ...] ablated together:
    ``mean`` (each position's output replaced by its mean over the batch), ``zero`` or ``resample``."""
    from mechscope.methods import head_ablation as HA
    from mechscope.methods.heads import check_heads

    if kind not in ("mean", "zero", "resample"):
        raise MechscopeError(f"kind must be mean, zero or resample, got {kind!r}")
    heads = [check_head(model, *h) for h in heads]
    if not heads:
        raise MechscopeError("no heads to ablate")
    check_heads(model, heads)
    tokens = as_tokens(model, tokens)
    if tokens.shape[1] % 2 == 0 or tokens.shape[1] < 3:
        raise MechscopeError(f"expected repeated tokens [batch, 1 + 2n], got {list(tokens.shape)}")
    if kind != "zero" and tokens.shape[0] < 2:
        b = tokens.shape[0]
        raise MechscopeError(f"batch must be at least 2 (mean- and resample-ablation need others), got {b}")
    n = tokens.shape[1] // 2
    tokens = tokens.to(_device(model))
    cap = HA.capture(model, tokens, n)
    by_layer: dict[int, list[int]] = {}
    for layer, h in heads:
        by_layer.setdefault(layer, []).append(h)
    from mechscope.hooks import hooks

    def make(layer):
        rep = HA.replacement(kind, cap.z[layer])

        def hook(z, hp):
            z = z.clone()
            for h in by_layer[layer]:
                z[:, :, h] = rep[..., h, :] if isinstance(rep, torch.Tensor) else rep
            return z

        return hook

    start = min(by_layer)
    with torch.no_grad(), hooks(model, fwd=[(f"blocks.{la}.attn.hook_z", make(la)) for la in by_layer]):
        ablated = HA.second_half_loss(model, model.run_blocks(cap.resid_pre[start], start), tokens, n)
    return AblationResult(heads, kind, float(cap.clean.mean()), float(ablated.mean()),
                          (ablated - cap.clean).cpu().tolist())  # fmt: skip


@user_errors
def find_induction_heads(
    model, *, n: int = 50, batch: int = 8, seed: int = 0, ablation: bool = True, text=None, show=None,
    tokenizer=None, name: str = "", protocol=None,
):  # fmt: skip
    """The whole ``mechscope lm heads`` analysis on ``model`` (scores, labels, ablations, composition, path
    patching): a :class:`~mechscope.methods.heads.HeadsResult`. ``text``: token ids [B, P] of real text for
    the real-text previous-token score; ``show``: extra heads [(layer, head)] kept for the viewer."""
    from mechscope.config import check_seed
    from mechscope.methods.heads import HeadProtocol
    from mechscope.methods.heads import find_induction_heads as _find

    protocol = protocol or HeadProtocol(n=n, batch=batch, seed=seed, per_head_ablation=ablation)
    check_seed(protocol.seed)
    text_tokens = as_tokens(model, text) if text is not None else None
    result = _find(model, protocol, text_tokens, name=name or model.cfg.name or "model", show=show)
    for key in ("repeated", "text"):  # the viewer's token text, and the model for heads not captured
        if key in result.examples:
            result.examples.setdefault("token_text", {})[key] = _decode(tokenizer, result.examples[key]["tokens"])
    result.examples["model"] = weakref.ref(model)
    return result


@user_errors
def circuits(model, heads=None, *, prompt=None, tokenizer=None, name: str = ""):
    """The Mathematical Framework toolkit (``mechscope lm circuits``) on ``model``: a
    :class:`~mechscope.methods.transformer_circuits.CircuitsResult`."""
    from mechscope.methods.heads import check_heads, default_token_range
    from mechscope.methods.transformer_circuits import read_circuits
    from mechscope.models.folding import analysis_weights

    heads = [check_head(model, *h) for h in heads] if heads else None
    check_heads(model, heads)
    ids = as_tokens(model, prompt, tokenizer)[0] if prompt is not None else None
    result = read_circuits(model, analysis_weights(model), name or model.cfg.name, heads, ids,
                           token_range=default_token_range(model))  # fmt: skip
    result._notebook = {
        "decode": (lambda i: tokenizer.decode([i])) if tokenizer is not None else str,
        "prompt_text": None if ids is None else _decode(tokenizer, ids),
    }
    return result


@dataclass
class ToyTraining(Shown):
    """``lm train-toy``'s series: ``series`` is what training.json holds (checkpoints under ``out`` when given)."""

    series: dict = field(repr=False)

    def __repr__(self) -> str:
        p = self.series.get("phase_change", {})
        return f"ToyTraining({self.series['config']['layers']} layers, phase change detected: {p.get('detected')})"


@user_errors
def train_toy(config=None, *, text: str | None = None, control: bool = False, out=None, progress: bool = False,
              **settings) -> ToyTraining:  # fmt: skip
    """Train ``lm train-toy``'s attention-only model (a :class:`~mechscope.toy.ToyConfig`, or its fields as
    keywords: ``layers``, ``steps``, ``seed``, ``data``...) and measure it at every checkpoint."""
    from dataclasses import replace
    from pathlib import Path

    from mechscope.toy import ToyConfig
    from mechscope.toy import train_toy as _train

    try:
        config = replace(config or ToyConfig(), **settings)
    except TypeError as e:
        raise MechscopeError(f"unknown toy setting: {e}") from None
    config.validate()
    series = _train(config, text, Path(out) if out is not None else None, progress)
    if control and config.layers == 2:
        series["control"] = _train(replace(config, layers=1), text, None, progress)
    return ToyTraining(series)
