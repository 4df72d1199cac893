"""Finding induction heads (Elhage et al. 2021; Olsson et al. 2022).

An induction head attends from a token to the token that followed an earlier occurrence of the
same token, and copies it: on "... A B ... A" it attends to B and raises B's logit. It works
with a previous-token head in an earlier layer, whose output tells each position which token
preceded it; the induction head's keys read that (K-composition).

Protocols (all seeded, tokenizer-free except the real-text one):

1. Repeated random tokens: BOS + N random tokens + the same N again. Induction score = mean
   attention from each second-half position to the position after its token's first
   occurrence. Per-position loss of the model (second half far below the first: in-context
   learning).
2. Prefix matching (Olsson et al.): N' random tokens repeated R times; attention from each
   token in repeats 2..R to every position that followed an earlier occurrence of it.
3. Previous-token score (attention to position − 1) on random tokens and on real text;
   duplicate-token score (attention to earlier copies of the same token).
4. Copying: each head's direct effect on the *centred* logit (unembedding centred over the
   vocabulary; softmax ignores a shared shift) of the token it attends to, through the folded
   analysis view (:mod:`mechscope.models.folding`); and the OV circuit's eigenvalue positivity
   on the folded weights.
5. Causal: mean-, zero- and resample-ablation of every head (:mod:`.head_ablation`): estimated
   for every head by attribution patching, measured exactly on the leading heads and a random
   sample, per sequence over all protocol sequences; the top-k induction heads mean-ablated
   together against k random heads.
6. The circuit: Q/K/V composition of every pair on the folded weights (:mod:`.composition`),
   and key-side path patching (:mod:`.path_patching`) of every candidate previous-token head
   into every induction head; only patching-confirmed edges count as "feeds".

A head is labelled an induction head by Olsson et al.'s two properties: prefix matching (its
prefix-matching score at least the threshold) and copying (positive centred copying).

Memory: attention scores are reduced to per-head numbers inside the hook that sees the pattern;
the residual stream and head outputs of the protocol batch are kept once for the ablations.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch
import torch.nn.functional as F

from mechscope.errors import MechscopeError
from mechscope.hooks import hooks
from mechscope.methods import head_ablation as HA
from mechscope.methods.composition import CompositionResult, all_composition
from mechscope.methods.framework import ov_eigen_positivity
from mechscope.methods.head_ablation import HeadAblation
from mechscope.methods.path_patching import Criterion, PathPatch, induction_edges
from mechscope.models.folding import AnalysisWeights, analysis_weights
from mechscope.models.transformer import HookedTransformer
from mechscope.results import Shown

log = logging.getLogger(__name__)

SCORES = (
    "induction",
    "prefix_matching",
    "previous_token",
    "previous_token_text",
    "duplicate_token",
    "copying",
    "ov_eigen_positivity",
    "ablation_loss_increase",
    "zero_ablation_loss_increase",
    "resample_ablation_loss_increase",
)
ABLATION_SCORES = {
    "mean": "ablation_loss_increase",
    "zero": "zero_ablation_loss_increase",
    "resample": "resample_ablation_loss_increase",
}
MEMORY_BUDGET = 8 * 2**30  # bytes for the cached residual streams, head outputs and gradients


@dataclass(frozen=True)
class Thresholds:
    """A head's label: the first rule it meets, in this order."""

    induction: float = 0.4  # prefix-matching score at least this, and positive centred copying
    previous_token: float = 0.4  # previous-token score on random tokens
    duplicate_token: float = 0.4


@dataclass(frozen=True)
class HeadProtocol:
    n: int = 50  # random tokens per half
    batch: int = 8
    seed: int = 0
    token_range: tuple[int, int] | None = None  # [low, high) token ids; default avoids specials and rare tokens
    prefix_n: int | None = None  # None: 25 (Olsson et al.), or as many as the context allows
    prefix_repeats: int = 4
    prefix_batch: int = 4
    text_batch: int = 4
    text_len: int = 128
    per_head_ablation: bool = True  # exact per-head ablations (estimates are always made)
    exact_top: int = 8  # heads measured exactly per ablation kind, by estimated effect
    exact_random: int = 8  # and a seeded random sample of other heads (mean-ablation)
    path_candidates: int = 3  # besides previous-token heads, the top-K-composition sources tested per target
    top_k: int | None = None  # None: 5, or half the heads of a smaller model
    random_draws: int = 8
    thresholds: Thresholds = field(default_factory=Thresholds)

    def to_dict(self) -> dict:
        return asdict(self)


def default_token_range(model: HookedTransformer) -> tuple[int, int]:
    v = model.cfg.d_vocab
    if v >= 20000:
        return (1000, 10000)  # BPE ids are roughly frequency-ordered: skip specials and bytes, and rare merges
    return (1, v) if v > 1 else (0, v)


def check_protocol(model: HookedTransformer, p: HeadProtocol) -> tuple[HeadProtocol, tuple[int, int]]:
    """The protocol with its defaults resolved for this model, and the token range; or a clear error."""
    if p.prefix_n is None:
        p = replace(p, prefix_n=max(1, min(25, (model.cfg.n_ctx - 1) // max(p.prefix_repeats, 1))))
    if p.top_k is None:
        p = replace(p, top_k=max(1, min(5, model.cfg.n_layers * model.cfg.n_heads // 2)))
    lo, hi = p.token_range or default_token_range(model)
    if not 0 <= lo < hi <= model.cfg.d_vocab:
        raise MechscopeError(f"token range [{lo}, {hi}) outside the vocabulary 0..{model.cfg.d_vocab - 1}")
    for name, value in (("n", p.n), ("batch", p.batch), ("prefix_n", p.prefix_n)):
        if value < 1:
            raise MechscopeError(f"{name} must be at least 1, got {value}")
    for name, value in (("exact_top", p.exact_top), ("exact_random", p.exact_random)):
        if value < 0:
            raise MechscopeError(f"{name} must be 0 or more, got {value}")
    if p.batch < 2:
        raise MechscopeError(f"batch must be at least 2 (mean- and resample-ablation need others), got {p.batch}")
    cfg = model.cfg
    need = 3 * cfg.n_layers * p.batch * (1 + 2 * p.n) * max(cfg.d_model, cfg.n_heads * cfg.d_head) * 4
    if need > MEMORY_BUDGET:
        raise MechscopeError(
            f"batch {p.batch} × {1 + 2 * p.n} positions would cache {need / 2**30:.1f} GiB of activations for the "
            f"ablations (budget {MEMORY_BUDGET / 2**30:.0f} GiB); use a smaller --batch or --n"
        )
    if p.prefix_repeats < 2:
        raise MechscopeError(f"prefix_repeats must be at least 2, got {p.prefix_repeats}")
    longest = max(1 + 2 * p.n, 1 + p.prefix_repeats * p.prefix_n)
    if longest > model.cfg.n_ctx:
        raise MechscopeError(
            f"N = {p.n} needs {1 + 2 * p.n} positions and the prefix protocol {1 + p.prefix_repeats * p.prefix_n}; "
            f"the model's context is {model.cfg.n_ctx}"
        )
    n_heads = model.cfg.n_layers * model.cfg.n_heads
    if not 1 <= p.top_k <= n_heads:
        raise MechscopeError(f"top_k must be between 1 and {n_heads}, got {p.top_k}")
    return p, (lo, hi)


def repeated_tokens(
    model: HookedTransformer, n: int, batch: int, repeats: int, generator: torch.Generator, token_range
) -> torch.Tensor:
    """[batch, 1 + repeats·n]: BOS, then n random tokens repeated ``repeats`` times."""
    lo, hi = token_range
    seq = torch.randint(lo, hi, (batch, n), generator=generator)
    bos = model.cfg.bos_token_id if model.cfg.bos_token_id is not None else lo
    return torch.cat([torch.full((batch, 1), bos), seq.repeat(1, repeats)], 1)


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
        model(tokens.to(model_device(model)))
    return out


def model_device(model: HookedTransformer) -> torch.device:
    return model.W_E.device


def loss_per_position(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of predicting token p+1 at position p: [B, P-1] (float32)."""
    return F.cross_entropy(logits[:, :-1].float().transpose(1, 2), tokens[:, 1:].to(logits.device), reduction="none")


# ---- the main pass: attention scores and copying in hooks ---------------------------------


def _main_pass(model: HookedTransformer, view: AnalysisWeights, tokens: torch.Tensor, n: int):
    """One forward over the repeated tokens: attention scores in hooks, loss, centred copying."""
    cfg = model.cfg
    b, p = tokens.shape
    ind, prev, dup = induction_mask(p, n), previous_token_mask(p), duplicate_mask(tokens)
    names = ("induction", "previous_token", "duplicate_token")
    scores = {k: np.zeros((cfg.n_layers, cfg.n_heads)) for k in names}
    attended, copy_num = {}, {}
    second = slice(n + 1, 2 * n + 1)
    dev = tokens.device

    def on_pattern(layer):
        def hook(pattern, hp):
            for name, mask in zip(names, (ind, prev, dup), strict=True):
                scores[name][layer] = masked_score(pattern, *mask).numpy()
            attended[layer] = pattern[:, :, second].argmax(-1)  # [B, H, n] the key each query attends to most

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
        fwd += [(f"blocks.{i}.attn.hook_pattern", on_pattern(i)), (f"blocks.{i}.attn.hook_z", on_z(i))]
    final = {}
    fwd.append((f"blocks.{cfg.n_layers - 1}.hook_resid_post", lambda x, hp: final.setdefault("resid", x)))
    with torch.no_grad(), hooks(model, fwd=fwd):
        logits = model(tokens)
    resid = final["resid"][:, second].float()  # [B, n, D]
    if cfg.norm == "layernorm":
        resid = resid - resid.mean(-1, keepdim=True)
    scale = (resid.pow(2).mean(-1) + cfg.norm_eps).sqrt()  # [B, n] the final norm's divisor
    scores["copying"] = np.stack(
        [(copy_num[i] / scale[:, None]).mean((0, 2)).cpu().numpy() for i in range(cfg.n_layers)]
    )
    return loss_per_position(logits, tokens).mean(0).cpu(), scores


def post_norm_scale(model: HookedTransformer, layer: int, z: torch.Tensor) -> torch.Tensor:
    """[B, P] divisor of the post-attention norm (Gemma 2/3) from the raw z [B, P, H, Dh]; ones without one."""
    block = model.blocks[layer]
    if block.ln1_post is None:
        return torch.ones(z.shape[:2], device=z.device)
    attn = block.attn
    raw = torch.einsum("bphd,hdm->bpm", z.float(), attn.W_O.float()) + attn.b_O.float()
    return (raw.pow(2).mean(-1) + block.ln1_post.eps).sqrt()


def classify(scores: dict[str, np.ndarray], t: Thresholds) -> list[list[str]]:
    """Olsson et al.'s induction head: prefix matching and copying; then previous-token, duplicate-token."""
    n_layers, n_heads = scores["induction"].shape
    labels = []
    for layer in range(n_layers):
        row = []
        for h in range(n_heads):
            if scores["prefix_matching"][layer, h] >= t.induction and scores["copying"][layer, h] > 0:
                row.append("induction")
            elif scores["previous_token"][layer, h] >= t.previous_token:
                row.append("previous_token")
            elif scores["duplicate_token"][layer, h] >= t.duplicate_token:
                row.append("duplicate_token")
            else:
                row.append("none")
        labels.append(row)
    return labels


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
    with torch.no_grad(), hooks(model, fwd=[(f"blocks.{layer}.attn.hook_pattern", grab(layer)) for layer in layers]):
        model(tokens[:1].to(model_device(model)))
    return out


# ---- the result ---------------------------------------------------------------------------


@dataclass
class HeadsResult(Shown):
    """Everything ``find_induction_heads`` measured; ``to_dict()`` is heads.json."""

    model: str
    protocol: dict
    scores: dict[str, np.ndarray]  # name -> [L, H]
    labels: list[list[str]]
    loss_per_position: list[float]  # mean over the batch, position p predicts token p+1
    loss_first_half: float
    loss_second_half: float
    top_k_ablation: dict
    ablation: dict[str, HeadAblation]  # kind -> estimates for all heads, measurements for some
    composition: CompositionResult
    path_patches: list[PathPatch]
    criterion: Criterion
    kv_groups: int  # query heads per key/value head
    seconds: dict[str, float]
    examples: dict = field(default_factory=dict)  # tokens and patterns for the viewer

    def ranked(self, score: str, label: str | None = None) -> list[dict]:
        s = self.scores[score]
        rows = [
            {"layer": int(layer), "head": int(h), "score": float(s[layer, h])}
            for layer in range(s.shape[0])
            for h in range(s.shape[1])
            if label is None or self.labels[layer][h] == label
        ]
        return sorted(rows, key=lambda r: -r["score"])

    def edges(self) -> list[dict]:
        """Path-patching-confirmed edges: one per (source, key/value head), with every query head's effect."""
        out = []
        for pp in self.path_patches:
            if any(pp.confirmed):
                targets = [h for h, ok in zip(pp.query_heads, pp.confirmed, strict=True) if ok]
                out.append(pp.to_dict() | {"targets": [f"{pp.layer}.{h}" for h in targets]})
        return out

    def table(self, n: int | None = 20):
        """The heads ranked by induction score (the report's table; ``n=None``: every head), as a
        :class:`~mechscope.notebook.Table`."""
        from mechscope.notebook.render import heads_table

        return heads_table(self, n)

    def show(self, layer: int, head: int, model=None):
        """That head's attention viewer on the repeated random tokens (needs the model for a head not captured)."""
        from mechscope.notebook.render import heads_show

        return heads_show(self, layer, head, model)

    def induction_heads(self) -> list[tuple[int, int]]:
        return [(layer, h) for layer, row in enumerate(self.labels) for h, lab in enumerate(row) if lab == "induction"]

    def circuit(self) -> list[dict]:
        """Per induction head: the strongest K-composition sources (folded) and every path-patching test."""
        return [self._circuit_row(layer, h) for layer, h in self.induction_heads() if layer > 0]

    def _circuit_row(self, layer: int, h: int) -> dict:
        comp, g = self.composition, self.kv_groups
        k = comp.into("K", layer, h)
        H = k.shape[1]
        first = h - h % g  # the first query head of this key/value head's group
        tests = [pp for pp in self.path_patches if pp.layer == layer and h in pp.query_heads]
        tests.sort(key=lambda pp: -pp.drop[pp.query_heads.index(h)])

        def test_row(pp: PathPatch) -> dict:
            i = pp.query_heads.index(h)
            ls, hs = pp.source
            return {
                "source": f"{ls}.{hs}",
                "source_label": self.labels[ls][hs],
                "induction_clean": float(pp.clean[i].mean()),
                "induction_patched": float(pp.patched[i].mean()),
                "drop": float(pp.drop[i]),
                "k_composition": float(comp.scores["K"][ls, hs, layer, h]),
                "confirmed": pp.confirmed[i],
                "loss_increase": None if pp.loss_increase is None else float(pp.loss_increase.mean()),
            }

        return {
            "induction_head": {"layer": layer, "head": h, "induction_score": float(self.scores["induction"][layer, h])},
            "kv_head": h // g,
            "shares_keys_with": [f"{layer}.{q}" for q in range(first, first + g) if q != h],
            "top_k_composition": [
                {
                    "head": f"{j // H}.{j % H}",
                    "k_composition": float(k.ravel()[j]),
                    "above_baseline": float(k.ravel()[j] - comp.baseline.mean),
                }
                for j in np.argsort(-k.ravel())[:5]
            ],
            "path_patching": [test_row(pp) for pp in tests],
        }

    def to_dict(self) -> dict:
        return {
            "schema": "mechscope.heads/2",
            "model": self.model,
            "protocol": self.protocol,
            "thresholds": self.protocol["thresholds"],
            # a score that was not measured (no text) is null, not NaN
            "scores": {
                k: [[None if np.isnan(x) else round(float(x), 6) for x in row] for row in np.asarray(v)]
                for k, v in self.scores.items()
            },
            "score_spread": {
                ABLATION_SCORES[k]: np.round(a.spread(), 6).tolist() for k, a in self.ablation.items()
            },
            "labels": self.labels,
            "induction_heads": self.ranked("induction", "induction"),
            "previous_token_heads": self.ranked("previous_token", "previous_token"),
            "duplicate_token_heads": self.ranked("duplicate_token", "duplicate_token"),
            "loss_per_position": self.loss_per_position,
            "loss_first_half": self.loss_first_half,
            "loss_second_half": self.loss_second_half,
            "ablation": {k: a.to_dict() for k, a in self.ablation.items()},
            "top_k_ablation": self.top_k_ablation,
            "composition": self.composition.to_dict(top=20),
            "circuit": self.circuit(),
            "edges": self.edges(),
            "path_patching_criterion": self.criterion.to_dict(),
            "kv_groups": self.kv_groups,
            "seconds": self.seconds,
        }


# ---- the analysis -------------------------------------------------------------------------


def path_tests(labels, composition: CompositionResult, kv_groups: int, extra: int) -> dict:
    """Which sources to path-patch into each induction head's key/value head: every earlier
    previous-token head, and the ``extra`` strongest K-composition sources of each query head."""
    tests: dict[tuple[int, int], list[tuple[int, int]]] = {}
    H = len(labels[0])
    for layer, row in enumerate(labels):
        for h, lab in enumerate(row):
            if lab != "induction" or layer == 0:
                continue
            key = (layer, h // kv_groups)
            srcs = tests.setdefault(key, [])
            prev = [(lay, hh) for lay in range(layer) for hh in range(H) if labels[lay][hh] == "previous_token"]
            k = composition.into("K", layer, h).ravel()
            top = [divmod(int(j), H) for j in np.argsort(-k)[:extra]]
            for src in prev + top:
                if src not in srcs:
                    srcs.append(src)
    return tests


def _top_k(model, cap, tokens, n, scores, k, draws, g) -> dict:
    """The top-k heads by induction score mean-ablated together, against k random heads."""
    cfg = model.cfg
    flat = scores["induction"].flatten()
    top = [divmod(int(i), cfg.n_heads) for i in np.argsort(-flat)[:k]]
    rnd = []
    for _ in range(draws):
        pick = torch.randperm(len(flat), generator=g)[:k].tolist()
        rnd.append(HA.group(model, cap, tokens, n, [divmod(i, cfg.n_heads) for i in pick]))
    return {
        "k": k,
        "heads": [{"layer": layer, "head": h} for layer, h in top],
        "ablation": "mean (per position, over the batch)",
        "induction_heads_loss_increase": HA.group(model, cap, tokens, n, top),
        "random_heads_loss_increase_mean": float(np.mean(rnd)),
        "random_heads_loss_increase_std": float(np.std(rnd)),
        "random_draws": rnd,
    }


def check_heads(model: HookedTransformer, heads) -> None:
    cfg = model.cfg
    for layer, h in heads or []:
        if not (0 <= layer < cfg.n_layers and 0 <= h < cfg.n_heads):
            raise MechscopeError(
                f"head {layer}.{h} out of range: layers 0..{cfg.n_layers - 1}, heads 0..{cfg.n_heads - 1}"
            )


def find_induction_heads(
    model: HookedTransformer,
    protocol: HeadProtocol | None = None,
    text_tokens: torch.Tensor | None = None,
    name: str = "",
    show: list[tuple[int, int]] | None = None,
    progress=None,
) -> HeadsResult:
    """Run every protocol on ``model``; ``text_tokens`` [B, P] enables the real-text scores."""
    model.check_complete()
    p, token_range = check_protocol(model, protocol or HeadProtocol())
    check_heads(model, show)
    cfg = model.cfg
    dev = model_device(model)
    g = torch.Generator().manual_seed(p.seed)
    seconds: dict[str, float] = {}
    say = progress or (lambda msg: None)
    clock = [time.perf_counter()]

    def lap(name):
        now = time.perf_counter()
        seconds[name] = now - clock[0]
        clock[0] = now

    say("folded weights")
    view = analysis_weights(model)
    lap("folding")
    say("repeated random tokens")
    tokens = repeated_tokens(model, p.n, p.batch, 2, g, token_range).to(dev)
    loss, scores = _main_pass(model, view, tokens, p.n)
    lap("repeated_tokens")
    say("prefix matching")
    ptoks = repeated_tokens(model, p.prefix_n, p.prefix_batch, p.prefix_repeats, g, token_range)
    scores |= attention_scores(model, ptoks, {"prefix_matching": prefix_mask(ptoks, 1 + p.prefix_n)})
    lap("prefix_matching")
    if text_tokens is not None:
        say("previous-token heads on real text")
        text_mask = previous_token_mask(text_tokens.shape[1])
        scores |= attention_scores(model, text_tokens, {"previous_token_text": text_mask})
    else:
        scores["previous_token_text"] = np.full((cfg.n_layers, cfg.n_heads), np.nan)
    lap("real_text")
    say("OV circuits")
    scores["ov_eigen_positivity"] = ov_eigen_positivity(view)
    lap("ov_circuits")

    say("per-head ablations (attribution patching, then exact on the leading heads)")
    cap = HA.capture(model, tokens, p.n)
    top, rnd = (p.exact_top, p.exact_random) if p.per_head_ablation else (0, 0)
    by_induction = [divmod(int(i), cfg.n_heads) for i in np.argsort(-scores["induction"].flatten())]
    always = by_induction[: p.top_k] if p.per_head_ablation else []
    ablation = HA.ablate_heads(model, cap, tokens, p.n, top, rnd, g, always=always)
    for kind, a in ablation.items():
        scores[ABLATION_SCORES[kind]] = a.best()
    lap("per_head_ablation")
    labels = classify(scores, p.thresholds)
    say("top-k ablation")
    top_k = _top_k(model, cap, tokens, p.n, scores, p.top_k, p.random_draws, g)
    lap("top_k_ablation")
    say("composition")
    composition = all_composition(view, seed=p.seed)
    lap("composition")
    say("path patching")
    kv_groups = cfg.n_heads // cfg.kv_heads
    tests = path_tests(labels, composition, kv_groups, p.path_candidates)
    patches = induction_edges(model, cap, tokens, p.n, tests, induction_mask(tokens.shape[1], p.n))
    lap("path_patching")

    by_previous = [divmod(int(i), cfg.n_heads) for i in np.argsort(-scores["previous_token"].flatten())]
    chosen = list(dict.fromkeys(list(show or []) + by_induction[:3] + by_previous[:2]))  # heads shown in the viewer
    examples = {
        "heads": [f"{layer}.{h}" for layer, h in chosen],
        "repeated": {"tokens": tokens[0].tolist(), "patterns": capture_patterns(model, tokens, chosen)},
    }
    if text_tokens is not None:
        examples["text"] = {"tokens": text_tokens[0].tolist(), "patterns": capture_patterns(model, text_tokens, chosen)}
    lap("examples")
    n = p.n
    return HeadsResult(
        model=name or cfg.name,
        protocol=p.to_dict() | {"token_range": list(token_range)},
        scores=scores,
        labels=labels,
        loss_per_position=loss.tolist(),
        loss_first_half=float(loss[1:n].mean()),
        loss_second_half=float(loss[n + 1 : 2 * n].mean()),
        top_k_ablation=top_k,
        ablation=ablation,
        composition=composition,
        path_patches=patches,
        criterion=Criterion(),
        kv_groups=kv_groups,
        seconds=seconds,
        examples=examples,
    )
