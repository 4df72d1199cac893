"""Watching induction heads form: small transformers trained from scratch (attention-only by default).

Olsson et al. (2022) found that induction heads appear abruptly during training, together with
a sharp gain in in-context learning, and only in models with at least two attention layers.
This module trains such a model (the same :class:`HookedTransformer`, MLPs off), checkpoints it
at log-spaced steps, and measures at every checkpoint: training and held-out loss, the
in-context-learning score, every head's induction and previous-token scores on repeated
random tokens, and K-composition from every layer-0 head into every layer-1 head. The phase
change is then found in the data (:func:`detect_phase_change`).

Data:

* ``synthetic`` (default): random tokens in which a random-length span (``min_span``..ctx/2)
  is repeated later in the sequence: copying is the only thing there is to learn.
* ``text``: character-level text (tinyshakespeare by default); ``repeat_fraction`` of each
  batch additionally carries a repeated span, to make the induction signal stronger.

MLPs: ``mlp="none"`` (default) is the attention-only model, unchanged bit for bit; ``"gelu"`` and
``"solu"`` add an MLP of ``d_mlp`` hidden units (default 4 × d_model) to every block, with GELU
or with SoLU followed by its LayerNorm (Elhage et al. 2022; ``act="solu_ln"`` of the model), for
``lm solu-compare`` and ``lm neurons``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from mechscope.core.errors import MechscopeError, about
from mechscope.core.outputs import save_tensors
from mechscope.core.paths import by_step
from mechscope.core.results import Result, check_schema
from mechscope.core.torch_utils import Timer, combine_work, evaluating
from mechscope.core.validate import check_count, check_lr, check_seed, check_types
from mechscope.lm.methods.composition import composition_scores
from mechscope.lm.methods.scores import attention_scores, induction_mask, previous_token_mask
from mechscope.lm.models.folding import analysis_weights
from mechscope.lm.models.transformer import SOLU_LN, HookedTransformer, TransformerConfig

log = logging.getLogger(__name__)


MLP_ACTS = {"none": None, "gelu": "gelu", "solu": SOLU_LN}  # --mlp -> the model's act
MAX_STEPS = 10_000_000  # a toy run of more steps than this is a typo (about 5 days at 20 steps/s)
MAX_WIDTH = 65_536


@dataclass(frozen=True)
class ToyTraining(Result):
    """``lm train-toy``'s record: ``series`` is what training.json holds (config, the measurements at every
    checkpoint, the phase change, the circuit; ``series["control"]`` the 1-layer control's, when trained).

    ``work``: the forward and backward passes through the blocks (:func:`train_toy` counts each model's training
    steps and checkpoint measurements), in passes over the training split's tokens for text data and over one
    training batch's (``batch`` × ``n_ctx``) for synthetic data, drawn afresh every step (``pass_over`` says which);
    the command's whole work (with ``parts``: each model's) when the 1-layer control was trained too. In
    training.json it is the entry ``work`` beside the series (the control's own sits in ``control``)."""

    SCHEMA = "mechscope.toy/1"
    FILE = "training.json"

    series: dict
    work: dict | None = None  # forward and backward passes, in passes over the training split or one batch (above)

    def to_dict(self) -> dict:
        work = {} if self.work is None else {"work": self.work}
        return {"schema": self.SCHEMA, **self.series, **work}

    @classmethod
    def from_dict(cls, d: dict) -> ToyTraining:
        # ``versions``: what made the file (core.outputs.write_json), not a series
        return cls({k: v for k, v in d.items() if k not in ("schema", "work", "versions")}, d.get("work"))

    def __repr__(self) -> str:
        p = self.series.get("phase_change", {})
        return f"ToyTraining({self.series['config']['layers']} layers, phase change detected: {p.get('detected')})"


@dataclass(frozen=True)
class ToyConfig:
    layers: int = 2
    data: str = "synthetic"  # synthetic | text
    steps: int | None = None  # None: 2,500 (synthetic) or 8,000 (text)
    d_model: int = 64
    n_heads: int = 4
    n_ctx: int = 64
    vocab: int = 64  # synthetic only; text uses its characters
    batch: int = 64
    lr: float = 1e-3
    warmup: int = 100
    seed: int = 0
    checkpoints: int = 30
    min_span: int = 8
    repeat_fraction: float = 0.5  # text only: share of sequences given a repeated span
    mlp: str = "none"  # none (attention-only) | gelu | solu (SoLU + LayerNorm)
    d_mlp: int | None = None  # None: 4 * d_model when there are MLPs

    @property
    def mlp_width(self) -> int | None:
        """Hidden units per MLP (None for the attention-only model)."""
        if self.mlp == "none":
            return None
        return self.d_mlp if self.d_mlp is not None else 4 * self.d_model

    @property
    def n_steps(self) -> int:
        return self.steps if self.steps is not None else (2500 if self.data == "synthetic" else 8000)

    def validate(self) -> None:
        check_types(self, {"layers": "--layers", "steps": "--steps", "d_mlp": "--d-mlp"})
        if self.layers not in (1, 2):
            raise MechscopeError(f"--layers must be 1 or 2, got {self.layers}")
        if self.data not in ("synthetic", "text"):
            raise MechscopeError(f"--data must be synthetic or text, got {self.data!r}")
        check_count(self.n_steps, "--steps", 1, MAX_STEPS)
        if self.mlp not in MLP_ACTS:
            raise MechscopeError(f"--mlp must be one of {', '.join(MLP_ACTS)}, got {self.mlp!r}")
        if self.mlp == "none" and self.d_mlp is not None:
            raise MechscopeError(f"--d-mlp {self.d_mlp} needs MLPs: pass --mlp gelu or --mlp solu")
        if self.d_mlp is not None:
            check_count(self.d_mlp, "--d-mlp", 1, MAX_WIDTH)
        check_seed(self.seed)
        check_lr(self.lr, "lr")
        for name, high in (("d_model", MAX_WIDTH), ("n_heads", 1024), ("n_ctx", 65_536), ("vocab", 1_000_000),
                           ("batch", 65_536), ("checkpoints", 10_000)):  # fmt: skip
            check_count(getattr(self, name), name, 2 if name == "vocab" else 1, high)  # tokens are drawn from 1
        if self.d_model % self.n_heads:
            raise MechscopeError(f"d_model {self.d_model} is not a multiple of n_heads {self.n_heads}")
        if self.warmup < 1 or not 0 <= self.repeat_fraction <= 1:
            raise MechscopeError(f"warmup must be at least 1 and repeat_fraction in [0, 1], got {self.warmup}, "
                                 f"{self.repeat_fraction}")  # fmt: skip
        if self.min_span < 1 or 2 * self.min_span > self.n_ctx:
            raise MechscopeError(f"min_span {self.min_span} does not fit twice in a context of {self.n_ctx}")


def checkpoint_steps(n: int, count: int) -> list[int]:
    """0 and about ``count`` log-spaced steps up to ``n``."""
    steps = {0, n} | {int(round(x)) for x in np.logspace(0, math.log10(max(n, 1)), count)}
    return sorted(s for s in steps if 0 <= s <= n)


def repeat_spans(x: torch.Tensor, min_span: int, generator: torch.Generator, rows: torch.Tensor | None = None):
    """Copy a random span of each row to a random later place in the same row (vectorised)."""
    b, length = x.shape
    s = torch.randint(min_span, length // 2 + 1, (b,), generator=generator)
    a = (torch.rand(b, generator=generator) * (length - 2 * s + 1)).long()
    d = a + s + (torch.rand(b, generator=generator) * (length - (a + 2 * s) + 1)).long()
    idx = torch.arange(length)[None]
    inside = (idx >= d[:, None]) & (idx < (d + s)[:, None])
    if rows is not None:
        inside &= rows[:, None]
    src = (idx - d[:, None] + a[:, None]).clamp(0, length - 1)
    return torch.where(inside, x.gather(1, src), x)


class Data:
    """Batches of ``n_ctx + 1`` tokens (inputs and next-token targets)."""

    def __init__(self, cfg: ToyConfig, text: str | None = None) -> None:
        self.cfg = cfg
        if cfg.data == "synthetic":
            self.vocab = cfg.vocab
            self.chars = None
            return
        if not text or not text.strip():
            raise MechscopeError("the text is empty")
        self.chars = sorted(set(text))
        self.vocab = len(self.chars)
        if self.vocab < 2:
            raise MechscopeError(f"the text has {self.vocab} distinct character: a language model needs at least 2")
        lookup = {c: i for i, c in enumerate(self.chars)}
        ids = torch.tensor([lookup[c] for c in text], dtype=torch.long)
        split = int(len(ids) * 0.9)
        self.train_ids, self.val_ids = ids[:split], ids[split:]
        if len(self.val_ids) < cfg.n_ctx + 2:
            raise MechscopeError(
                f"the text has {len(ids)} characters: too short for a context of {cfg.n_ctx} "
                f"(it needs at least {10 * (cfg.n_ctx + 2)})"
            )

    def batch(self, generator: torch.Generator, size: int, held_out: bool = False) -> torch.Tensor:
        c = self.cfg
        if self.chars is None:
            x = torch.randint(1, self.vocab, (size, c.n_ctx + 1), generator=generator)
            return repeat_spans(x, c.min_span, generator)
        ids = self.val_ids if held_out else self.train_ids
        starts = torch.randint(0, len(ids) - c.n_ctx - 1, (size,), generator=generator)
        x = torch.stack([ids[s : s + c.n_ctx + 1] for s in starts.tolist()])
        rows = torch.rand(size, generator=generator) < c.repeat_fraction
        return repeat_spans(x, c.min_span, generator, rows)


def make_model(cfg: ToyConfig, vocab: int) -> HookedTransformer:
    mlp = {"attn_only": True} if cfg.mlp == "none" else {"d_mlp": cfg.mlp_width, "act": MLP_ACTS[cfg.mlp]}
    tc = TransformerConfig(
        d_model=cfg.d_model,
        n_layers=cfg.layers,
        n_heads=cfg.n_heads,
        d_head=cfg.d_model // cfg.n_heads,
        d_vocab=vocab,
        n_ctx=cfg.n_ctx,
        positional="learned",
        norm="layernorm",
        tie_embeddings=False,  # tied, the direct path predicts the current token and training stalls
        bos_token_id=0,
        family="toy",
        name=f"attn-only-{cfg.layers}L" if cfg.mlp == "none" else f"{cfg.layers}L-{cfg.mlp}",
        **mlp,
    )
    model = HookedTransformer(tc)
    model.init_weights(torch.Generator().manual_seed(cfg.seed))
    return model


def icl_score(loss_per_position: torch.Tensor) -> float:
    """In-context learning score (Olsson et al.): mean loss late in the context minus early,
    here the last tenth of the positions minus the second tenth (negative = learns in context)."""
    n = loss_per_position.shape[-1]
    early = loss_per_position[..., n // 10 : max(n // 5, n // 10 + 1)].mean()
    late = loss_per_position[..., n - max(n // 10, 1) :].mean()
    return float(late - early)


@torch.no_grad()
def measure(model: HookedTransformer, held_out: torch.Tensor, probe: torch.Tensor) -> dict:
    """Held-out loss, ICL score, per-head induction/previous-token scores, K-composition (in eval mode; the
    model's mode is restored)."""
    with evaluating(model):
        return _measure(model, held_out, probe)


def _measure(model: HookedTransformer, held_out: torch.Tensor, probe: torch.Tensor) -> dict:
    cfg = model.cfg
    logits = model(held_out[:, :-1])
    loss = F.cross_entropy(logits.transpose(1, 2), held_out[:, 1:], reduction="none")  # [B, P]
    p = probe.shape[1]
    n = (p - 1) // 2
    scores = attention_scores(
        model, probe, {"induction": induction_mask(p, n), "previous_token": previous_token_mask(p)}
    )
    out = {
        "held_out_loss": float(loss.mean()),
        "icl_score": icl_score(loss.mean(0)),
        "induction": scores["induction"].round(5).tolist(),
        "previous_token": scores["previous_token"].round(5).tolist(),
    }
    if cfg.n_layers >= 2:
        comp = composition_scores(analysis_weights(model), ("K",))["K"][0, :, 1, :]  # [L0 head, L1 head], folded
        out["k_composition"] = comp.T.numpy().round(5).tolist()  # [L1 head][L0 head]
    return out


def detect_phase_change(
    steps: list[int], induction: list[float], icl: list[float], min_induction_jump: float = 0.1
) -> dict:
    """The checkpoint interval where the induction score rises and the ICL score falls together.

    Each series' change over each interval is divided by the series' whole range; the interval
    with the largest smaller-of-the-two normalised changes wins. ``detected`` is true when both
    series moved at least 20% of their range inside that one interval and the induction score
    rose by at least ``min_induction_jump`` (so that noise in a model without induction heads,
    whose range is tiny, is not called a phase change).
    """
    a, b = np.asarray(induction, float), -np.asarray(icl, float)  # both rise at the phase change
    if len(steps) < 2:
        return {"detected": False, "reason": "fewer than two checkpoints"}
    ra, rb = np.ptp(a) or 1.0, np.ptp(b) or 1.0
    joint = np.minimum(np.diff(a) / ra, np.diff(b) / rb)
    i = int(np.argmax(joint))
    return {
        "detected": bool(joint[i] >= 0.2 and a[i + 1] - a[i] >= min_induction_jump),
        "step": int(round((steps[i] + steps[i + 1]) / 2)),
        "window": [int(steps[i]), int(steps[i + 1])],
        "induction_jump": float(a[i + 1] - a[i]),
        "icl_jump": float(icl[i + 1] - icl[i]),
        "share_of_range": float(joint[i]),
    }


def train_toy(cfg: ToyConfig, text: str | None = None, out: Path | None = None, progress: bool = True) -> dict:
    """Train, measure at every checkpoint, save checkpoints under ``out``; return the series, with ``work``: the
    passes through the blocks of the training steps and the measurements (see :class:`ToyTraining`)."""
    from mechscope.lm.models.transformer import work_counter

    cfg.validate()
    data = Data(cfg, text)
    g = torch.Generator().manual_seed(cfg.seed)
    held = torch.Generator().manual_seed(cfg.seed + 10_000)
    held_out = data.batch(held, 128, held_out=True)
    n = (cfg.n_ctx - 1) // 2
    probe_tokens = torch.randint(1, data.vocab, (16, n), generator=held)
    probe = torch.cat([torch.zeros(16, 1, dtype=torch.long), probe_tokens.repeat(1, 2)], 1)
    model = make_model(cfg, data.vocab)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / cfg.warmup))
    marks = set(checkpoint_steps(cfg.n_steps, cfg.checkpoints))
    series: list[dict] = []
    running, count = 0.0, 0
    clock = Timer()  # seconds since the start of training
    top_layer = cfg.layers - 1

    def record(step: int) -> None:
        row = {"step": step, "train_loss": running / count if count else None, **measure(model, held_out, probe)}
        row["seconds"] = clock.total()
        series.append(row)
        if out is not None:
            (out / "checkpoints").mkdir(parents=True, exist_ok=True)
            save_tensors(out / "checkpoints" / f"step_{step:06d}.safetensors", model.state_dict())

    model.train()
    counter = work_counter(model)
    bar = tqdm(total=cfg.n_steps, desc=f"train {cfg.layers}-layer", unit="step", disable=not progress, leave=False)
    with counter.counting(), bar:
        record(0)
        for step in range(1, cfg.n_steps + 1):
            x = data.batch(g, cfg.batch)
            loss = F.cross_entropy(model(x[:, :-1]).transpose(1, 2), x[:, 1:])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            value = loss.item()
            if not math.isfinite(value):
                raise MechscopeError(f"training diverged: the loss is {value} at step {step} (lr {cfg.lr:g})")
            running += value
            count += 1
            bar.update(1)
            if step in marks:
                record(step)
                best = max(series[-1]["induction"][top_layer])  # what the final line reports: the last layer's best
                bar.set_postfix(
                    {"loss": f"{running / count:.3f}", f"highest induction (layer {top_layer})": f"{best:.2f}"}
                )
                running, count = 0.0, 0
    if data.chars is None:  # synthetic tokens are drawn afresh every step: a pass is one step's batch
        per, pass_over = cfg.batch * cfg.n_ctx, f"one training batch ({cfg.batch} x {cfg.n_ctx} tokens)"
    else:
        per, pass_over = len(data.train_ids), "the training split (the first 90% of the text)"
    work = counter.report(f"lm train-toy ({cfg.layers} layer{'s' * (cfg.layers > 1)})", per) | {"pass_over": pass_over}
    last = series[-1]
    ind_series = [max(row["induction"][top_layer]) for row in series]
    phase = detect_phase_change([r["step"] for r in series], ind_series, [r["icl_score"] for r in series])
    result = {
        "config": asdict(cfg) | {"steps": cfg.n_steps},
        "model": model.cfg.to_dict(),
        "vocab": data.vocab,
        "chars": data.chars,  # the text's characters by token id (None for synthetic data)
        "series": series,
        "phase_change": phase,
        "train_seconds": clock.total(),
        "final": {
            "max_induction_last_layer": max(last["induction"][top_layer]),
            "max_previous_token_layer0": max(last["previous_token"][0]),
            "held_out_loss": last["held_out_loss"],
            "icl_score": last["icl_score"],
        },
    }
    if cfg.layers >= 2:
        h_ind = int(np.argmax(last["induction"][1]))
        h_prev = int(np.argmax(last["previous_token"][0]))
        comp = [row["k_composition"][h_ind][h_prev] for row in series]
        result["circuit"] = {
            "induction_head": [1, h_ind],
            "previous_token_head": [0, h_prev],
            "k_composition_series": comp,
        }
        if phase.get("window"):
            steps = [r["step"] for r in series]
            i0, i1 = steps.index(phase["window"][0]), steps.index(phase["window"][1])
            result["circuit"]["k_composition_jump_at_phase_change"] = comp[i1] - comp[i0]
            result["circuit"]["k_composition_range"] = float(np.ptp(comp))
    return result | {"work": work}


def train_toy_and_control(
    cfg: ToyConfig, text: str | None = None, out: Path | None = None, progress: bool = True, control: bool = True
) -> ToyTraining:
    """:func:`train_toy`, and for a 2-layer model with ``control`` its 1-layer control too (checkpoints under
    ``out / "control"``): the :class:`ToyTraining` whose ``work`` counts both models (``parts``: each one's)."""
    series = train_toy(cfg, text, out, progress)
    work = series.pop("work")
    if control and cfg.layers == 2:
        series["control"] = train_toy(replace(cfg, layers=1), text, None if out is None else out / "control", progress)
        parts = {f"{cfg.layers} layers": work, "control (1 layer)": series["control"]["work"]}
        work = combine_work(parts, "lm train-toy", work["rows_per_pass"]) | {"pass_over": work["pass_over"]}
    return ToyTraining(series, work)


@torch.no_grad()
def text_loss(model: HookedTransformer, ids: torch.Tensor, n_ctx: int | None = None, batch: int = 64) -> dict:
    """Mean next-token loss over every non-overlapping window of ``n_ctx + 1`` tokens of ``ids`` [T]
    (the whole held-out text, not a sample): ``{"loss", "tokens"}``."""
    n_ctx = n_ctx or model.cfg.n_ctx
    windows = ids[: (len(ids) - 1) // n_ctx * n_ctx + 1]
    if len(windows) < 2:
        raise MechscopeError(f"the text has {len(ids)} tokens: too short for a window of {n_ctx + 1}")
    x = windows[:-1].view(-1, n_ctx)  # inputs [W, n_ctx]
    y = windows[1:].view(-1, n_ctx)  # targets [W, n_ctx]
    total = 0.0
    with evaluating(model):
        for i in range(0, len(x), batch):
            logits = model(x[i : i + batch])
            total += float(F.cross_entropy(logits.transpose(1, 2), y[i : i + batch], reduction="sum"))
    return {"loss": total / y.numel(), "tokens": int(y.numel())}


def load_toy(path: str | Path, device=None, dtype=None) -> tuple[HookedTransformer, list[str] | None, str]:
    """A trained toy model: a ``train-toy`` run directory (its last checkpoint), its ``control/``,
    or one checkpoint file under ``checkpoints/``. Returns the model, the characters by token id
    (text data) and a name. ``device``/``dtype`` as ``load_model`` takes them, checked (default: the CPU,
    float32)."""
    import json

    from safetensors.torch import load_file

    path = Path(path)
    run = path.parent.parent if path.is_file() else path
    control = run.name == "control" and not (run / "training.json").is_file()
    meta = (run.parent if control else run) / "training.json"  # the control's record sits in its parent's
    if not meta.is_file():
        raise MechscopeError(f"{path}: not a train-toy run (no training.json in {run})")
    try:
        info = json.loads(meta.read_text())
        if isinstance(info, dict) and isinstance(info.get("schema"), str):  # a newer record: refused, not misread
            check_schema(info["schema"], ToyTraining.SCHEMA, str(meta))
        info = info["control"] if control else info
        with about(meta):  # a field of the wrong type or range, edited by hand: said of the file
            cfg = TransformerConfig.from_dict(info["model"])
            cfg.validate()
    except (ValueError, KeyError, TypeError) as e:
        raise MechscopeError(f"{meta}: not a readable train-toy record ({type(e).__name__}: {e})") from None
    ckpt = path if path.is_file() else _last_checkpoint(run / "checkpoints")
    if ckpt is None:
        raise MechscopeError(f"{run}: no checkpoints/step_*.safetensors")
    with torch.random.fork_rng(devices=[]):  # the initial weights are overwritten: leave the caller's RNG alone
        model = HookedTransformer(cfg)
    try:
        model.load_state_dict(load_file(str(ckpt)))
    except Exception as e:  # a corrupt file or another architecture
        raise MechscopeError(f"{ckpt}: cannot load ({type(e).__name__}: {e})") from None
    if device is not None or dtype is not None:
        from mechscope.lm.models.devices import resolve_device, resolve_dtype

        dev = resolve_device(device or "cpu")
        model = model.to(device=dev, dtype=resolve_dtype(dtype or torch.float32, dev))
    return model.eval(), info.get("chars"), f"{run.name}/{ckpt.stem}"


def _last_checkpoint(folder: Path) -> Path | None:
    """The checkpoint of the highest step, by number (:func:`~mechscope.core.paths.by_step`)."""
    steps = by_step(folder.glob("step_*.safetensors"), r"step_(\d+)\.safetensors")
    return steps[-1] if steps else None


def is_toy_run(path: str | Path) -> bool:
    path = Path(path)
    run = path.parent.parent if path.is_file() and path.suffix == ".safetensors" else path
    return (run / "training.json").is_file() or (run.name == "control" and (run.parent / "training.json").is_file())
