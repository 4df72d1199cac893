"""Training from an activation store, with checkpoints kept in a staging folder beside the output.

Both wings' ``sae train`` commands call :func:`train_from_store`: it reads the store's batches (pairs for a
transcoder) with :class:`~mechscope.core.dictionaries.ActivationReader` and trains with
:func:`~mechscope.core.dictionaries.train`. Checkpoints go to :func:`staging` (``<out>.partial/checkpoints``),
which an interrupted run leaves behind and ``--resume`` continues from (refused, in one line, when its settings
differ); the finished outputs are written atomically by the wing and the staging folder removed.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from mechscope.core.dictionaries.config import DictionaryConfig
from mechscope.core.dictionaries.store import ActivationReader
from mechscope.core.dictionaries.train import TrainConfig, TrainResult, train
from mechscope.core.errors import MechscopeError
from mechscope.core.results import Result


def staging(out) -> Path:
    """The folder beside ``out`` that holds what an interrupted command can resume from."""
    out = Path(out).expanduser().absolute()
    return out.parent / f"{out.name}.partial"


def checkpoints_of(out) -> Path:
    return staging(out) / "checkpoints"


def clear_staging(out) -> None:
    shutil.rmtree(staging(out), ignore_errors=True)


def claim_stage(stage: Path, record: dict) -> None:
    """A harvest's staging folder: made with its settings (``settings.json``), or checked to hold an interrupted
    harvest with the same settings, which then resumes."""
    import json

    where = stage / "settings.json"
    if where.is_file():
        try:
            old = json.loads(where.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            old = None
        if old != json.loads(json.dumps(record)):
            raise MechscopeError(
                f"{stage}: an interrupted harvest with other settings is there; remove it or use its settings"
            )
    else:
        stage.mkdir(parents=True, exist_ok=True)
        where.write_text(json.dumps(record, indent=1), encoding="utf-8")


def store_reader(store, cfg: DictionaryConfig, batch_size: int, *, seed: int = 0, epochs: int = 1,
                 mix_shards: int = 4) -> ActivationReader:  # fmt: skip
    """The batches ``cfg`` trains on: rows of width d_in, or ``(x, y)`` pairs of a ``d_in + d_out`` store."""
    reader = ActivationReader(store, batch_size, seed=seed, epochs=epochs, mix_shards=mix_shards,
                              split=(cfg.d_in, cfg.d_out) if cfg.transcoder else None)  # fmt: skip
    width = reader.manifest["width"]
    want = cfg.d_in + cfg.d_out if cfg.transcoder else cfg.d_in
    if width != want:
        what = f"d_in + d_out = {cfg.d_in} + {cfg.d_out}" if cfg.transcoder else f"d_in = {cfg.d_in}"
        raise MechscopeError(f"{store}: the store holds rows of width {width}; the dictionary expects {what}")
    if reader.rows < batch_size:
        raise MechscopeError(f"{store}: the store holds {reader.rows} rows, fewer than one batch of {batch_size}")
    return reader


def train_from_store(
    store, cfg: DictionaryConfig, tc: TrainConfig, out, *, batch_size: int, epochs: int = 1, resume: bool = False,
    distributed: bool | None = None, device=None, counter=None,
) -> TrainResult:  # fmt: skip
    """Train ``cfg`` on the store (checkpoints in :func:`checkpoints_of` ``(out)`` when ``tc`` asks for them;
    ``resume``: continue from the newest there). ``counter``: a WorkCounter the training adds its passes through
    the dictionary to (see :func:`~mechscope.core.dictionaries.train.train`)."""
    reader = store_reader(store, cfg, batch_size, seed=tc.seed, epochs=epochs)
    where = checkpoints_of(out)
    if resume and not where.is_dir():
        raise MechscopeError(f"--resume: no checkpoint to resume from ({where} does not exist)")
    _check_stream(where, {"store": str(Path(store).absolute()), "batch_size": batch_size, "epochs": epochs,
                          "rows": reader.rows}, resume, bool(tc.checkpoint_every))  # fmt: skip
    return train(cfg, reader, tc, resume_from=where if resume else None, distributed=distributed, device=device,
                 counter=counter)  # fmt: skip


@dataclass(frozen=True)
class StagedTraining:
    """What :func:`train_staged` gives back: the training, its work record and this process's rank (0 writes)."""

    trained: TrainResult
    work: dict
    rank: int


def train_staged(
    store, cfg: DictionaryConfig, out, *, name: str, rows: int, force: bool = False, batch_size: int = 4096,
    epochs: int = 1, steps: int | None = None, lr: float = 4e-4, seed: int = 0, checkpoint_every: int = 0,
    resume: bool = False, progress: bool = True, distributed: bool | None = None, device=None,
    train_config: TrainConfig | None = None,
) -> StagedTraining:  # fmt: skip
    """Both wings' ``sae train`` after the dictionary is configured: ``--batch-size``/``--epochs`` checked, the
    processes ``torchrun`` started joined (``distributed``), ``out`` checked on rank 0, and :func:`train_from_store`
    run with a WorkCounter over the dictionary's rows (``rows``: the store's, the unit of a pass; ``name``: the
    command, for the work record)."""
    from mechscope.core.dictionaries import parallel as P
    from mechscope.core.outputs import check_target
    from mechscope.core.torch_utils import WorkCounter
    from mechscope.core.validate import check_int

    check_int(batch_size, "--batch-size", 1)
    check_int(epochs, "--epochs", 1)
    use_dist = P.init_from_env(distributed, device)
    rank, _ = P.rank_world()
    if rank == 0:
        check_target(out, force)
    tc = train_config or TrainConfig(lr=lr, seed=seed, max_steps=steps, progress=progress,
                                     checkpoint_every=checkpoint_every,
                                     checkpoint_dir=str(checkpoints_of(out)) if checkpoint_every else None)  # fmt: skip
    counter = WorkCounter([], "rows")  # the training loop adds its passes through the dictionary (not the network)
    trained = train_from_store(store, cfg, tc, out, batch_size=batch_size, epochs=epochs, resume=resume,
                               distributed=use_dist, device=device, counter=counter)  # fmt: skip
    work = counter.report(name, rows) if rank == 0 else counter.summary(rows)
    return StagedTraining(trained, work, rank)


def _check_stream(where: Path, stream: dict, resume: bool, checkpointing: bool) -> None:
    """The batch stream a checkpoint was made on (store, batch size, epochs) must be this run's to resume; the
    dictionary and training settings are compared by :func:`~mechscope.core.dictionaries.train.train`."""
    import json

    record = where / "stream.json"
    if resume and record.is_file():
        try:
            old = json.loads(record.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            old = {}
        for key in sorted(stream):
            if old.get(key) != stream[key]:
                raise MechscopeError(
                    f"{where}: checkpoint was written with {key}={old.get(key)!r}, this run has "
                    f"{key}={stream[key]!r}; resume with the same settings"
                )
    elif checkpointing and not resume:
        from mechscope.core.dictionaries.parallel import is_main

        if is_main():
            where.mkdir(parents=True, exist_ok=True)
            record.write_text(json.dumps(stream), encoding="utf-8")


@dataclass(frozen=True)
class DictionaryTraining(Result):
    """``sae train`` (either wing): the dictionary's settings, the run's size and speed and its logged metrics."""

    model: str
    hook: str
    target: str | None
    store: str
    architecture: str
    d_in: int
    d_sae: int
    d_out: int
    config: dict
    train_config: dict
    batch_size: int
    epochs: int
    steps: int
    rows: int
    seconds: float
    rows_per_second: float
    world_size: int
    resumed_from_step: int
    final: dict  # the last logged metrics (loss, l0, explained variance, dead fraction)
    history: tuple[dict, ...]
    # forward and backward passes through the dictionary this run made (the whole job's, every process), in passes
    # over the store's rows (WorkCounter, unit rows, counted by the training loop: see core.dictionaries.train);
    # training does not run the network
    work: dict | None = None


def training_fields(result: TrainResult, *, model: str, hook: str, target: str | None, store: str, batch_size: int,
                    epochs: int) -> dict:  # fmt: skip
    """The fields of a :class:`DictionaryTraining` from the core's :class:`TrainResult`."""
    cfg = result.config
    return dict(
        model=model, hook=hook, target=target, store=str(store), architecture=cfg["architecture"],
        d_in=cfg["d_in"], d_sae=cfg["d_sae"], d_out=cfg["d_out"], config=cfg, train_config=result.train_config,
        batch_size=batch_size, epochs=epochs, steps=result.steps, rows=result.rows, seconds=result.seconds,
        rows_per_second=result.rows_per_second, world_size=result.world_size,
        resumed_from_step=result.resumed_from_step, final=dict(result.history[-1]) if result.history else {},
        history=result.history,
    )  # fmt: skip
