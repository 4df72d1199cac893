"""MLP neurons: their top-activating contexts and how monosemantic those are.

For every neuron of every MLP layer this finds the ``k`` (default 100) contexts, positions of a
seeded sample of real text, where it is most active, and measures how concentrated those
contexts are on one token: the question Elhage et al. (2022, "Softmax Linear Units",
transformer-circuits.pub/2022/solu) asked of GELU and SoLU neurons by hand, here answered
automatically.

Definitions (per neuron; its *firing contexts* are the positions among its top ``k``
activations where the activation is positive):

* ``entropy``: the Shannon entropy, in bits, of the current token over the firing contexts.
  0 when every one is the same token; a neuron that fires on positions at random scores about
  the entropy of ``k`` tokens drawn at random from the text (the ``baseline``, measured on the
  same sample).
* ``top_share``: the share of the most common current token among the firing contexts (1: one
  token).
* ``prev_share``: the same for the token before (a neuron can be about what came before, "after
  a space"); ``pattern_share`` is the larger of the two, and ``pattern`` says which token it is.
* ``bigram``: the most common (previous, current) pair and its share: the short pattern shown.

A neuron with fewer than ``min_count`` firing contexts is *rarely active* and left out of the
distributions (counted apart). Which activation is read (``site``): ``hook_post`` (after the
nonlinearity) for GELU and every other MLP; for SoLU (``act='solu_ln'``) ``hook_mid``, SoLU's
own output before the MLP's LayerNorm, by default (the LayerNorm rescales every position by its
own spread, which mixes the neurons' scales), or ``hook_post`` when asked. A gated MLP's neuron
(SwiGLU) is act(gate) · up at ``hook_post``; only its positive side is read here.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from mechscope.core.errors import MechscopeError
from mechscope.core.hooks import run_with_cache
from mechscope.core.results import Result, figure_data
from mechscope.core.torch_utils import described, evaluating
from mechscope.core.validate import check_int
from mechscope.lm.models.transformer import SOLU_LN, HookedTransformer

SITES = ("auto", "post", "mid")


def sample_windows(ids: torch.Tensor, n: int, length: int, seed: int) -> torch.Tensor:
    """``n`` non-overlapping windows of ``length`` tokens from ``ids`` [T], chosen at random (seeded),
    in text order: [N, length]. Fewer when the text has fewer whole windows; one shorter window when
    the text is shorter than ``length``."""
    ids = torch.as_tensor(ids, dtype=torch.long).flatten()
    if len(ids) < 2:
        raise MechscopeError(f"the text has {len(ids)} token(s): too short to sample contexts from")
    if n < 1 or length < 2:
        raise MechscopeError(f"need at least one window of at least 2 tokens, got {n} of {length}")
    if len(ids) < length:
        return ids[None]
    chunks = len(ids) // length
    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(chunks, generator=g)[:n].sort().values
    return torch.stack([ids[int(c) * length : (int(c) + 1) * length] for c in pick])


def mlp_layers(model: HookedTransformer) -> list[int]:
    return [i for i, b in enumerate(model.blocks) if b.mlp is not None]


def check_neuron_model(model: HookedTransformer, layers: list[int] | None, site: str = "auto") -> list[int]:
    """The MLP layers to read (all by default); one-line errors for a model without MLPs, a layer
    out of range, a site the model does not have."""
    name = model.cfg.name or "this model"
    have = mlp_layers(model)
    if not have:
        raise MechscopeError(f"{name} has no MLP layers (attention-only): it has no neurons to read")
    if site not in SITES:
        raise MechscopeError(f"--site must be one of {', '.join(SITES)}, got {site!r}")
    if site == "mid" and model.cfg.act != SOLU_LN:
        raise MechscopeError(f"--site mid is the SoLU MLP's (act 'solu_ln'); {name} uses {model.cfg.act!r}")
    if layers is not None and (isinstance(layers, (str, bytes)) or not hasattr(layers, "__iter__")):
        raise MechscopeError(f"layers must be a list of MLP layer indices, e.g. [0, 1], got {layers!r}")  # 0: all
    layers = [check_int(layer, "an MLP layer") for layer in (() if layers is None else layers)]  # 1.0 was
    # blocks.1.0.mlp.hook_post (an array or a tensor of layers is iterated, never read as true or false)
    if not layers:
        return have
    for layer in layers:
        if layer not in have:
            raise MechscopeError(f"layer {layer} out of range: the MLP layers are {_span(have)}")
    return sorted(set(layers))


def _span(xs: list[int]) -> str:
    return f"{xs[0]}..{xs[-1]}" if xs == list(range(xs[0], xs[-1] + 1)) else ", ".join(map(str, xs))


def site_hook(model: HookedTransformer, layer: int, site: str = "auto") -> str:
    """The hook name of a layer's neuron activations (see the module docstring)."""
    mid = site == "mid" or (site == "auto" and model.cfg.act == SOLU_LN)
    return f"blocks.{layer}.mlp.hook_{'mid' if mid else 'post'}"


@dataclass(frozen=True)
class TopActivations(Result):
    """The ``k`` largest activations of every neuron of the layers read, over a token sample [N, P]."""

    layers: tuple[int, ...]
    hooks: tuple[str, ...]
    values: torch.Tensor  # [L, M, k], descending
    seq: torch.Tensor  # [L, M, k] sequence index into the sample
    pos: torch.Tensor  # [L, M, k] position
    max: torch.Tensor  # [L, M] (= values[..., 0])
    mean: torch.Tensor  # [L, M] over every counted position
    density: torch.Tensor  # [L, M] share of counted positions where the activation is positive


def check_k(k: int, tokens: torch.Tensor, skip_first: int = 0, what: str = "the sample") -> None:
    """A neuron's top ``k`` activations are fewer than the sample's positions (a BOS not counted): with as many,
    every position is a "top" one and every figure read off them is the sample's own (0% monosemantic, silently)."""
    n, p = tokens.shape
    if k >= n * (p - skip_first):
        raise MechscopeError(f"{what}: {n * (p - skip_first):,} positions ({n:,} sequence{'s' * (n != 1)} of "
                             f"{p - skip_first:,}), not more than the {k:,} top activations kept per neuron (--k): "
                             "every position would be a top one; use a smaller --k or more text")  # fmt: skip


@torch.no_grad()
def top_activations(
    model: HookedTransformer,
    tokens: torch.Tensor,
    layers: list[int],
    k: int = 100,
    site: str = "auto",
    batch: int = 32,
    skip_first: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> TopActivations:
    """Run the sample ``tokens`` [N, P] through ``model`` in batches and keep, per neuron, the ``k``
    largest activations and where they are; positions before ``skip_first`` (a BOS) are not counted."""
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2:  # [P] was "not enough values to unpack"
        raise MechscopeError(f"expected a token sample [N, P], got {described(tokens)}")
    every = check_neuron_model(model, layers, site)  # site "bogus" was read as "post"
    layers = list(dict.fromkeys(int(i) for i in (() if layers is None else layers))) or every  # in the order given
    k, batch = check_int(k, "k", 1), check_int(batch, "batch", 1)  # k 0 was an IndexError, batch 0 range()'s error
    skip_first = check_int(skip_first, "skip_first", 0, tokens.shape[1] - 1)
    n, p = tokens.shape
    hooks = [site_hook(model, layer, site) for layer in layers]
    check_k(k, tokens, skip_first)
    best_v: list[torch.Tensor | None] = [None] * len(layers)
    best_i: list[torch.Tensor | None] = [None] * len(layers)
    total = [None] * len(layers)
    positive = [None] * len(layers)
    count = 0
    device = model.W_E.device
    for start in range(0, n, batch):
        chunk = tokens[start : start + batch].to(device)
        _, cache = run_with_cache(model, chunk, names=hooks)
        b = chunk.shape[0]
        flat = (torch.arange(start, start + b)[:, None] * p + torch.arange(p)[None, :])[:, skip_first:].reshape(-1)
        count += flat.numel()
        for j, name in enumerate(hooks):
            act = cache[name][:, skip_first:].float().cpu().reshape(len(flat), -1)  # [b*P', M]
            total[j] = act.sum(0) if total[j] is None else total[j] + act.sum(0)
            pos_count = (act > 0).sum(0)
            positive[j] = pos_count if positive[j] is None else positive[j] + pos_count
            idx = flat[:, None].expand_as(act)
            if best_v[j] is not None:
                act, idx = torch.cat([best_v[j], act]), torch.cat([best_i[j], idx])
            v, where = act.topk(min(k, act.shape[0]), dim=0)  # [k, M]
            best_v[j], best_i[j] = v, idx.gather(0, where)
        if progress is not None:
            progress(min(start + batch, n), n)
    values = torch.stack(best_v).transpose(1, 2).contiguous()  # [L, M, k]
    flat_idx = torch.stack(best_i).transpose(1, 2)
    return TopActivations(
        layers=tuple(layers),
        hooks=tuple(hooks),
        values=values,
        seq=flat_idx // p,
        pos=flat_idx % p,
        max=values[..., 0],
        mean=torch.stack(total) / count,
        density=torch.stack(positive).float() / count,
    )


def entropy_bits(counts: np.ndarray) -> float:
    """Shannon entropy in bits of the distribution given by ``counts``."""
    c = np.asarray(counts, dtype=float)
    c = c[c > 0]
    if c.size == 0:
        return float("nan")
    q = c / c.sum()
    return float(max(0.0, -(q * np.log2(q)).sum()))


@dataclass(frozen=True)
class Concentration(Result):
    """How concentrated one neuron's firing contexts are (see the module docstring)."""

    n: int  # firing contexts among the top k
    entropy: float  # bits, current token
    top_token: int
    top_share: float
    prev_token: int  # -1: the start of a window
    prev_share: float
    bigram: tuple[int, int]
    bigram_share: float

    @property
    def pattern_share(self) -> float:
        return max(self.top_share, self.prev_share)

    @property
    def pattern(self) -> str:
        """Which short pattern the figure is about: the current token or the one before."""
        return "token" if self.top_share >= self.prev_share else "previous token"


def concentration(current: np.ndarray, previous: np.ndarray) -> Concentration:
    """The figures of one neuron from the current and previous tokens of its firing contexts."""
    n = len(current)
    if n == 0:
        nan = float("nan")
        return Concentration(0, nan, -1, nan, -1, nan, (-1, -1), nan)
    tok, cnt = np.unique(current, return_counts=True)
    ptok, pcnt = np.unique(previous, return_counts=True)
    pairs, pair_cnt = np.unique(np.stack([previous, current], 1), axis=0, return_counts=True)
    b = int(pair_cnt.argmax())
    return Concentration(
        n=n,
        entropy=entropy_bits(cnt),
        top_token=int(tok[cnt.argmax()]),
        top_share=float(cnt.max() / n),
        prev_token=int(ptok[pcnt.argmax()]),
        prev_share=float(pcnt.max() / n),
        bigram=(int(pairs[b, 0]), int(pairs[b, 1])),
        bigram_share=float(pair_cnt[b] / n),
    )


def random_baseline(tokens: torch.Tensor, k: int, seed: int, draws: int = 200, skip_first: int = 0) -> dict:
    """The figures of a neuron that fires at random: current-token entropy and top share of ``k``
    positions drawn at random from the sample, over ``draws`` seeded draws (mean and 5th/95th percentiles)."""
    flat = tokens[:, skip_first:].reshape(-1).numpy()
    rng = np.random.default_rng(seed)
    k = min(k, len(flat))
    ent, share = [], []
    for _ in range(draws):
        pick = flat[rng.choice(len(flat), size=k, replace=False)]
        _, cnt = np.unique(pick, return_counts=True)
        ent.append(entropy_bits(cnt))
        share.append(cnt.max() / k)
    return {
        "k": k,
        "draws": draws,
        "entropy_mean": float(np.mean(ent)),
        "entropy_p05": float(np.percentile(ent, 5)),
        "entropy_p95": float(np.percentile(ent, 95)),
        "top_share_mean": float(np.mean(share)),
        "top_share_p95": float(np.percentile(share, 95)),
    }


@dataclass(frozen=True)
class LayerNeurons(Result):
    layer: int
    hook: str
    figures: tuple[Concentration, ...]  # one per neuron, in neuron order
    max: tuple[float, ...]
    density: tuple[float, ...]
    contexts: tuple[tuple[dict, ...], ...]  # per neuron: {seq, pos, act, start, acts} of its top contexts

    def entropy(self) -> np.ndarray:
        return np.array([f.entropy for f in self.figures])

    def top_share(self) -> np.ndarray:
        return np.array([f.top_share for f in self.figures])

    def counted(self, min_count: int) -> np.ndarray:
        """Neurons with at least ``min_count`` firing contexts."""
        return np.array([f.n >= min_count for f in self.figures])


@dataclass(frozen=True)
class NeuronsResult(Result):
    """Every neuron's top contexts and monosemanticity figures; ``to_dict()`` is neurons.json.

    ``tokens`` (the text sample) and ``decoder`` (token id -> text) are for writing and showing it; the JSON
    holds the decoded text of each context and top token instead, and ``load`` reads that back.
    """

    SCHEMA = "mechscope.neurons/1"
    FILE = "neurons.json"

    model: str
    k: int
    min_count: int
    sample: dict  # sequences, length, tokens, seed, source, skip_first
    baseline: dict
    layers: tuple[LayerNeurons, ...]
    tokens: torch.Tensor = figure_data()  # the sample [N, P] (the report decodes contexts from it)
    decoder: Callable[[int], str] | None = figure_data()
    work: dict | None = None  # forward and backward passes through the blocks, in passes over the sample's N x P
    # tokens (WorkCounter; `lm neurons`: one for the top activations and the share of sequences holding a context shown)

    def ranking(self) -> list[tuple[int, int]]:
        """(layer, neuron) of every counted neuron, most monosemantic first: lowest entropy, then
        highest top share, then layer and index."""
        rows = []
        for lay in self.layers:
            for i, f in enumerate(lay.figures):
                if f.n >= self.min_count:
                    rows.append((f.entropy, -f.top_share, lay.layer, i))
        return [(layer, i) for _, _, layer, i in sorted(rows)]

    def figure(self, layer: int, neuron: int) -> Concentration:
        return self.layer(layer).figures[neuron]

    def layer(self, layer: int) -> LayerNeurons:
        return next(lay for lay in self.layers if lay.layer == layer)

    def summary(self) -> dict:
        """Distribution figures over every counted neuron (and per layer)."""

        def stats(figs: list[Concentration]) -> dict:
            ent = np.array([f.entropy for f in figs])
            share = np.array([f.top_share for f in figs])
            pat = np.array([f.pattern_share for f in figs])
            if not len(figs):
                return {"neurons": 0}
            return {
                "neurons": len(figs),
                "entropy_median": float(np.median(ent)),
                "entropy_mean": float(ent.mean()),
                "entropy_quartiles": [float(np.percentile(ent, 25)), float(np.percentile(ent, 75))],
                "top_share_median": float(np.median(share)),
                "share_one_token_ge_0.5": float((share >= 0.5).mean()),
                "share_one_token_ge_0.9": float((share >= 0.9).mean()),
                "share_pattern_ge_0.5": float((pat >= 0.5).mean()),
                "below_baseline_p05": float((ent < self.baseline["entropy_p05"]).mean()),
            }

        out = {}
        every = []
        for lay in self.layers:
            figs = [f for f in lay.figures if f.n >= self.min_count]
            every += figs
            out[f"layer {lay.layer}"] = stats(figs) | {"rarely_active": len(lay.figures) - len(figs)}
        out["all"] = stats(every) | {"rarely_active": sum(len(lay.figures) for lay in self.layers) - len(every)}
        return out

    def to_dict(self) -> dict:
        """JSON values; with a ``decoder`` (token id -> text) each context also carries its tokens as text,
        and each neuron its top token, previous token and bigram."""
        decode = self.decoder
        d = super().to_dict()
        d["summary"] = self.summary()
        tokens = self.tokens.numpy() if self.tokens is not None else None
        memo: dict[int, str] = {}

        def text(i: int) -> str | None:
            if decode is None or i < 0:
                return None
            if i not in memo:
                memo[i] = decode(int(i))
            return memo[i]

        for lay, row in zip(self.layers, d["layers"], strict=True):
            for f, fd in zip(lay.figures, row["figures"], strict=True):
                fd["pattern_share"], fd["pattern"] = f.pattern_share, f.pattern
                if decode is not None and f.n:
                    fd["text"] = {"top_token": text(f.top_token), "prev_token": text(f.prev_token)}
                    fd["text"]["bigram"] = [text(f.bigram[0]), text(f.bigram[1])]
            if decode is not None and tokens is not None:
                for ctxs in row["contexts"]:
                    for c in ctxs:
                        ids = tokens[c["seq"], c["start"] : c["start"] + len(c["acts"])]
                        c["tokens"] = [text(int(i)) for i in ids]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> NeuronsResult:
        """neurons.json read back; the decoded text of the top tokens becomes the decoder's table."""
        from dataclasses import replace

        base = super().from_dict(d)
        table: dict[int, str] = {}
        for row in d["layers"]:
            for fd in row["figures"]:
                text = fd.get("text")
                if text:
                    table[int(fd["top_token"])] = text["top_token"]
                    table[int(fd["prev_token"])] = text["prev_token"]
                    table[int(fd["bigram"][0])], table[int(fd["bigram"][1])] = text["bigram"]
        return replace(base, decoder=table.get if table else None)


@dataclass(frozen=True)
class SoluComparison(Result):
    """``lm solu-compare``: the same toy transformer with GELU and with SoLU MLPs; compare.json.

    ``models``: per model its training figures and its neurons' distribution figures; ``neurons``: each
    model's :class:`NeuronsResult` (in memory, for the report; each is also saved beside its run).

    ``work``: every pass through the blocks, in passes over the held-out sample the neurons are read on
    (``sequences`` windows of ``n_ctx`` tokens), with ``parts``: each model's training (its steps and checkpoint
    measurements, counted by :func:`~mechscope.lm.toy.train_toy`) and analysis (its held-out loss over the whole
    held-out text, and the neuron readings).
    """

    SCHEMA = "mechscope.solu-compare/1"
    FILE = "compare.json"

    settings: dict
    text: str
    vocab: int
    models: list[dict]
    baseline: dict
    summary: list[str]
    seconds: dict[str, float]
    neurons: dict[str, NeuronsResult] | None = figure_data()
    work: dict | None = None  # forward and backward passes, in passes over the held-out sample read (WorkCounter)


@torch.no_grad()
def context_activations(
    model: HookedTransformer,
    tokens: torch.Tensor,
    top: TopActivations,
    n_contexts: int,
    before: int,
    after: int,
    batch: int = 32,
) -> list[torch.Tensor]:
    """Each neuron's activation over a window around each of its top ``n_contexts`` positions:
    per layer [M, n_contexts, before + 1 + after] (NaN outside the sequence). A second pass over
    only the sequences that hold a shown context."""
    n, p = tokens.shape
    c = min(n_contexts, top.values.shape[-1])
    seq, pos = top.seq[..., :c], top.pos[..., :c]  # [L, M, c]
    offsets = torch.arange(-before, after + 1)
    out = [torch.full((seq.shape[1], c, len(offsets)), float("nan")) for _ in top.layers]
    needed = torch.unique(seq)
    device = model.W_E.device
    for start in range(0, len(needed), batch):
        chunk = needed[start : start + batch]
        _, cache = run_with_cache(model, tokens[chunk].to(device), names=list(top.hooks))
        local = torch.full((n,), -1, dtype=torch.long)
        local[chunk] = torch.arange(len(chunk))
        for j, name in enumerate(top.hooks):
            act = cache[name].float().cpu()  # [b, P, M]
            m_idx, c_idx = torch.nonzero(local[seq[j]] >= 0, as_tuple=True)
            if not len(m_idx):
                continue
            rows = local[seq[j][m_idx, c_idx]]
            where = pos[j][m_idx, c_idx][:, None] + offsets[None, :]  # [pairs, W]
            valid = (where >= 0) & (where < p)
            vals = act[rows[:, None], where.clamp(0, p - 1), m_idx[:, None]]
            out[j][m_idx, c_idx] = torch.where(valid, vals, torch.full_like(vals, float("nan")))
    return out


def read_neurons(
    model: HookedTransformer,
    tokens: torch.Tensor,
    *,
    name: str,
    layers: list[int] | None = None,
    k: int = 100,
    site: str = "auto",
    min_count: int = 10,
    n_contexts: int = 5,
    before: int = 20,
    after: int = 3,
    skip_first: int = 0,
    sample: dict | None = None,
    seed: int = 0,
    batch: int = 32,
    progress: Callable[[str], None] | None = None,
) -> NeuronsResult:
    """Top contexts and monosemanticity figures of every neuron of ``layers`` (all MLP layers)."""
    layers = check_neuron_model(model, layers, site)
    if tokens.dim() != 2 or tokens.shape[1] - skip_first < 1 or not tokens.numel():
        raise MechscopeError("the text sample is empty")
    if k < 1 or min_count < 1 or n_contexts < 0:
        raise MechscopeError(
            f"--k and --min-count must be at least 1 and --contexts at least 0, got {k}, {min_count}, {n_contexts}"
        )
    check_k(k, tokens, skip_first)
    before, after = check_int(before, "before", 0), check_int(after, "after", 0)  # -2 was a window cut short
    say = progress or (lambda _: None)
    say(f"top {k} activations of {sum(model.cfg.d_mlp for _ in layers):,} neurons over {tokens.numel():,} tokens")
    with evaluating(model):
        top = top_activations(model, tokens, layers, k, site, batch, skip_first)
        say("contexts")
        windows = context_activations(model, tokens, top, n_contexts, before, after, batch)
    n, p = tokens.shape
    tok = tokens.numpy()
    out = []
    for j, layer in enumerate(layers):
        figs, ctxs = [], []
        for m in range(top.values.shape[1]):
            fire = (top.values[j, m] > 0).numpy()
            s, q = top.seq[j, m].numpy()[fire], top.pos[j, m].numpy()[fire]
            cur = tok[s, q]
            prev = np.where(q > 0, tok[s, np.maximum(q - 1, 0)], -1)
            figs.append(concentration(cur, prev))
            shown = []
            for c in range(windows[j].shape[1]):
                start = int(top.pos[j, m, c]) - before
                w = windows[j][m, c]
                keep = ~torch.isnan(w)
                shown.append(
                    {
                        "seq": int(top.seq[j, m, c]),
                        "pos": int(top.pos[j, m, c]),
                        "act": float(top.values[j, m, c]),
                        "start": max(start, 0),
                        "acts": [float(f"{v:.4g}") for v in w[keep].tolist()],
                    }
                )
            ctxs.append(tuple(shown))
        out.append(
            LayerNeurons(
                layer=layer,
                hook=top.hooks[j],
                figures=tuple(figs),
                max=tuple(top.max[j].tolist()),
                density=tuple(top.density[j].tolist()),
                contexts=tuple(ctxs),
            )
        )
    base = random_baseline(tokens, k, seed, skip_first=skip_first)
    sample = {"sequences": n, "length": p, "tokens": n * (p - skip_first), "skip_first": skip_first} | (sample or {})
    return NeuronsResult(
        model=name, k=k, min_count=min_count, sample=sample, baseline=base, layers=tuple(out), tokens=tokens
    )


def max_entropy_bits(k: int, vocab: int) -> float:
    """The largest current-token entropy ``k`` contexts can have."""
    return math.log2(max(1, min(k, vocab)))
