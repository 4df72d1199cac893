"""Typographic attacks (Goh et al. 2021): write a word on an image and watch zero-shot classification follow the word.

Zero-shot classification scores an image against one prompt per class ("a handwritten seven"): logits are the
model's scaled cosine similarities (:class:`~mechscope.clip.models.views.ZeroShot`). The attack writes ``word`` on
each image (:func:`mechscope.clip.data.render.write_on`) and asks how often the prediction moves to the ``target``
class. Only images classified correctly before the attack, and not of the target class, count:

* success rate: the fraction of those whose attacked prediction is the target; "any": the fraction whose
  prediction changed at all;
* the margin logit[target] - logit[true], clean and attacked.

Which neurons carry it: the images are split (seeded) into a discovery half and a held-out half. On the discovery
half every neuron of the chosen image-tower layers is scored by attribution patching (the gradient of the margin
times the change that ablating the neuron would make, summed over tokens), the best candidates are then ablated one
by one for real (:func:`mechscope.core.intervene.intervene`) and ranked by how far each alone lowers the margin.
The top ``k`` are ablated together (through :func:`mechscope.core.hooks.hooks`) on the held-out half: the success
rate after, the clean accuracy after (an ablation that breaks the model would "undo" any attack), the fraction of
the attack's margin undone, and the same for ``controls`` sets of ``k`` neurons drawn at random from the other
neurons of the same layers (the control: each set's success, their mean and sample sd).
Ablation replaces a neuron's activation by its mean over the clean images at each token (``mean``) or by 0
(``zero``).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from mechscope.clip.data.render import Placement, check_word, write_on
from mechscope.clip.methods.neurons import layer_name
from mechscope.clip.models.views import ZeroShot
from mechscope.core.errors import MechscopeError
from mechscope.core.hooks import hooks, run_with_cache
from mechscope.core.intervene import intervene
from mechscope.core.results import Result, figure_data
from mechscope.core.stats import sample_sd
from mechscope.core.torch_utils import evaluating

ABLATIONS = ("mean", "zero")


@dataclass(frozen=True)
class AttackNeuron(Result):
    neuron: str
    layer: int
    unit: int
    estimated: float  # attribution patching: the margin change ablating it alone would make (discovery images)
    effect: float  # measured: the margin change when it alone is ablated (discovery images; negative undoes)


@dataclass(frozen=True)
class AttackSummary(Result):
    """The attack's numbers, on all counted images and on the held-out half with the found neurons ablated."""

    n_images: int
    n_counted: int  # correctly classified before the attack and not of the target class
    clean_accuracy: float
    attacked_accuracy: float
    success_rate: float  # targeted: attacked prediction == target (counted images)
    success_rate_any: float  # the prediction changed at all
    margin_clean: float  # mean logit[target] - logit[true]
    margin_attacked: float
    n_discovery: int
    n_heldout: int
    heldout_success: float  # held-out half, before ablation
    heldout_success_ablated: float  # held-out half, the top k neurons ablated
    heldout_clean_accuracy_ablated: float  # clean held-out images, the top k ablated (the model still works?); read
    # it against heldout_clean_accuracy, which is 1 by selection (only correctly classified images are counted)
    margin_ablated: float  # held-out attacked images with the top k ablated
    undone: float  # fraction of the attack's margin shift undone by the ablation (held-out)
    control_success_mean: float  # k random neurons ablated instead (held-out), mean over the random sets
    control_success_sd: float  # sample sd (ddof 1) over the sets (results written before control_successes: ddof 0)
    control_undone_mean: float
    k: int
    heldout_accuracy: float = float("nan")  # attacked held-out images still classified as their true class
    heldout_accuracy_ablated: float = float("nan")  # ... with the top k ablated (back to the true class?)
    given: tuple[str, ...] = ()  # neurons named by the user (``--ablate``, e.g. multimodal ones), ablated instead
    given_success: float = float("nan")  # held-out success with the given neurons ablated
    given_accuracy: float = float("nan")  # held-out attacked images classified as their true class, given ablated
    given_clean_accuracy: float = float("nan")  # clean held-out images, given ablated
    given_undone: float = float("nan")  # fraction of the margin shift undone by ablating the given neurons
    heldout_clean_accuracy: float = float("nan")  # clean held-out images, nothing ablated: 1 by selection
    control_successes: tuple[float, ...] = ()  # held-out success with each random set of k neurons ablated


def attack_images(unit: torch.Tensor, word: str, font: str = "sans", size: int = 10,
                  where: Placement = Placement(0.5, 0.8), fg=1.0, label=None) -> torch.Tensor:  # fmt: skip
    """``word`` written on every image (unit pixels [N,C,S,S])."""
    check_word(word, (font,))
    return torch.stack([write_on(x, word, font, size, where, fg, label) for x in unit]) if len(unit) else unit


@torch.no_grad()
def logits_of(zs: ZeroShot, unit: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    with evaluating(zs):
        return torch.cat([zs(unit[i : i + batch_size]).cpu() for i in range(0, len(unit), batch_size)])


@torch.no_grad()
def token_means(zs: ZeroShot, unit: torch.Tensor, layers: list[int], batch_size: int = 64) -> dict[int, torch.Tensor]:
    """Each layer's mean activation per token over ``unit``: {layer: [P,M]}."""
    sums: dict[int, torch.Tensor] = {}
    for i in range(0, len(unit), batch_size):
        _, cache = run_with_cache(zs, unit[i : i + batch_size], names=[layer_name(x) for x in layers])
        for x in layers:
            s = cache[layer_name(x)].float().sum(0).cpu()
            sums[x] = s if x not in sums else sums[x] + s
    return {x: v / max(len(unit), 1) for x, v in sums.items()}


@contextmanager
def ablated(zs: ZeroShot, neurons: list[tuple[int, int]], means: dict[int, torch.Tensor] | None):
    """Within the block, the neurons' activations replaced by their token means (None: by zero), in every layer."""
    by_layer: dict[int, list[int]] = {}
    for layer, unit in neurons:
        by_layer.setdefault(layer, []).append(unit)

    def edit(layer):
        units = torch.tensor(by_layer[layer])

        def fn(x, hook):
            x = x.clone()
            x[:, :, units] = 0 if means is None else means[layer][:, units].to(x.device, x.dtype)
            return x

        return fn

    with hooks(zs, fwd=[(layer_name(x), edit(x)) for x in by_layer]):
        yield zs


def margins(logits: torch.Tensor, true: torch.Tensor, target: int) -> torch.Tensor:
    """logit[target] - logit[true] per image [N]."""
    true = true.to(logits.device)
    return logits[:, target] - logits[torch.arange(len(logits), device=logits.device), true]


def share_undone(m_attacked: torch.Tensor, m_ablated: torch.Tensor, shift: float) -> float:
    """The fraction of the attack's mean margin shift that an ablation takes back; NaN where the attack shifted no
    margin (nothing to undo), for the top k, the given neurons and every control alike."""
    return float((m_attacked - m_ablated).mean()) / shift if abs(shift) > 1e-12 else float("nan")


def attribution_scores(zs: ZeroShot, attacked: torch.Tensor, true: torch.Tensor, target: int, layers: list[int],
                       means: dict[int, torch.Tensor] | None) -> torch.Tensor:  # fmt: skip
    """Estimated margin change of ablating each neuron alone [L, M] (attribution patching, mean over images)."""
    names = [layer_name(x) for x in layers]
    with evaluating(zs), torch.enable_grad():
        logits, cache = run_with_cache(zs, attacked, names=names, grad=True)
        m = margins(logits, true, target).sum()
        grads = torch.autograd.grad(m, [cache[n] for n in names])
    out = []
    for x, n, g in zip(layers, names, grads, strict=True):
        a = cache[n].detach().float()
        rep = torch.zeros_like(a) if means is None else means[x].to(a)[None].expand_as(a)
        out.append(((rep - a) * g.float()).sum(1).mean(0).cpu())  # [M]
    return torch.stack(out)


def exact_effects(zs: ZeroShot, attacked: torch.Tensor, true: torch.Tensor, target: int,
                  candidates: list[tuple[int, int]], means: dict[int, torch.Tensor] | None) -> list[float]:  # fmt: skip
    """The measured mean margin change of ablating each candidate alone (core.intervene, one mask per neuron)."""
    base = margins(logits_of(zs, attacked), true, target).mean()
    out = {}
    for layer in sorted({x for x, _ in candidates}):
        units = [u for x, u in candidates if x == layer]
        _, cache = run_with_cache(zs, attacked[:1], names=[layer_name(layer)])
        shape = tuple(cache[layer_name(layer)].shape[1:])  # [P,M]
        masks = torch.zeros(len(units), *shape, dtype=torch.bool)
        for i, u in enumerate(units):
            masks[i, :, u] = True
        act = cache[layer_name(layer)]
        rep = 0.0 if means is None else means[layer].to(act.device, act.dtype)
        with torch.no_grad():
            outs = intervene(zs, attacked, layer_name(layer), masks, rep, batch_size=max(256, len(attacked)))
        for u, o in zip(units, outs, strict=True):
            out[(layer, u)] = float(margins(o.float().cpu(), true, target).mean() - base)
    return [out[c] for c in candidates]


@dataclass(frozen=True)
class AttackFinding(Result):
    summary: AttackSummary
    neurons: tuple[AttackNeuron, ...]
    predictions_clean: tuple[int, ...]
    predictions_attacked: tuple[int, ...]
    predictions_ablated: tuple[int, ...]  # attacked images with the top k ablated (every image, for the figures)
    examples: np.ndarray | None = figure_data()  # [n, 2, C, S, S] clean and attacked
    probabilities: np.ndarray | None = figure_data()  # [n, 3, K] clean, attacked, attacked+ablated


def typographic_attack(zs: ZeroShot, unit: torch.Tensor, true: torch.Tensor, target: int, word: str,
                       layers: list[int], k: int = 5, candidates: int = 20, font: str = "sans", size: int = 10,
                       where: Placement = Placement(0.5, 0.8), fg=1.0, label=None, ablation: str = "mean",
                       controls: int = 10, seed: int = 0, n_examples: int = 8,
                       given: tuple[tuple[int, int], ...] = ()) -> AttackFinding:  # fmt: skip
    """The attack on ``unit`` (unit pixels [N,C,S,S], classes ``true`` [N]) and the neurons that carry it.
    ``given``: neurons (layer, unit) named by the user, ablated together on the held-out half as well (for example
    the multimodal neurons ``clip neurons`` found), so their share in the attack is measured beside the found ones'."""
    if ablation not in ABLATIONS:
        raise MechscopeError(f"ablation must be one of {', '.join(ABLATIONS)}, got {ablation!r}")
    n_classes = zs.classes.shape[0]
    if not 0 <= target < n_classes:
        raise MechscopeError(f"target class {target} out of range 0..{n_classes - 1}")
    attacked = attack_images(unit, word, font, size, where, fg, label)
    clean_logits, attacked_logits = logits_of(zs, unit), logits_of(zs, attacked)
    pc, pa = clean_logits.argmax(1), attacked_logits.argmax(1)
    counted = torch.nonzero((pc == true) & (true != target)).flatten()
    if len(counted) < 2:
        raise MechscopeError(
            f"only {len(counted)} image(s) are classified correctly before the attack and are not of the target "
            "class; the attack needs at least 2 (more images, or other prompts)"
        )
    g = torch.Generator().manual_seed(seed)
    order = counted[torch.randperm(len(counted), generator=g)]
    discovery, heldout = order[: len(order) // 2], order[len(order) // 2 :]
    means = token_means(zs, unit, layers) if ablation == "mean" else None

    est = attribution_scores(zs, attacked[discovery], true[discovery], target, layers, means)  # [L,M]
    d_mlp = est.shape[1]
    flat = est.flatten().argsort()[: min(max(candidates, k), est.numel())]  # most negative: undo the most
    cands = [(layers[int(i) // d_mlp], int(i) % d_mlp) for i in flat]
    effects = exact_effects(zs, attacked[discovery], true[discovery], target, cands, means)
    ranked = sorted(zip(cands, effects, [float(est.flatten()[i]) for i in flat], strict=True), key=lambda t: t[1])
    chosen = [c for c, _, _ in ranked[:k]]
    neurons = tuple(AttackNeuron(f"{x}.{u}", x, u, e_est, eff) for (x, u), eff, e_est in ranked)

    t = true[heldout]
    m_clean = margins(clean_logits[heldout], t, target)
    m_att = margins(attacked_logits[heldout], t, target)
    with ablated(zs, chosen, means):
        ab_logits = logits_of(zs, attacked)
        ab_clean = logits_of(zs, unit[heldout])
    m_ab = margins(ab_logits[heldout], t, target)
    shift = float((m_att - m_clean).mean())
    undone = share_undone(m_att, m_ab, shift)

    given_row: dict = {}
    if given:
        with ablated(zs, list(given), means):
            gl = logits_of(zs, attacked[heldout])
            gc = logits_of(zs, unit[heldout])
        given_row = {
            "given": tuple(f"{x}.{u}" for x, u in given),
            "given_success": float((gl.argmax(1) == target).float().mean()),
            "given_accuracy": float((gl.argmax(1) == t).float().mean()),
            "given_clean_accuracy": float((gc.argmax(1) == t).float().mean()),
            "given_undone": share_undone(m_att, margins(gl, t, target), shift),
        }

    ctrl_success, ctrl_undone = [], []
    others = [(x, u) for x in layers for u in range(d_mlp) if (x, u) not in chosen]  # a control holding a found
    for _ in range(controls):  # neuron measures that neuron again (one such set took the success from ~80% to 20%)
        pick = [others[int(i)] for i in torch.randperm(len(others), generator=g)[:k]]
        with ablated(zs, pick, means):
            cl = logits_of(zs, attacked[heldout])
        ctrl_success.append(float((cl.argmax(1) == target).float().mean()))
        ctrl_undone.append(share_undone(m_att, margins(cl, t, target), shift))

    summary = AttackSummary(
        n_images=len(unit), n_counted=len(counted), clean_accuracy=float((pc == true).float().mean()),
        attacked_accuracy=float((pa == true).float().mean()),
        success_rate=float((pa[counted] == target).float().mean()),
        success_rate_any=float((pa[counted] != true[counted]).float().mean()),
        margin_clean=float(margins(clean_logits[counted], true[counted], target).mean()),
        margin_attacked=float(margins(attacked_logits[counted], true[counted], target).mean()),
        n_discovery=len(discovery), n_heldout=len(heldout),
        heldout_success=float((pa[heldout] == target).float().mean()),
        heldout_success_ablated=float((ab_logits[heldout].argmax(1) == target).float().mean()),
        heldout_clean_accuracy_ablated=float((ab_clean.argmax(1) == t).float().mean()),
        margin_ablated=float(m_ab.mean()), undone=undone,
        control_success_mean=float(np.mean(ctrl_success)) if ctrl_success else float("nan"),
        control_success_sd=float(sample_sd(ctrl_success)) if ctrl_success else float("nan"),
        control_undone_mean=float(np.mean(ctrl_undone)) if ctrl_undone else float("nan"), k=len(chosen),
        heldout_accuracy=float((pa[heldout] == t).float().mean()),
        heldout_accuracy_ablated=float((ab_logits[heldout].argmax(1) == t).float().mean()), **given_row,
        heldout_clean_accuracy=float((pc[heldout] == t).float().mean()), control_successes=tuple(ctrl_success),
    )  # fmt: skip
    shown = heldout[:n_examples]
    probs = torch.stack([clean_logits[shown], attacked_logits[shown], ab_logits[shown]], 1).softmax(-1)
    return AttackFinding(summary, neurons, tuple(pc.tolist()), tuple(pa.tolist()), tuple(ab_logits.argmax(1).tolist()),
                         torch.stack([unit[shown], attacked[shown]], 1).numpy(), probs.numpy())  # fmt: skip


@dataclass(frozen=True)
class AttackResult(Result):
    """``clip attack``: a typographic attack, its success rate, and the neurons that carry it (attack.json)."""

    SCHEMA = "mechscope.clip-attack/1"
    FILE = "attack.json"

    model: str
    family: str
    word: str
    target: str  # the class the word names
    classes: tuple[str, ...]
    prompts: tuple[str, ...]
    images: str  # what was attacked
    true_classes: tuple[int, ...]  # per image
    layers: tuple[int, ...]
    ablation: str
    settings: dict
    finding: AttackFinding
    seconds: dict
    weights_sha256: str = ""
    machine: str = ""
    # forward and backward passes of each tower, {"image": ..., "text": ...} (WorkCounter), in passes over the images
    # attacked and over the class prompts
    work: dict | None = None
