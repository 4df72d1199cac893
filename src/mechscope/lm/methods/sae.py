"""Sparse dictionaries on a transformer: harvesting hook points, splicing a dictionary in, reading its latents.

**Hook points** (names of :mod:`mechscope.lm.models.transformer`): ``blocks.L.hook_resid_pre``,
``hook_resid_mid``, ``hook_resid_post``, ``hook_attn_out``, ``hook_mlp_in`` (the MLP sublayer's input before
ln2), ``mlp.hook_in`` (after ln2: a transcoder's input), ``hook_mlp_out``, ``mlp.hook_post`` and
``attn.hook_z`` ([B, P, H, Dh] flattened over heads to ``H * Dh``). Every activation ``[B, P, ...]`` becomes rows
``[B * P', width]`` of the positions after the context's BOS (``skip_first`` = 1 when a BOS was prepended: its
residual is an outlier the dictionaries are not trained on, and it is left as it is when splicing). A
transcoder is harvested as pairs ``[x, y]`` side by side: its input hook and its target hook in the same pass.

**Splicing**: an SAE replaces the activation at its hook by its reconstruction ``x_hat`` (positions from
``skip_first`` on); a transcoder replaces its target (``hook_mlp_out``) by ``transcoder(x)`` of its input
(``mlp.hook_in``), so the MLP's own output is discarded. Everything goes through :func:`mechscope.core.hooks.hooks`.

**Spliced-in effect** (core's formulas): next-token cross-entropy over every position of every context, with
the model clean (``L_clean``), spliced (``L_sae``) and with the hook's activation zeroed at the same positions
(``L_zero``): ``ce_loss_recovered = (L_zero - L_sae) / (L_zero - L_clean)``; KL(P_clean || P_spliced) per
position, averaged.

**Direct logit effect** of a latent: its decoder direction written into the residual stream (the decoder row
itself for residual-stream and ``hook_mlp_out``/``hook_attn_out`` dictionaries; through ``W_O`` per head for
``attn.hook_z``; through the MLP's ``W_out`` for ``mlp.hook_post``), then through the final norm's gain (for a
LayerNorm model the direction is centred over d_model first, as LayerNorm removes the mean) and ``W_U``, the
result centred over the vocabulary (softmax ignores a shared shift). The norm's division by each position's
scale is left out: it is a positive factor per position and changes no ranking. This is the unembedding of
:func:`mechscope.lm.models.folding.analysis_weights` (``fold_ln``, ``center_unembed``).

**Induction-related latents**: on BOS + n random tokens + the same n again (the induction protocol of
``lm heads``), each latent's firing rate on the second copy minus its rate on the first; a latent that fires
on the repeat and not on the first copy reads "this token continues a sequence seen before".
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from mechscope.core.dictionaries import SparseDictionary, StreamingMetrics
from mechscope.core.dictionaries.latents import LatentCollector
from mechscope.core.dictionaries.metrics import ce_loss_recovered, kl_recovered
from mechscope.core.dictionaries.parallel import split
from mechscope.core.dictionaries.staged import DictionaryTraining
from mechscope.core.errors import HookError, MechscopeError
from mechscope.core.hooks import hook_points, hooks, run_with_cache
from mechscope.core.results import Result, figure_data
from mechscope.core.torch_utils import evaluating
from mechscope.lm.models.transformer import HookedTransformer


class _Stop(Exception):
    """Raised by the last capturing hook: the rest of the forward pass is not needed."""


# ---- hooks and their widths -------------------------------------------------------------------------


def layer_of(hook: str) -> int | None:
    parts = hook.split(".")
    return int(parts[1]) if len(parts) > 2 and parts[0] == "blocks" and parts[1].isdigit() else None


def probe_tokens(model: HookedTransformer) -> torch.Tensor:
    bos = model.cfg.bos_token_id if model.cfg.bos_token_id is not None else 0
    return torch.tensor([[bos, min(1, model.cfg.d_vocab - 1)]], device=model.W_E.device)


def hook_widths(model: HookedTransformer, names: list[str]) -> dict[str, int]:
    """The row width of each hook (the product of its dimensions after [B, P]), in the order the hooks fire in the
    forward pass; an unknown or non-firing hook is a one-line :class:`HookError`."""
    known = hook_points(model)
    for n in names:
        if n not in known or not n:  # "" names the model itself among its modules, not a hook point
            from mechscope.core.hooks import describe_names

            raise HookError(f"unknown hook point {n!r}; valid names: {describe_names(known)}")
    with evaluating(model):
        _, cache = run_with_cache(model, probe_tokens(model), names=list(dict.fromkeys(names)))
    return {n: int(np.prod(x.shape[2:])) for n, x in cache.items()}  # the cache fills as the hooks fire


def check_distinct(hook: str, target: str | None) -> None:
    """A transcoder's target is another hook than its input (checked from the names alone, before a model loads)."""
    if target is not None and hook == target:
        raise MechscopeError(f"a transcoder's target must be another hook than its input, after it; got {hook} twice")


def check_pair(fired: list[str], hook: str, target: str) -> None:
    """A transcoder's target hook runs after its input hook in the forward pass (it replaces what the target carries
    by a function of what the input hook saw); ``fired``: hook names in firing order (:func:`hook_widths`' keys)."""
    check_distinct(hook, target)
    if fired.index(target) < fired.index(hook):
        raise MechscopeError(f"a transcoder's target must run after its input hook: {target} runs before {hook}")


def check_dictionary(model: HookedTransformer, dictionary: SparseDictionary, hook: str, target: str | None) -> None:
    """A dictionary fits its hook(s): d_in is the hook's width (d_out the target's), a transcoder's target runs
    after its input; one line when not."""
    widths = hook_widths(model, [hook] + ([target] if target else []))
    cfg = dictionary.cfg
    if cfg.transcoder and not target:
        raise MechscopeError("a transcoder needs its target hook (the MLP output it replaces): blocks.L.hook_mlp_out")
    if not cfg.transcoder and target:
        raise MechscopeError(f"an SAE reads and writes one hook; got a target {target!r} as well")
    if cfg.d_in != widths[hook]:
        raise MechscopeError(f"the dictionary reads d_in={cfg.d_in}; {hook} of this model has width {widths[hook]}")
    if target and cfg.d_out != widths[target]:
        raise MechscopeError(
            f"the dictionary writes d_out={cfg.d_out}; {target} of this model has width {widths[target]}"
        )
    if target:
        check_pair(list(widths), hook, target)


# ---- contexts ------------------------------------------------------------------------------------------


def contexts(ids, length: int, bos: int | None, limit: int | None = None) -> torch.Tensor:
    """The token stream ``ids`` cut into consecutive contexts [N, length]: ``length - 1`` text tokens after a
    BOS where ``bos`` is given (as ``lm neurons`` samples: the model's BOS first when it has one), else
    ``length``. The tail shorter than a context is dropped; ``limit`` keeps the first contexts."""
    ids = torch.as_tensor(ids, dtype=torch.long).flatten()
    body = length - (bos is not None)
    if body < 1:
        raise MechscopeError(f"--context {length} leaves no room for text after the BOS")
    n = len(ids) // body
    if limit is not None:
        n = min(n, limit)
    if n == 0:
        raise MechscopeError(
            f"the corpus has {len(ids)} token(s): fewer than one context of {body} (expected a non-empty text)"
        )
    out = ids[: n * body].view(n, body)
    if bos is not None:
        out = torch.cat([torch.full((n, 1), bos, dtype=torch.long), out], 1)
    return out


# ---- harvesting ------------------------------------------------------------------------------------------


def capture(model: HookedTransformer, tokens: torch.Tensor, names: list[str], stop: bool = True) -> dict:
    """The activations at ``names`` for ``tokens`` [B, P], the forward stopped after the last one (``stop``)."""
    cache: dict[str, torch.Tensor] = {}
    want = set(names)

    def store(x, hook):
        cache[hook.name] = x.detach()
        if stop and want <= cache.keys():
            raise _Stop

    with evaluating(model), torch.no_grad(), hooks(model, fwd=[(n, store) for n in dict.fromkeys(names)]):
        with contextlib.suppress(_Stop):
            model(tokens.to(model.W_E.device))
    silent = [n for n in names if n not in cache]
    if silent:
        raise HookError(f"hook point {silent[0]!r} does not fire for this model")
    return cache


def rows(act: torch.Tensor, skip_first: int) -> torch.Tensor:
    """[B, P, ...] -> [B * (P - skip_first), width] float32 on the CPU."""
    a = act[:, skip_first:]
    return a.reshape(a.shape[0] * a.shape[1], -1).float().cpu()


@dataclass(frozen=True)
class HarvestSpec:
    """One store of a harvest: an SAE's hook, or a transcoder's input hook and target."""

    hook: str
    target: str | None = None

    @property
    def name(self) -> str:
        return self.hook if self.target is None else f"{self.hook}__to__{self.target}"


def harvest_batches(
    model: HookedTransformer, tokens: torch.Tensor, specs: list[HarvestSpec], *, batch: int, skip_first: int,
    rank: int = 0, world: int = 1, stop: bool = True, on_batch=None,
) -> Iterator[list[torch.Tensor]]:  # fmt: skip
    """For each batch of contexts, the rows of each spec (``[x, y]`` for a transcoder), this rank's slice of
    the batch only (``world`` > 1: the slices are gathered by the caller)."""
    names = list(dict.fromkeys(n for s in specs for n in (s.hook, s.target) if n))
    widths = hook_widths(model, names)
    for start in range(0, len(tokens), batch):
        part = tokens[start : start + batch]
        part = part[split(len(part), rank, world)]
        if len(part) == 0:
            yield [torch.zeros(0, widths[s.hook] + (widths[s.target] if s.target else 0)) for s in specs]
            continue
        cache = capture(model, part, names, stop)
        out = []
        for s in specs:
            x = rows(cache[s.hook], skip_first)
            out.append(x if s.target is None else torch.cat([x, rows(cache[s.target], skip_first)], 1))
        if on_batch is not None:
            on_batch(len(part) * tokens.shape[1])
        yield out


# ---- splicing ------------------------------------------------------------------------------------------


def splice_hooks(dictionary: SparseDictionary, hook: str, target: str | None, skip_first: int, sink=None,
                 mode: str = "splice") -> list:  # fmt: skip
    """Forward hooks that splice ``dictionary`` in (``mode="splice"``) or zero its output site (``"zero"``),
    positions from ``skip_first`` on. ``sink(f [N, d_sae])`` receives the latents of each forward."""
    seen: dict[str, torch.Tensor] = {}
    out_hook = target or hook

    def read_input(x, h):
        seen["x"] = x
        return None

    def replace(y, h):
        new = y.clone()
        if mode == "zero":
            new[:, skip_first:] = 0
            return new
        x = seen.pop("x") if target else y
        xs = x[:, skip_first:]
        flat = xs.reshape(-1, dictionary.cfg.d_in)
        out, f = dictionary(flat)
        if sink is not None:
            sink(f.detach())
        new[:, skip_first:] = out.reshape(y[:, skip_first:].shape).to(y.dtype)
        return new

    return ([(hook, read_input)] if target and mode == "splice" else []) + [(out_hook, replace)]


def next_token_losses(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """[B, P-1] cross-entropy of each next token, float64."""
    logp = torch.log_softmax(logits[:, :-1].double(), -1)
    return -logp.gather(-1, tokens[:, 1:, None].to(logp.device)).squeeze(-1)


@dataclass(frozen=True)
class SpliceEffect(Result):
    """The model with the dictionary spliced in, against clean and zero-ablated (see the module docstring)."""

    tokens: int
    loss_clean: float
    loss_spliced: float
    loss_zero_ablated: float
    ce_loss_recovered: float
    kl_spliced: float
    kl_zero_ablated: float
    kl_recovered: float


def splice_effect(
    model: HookedTransformer, tokens: torch.Tensor, dictionary: SparseDictionary, hook: str, target: str | None,
    *, skip_first: int, batch: int = 8, progress=None,
):  # fmt: skip
    """(:class:`SpliceEffect`, :class:`~mechscope.core.dictionaries.DictionaryMetrics`) over ``tokens`` [N, P]:
    three forwards per batch (clean, spliced, zero-ablated) and the reconstruction metrics at the hook."""
    cfg = dictionary.cfg
    metrics = StreamingMetrics(cfg.d_out, cfg.d_sae)
    sums = dict.fromkeys(("clean", "spliced", "zero", "kl_s", "kl_z"), 0.0)
    n_pred = 0
    names = [hook] + ([target] if target else [])
    dictionary.eval()
    with evaluating(model), torch.no_grad():
        for start in range(0, len(tokens), batch):
            part = tokens[start : start + batch].to(model.W_E.device)
            clean, cache = run_with_cache(model, part, names=names)
            latents: list[torch.Tensor] = []
            with hooks(model, fwd=splice_hooks(dictionary, hook, target, skip_first, latents.append)):
                spliced = model(part)
            with hooks(model, fwd=splice_hooks(dictionary, hook, target, skip_first, mode="zero")):
                zeroed = model(part)
            x_true = rows(cache[target or hook], skip_first)
            x_in = rows(cache[hook], skip_first)
            out, f = dictionary(x_in)
            metrics.update(x_true, out.float(), f)
            for key, logits in (("clean", clean), ("spliced", spliced), ("zero", zeroed)):
                sums[key] += float(next_token_losses(logits, part).sum())
            from mechscope.core.dictionaries.metrics import kl_divergence

            sums["kl_s"] += float(kl_divergence(clean, spliced, "none").sum())
            sums["kl_z"] += float(kl_divergence(clean, zeroed, "none").sum())
            n_pred += part.shape[0] * (part.shape[1] - 1)
            if progress is not None:
                progress(part.shape[0] * part.shape[1])
    n_pos = tokens.shape[0] * tokens.shape[1]
    lc, ls, lz = sums["clean"] / n_pred, sums["spliced"] / n_pred, sums["zero"] / n_pred
    kls, klz = sums["kl_s"] / n_pos, sums["kl_z"] / n_pos
    effect = SpliceEffect(
        tokens=int(n_pos), loss_clean=lc, loss_spliced=ls, loss_zero_ablated=lz,
        ce_loss_recovered=ce_loss_recovered(lc, ls, lz), kl_spliced=kls, kl_zero_ablated=klz,
        kl_recovered=kl_recovered(kls, klz),
    )  # fmt: skip
    return effect, metrics.result()


# ---- latents over a sample ---------------------------------------------------------------------------


def latent_activations(
    model: HookedTransformer, tokens: torch.Tensor, dictionary: SparseDictionary, hook: str, *, skip_first: int,
    batch: int = 16, progress=None,
):  # fmt: skip
    """The dictionary's latents on every position (from ``skip_first``) of ``tokens`` [N, P]: a
    :class:`~mechscope.core.dictionaries.latents.LatentActivations` whose row ``n * (P - skip_first) + j`` is
    context ``n``, position ``skip_first + j``."""
    acc = LatentCollector(dictionary.cfg.d_sae)
    dictionary.eval()
    with torch.no_grad():
        for start in range(0, len(tokens), batch):
            part = tokens[start : start + batch]
            x = rows(capture(model, part, [hook])[hook], skip_first)
            acc.update(dictionary.encode(x))
            if progress is not None:
                progress(part.numel())
    return acc.result()


# an induction-like latent: its firing rate on the repeat of random tokens at least this much above its rate on the
# first copy (the criterion the dashboards' summary and headings state)
INDUCTION_MARGIN = 0.2


@dataclass(frozen=True)
class InductionLatents(Result):
    """Latents on repeated random tokens (BOS + n + the same n): firing rate and mean activation on each copy,
    the latents ranked by ``rate_second - rate_first``."""

    n: int
    sequences: int
    seed: int
    ranked: tuple[int, ...]  # latents, most induction-like first (at most 50)
    rate_first: tuple[float, ...]  # of the ranked latents, in order
    rate_second: tuple[float, ...]
    mean_first: tuple[float, ...]
    mean_second: tuple[float, ...]
    tokens: tuple[int, ...]  # the first sequence (for the dashboards)
    activations: tuple[tuple[float, ...], ...]  # the ranked latents' activation on it, per position

    SCHEMA: ClassVar[str | None] = None


def induction_latents(
    model: HookedTransformer, dictionary: SparseDictionary, hook: str, *, n: int = 32, sequences: int = 16,
    seed: int = 0, top: int = 50,
) -> InductionLatents:  # fmt: skip
    """Rank latents by how much more often they fire on the repeated copy (see the module docstring)."""
    from mechscope.lm.methods.scores import default_token_range, repeated_tokens

    n = min(n, (model.cfg.n_ctx - 1) // 2)
    tokens = repeated_tokens(model, n, sequences, 2, torch.Generator().manual_seed(seed), default_token_range(model))
    act = capture(model, tokens, [hook])[hook]
    with torch.no_grad():
        f = dictionary.encode(act.reshape(act.shape[0], act.shape[1], -1).float().cpu())  # [B, P, S]
    first, second = f[:, 1 : 1 + n], f[:, 1 + n :]
    rate1 = (first > 0).double().mean((0, 1))
    rate2 = (second > 0).double().mean((0, 1))
    score = rate2 - rate1
    order = torch.argsort(score, descending=True, stable=True)[:top]
    order = order[score[order] > 0]
    return InductionLatents(
        n=n, sequences=sequences, seed=seed, ranked=tuple(int(i) for i in order),
        rate_first=tuple(float(rate1[i]) for i in order), rate_second=tuple(float(rate2[i]) for i in order),
        mean_first=tuple(float(first[..., i].double().mean()) for i in order),
        mean_second=tuple(float(second[..., i].double().mean()) for i in order),
        tokens=tuple(int(t) for t in tokens[0]),
        activations=tuple(tuple(float(v) for v in f[0, :, i]) for i in order),
    )  # fmt: skip


# ---- weights: direct logit effects and neurons ------------------------------------------------------------


def unembedding(model: HookedTransformer) -> torch.Tensor:
    """``W_U`` [D, V] with the final norm's gain folded in (rows centred over d_model for LayerNorm) and the
    columns centred over the vocabulary (see the module docstring)."""
    w = model.W_U.detach().float().cpu()
    norm = model.ln_final
    if norm is not None:
        w = w * norm.gain.detach().float().cpu()[:, None]
        if type(norm).__name__ == "LayerNorm":
            w = w - w.mean(0, keepdim=True)
    return w - w.mean(1, keepdim=True)


def residual_directions(model: HookedTransformer, dictionary: SparseDictionary, out_hook: str) -> torch.Tensor | None:
    """The decoder rows written into the residual stream, [d_sae, D], or None where the hook is not linear
    into it (``mlp.hook_in``, ``hook_pre``...)."""
    w = dictionary.folded().W_dec.detach().float().cpu()  # [S, d_out]
    layer = layer_of(out_hook)
    d = model.cfg.d_model
    if out_hook.endswith(("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_mlp_out", "hook_attn_out",
                          "hook_mlp_in")) and w.shape[1] == d:  # fmt: skip
        return w
    if out_hook.endswith("attn.hook_z") and layer is not None:
        wo = model.blocks[layer].attn.W_O.detach().float().cpu()  # [H, Dh, D]
        return torch.einsum("shk,hkd->sd", w.view(w.shape[0], *wo.shape[:2]), wo)
    if out_hook.endswith("mlp.hook_post") and layer is not None:
        return w @ model.blocks[layer].mlp.down.weight.detach().float().cpu().T
    return None


@dataclass(frozen=True)
class LogitEffect(Result):
    """A latent's direct effect on the logits: the tokens its decoder direction promotes and suppresses."""

    promoted: tuple[int, ...]
    promoted_values: tuple[float, ...]
    suppressed: tuple[int, ...]
    suppressed_values: tuple[float, ...]


def logit_effects(directions: torch.Tensor, unembed: torch.Tensor, latents: list[int],
                  k: int = 10) -> dict[int, LogitEffect]:  # fmt: skip
    """Per latent, the ``k`` tokens most promoted and most suppressed (:func:`unembedding`)."""
    out = {}
    for i in latents:
        e = directions[i] @ unembed  # [V]
        top, bot = torch.topk(e, k), torch.topk(-e, k)
        out[i] = LogitEffect(tuple(int(t) for t in top.indices), tuple(float(v) for v in top.values),
                             tuple(int(t) for t in bot.indices), tuple(float(-v) for v in bot.values))  # fmt: skip
    return out


def neuron_comparison(model: HookedTransformer, dictionary: SparseDictionary, hook: str, target: str | None,
                      latents: list[int], k: int = 5) -> dict[int, list[tuple[str, float]]]:  # fmt: skip
    """What each latent's decoder direction mixes: for ``attn.hook_z``, the heads by the share of the
    direction's squared norm in each; where the direction lives in the residual stream, the MLP neurons whose
    output direction (``W_out`` column) it is most like (cosine, the MLP writing there: layer L's for
    ``hook_mlp_out``/``hook_resid_post``/transcoders, L-1's for ``hook_resid_pre``); for ``mlp.hook_post``, the
    neurons with the largest weights. Otherwise the largest coordinates."""
    w = dictionary.folded().W_dec.detach().float().cpu()
    out_hook = target or hook
    layer = layer_of(out_hook)
    result: dict[int, list[tuple[str, float]]] = {}
    if out_hook.endswith("attn.hook_z") and layer is not None:
        h = model.cfg.n_heads
        for i in latents:
            share = w[i].view(h, -1).pow(2).sum(1) / w[i].pow(2).sum().clamp_min(1e-12)
            top = torch.argsort(share, descending=True)[:k]
            result[i] = [(f"head {layer}.{int(j)}", float(share[j])) for j in top]
        return result
    mlp_layer = None
    if layer is not None:
        if out_hook.endswith(("hook_mlp_out", "hook_resid_post", "hook_resid_mid", "hook_mlp_in")):
            mlp_layer = layer if out_hook.endswith(("hook_mlp_out", "hook_resid_post")) else layer - 1
        elif out_hook.endswith("hook_resid_pre"):
            mlp_layer = layer - 1
    if mlp_layer is not None and 0 <= mlp_layer < model.cfg.n_layers and model.blocks[mlp_layer].mlp is not None \
            and w.shape[1] == model.cfg.d_model:  # fmt: skip
        wout = model.blocks[mlp_layer].mlp.down.weight.detach().float().cpu().T  # [M, D]
        wout = wout / wout.norm(dim=1, keepdim=True).clamp_min(1e-12)
        for i in latents:
            d = w[i] / w[i].norm().clamp_min(1e-12)
            cos = wout @ d
            top = torch.argsort(cos.abs(), descending=True)[:k]
            result[i] = [(f"neuron {mlp_layer}.{int(j)}", float(cos[j])) for j in top]
        return result
    what = "neuron" if out_hook.endswith("mlp.hook_post") else "dim"
    for i in latents:
        d = w[i] / w[i].norm().clamp_min(1e-12)
        top = torch.argsort(d.abs(), descending=True)[:k]
        result[i] = [(f"{what} {int(j)}", float(d[j])) for j in top]
    return result


# ---- the records the commands write ------------------------------------------------------------------------


@dataclass(frozen=True)
class LmSaeHarvest(Result):
    """``lm sae harvest``: the stores written (one per hook or transcoder pair), their sizes and the speed."""

    SCHEMA: ClassVar[str] = "mechscope.lm-sae-harvest/1"
    FILE: ClassVar[str] = "harvest.json"

    model: str
    text: str
    context: int
    bos: int | None
    skip_first: int
    contexts: int
    tokens: int  # positions run through the model (BOS included)
    rows: int  # rows per store (positions after the BOS)
    stores: tuple[dict, ...]  # {name, hook, target, d_in, d_out, width, shards, directory}
    seconds: float
    tokens_per_second: float
    world_size: int
    resumed_rows: int
    settings: dict
    # forward and backward passes through the blocks, in passes over the tokens harvested (``tokens``, BOS included;
    # WorkCounter): the whole job's, summed over the processes. With ``stop_early`` a forward stops after the last
    # hook harvested, so it counts the blocks up to it (a fraction of a pass); a resumed harvest counts the contexts
    # it ran; the two two-token probes of the hooks' widths included
    work: dict | None = None


@dataclass(frozen=True)
class LmSaeTraining(DictionaryTraining):
    """``lm sae train``: see :class:`~mechscope.core.dictionaries.staged.DictionaryTraining`."""

    SCHEMA: ClassVar[str] = "mechscope.lm-sae-training/1"
    FILE: ClassVar[str] = "training.json"


@dataclass(frozen=True)
class LmSaeEvaluation(Result):
    """``lm sae evaluate``: reconstruction and sparsity at the hook, and the model with the dictionary spliced in."""

    SCHEMA: ClassVar[str] = "mechscope.lm-sae-evaluation/1"
    FILE: ClassVar[str] = "evaluation.json"

    model: str
    dictionary: str
    hook: str
    target: str | None
    architecture: str
    d_in: int
    d_sae: int
    text: str
    contexts: int
    context: int
    skip_first: int
    effect: SpliceEffect
    metrics: dict  # DictionaryMetrics.to_dict() (l0, mse, explained_variance, ... dead_fraction)
    seconds: float
    latent_frequency: np.ndarray | None = figure_data()
    trained_on: str = ""  # the model its cfg.json names (SAELens' model_name; "" when it names none)
    # forward and backward passes through the blocks, in passes over the tokens evaluated (``contexts x context``,
    # BOS included): three per batch (clean, spliced, zero-ablated) and a two-token probe of the hooks' widths
    # (WorkCounter); ``work["dictionary"]``: the dictionary's own forwards, in passes over its rows (the positions
    # after the BOS): two, spliced in and for the reconstruction metrics
    work: dict | None = None


@dataclass(frozen=True)
class TextExample(Result):
    """A context around one position: the tokens (text) and the latent's activation on each."""

    value: float
    sequence: int
    position: int
    tokens: tuple[str, ...]
    acts: tuple[float, ...]
    focus: int  # index of the position in ``tokens``


@dataclass(frozen=True)
class LmLatentDashboard(Result):
    latent: int
    density: float
    max: float
    mean_when_active: float
    top: tuple[TextExample, ...]
    band_edges: tuple[float, ...]
    bands: tuple[tuple[TextExample, ...], ...]
    hist_counts: tuple[int, ...]
    hist_edges: tuple[float, ...]
    promoted: tuple[tuple[str, float], ...]
    suppressed: tuple[tuple[str, float], ...]
    mixes: tuple[tuple[str, float], ...]  # neurons / heads / coordinates the decoder direction is most like
    induction: dict | None  # {rate_first, rate_second, mean_first, mean_second} when ranked as induction-like
    why: str  # why it is shown: asked, induction, random


@dataclass(frozen=True)
class LmSaeDashboards(Result):
    """``lm sae show``: dashboards of chosen latents, the latent-density histogram, the induction ranking."""

    SCHEMA: ClassVar[str] = "mechscope.lm-sae-dashboards/1"
    FILE: ClassVar[str] = "dashboards.json"

    model: str
    dictionary: str
    hook: str
    target: str | None
    architecture: str
    d_in: int
    d_sae: int
    text: str
    contexts: int
    context: int
    tokens: int  # positions read (after the BOS)
    dead_fraction: float
    logit_effect: str  # how the direct logit effects were computed (or why there are none)
    induction: InductionLatents | None
    induction_tokens: tuple[str, ...]
    latents: tuple[LmLatentDashboard, ...]
    summary: tuple[str, ...]
    seconds: dict
    densities: np.ndarray | None = figure_data()
    trained_on: str = ""  # the model its cfg.json names (SAELens' model_name; "" when it names none)
    # forward and backward passes through the blocks, in passes over the tokens read (``contexts x context``, BOS
    # included; WorkCounter): each forward stops after the hook (the blocks up to it), plus the induction sequences
    # and a two-token probe; the dictionary's encoder on the hook's rows is not counted (``encode``, not the network)
    work: dict | None = None
    induction_bos: bool = True  # position 0 of the induction sequences is the model's BOS (else its first token id)
