"""Attention scores of every head, from one forward pass: the one scoring pass of the language half.

Protocols (seeded, tokenizer-free): repeated random tokens (BOS + N random tokens + the same N again) give
the induction score (mean attention from each second-copy position to the position after its token's first
occurrence), the previous-token score (attention to position − 1) and the duplicate-token score (attention to
earlier copies of the same token); prefix matching (Olsson et al. 2022) repeats N' tokens R times. Scores are
reduced to per-head numbers inside the hook that sees each pattern, so no [B, H, P, P] tensor is kept.

:func:`score_pass` is the pass both ``lm heads`` (with the copying score, through the folded analysis view)
and :func:`head_scores` (the notebook's quick look) run; :class:`HeadScores` is the latter's result.
"""

from __future__ import annotations

import numbers
import weakref
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from mechscope.core.errors import MechscopeError, user_errors
from mechscope.core.hooks import hooks, run_with_cache
from mechscope.core.results import Result, figure_data
from mechscope.lm.models.folding import AnalysisWeights
from mechscope.lm.models.transformer import HookedTransformer

REPEATED_SCORES = ("induction", "previous_token", "duplicate_token")


def default_token_range(model: HookedTransformer) -> tuple[int, int]:
    v = model.cfg.d_vocab
    if v >= 20000:
        return (1000, 10000)  # BPE ids are roughly frequency-ordered: skip specials and bytes, and rare merges
    return (1, v) if v > 1 else (0, v)


def token_range_of(model: HookedTransformer, token_range: tuple[int, int] | None) -> tuple[int, int]:
    """``token_range`` [LOW, HIGH) checked against the vocabulary (None: :func:`default_token_range`)."""
    if token_range is not None and not (isinstance(token_range, (tuple, list)) and len(token_range) == 2
                                        and all(isinstance(x, numbers.Integral) and not isinstance(x, bool)
                                                for x in token_range)):  # fmt: skip
        raise MechscopeError(f"a token range is two integers [LOW, HIGH), got {token_range!r}")
    lo, hi = (int(x) for x in token_range) if token_range is not None else default_token_range(model)
    if lo >= hi:
        raise MechscopeError(f"token range [{lo}, {hi}) is empty: LOW must be below HIGH")
    if not 0 <= lo < hi <= model.cfg.d_vocab:
        raise MechscopeError(f"token range [{lo}, {hi}) outside the vocabulary 0..{model.cfg.d_vocab - 1}")
    return lo, hi


def repeated_tokens(
    model: HookedTransformer, n: int, batch: int, repeats: int, generator: torch.Generator, token_range
) -> torch.Tensor:
    """[batch, 1 + repeats·n]: BOS, then n random tokens repeated ``repeats`` times."""
    lo, hi = token_range
    seq = torch.randint(lo, hi, (batch, n), generator=generator)
    bos = model.cfg.bos_token_id if model.cfg.bos_token_id is not None else lo
    if not 0 <= bos < model.cfg.d_vocab:  # transformers' GPT-2 config keeps 50256 whatever the vocabulary's size
        raise MechscopeError(f"the model's BOS token id {bos} (bos_token_id in its config) is outside its vocabulary "
                             f"0..{model.cfg.d_vocab - 1}: set it to a token the model has")  # fmt: skip
    return torch.cat([torch.full((batch, 1), bos), seq.repeat(1, repeats)], 1)


def check_next_token_model(model: HookedTransformer) -> None:
    """The induction protocol reads a next-token loss: a tracr model's outputs are classes of its own."""
    if model.cfg.d_vocab_out is not None:
        raise MechscopeError(
            f"{model.cfg.name or 'this model'}: its outputs are classes of their own, not next tokens (a compiled "
            "tracr model), so the induction protocol's loss means nothing; lm circuits, graph and discover read it"
        )


def model_device(model: HookedTransformer) -> torch.device:
    return model.W_E.device


# ---- masks: which keys count for each query ------------------------------------------------


def induction_mask(p: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Target [P, K] and queries [P] for the induction stripe on BOS + n + n."""
    target = torch.zeros(p, p, dtype=torch.bool)
    q = torch.arange(n + 1, 2 * n + 1)
    target[q, q - n + 1] = True
    queries = torch.zeros(p, dtype=torch.bool)
    queries[q] = True
    return target, queries


def previous_token_mask(p: int) -> tuple[torch.Tensor, torch.Tensor]:
    target = torch.zeros(p, p, dtype=torch.bool)
    q = torch.arange(1, p)
    target[q, q - 1] = True
    queries = torch.zeros(p, dtype=torch.bool)
    queries[1:] = True
    return target, queries


def duplicate_mask(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys k < q holding the same token as q: [B, P, K]; queries with at least one: [B, P]."""
    same = tokens[:, :, None] == tokens[:, None, :]
    target = same & torch.ones_like(same[0]).tril(-1)
    return target, target.any(-1)


def prefix_mask(tokens: torch.Tensor, first_query: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys k ≤ q whose previous token equals token q (k − 1 an earlier occurrence)."""
    b, p = tokens.shape
    prev = torch.cat([torch.full((b, 1), -1), tokens[:, :-1]], 1)  # token before each key
    target = (tokens[:, :, None] == prev[:, None, :]) & torch.ones(p, p, dtype=torch.bool).tril()
    queries = target.any(-1)
    queries[:, :first_query] = False
    return target, queries


def masked_score(pattern: torch.Tensor, target: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """Mean over (batch, query) of attention mass on the target keys: [H] (float32, on the CPU)."""
    pattern = pattern.float()
    target, queries = target.to(pattern.device), queries.to(pattern.device)
    if target.dim() == 2:
        target, queries = target.expand(pattern.shape[0], -1, -1), queries.expand(pattern.shape[0], -1)
    mass = (pattern * target[:, None].to(pattern.dtype)).sum(-1)  # [B, H, P]
    w = queries[:, None].to(pattern.dtype)  # [B, 1, P]
    return ((mass * w).sum((0, 2)) / w.sum().clamp(min=1)).cpu()


def attention_scores(model: HookedTransformer, tokens: torch.Tensor, masks: dict[str, tuple]) -> dict[str, np.ndarray]:
    """Each named mask's score for every head, [L, H], computed inside the pattern hooks."""
    cfg = model.cfg
    out = {name: np.zeros((cfg.n_layers, cfg.n_heads)) for name in masks}

    def scorer(layer):
        def hook(pattern, hp):
            for name, (target, queries) in masks.items():
                out[name][layer] = masked_score(pattern, target, queries).numpy()

        return hook

    with torch.no_grad(), hooks(model, fwd=[(f"blocks.{i}.attn.hook_pattern", scorer(i)) for i in range(cfg.n_layers)]):
        model.run_blocks(model.embed(tokens.to(model_device(model))))  # the patterns only: no unembedding
    return out


LOGITS_CHUNK_BYTES = 32 * 2**20  # the logits of one chunk of sequences


def sequences_per_chunk(model: HookedTransformer, positions: slice, length: int, tensors: int = 1) -> int:
    """How many sequences fit in LOGITS_CHUNK_BYTES when ``tensors`` logits-sized tensors at ``positions`` are held
    at once (at least one sequence)."""
    start, stop, _ = positions.indices(length)
    return max(1, LOGITS_CHUNK_BYTES // (tensors * max(stop - start, 1) * model.cfg.d_vocab * 4))


def token_losses(model: HookedTransformer, resid: torch.Tensor, tokens: torch.Tensor, positions: slice) -> torch.Tensor:
    """Cross-entropy of predicting token p+1 at each position p in ``positions`` from the final residual stream
    ``resid`` [B, P, D]: [B, len(positions)] (float32).

    The same numbers as unembedding the whole batch and taking each position's cross-entropy (every operation works
    row by row), made a few sequences at a time so that the logits [B, P, V] are never whole: with SmolLM2's
    49,152-token vocabulary they are the largest activation of a forward pass. When ``resid`` requires a gradient
    the batch is one chunk (one graph); a caller that wants the gradient at ``resid`` in chunks takes one backward per
    chunk of sequences_per_chunk (as :func:`~mechscope.lm.methods.ablation.capture` does)."""
    start, stop, _ = positions.indices(resid.shape[1])
    per = resid.shape[0] if resid.requires_grad else sequences_per_chunk(model, positions, resid.shape[1])
    out = []
    for i in range(0, resid.shape[0], per):
        logits = model.unembed(resid[i : i + per, positions]).float()
        target = tokens[i : i + per, start + 1 : stop + 1].to(logits.device)
        out.append(F.cross_entropy(logits.transpose(1, 2), target, reduction="none"))
    return torch.cat(out)


def post_norm_scale(model: HookedTransformer, layer: int, z: torch.Tensor) -> torch.Tensor:
    """[B, P] divisor of the post-attention norm (Gemma 2/3) from the raw z [B, P, H, Dh]; ones without one."""
    block = model.blocks[layer]
    if block.ln1_post is None:
        return torch.ones(z.shape[:2], device=z.device)
    attn = block.attn
    raw = torch.einsum("bphd,hdm->bpm", z.float(), attn.W_O.float()) + attn.b_O.float()
    return (raw.pow(2).mean(-1) + block.ln1_post.eps).sqrt()


# ---- the one pass -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ScorePass:
    loss: torch.Tensor  # [P - 1] loss per position, mean over the batch
    scores: dict[str, np.ndarray]  # induction, previous_token, duplicate_token (and copying with a view): [L, H]
    patterns: dict[int, torch.Tensor]  # layer -> [H, P, P] of the first sequence (when kept)


def score_pass(
    model: HookedTransformer, tokens: torch.Tensor, n: int, view: AnalysisWeights | None = None,
    keep_patterns: bool = False,
) -> ScorePass:  # fmt: skip
    """One forward over repeated tokens [B, 1 + 2n]: the induction, previous-token and duplicate-token scores
    of every head in hooks, the loss per position, and with the folded ``view`` the centred copying score
    (each head's direct effect on the logit of the token it attends to most, before the final norm's scale)."""
    cfg = model.cfg
    b, p = tokens.shape
    masks = (induction_mask(p, n), previous_token_mask(p), duplicate_mask(tokens))
    scores = {k: np.zeros((cfg.n_layers, cfg.n_heads)) for k in REPEATED_SCORES}
    attended, copy_num, kept = {}, {}, {}
    second = slice(n + 1, 2 * n + 1)
    dev = tokens.device

    def on_pattern(layer):
        def hook(pattern, hp):
            for name, mask in zip(REPEATED_SCORES, masks, strict=True):
                scores[name][layer] = masked_score(pattern, *mask).numpy()
            if view is not None:
                attended[layer] = pattern[:, :, second].argmax(-1)  # [B, H, n] the key each query attends to most
            if keep_patterns:
                kept[layer] = pattern[0].detach().float().cpu()  # [H, P, P] of the first sequence

        return hook

    def on_z(layer):
        def hook(z, hp):
            # the folded view's head output: z without the value bias (folded into b_O), centred W_O
            zf = z[:, second].float() - view.value_bias[layer].to(dev)
            r = torch.einsum("bphd,hdm->bhpm", zf, view.W_O[layer].to(dev))  # [B, H, n, D]
            r = r / post_norm_scale(model, layer, z[:, second])[:, None, :, None]
            tok = tokens.gather(1, attended.pop(layer).reshape(b, -1)).reshape(b, cfg.n_heads, n)
            copy_num[layer] = (r * view.W_U.to(dev).T[tok]).sum(-1)  # [B, H, n], before the final norm's scale

        return hook

    fwd = []
    for i in range(cfg.n_layers):
        fwd.append((f"blocks.{i}.attn.hook_pattern", on_pattern(i)))
        if view is not None:
            fwd.append((f"blocks.{i}.attn.hook_z", on_z(i)))
    with torch.no_grad(), hooks(model, fwd=fwd):
        resid = model.run_blocks(model.embed(tokens))  # the final residual stream
        loss = token_losses(model, resid, tokens, slice(0, p - 1))
    if not bool(torch.isfinite(loss).all()):  # every score read off this pass would be NaN without a word
        dtype = str(model.W_E.dtype).removeprefix("torch.")
        raise MechscopeError(f"the model's loss on the repeated tokens is not finite (NaN or infinity): its weights "
                             f"hold non-finite values, or its activations overflow in {dtype}")  # fmt: skip
    if view is not None:
        scores["copying"] = _copying(cfg, resid[:, second].float(), copy_num)
    return ScorePass(loss.mean(0).cpu(), scores, kept)


def _copying(cfg, resid: torch.Tensor, copy_num: dict[int, torch.Tensor]) -> np.ndarray:
    """[L, H] centred copying: each layer's numerators divided by the final norm's divisor at each position."""
    if cfg.norm == "layernorm":
        resid = resid - resid.mean(-1, keepdim=True)
    scale = (resid.pow(2).mean(-1) + cfg.norm_eps).sqrt()  # [B, n] the final norm's divisor
    if cfg.norm == "none":
        scale = torch.ones_like(scale)
    return np.stack([(copy_num[i] / scale[:, None]).mean((0, 2)).cpu().numpy() for i in range(cfg.n_layers)])


def attention_pattern(model: HookedTransformer, tokens: torch.Tensor, layer: int, head: int) -> np.ndarray:
    """One head's attention pattern [P, K] on one sequence ``tokens`` [1, P] (float32, on the CPU)."""
    name = f"blocks.{layer}.attn.hook_pattern"
    _, cache = run_with_cache(model, tokens.to(model_device(model)), names=[name])
    return cache[name][0, head].float().cpu().numpy()


def capture_patterns(model, tokens: torch.Tensor, heads: list[tuple[int, int]]) -> dict[str, list]:
    """Attention patterns [P, K] of the chosen heads on one sequence (for the report's viewer)."""
    out = {}

    def grab(layer):
        def hook(pattern, hp):
            for lh in heads:
                if lh[0] == layer:
                    out[f"{layer}.{lh[1]}"] = pattern[0, lh[1]].float().cpu().numpy().round(4).tolist()

        return hook

    layers = sorted({layer for layer, _ in heads})
    if not layers:
        return out
    with torch.no_grad(), hooks(model, fwd=[(f"blocks.{layer}.attn.hook_pattern", grab(layer)) for layer in layers]):
        model.run_blocks(model.embed(tokens[:1].to(model_device(model))), 0, layers[-1] + 1)  # no later layer
    return out


# ---- the notebook's quick look: scores from one pass, no ablations ------------------------------


@dataclass(frozen=True)
class HeadScores(Result):
    """Attention scores of every head on repeated random tokens, from one forward pass (no ablations).

    ``scores``: name -> [layers, heads] (``induction``, ``previous_token``, ``duplicate_token``);
    ``loss_per_position`` [P - 1]; ``tokens`` [B, 1 + 2n] and their text; ``patterns``: the attention of
    the strongest heads on the first sequence, ``"layer.head"`` -> [P, P], for :meth:`show`.
    """

    SCHEMA = "mechscope.head-scores/1"

    model: str
    n: int
    tokens: torch.Tensor
    token_text: tuple[str, ...]
    scores: dict[str, np.ndarray]
    loss_per_position: tuple[float, ...]
    loss_first_half: float
    loss_second_half: float
    patterns: dict[str, np.ndarray]
    model_ref: Any = figure_data()  # a weak reference to the model, for heads whose pattern was not kept

    @user_errors
    def ranked(self, score: str = "induction") -> list[tuple[int, int]]:
        """Every (layer, head), highest ``score`` first (one of :attr:`scores`' names)."""
        if score not in self.scores:
            raise MechscopeError(f"unknown score {score!r}: one of {', '.join(self.scores)}")
        s = self.scores[score]
        return [divmod(int(i), s.shape[1]) for i in np.argsort(-s.ravel(), kind="stable")]

    def table(self, n: int | None = 20):
        """The heads ranked by induction score, as a table view."""
        return self.render_view("table", n)

    def show(self, layer: int, head: int, model=None):
        """Head ``layer.head``'s attention on the first repeated-token sequence, as a hover viewer."""
        return self.render_view("show", layer, head, model)


def check_head(model: HookedTransformer, layer, head) -> tuple[int, int]:
    """``(layer, head)`` as integers inside the model; a one-line error otherwise."""
    for name, v in (("layer", layer), ("head", head)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise MechscopeError(f"{name} must be an integer, got {v!r}")
    check_heads(model, [(int(layer), int(head))])
    return int(layer), int(head)


def _as_pairs(heads) -> list[tuple[int, int]]:
    """A list (any iterable: a zip, a numpy array of rows) of (layer, head) pairs of integers, as int tuples; one
    head given alone, or as "17.3", is refused in one line. None: no heads."""
    if heads is None:
        return []
    if isinstance(heads, (str, bytes)) or not hasattr(heads, "__iter__"):
        raise MechscopeError(f"heads must be a list of (layer, head) pairs, e.g. [(17, 3)], got {heads!r}")
    heads = list(heads)
    if len(heads) == 2 and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in heads):
        raise MechscopeError(f"heads must be a list of (layer, head) pairs: for one head give "
                             f"[({int(heads[0])}, {int(heads[1])})]")  # fmt: skip
    for h in heads:
        if isinstance(h, (str, bytes)) or not hasattr(h, "__len__") or len(h) != 2:
            raise MechscopeError(f"each head must be a (layer, head) pair, e.g. (17, 3), got {h!r}")
        if any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) for v in h):
            raise MechscopeError(f"each head must be a (layer, head) pair of integers, got {tuple(h)!r}")
    return [(int(a), int(b)) for a, b in heads]


def check_heads(model: HookedTransformer, heads) -> list[tuple[int, int]]:
    """Each head in range, and none given twice (it was read out, or shown, twice): the heads as int pairs."""
    from mechscope.core.validate import repeated

    cfg = model.cfg
    heads = _as_pairs(heads)
    twice = repeated(heads)
    if twice:
        raise MechscopeError(f"head {', '.join(f'{a}.{b}' for a, b in twice)} given more than once")
    for layer, h in heads:
        if not (0 <= layer < cfg.n_layers and 0 <= h < cfg.n_heads):
            raise MechscopeError(
                f"head {layer}.{h} out of range: layers 0..{cfg.n_layers - 1}, heads 0..{cfg.n_heads - 1}"
            )
    return heads


def head_scores(model: HookedTransformer, tokens: torch.Tensor, token_text: list[str], name: str) -> HeadScores:
    """Induction, previous-token and duplicate-token scores of every head from one pass over repeated tokens
    [B, 1 + 2n] (checked by the caller), keeping the patterns of the 3 strongest induction and 2 strongest
    previous-token heads."""
    n = tokens.shape[1] // 2
    sp = score_pass(model, tokens.to(model_device(model)), n, keep_patterns=True)
    loss = sp.loss
    base = HeadScores(
        model=name, n=n, tokens=tokens.cpu(), token_text=tuple(token_text), scores=sp.scores,
        loss_per_position=tuple(loss.tolist()), loss_first_half=float(loss[1:n].mean()),
        loss_second_half=float(loss[n + 1 : 2 * n].mean()), patterns={}, model_ref=weakref.ref(model),
    )  # fmt: skip
    keep = base.ranked("induction")[:3] + base.ranked("previous_token")[:2]
    patterns = {f"{layer}.{h}": sp.patterns[layer][h].numpy() for layer, h in keep}
    from dataclasses import replace

    return replace(base, patterns=patterns)
