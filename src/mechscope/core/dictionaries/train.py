"""Training a sparse dictionary on a stream of activation batches, on one process or data-parallel.

``train(cfg, batches, TrainConfig(...))`` reads ``batches`` (tensors ``x [B, d_in]`` for an SAE, pairs
``(x [B, d_in], y [B, d_out])`` for a transcoder) and returns a :class:`TrainResult` holding the model.

Each step: Adam on the loss of losses.py, the decoder-row gradient made orthogonal to each row before the step
and the rows renormalised after it (sae.py), JumpReLU thresholds kept >= 0, dead latents tracked over a window
of tokens (AuxK revives them for TopK/BatchTopK; ReLU resamples them every ``resample_every`` steps). Before the
first step the first ``init_rows`` rows set the normalisation factors and the decoder bias (initialisation.py).

Small dictionaries train fastest on one thread (``torch.set_num_threads(1)``): several threads spin badly
on busy cores. Determinism: the same settings and data give bit-identical weights on the same machine (the
initialisation comes from ``seed``, the rest is deterministic CPU arithmetic). Resuming from a checkpoint replays
``batches`` from its start, skips the batches already trained on, and continues bit for bit.

Data parallel: call ``train`` in every rank of an initialised ``torch.distributed`` group (gloo on CPU, NCCL
on GPUs), each with the same full batch stream; rank r trains on rows ``[r B/W, (r+1) B/W)`` of every batch,
gradients are averaged with all-reduce, dead-latent counts, metrics and BatchTopK's kept set are global, so
the run follows the one-process run up to float rounding (tests/dictionaries/test_distributed.py: max
|difference| <= 1e-5 after 30 steps; measured about 2e-7).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import numbers
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.distributed as dist
from tqdm import tqdm

from mechscope.core.dictionaries import checkpoint as ckpt
from mechscope.core.dictionaries.config import DictionaryConfig
from mechscope.core.dictionaries.dead import LatentActivity, resample_dead
from mechscope.core.dictionaries.initialisation import decoder_bias_init, norm_scale
from mechscope.core.dictionaries.losses import StepLoss, step_loss
from mechscope.core.dictionaries.sae import SparseDictionary
from mechscope.core.dictionaries.stream import BatchStream
from mechscope.core.errors import MechscopeError
from mechscope.core.results import Result
from mechscope.core.validate import check_lr, check_seed, scalar

# TrainConfig fields that never change the weights: they may differ when resuming
_FREE = ("max_steps", "checkpoint_every", "checkpoint_dir", "keep_checkpoints", "log_every", "progress")


@dataclass(frozen=True)
class TrainConfig:
    """How to train. lr: Adam's rate, reached after ``lr_warmup_steps`` linear steps and brought linearly to 0
    over the last ``lr_decay_steps`` (needs ``max_steps``). sparsity_warmup_steps: the L1/L0 coefficient ramps
    from 0 over these steps. max_steps: stop there (``None``: when the data ends). b_dec_init: "geometric_median",
    "mean" or "zeros", from ``init_rows`` rows. dead_window: tokens without firing that make a latent dead.
    resample_every: steps between resamplings of dead latents (relu only; ``None``: never).
    batchtopk_threshold_lr: rate of the running average of the batch's smallest kept activation (BatchTopK's
    inference threshold). checkpoint_every: steps between checkpoints into ``checkpoint_dir`` (0: none), of
    which the newest ``keep_checkpoints`` stay."""

    lr: float = 4e-4
    adam_betas: tuple[float, float] = (0.9, 0.999)
    lr_warmup_steps: int = 0
    lr_decay_steps: int = 0
    sparsity_warmup_steps: int = 0
    max_steps: int | None = None
    b_dec_init: str = "geometric_median"
    init_rows: int = 4096
    seed: int = 0
    dead_window: int = 1_000_000
    resample_every: int | None = None
    batchtopk_threshold_lr: float = 0.01
    checkpoint_every: int = 0
    checkpoint_dir: str | None = None
    keep_checkpoints: int = 2
    log_every: int = 10
    progress: bool = True

    def __post_init__(self) -> None:
        check_lr(self.lr, "lr")
        for name in ("lr_warmup_steps", "lr_decay_steps", "sparsity_warmup_steps", "checkpoint_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise MechscopeError(f"expected {name} to be an integer >= 0, got {value!r}")
        for name in ("init_rows", "dead_window", "log_every", "keep_checkpoints"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise MechscopeError(f"expected {name} to be a positive integer, got {value!r}")
        for name in ("max_steps", "resample_every"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise MechscopeError(f"expected {name} to be a positive integer or None, got {value!r}")
        check_seed(self.seed)
        if self.lr_decay_steps and self.max_steps is None:
            raise MechscopeError("expected max_steps with lr_decay_steps (the decay ends at max_steps)")
        if self.checkpoint_every and not self.checkpoint_dir:
            raise MechscopeError("expected checkpoint_dir with checkpoint_every")
        if not 0 < self.batchtopk_threshold_lr <= 1:
            raise MechscopeError(f"expected 0 < batchtopk_threshold_lr <= 1, got {self.batchtopk_threshold_lr!r}")
        betas = self.adam_betas  # (1.5, 0.9) was torch's "Invalid beta parameter" at the first step
        items = [scalar(b) for b in betas] if hasattr(betas, "__len__") and not isinstance(betas, str) else []
        if not (len(items) == 2 and all(isinstance(b, numbers.Real) and not isinstance(b, bool) and 0 <= b < 1
                                        for b in items)):  # fmt: skip
            raise MechscopeError(f"expected adam_betas to be two numbers in [0, 1), got {betas!r}")
        betas = items
        object.__setattr__(self, "adam_betas", tuple(float(b) for b in betas))

    def result_settings(self) -> dict:
        """The settings that shape the weights (compared on resume), as JSON values."""
        free = set(_FREE) - ({"max_steps"} if self.lr_decay_steps else set())
        return json.loads(json.dumps({k: v for k, v in dataclasses.asdict(self).items() if k not in free}))


@dataclass(frozen=True)
class TrainResult(Result):
    """A finished training run: its settings, size, speed, logged metrics and (outside the JSON) the model."""

    SCHEMA: ClassVar[str] = "mechscope.dictionary_training/1"

    config: dict
    train_config: dict
    steps: int
    rows: int
    seconds: float
    rows_per_second: float
    in_scale: float
    out_scale: float
    world_size: int
    resumed_from_step: int
    checkpoint: str | None
    history: tuple[dict, ...]
    model: Any = field(default=None, repr=False, compare=False, metadata={"json": False})


@dataclass
class _Run:
    """The mutable state of one run."""

    model: SparseDictionary
    optimizer: torch.optim.Optimizer
    activity: LatentActivity
    generator: torch.Generator
    device: torch.device
    step: int = 0
    rows: int = 0
    resumed_from: int = 0
    start_rows: int = 0
    history: list = field(default_factory=list)
    counter: Any = None  # a WorkCounter the steps add their passes to (train's ``counter``)


def train(
    cfg: DictionaryConfig,
    batches,
    train_cfg: TrainConfig | None = None,
    *,
    resume_from=None,
    distributed: bool | None = None,
    device: str | torch.device | None = None,
    counter=None,
) -> TrainResult:
    """Train a dictionary of ``cfg`` on ``batches`` (see the module docstring) and return the result.

    resume_from: a checkpoint (a step directory or a checkpoint_dir) to continue from; its settings must
    equal these. distributed: train data-parallel over the default process group (``None``: when one is
    initialised). device: where to train ("cpu" by default; with NCCL give each rank its own GPU, e.g.
    ``f"cuda:{rank}"``); batches are moved there shard by shard. counter: a
    :class:`~mechscope.core.torch_utils.WorkCounter` (unit: rows) the loop adds this run's passes through the
    dictionary to, the whole job's on every rank: each step one forward and one backward over the batch's rows
    (AuxK's decode of the dead latents is part of that step), and a ReLU resampling one more forward of the batch on
    each rank. The loss reads the dictionary through its methods, not its ``forward``, so no hook could see the
    steps: the loop counts them. The initialisation (normalisation factors, decoder bias) is not counted.
    """
    tc = train_cfg or TrainConfig()
    if not isinstance(cfg, DictionaryConfig) or not isinstance(tc, TrainConfig):
        raise MechscopeError("expected a DictionaryConfig and a TrainConfig")
    use_dist = dist.is_available() and dist.is_initialized() if distributed is None else distributed
    if use_dist and not (dist.is_available() and dist.is_initialized()):
        raise MechscopeError("expected an initialised torch.distributed process group for distributed=True")
    group = dist.group.WORLD if use_dist and dist.get_world_size() > 1 else None
    data = BatchStream(cfg, batches, group)
    device = torch.device(device if device is not None else "cpu")
    started = time.perf_counter()
    if resume_from is not None:
        run = _resume(cfg, tc, resume_from, data, device)
    else:
        run = _start(cfg, tc, data, group, device)
    run.counter = counter
    _loop(run, cfg, tc, data, group)
    return _finish(run, cfg, tc, group, time.perf_counter() - started)


# ---- start, resume, finish ----------------------------------------------------------------------------


def _new_run(cfg: DictionaryConfig, tc: TrainConfig, device: torch.device) -> _Run:
    generator = torch.Generator().manual_seed(tc.seed)
    model = SparseDictionary(cfg, generator=generator).to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=tc.lr, betas=tc.adam_betas, foreach=False)
    resample_gen = torch.Generator().manual_seed(tc.seed + 1)
    return _Run(model, optimizer, LatentActivity(cfg.d_sae), resample_gen, device)


@torch.no_grad()
def _start(cfg: DictionaryConfig, tc: TrainConfig, data: BatchStream, group, device) -> _Run:
    run = _new_run(cfg, tc, device)
    sample = data.peek_rows(tc.init_rows)
    if not sample:
        raise MechscopeError("expected activation batches, got an empty stream")
    xs = torch.cat([b[0] for b in sample])[: tc.init_rows]
    ys = torch.cat([b[1] for b in sample])[: tc.init_rows]
    model = run.model
    if cfg.normalize_activations != "none":
        model.in_scale.fill_(norm_scale(xs))
        model.out_scale.fill_(norm_scale(ys) if cfg.transcoder else model.in_scale.item())
    b_dec = decoder_bias_init(ys.double() * model.out_scale.item(), tc.b_dec_init)
    model.b_dec.copy_(b_dec.to(model.b_dec.dtype))
    if group is not None:
        for t in model.state_dict().values():
            dist.broadcast(t, src=0, group=group)
    return run


def _resume(cfg: DictionaryConfig, tc: TrainConfig, path, data: BatchStream, device) -> _Run:
    meta, tensors = ckpt.load_checkpoint(path)
    where = ckpt.find_checkpoint(path)
    ckpt.check_same_settings(where, meta.get("config", {}), json.loads(json.dumps(cfg.to_dict())), "dictionary")
    ckpt.check_same_settings(where, meta.get("train_config", {}), tc.result_settings(), "training")
    run = _new_run(cfg, tc, device)
    try:
        run.model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        names = dict(run.model.named_parameters())
        for name, p in names.items():
            state = {key: tensors[f"adam.{name}.{key}"].clone() for key in ("step", "exp_avg", "exp_avg_sq")}
            run.optimizer.state[p] = {k: v if k == "step" else v.to(device) for k, v in state.items()}
        run.activity.since = tensors["activity.since"].clone()
        run.generator.set_state(tensors["rng.resample"].clone())
    except (KeyError, RuntimeError) as e:
        raise MechscopeError(f"{where}: checkpoint state does not fit these settings ({type(e).__name__})") from None
    run.step = run.resumed_from = int(meta["step"])
    run.rows = int(meta["rows"])
    run.history = list(meta.get("history", []))
    data.skip(run.step)
    return run


def _save(run: _Run, cfg: DictionaryConfig, tc: TrainConfig, group) -> str | None:
    if not tc.checkpoint_dir:
        return None
    where = None
    if group is None or dist.get_rank(group) == 0:
        tensors = {f"model.{k}": v for k, v in run.model.state_dict().items()}
        for name, p in run.model.named_parameters():
            for key, value in run.optimizer.state.get(p, {}).items():
                tensors[f"adam.{name}.{key}"] = torch.as_tensor(value)
        tensors["activity.since"] = run.activity.since
        tensors["rng.resample"] = run.generator.get_state()
        meta = {"rows": run.rows, "config": cfg.to_dict(), "train_config": tc.result_settings(), "history": run.history}
        where = str(ckpt.save_checkpoint(tc.checkpoint_dir, run.step, meta, tensors, tc.keep_checkpoints))
    if group is not None:
        dist.barrier(group)
    return where


def _finish(run: _Run, cfg: DictionaryConfig, tc: TrainConfig, group, seconds: float) -> TrainResult:
    if run.step == 0:
        raise MechscopeError("expected activation batches, got an empty stream")
    if not all(bool(torch.isfinite(p).all()) for p in run.model.parameters()):  # nothing saved, nothing reported
        raise MechscopeError(f"training diverged: the weights are not finite after {run.step} steps (lr {tc.lr:g}); "
                             "train again with a smaller --lr")  # fmt: skip
    last = None
    if tc.checkpoint_dir and (not tc.checkpoint_every or run.step % tc.checkpoint_every):
        last = _save(run, cfg, tc, group)
    elif tc.checkpoint_dir:
        last = str(ckpt.find_checkpoint(tc.checkpoint_dir))
    rows = run.rows - run.start_rows
    return TrainResult(
        config=cfg.to_dict(),
        train_config=dataclasses.asdict(tc),
        steps=run.step,
        rows=run.rows,
        seconds=seconds,
        rows_per_second=rows / seconds if seconds > 0 else math.nan,
        in_scale=run.model.in_scale.item(),
        out_scale=run.model.out_scale.item(),
        world_size=dist.get_world_size(group) if group is not None else 1,
        resumed_from_step=run.resumed_from,
        checkpoint=last,
        history=tuple(run.history),
        model=run.model.eval(),
    )


# ---- the loop ------------------------------------------------------------------------------------------


def _loop(run: _Run, cfg: DictionaryConfig, tc: TrainConfig, data: BatchStream, group) -> None:
    rank = dist.get_rank(group) if group is not None else 0
    bar = tqdm(total=tc.max_steps, initial=run.step, disable=not tc.progress or rank != 0, desc="dictionary")
    run.start_rows = run.rows
    try:
        for x, y in data if tc.max_steps is None else itertools.islice(data, max(0, tc.max_steps - run.step)):
            out = _one_step(run, cfg, tc, x, y, group)
            bar.update(1)
            if run.step % tc.log_every == 0 or run.step == tc.max_steps:
                run.history.append(_metrics(run, cfg, tc, out, group))
                bar.set_postfix({k: f"{v:.4g}" for k, v in run.history[-1].items() if k != "step"}, refresh=False)
            if tc.checkpoint_every and run.step % tc.checkpoint_every == 0:
                _save(run, cfg, tc, group)
    finally:
        bar.close()


def _factors(tc: TrainConfig, step: int) -> tuple[float, float]:
    """(learning-rate factor, sparsity-coefficient factor) at ``step`` (1-based)."""
    lr = min(1.0, step / tc.lr_warmup_steps) if tc.lr_warmup_steps else 1.0
    if tc.lr_decay_steps:
        lr *= min(1.0, max(0.0, (tc.max_steps - step + 1) / tc.lr_decay_steps))
    sparsity = min(1.0, step / tc.sparsity_warmup_steps) if tc.sparsity_warmup_steps else 1.0
    return lr, sparsity


def _shard(t: torch.Tensor, group) -> torch.Tensor:
    if group is None:
        return t
    n, world, rank = t.shape[0], dist.get_world_size(group), dist.get_rank(group)
    return t[rank * n // world : (rank + 1) * n // world]


def _one_step(run: _Run, cfg: DictionaryConfig, tc: TrainConfig, x, y, group) -> StepLoss:
    run.step += 1
    lr_factor, sparsity_scale = _factors(tc, run.step)
    for g in run.optimizer.param_groups:
        g["lr"] = tc.lr * lr_factor
    model = run.model
    dead = run.activity.dead(tc.dead_window).to(run.device)
    x_local, y_local = _shard(x, group).to(run.device), _shard(y, group).to(run.device)
    out = step_loss(model, x_local, y_local, sparsity_scale=sparsity_scale, dead_mask=dead, group=group)
    run.optimizer.zero_grad(set_to_none=True)
    out.total.backward()
    if group is not None:
        for p in model.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad, group=group)
                p.grad.div_(dist.get_world_size(group))
    model.remove_parallel_decoder_grad()
    run.optimizer.step()
    with torch.no_grad():
        model.set_decoder_unit_norm()
        if cfg.architecture == "jumprelu":
            model.threshold.clamp_(min=0)
    fired = _global((out.latents.detach() > 0).any(0).to(torch.int32), group, dist.ReduceOp.MAX).bool()
    run.activity.update(fired, x.shape[0])
    run.rows += x.shape[0]
    world = dist.get_world_size(group) if group is not None else 1
    if run.counter is not None:  # the ranks' slices make up the batch
        run.counter.add(x.shape[0], world, backward=True)
    if cfg.architecture == "batchtopk":
        _update_threshold(run, tc, out.latents.detach(), group)
    if cfg.architecture == "relu" and tc.resample_every and run.step % tc.resample_every == 0:
        dead = run.activity.dead(tc.dead_window)
        if resample_dead(model, run.optimizer, dead.to(run.device), x.to(run.device), y.to(run.device),
                         run.generator) and run.counter is not None:  # fmt: skip
            run.counter.add(x.shape[0] * world, world)  # every rank the whole batch
        run.activity.since[dead] = 0
    return out


def _global(t: torch.Tensor, group, op=None) -> torch.Tensor:
    if group is not None:
        t = t.clone()
        dist.all_reduce(t, op=op if op is not None else dist.ReduceOp.SUM, group=group)
    return t


@torch.no_grad()
def _update_threshold(run: _Run, tc: TrainConfig, f: torch.Tensor, group) -> None:
    """BatchTopK's inference threshold: a running average of the batch's smallest kept activation
    (Bussmann et al. 2024 average it over batches; the first batch sets it)."""
    positive = f[f > 0]
    local = positive.min().double() if positive.numel() else f.new_tensor(math.inf, dtype=torch.float64)
    smallest = float(_global(local.reshape(1), group, dist.ReduceOp.MIN))
    if not math.isfinite(smallest):
        return
    theta = run.model.threshold
    value = (
        smallest
        if run.step == 1
        else (1 - tc.batchtopk_threshold_lr) * theta[0].item() + tc.batchtopk_threshold_lr * smallest
    )
    theta.fill_(value)


@torch.no_grad()
def _metrics(run: _Run, cfg: DictionaryConfig, tc: TrainConfig, out: StepLoss, group) -> dict:
    """Loss, L0, explained variance (against the batch mean, normalised space) and dead fraction, global."""
    t, o, f = out.target.double(), out.output.double(), out.latents.detach()
    head = [
        (t - o).pow(2).sum(),
        t.pow(2).sum(),
        (f > 0).sum(),
        t.new_tensor(t.shape[0]),
        out.total.detach() * t.shape[0],
    ]
    sums = torch.cat([torch.stack([v.double() for v in head]), t.sum(0)])
    sums = _global(sums, group)
    sse, sq, active, n, loss = sums[:5].tolist()
    total = sq - float(sums[5:].pow(2).sum()) / n
    return {
        "step": run.step,
        "loss": loss / n,
        "l0": active / n,
        "explained_variance": 1 - sse / total if total > 0 else math.nan,
        "dead_fraction": float(run.activity.dead(tc.dead_window).double().mean()),
    }


@torch.no_grad()
def estimate_batchtopk_threshold(model: SparseDictionary, batches) -> float:
    """Bussmann et al. 2024's inference threshold: the mean over ``batches`` (tensors ``[B, d_in]``) of the
    smallest activation BatchTopK keeps in each batch; sets it on ``model`` and returns it."""
    if model.cfg.architecture != "batchtopk":
        raise MechscopeError(f"expected a batchtopk dictionary, got {model.cfg.architecture}")
    was = model.training
    model.train()
    values = []
    for batch in batches:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        f = model.activate(model.pre_activations(model.normalise_input(x)))
        if (f > 0).any():
            values.append(float(f[f > 0].min()))
    model.train(was)
    if not values:
        raise MechscopeError("expected batches on which some latent fires to estimate the threshold")
    model.threshold.fill_(sum(values) / len(values))
    return sum(values) / len(values)
