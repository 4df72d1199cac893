"""Small per-layer transcoders for a transformer's MLPs, trained here with the core's trainer (for attribution
graphs when no transcoders are at hand).

Data: contexts of ``context`` tokens of a text (tinyshakespeare by default), BOS first; positions from 1 on (the
first token's residual is an outlier, left to the error node). For a group of layers at a time, one forward pass per
batch of contexts (stopped after the group's last layer) collects each MLP's input (``blocks.L.mlp.hook_in``, after
ln2) and output (``blocks.L.hook_mlp_out``) in float16; then each layer's transcoder is trained on its (input,
output) pairs, shuffled with the seed, for ``epochs`` passes, by :func:`mechscope.core.dictionaries.train`
(TopK by default: no sparsity coefficient to tune). Quality on ``eval_tokens`` held-out positions: explained
variance of the MLP output, L0, and the share of the output's norm that is left to the error node.

``crosslayer=True`` trains one cross-layer transcoder (:mod:`mechscope.lm.methods.crosslayer`) instead, with
``d_sae`` features per layer (so the same number of features in all as the per-layer set): every layer harvested in
one pass, then Adam on ``Σ_l' mean_n ||y_l' - ŷ_l'||²`` (each layer's MSE, summed over dimensions and layers, in
units where each layer's inputs and outputs have mean squared norm D, the factors folded into the weights after)
plus the per-layer code's sparsity penalty (ReLU: L1 of each feature times the norm of its concatenated decoders;
JumpReLU: L0 through the step's pseudo-derivative; TopK per layer: none). Each feature's concatenated decoder is kept
at unit norm (its gradient's parallel part removed before each step), as the core keeps decoder rows; the encoder
and decoder start from the seed and the batches are shuffled with it, so a run is deterministic on one machine.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import asdict, dataclass

import torch

from mechscope.core.dictionaries import DictionaryConfig, TrainConfig, train
from mechscope.core.errors import MechscopeError
from mechscope.core.hooks import hooks
from mechscope.core.results import Result, figure_data
from mechscope.core.torch_utils import evaluating
from mechscope.core.validate import settings_or
from mechscope.lm.methods.crosslayer import CrossLayerTranscoder
from mechscope.lm.methods.transcoders import Transcoders
from mechscope.lm.models.transformer import HookedTransformer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TranscoderTraining:
    """How to train: ``tokens`` training positions per layer, in contexts of ``context`` tokens; ``d_sae``
    latents (None: ``expansion`` × d_model), ``architecture`` and ``k``; ``epochs`` over the data; ``group`` layers
    harvested per forward pass; ``layers``: the MLP layers to train (None: all); every other layer gets an empty
    transcoder, so that its whole MLP output is an error node in a graph."""

    tokens: int = 65_536
    eval_tokens: int = 4096
    context: int = 128
    d_sae: int | None = None
    expansion: int = 4
    architecture: str = "topk"
    k: int = 16
    epochs: int = 2
    batch: int = 1024
    lr: float = 1e-3
    group: int = 10
    seed: int = 0
    layers: tuple[int, ...] | None = None
    crosslayer: bool = False

    def validate(self) -> None:
        from mechscope.core.validate import check_int

        check_int(self.tokens, "tokens", 256, 10**9)
        check_int(self.eval_tokens, "eval_tokens", 0, 10**8)
        check_int(self.context, "context", 2, 10**6)
        check_int(self.epochs, "epochs", 1, 1000)
        check_int(self.batch, "batch", 1, 10**6)
        check_int(self.group, "group", 1, 10**4)
        check_int(self.expansion, "expansion", 1, 1024)
        if self.d_sae is not None:
            check_int(self.d_sae, "d_sae", 1, 10**7)
        if self.layers is not None:
            if not self.layers:
                raise MechscopeError("layers must name at least one layer (or be None: all)")
            for i in self.layers:
                check_int(i, "layer", 0, 10**4)
        if self.crosslayer and self.layers is not None:
            raise MechscopeError("a cross-layer transcoder spans every MLP layer: leave layers unset")
        if self.crosslayer and self.architecture not in ("topk", "relu", "jumprelu"):
            raise MechscopeError(f"a cross-layer transcoder is topk, relu or jumprelu, not {self.architecture!r}")


@dataclass(frozen=True)
class TrainedTranscoders(Result):
    """What was trained and how well: per layer ``{"layer", "explained_variance", "l0", "error_share", "dead",
    "seconds"}``; ``transcoders`` (not in the JSON) the set."""

    model: str
    settings: dict
    text: str
    contexts: int
    layers: tuple[dict, ...]
    seconds: float
    transcoders: object = figure_data()

    def mean(self, key: str) -> float:
        vals = [r[key] for r in self.layers if r.get(key) is not None and math.isfinite(r[key])]
        return sum(vals) / len(vals) if vals else float("nan")


class _Stop(Exception):
    pass


def _contexts(ids: list[int], n_ctx: int, bos: int | None, count: int) -> torch.Tensor:
    body = n_ctx - (1 if bos is not None else 0)
    rows = []
    for i in range(count):
        chunk = ids[i * body : (i + 1) * body]
        if len(chunk) < body:
            break
        rows.append(([bos] if bos is not None else []) + chunk)
    if not rows:
        raise MechscopeError(f"the text is too short for one context of {n_ctx} tokens")
    return torch.tensor(rows)


@torch.no_grad()
def _harvest(model: HookedTransformer, ctx: torch.Tensor, layers: list[int], skip: int, batch: int = 8):
    """Per layer (inputs, outputs) float16 [n, D] over every position from ``skip`` on."""
    xs = {i: [] for i in layers}
    ys = {i: [] for i in layers}
    last = max(layers)

    def grab(store, i, stop=False):
        def fn(x, hook):
            store[i].append(x[:, skip:].reshape(-1, x.shape[-1]).to(torch.float16).cpu())
            if stop:
                raise _Stop

        return fn

    fwd = [(f"blocks.{i}.mlp.hook_in", grab(xs, i)) for i in layers]
    fwd += [(f"blocks.{i}.hook_mlp_out", grab(ys, i, i == last)) for i in layers]
    dev = next(model.parameters()).device
    with hooks(model, fwd=fwd):
        for b in range(0, len(ctx), batch):
            with contextlib.suppress(_Stop):
                model(ctx[b : b + batch].to(dev))
    return {i: torch.cat(xs[i]) for i in layers}, {i: torch.cat(ys[i]) for i in layers}


def train_transcoders(
    model: HookedTransformer,
    ids: list[int],
    settings: TranscoderTraining | None = None,
    *,
    text_name: str = "",
    progress=None,
) -> TrainedTranscoders:
    """One transcoder per MLP layer of ``model``, trained on the token ids ``ids`` (a tokenised text)."""
    s = settings_or(settings, TranscoderTraining)
    s.validate()
    cfg = model.cfg
    if cfg.attn_only:
        raise MechscopeError(f"{cfg.name or 'this model'} has no MLPs: an attribution graph needs no transcoders")
    if cfg.norm_after_residual:
        raise MechscopeError("training transcoders for a post-LN model is not supported")
    start = time.perf_counter()
    bos = cfg.bos_token_id
    skip = 1 if bos is not None else 0
    context = min(s.context, cfg.n_ctx)
    per_ctx = context - skip
    n_ctx = math.ceil((s.tokens + s.eval_tokens) / per_ctx)
    ctx = _contexts(ids, context, bos, n_ctx)
    if len(ctx) * per_ctx < s.tokens + s.eval_tokens:
        log.warning(
            "the text gives %d positions, fewer than %d asked for", len(ctx) * per_ctx, s.tokens + s.eval_tokens
        )
    d_sae = s.d_sae or s.expansion * cfg.d_model

    def record(tcs, rows) -> TrainedTranscoders:
        settings = {**asdict(s), "d_sae": d_sae}
        return TrainedTranscoders(model=cfg.name, settings=settings, text=text_name, contexts=len(ctx),
                                  layers=tuple(rows), seconds=time.perf_counter() - start, transcoders=tcs)  # fmt: skip

    if s.crosslayer:
        with evaluating(model):
            return record(*_train_crosslayer(model, ctx, s, d_sae, skip, progress))
    dcfg = DictionaryConfig(
        d_in=cfg.d_model,
        d_sae=d_sae,
        architecture=s.architecture,
        k=s.k if s.architecture in ("topk", "batchtopk") else None,
        transcoder=True,
        d_out=cfg.d_model,
        normalize_activations="expected_average_only_in",
    )
    chosen = sorted(set(s.layers)) if s.layers is not None else list(range(cfg.n_layers))
    if chosen[-1] >= cfg.n_layers:
        raise MechscopeError(f"layer {chosen[-1]} outside the model's 0..{cfg.n_layers - 1}")
    g = torch.Generator().manual_seed(s.seed)
    dicts, rows = {}, []
    with evaluating(model):
        for g0 in range(0, len(chosen), s.group):
            layers = chosen[g0 : g0 + s.group]
            if progress:
                progress(f"harvesting layers {layers[0]}..{layers[-1]} over {len(ctx)} contexts")
            xs, ys = _harvest(model, ctx, layers, skip)
            for i in layers:
                t0 = time.perf_counter()
                x, y = xs.pop(i), ys.pop(i)
                n_eval = min(s.eval_tokens, len(x) // 5)
                xe, ye, xt, yt = x[:n_eval], y[:n_eval], x[n_eval:], y[n_eval:]
                tc = TrainConfig(lr=s.lr, seed=s.seed + i, progress=False, log_every=50, init_rows=min(4096, len(xt)))
                result = train(dcfg, _batches(xt, yt, s.batch, s.epochs, g), tc)
                d = result.model.eval()
                q = _quality(d, xe.float(), ye.float())
                q |= {"layer": i, "seconds": time.perf_counter() - t0, "steps": result.steps}
                rows.append(q)
                dicts[i] = d
                if progress:
                    progress(
                        f"layer {i}: explained variance {q['explained_variance']:.3f}, L0 {q['l0']:.1f}, "
                        f"error share {q['error_share']:.3f} ({q['seconds']:.0f} s)"
                    )
    if len(chosen) == cfg.n_layers:
        tcs = Transcoders.of([dicts[i] for i in chosen], source="trained here")
    else:
        tcs = Transcoders.padded(
            model,
            dicts,
            source=f"trained here for layers {','.join(map(str, chosen))} (the other MLPs: error nodes only)",
        )
    return record(tcs, rows)


def _batches(x: torch.Tensor, y: torch.Tensor, batch: int, epochs: int, g: torch.Generator):
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=g)
        for b in range(0, len(order) - batch + 1, batch):
            idx = order[b : b + batch]
            yield x[idx].float(), y[idx].float()


@torch.no_grad()
def _quality(d, x: torch.Tensor, y: torch.Tensor) -> dict:
    if len(x) == 0:
        return {"explained_variance": float("nan"), "l0": float("nan"), "error_share": float("nan"), "dead": None}
    out, f = d(x)
    err = y - out
    ev = 1 - float(err.pow(2).sum() / (y - y.mean(0)).pow(2).sum())
    return {
        "explained_variance": ev,
        "l0": float((f > 0).float().sum(-1).mean()),
        "error_share": float(err.norm(dim=-1).mean() / y.norm(dim=-1).mean()),
        "dead": int(((f > 0).sum(0) == 0).sum()),
    }


# ---- cross-layer transcoders --------------------------------------------------------------------------------


def _train_crosslayer(
    model: HookedTransformer, ctx: torch.Tensor, s: TranscoderTraining, d_sae: int, skip: int, progress
):
    """One CLT over every MLP layer (see the module docstring): (the CLT, folded to raw units; quality rows)."""
    from mechscope.core.dictionaries.activations import jumprelu, step, topk_relu
    from mechscope.core.dictionaries.initialisation import decoder_bias_init, norm_scale

    cfg = model.cfg
    L, D = cfg.n_layers, cfg.d_model
    if progress:
        progress(f"harvesting layers 0..{L - 1} over {len(ctx)} contexts")
    xs, ys = _harvest(model, ctx, list(range(L)), skip)
    X = torch.stack([xs.pop(i) for i in range(L)], 1)  # [n, L, D] float16
    Y = torch.stack([ys.pop(i) for i in range(L)], 1)
    n_eval = min(s.eval_tokens, len(X) // 5)
    xe, ye, xt, yt = X[:n_eval], Y[:n_eval], X[n_eval:], Y[n_eval:]
    t0 = time.perf_counter()
    init = min(4096, len(xt))
    s_in = torch.tensor([norm_scale(xt[:init, i].float()) for i in range(L)])  # [L]
    s_out = torch.tensor([norm_scale(yt[:init, i].float()) for i in range(L)])
    g = torch.Generator().manual_seed(s.seed)
    arch = s.architecture
    clt = CrossLayerTranscoder(L, D, d_sae, arch, s.k if arch == "topk" else None, generator=g)
    with torch.no_grad():
        for i in range(L):
            clt.b_dec[i] = decoder_bias_init(yt[:init, i].double() * float(s_out[i]), "geometric_median").float()
    l1, l0, bw = DictionaryConfig.l1_coefficient, DictionaryConfig.l0_coefficient, DictionaryConfig.bandwidth
    opt = torch.optim.Adam(clt.parameters(), lr=s.lr, foreach=False)
    steps = 0
    clt.train()
    for x, y in _batches(xt, yt, s.batch, s.epochs, g):  # [B, L, D]
        xn, yn = x * s_in[None, :, None], y * s_out[None, :, None]
        pres = [clt.pre_activations(i, xn[:, i]) for i in range(L)]  # [B, F] each
        if arch == "topk":
            f = [topk_relu(z, s.k) for z in pres]
        elif arch == "relu":
            f = [z.relu() for z in pres]
        else:
            f = [jumprelu(z, clt.threshold[i].clamp_min(0), bw) for i, z in enumerate(pres)]
        out = clt.decode_all(torch.stack(f, 1))
        loss = (out - yn).pow(2).sum(-1).mean(0).sum()  # Σ over layers of each layer's MSE
        if arch == "relu":
            norms = [clt.W_dec[i].flatten(1).norm(dim=1) for i in range(L)]
            loss = loss + l1 * sum((fi * n).sum(-1).mean() for fi, n in zip(f, norms, strict=True))
        elif arch == "jumprelu":
            loss = loss + l0 * sum(
                step(z, clt.threshold[i].clamp_min(0), bw).sum(-1).mean() for i, z in enumerate(pres)
            )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():
            for w in clt.W_dec:  # each feature's concatenated decoder stays a unit vector
                if w.grad is not None:
                    unit = w / w.flatten(1).norm(dim=1).clamp_min(1e-12)[:, None, None]
                    w.grad.sub_((w.grad * unit).sum((1, 2), keepdim=True) * unit)
        opt.step()
        with torch.no_grad():
            for w in clt.W_dec:
                w.div_(w.flatten(1).norm(dim=1).clamp_min(1e-12)[:, None, None])
            if arch == "jumprelu":
                clt.threshold.clamp_(min=0)
        steps += 1
    clt = fold_scales(clt, s_in, s_out).eval()
    clt.source = "trained here (cross-layer)"
    seconds = time.perf_counter() - t0
    rows = _quality_crosslayer(clt, xe.float(), ye.float())
    for r in rows:
        r |= {"seconds": seconds / L, "steps": steps}
        if progress:
            progress(
                f"layer {r['layer']}: explained variance {r['explained_variance']:.3f}, L0 {r['l0']:.1f}, "
                f"error share {r['error_share']:.3f}"
            )
    return clt, rows


@torch.no_grad()
def fold_scales(clt: CrossLayerTranscoder, s_in: torch.Tensor, s_out: torch.Tensor) -> CrossLayerTranscoder:
    """Fold the per-layer scales a CLT was trained with (``x' = s_in[l] x``, ``y' = s_out[l] y``) into its weights,
    in place: ``W_enc[l] *= s_in[l]``, ``W_dec[l -> l'] /= s_out[l']``, ``b_dec[l'] /= s_out[l']`` (the features are
    unchanged; a skip path would need ``W_skip[l] *= s_in[l] / s_out[l]``)."""
    clt.W_enc.mul_(s_in[:, None, None].to(clt.W_enc))
    for i in range(clt.n_layers):
        clt.W_dec[i].div_(s_out[i:][None, :, None].to(clt.W_enc))
    clt.b_dec.div_(s_out[:, None].to(clt.W_enc))
    if clt.skip:
        clt.W_skip.mul_((s_in / s_out)[:, None, None].to(clt.W_enc))
    return clt


@torch.no_grad()
def _quality_crosslayer(clt: CrossLayerTranscoder, x: torch.Tensor, y: torch.Tensor) -> list[dict]:
    """Per layer: explained variance of its MLP output, its features' L0, error share, dead features (held out)."""
    if len(x) == 0:
        nan = float("nan")
        return [
            {"layer": i, "explained_variance": nan, "l0": nan, "error_share": nan, "dead": None}
            for i in range(clt.n_layers)
        ]
    out, f = clt(x)
    rows = []
    for i in range(clt.n_layers):
        err = y[:, i] - out[:, i]
        rows.append(
            {
                "layer": i,
                "explained_variance": 1 - float(err.pow(2).sum() / (y[:, i] - y[:, i].mean(0)).pow(2).sum()),
                "l0": float((f[:, i] > 0).float().sum(-1).mean()),
                "error_share": float(err.norm(dim=-1).mean() / y[:, i].norm(dim=-1).mean()),
                "dead": int(((f[:, i] > 0).sum(0) == 0).sum()),
            }
        )
    return rows
