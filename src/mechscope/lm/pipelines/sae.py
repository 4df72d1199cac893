"""``mechscope lm sae {harvest,train,evaluate,show}``: sparse dictionaries on a transformer, from the Python API too.

Each function returns ``(output directory, result)`` and writes its files atomically (nothing a user has is
replaced without ``force``):

- :func:`sae_harvest`: a text file cut into contexts, run through the model, activations at hook points (and
  transcoder pairs) streamed into sharded stores (``harvest.json`` + one store folder per hook). Resumable: an
  interrupted harvest keeps its shards in ``OUT.partial/`` and the same command continues from them.
- :func:`sae_train`: a dictionary trained on a store, saved in SAELens' layout (``cfg.json``,
  ``sae_weights.safetensors``) with ``training.json``. ``checkpoint_every`` keeps checkpoints in
  ``OUT.partial/checkpoints``; ``resume`` continues from them.
- :func:`sae_evaluate`: a dictionary (ours, or any in SAELens' layout) spliced into the model: reconstruction,
  sparsity, CE loss recovered, KL (``evaluation.json``, ``report.html``).
- :func:`sae_show`: dashboards of latents (``dashboards.json``, ``report.html``).

Harvesting and training run data-parallel under ``torchrun`` (``distributed``; detected from its environment):
rank 0 writes, the others compute (see :mod:`mechscope.core.dictionaries.parallel`). Each JSON's ``work`` holds
the passes the command made (the whole job's under ``torchrun``): through the blocks for harvest, evaluate and show
(see each result's field), through the dictionary for train.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from tqdm import tqdm

from mechscope.core.dictionaries import DictionaryConfig, TrainConfig, load_saelens, save_saelens
from mechscope.core.dictionaries import parallel as P
from mechscope.core.dictionaries.config import check_options
from mechscope.core.dictionaries.latents import check_shown, densities, latent_summary
from mechscope.core.dictionaries.saelens_format import dictionary_folder
from mechscope.core.dictionaries.staged import (
    claim_stage,
    clear_staging,
    staging,
    train_staged,
    training_fields,
)
from mechscope.core.dictionaries.store import harvest_many, stored_rows
from mechscope.core.errors import MechscopeError
from mechscope.core.outputs import atomic_output, check_target, write_json
from mechscope.core.paths import model_out, other_wing
from mechscope.core.torch_utils import Timer, WorkCounter
from mechscope.core.validate import check_int, check_seed, settings_or
from mechscope.lm.methods import sae as S
from mechscope.lm.models.transformer import work_counter
from mechscope.lm.text import context_length, read_text
from mechscope.lm.tokenizer import encode_named

log = logging.getLogger(__name__)


# ---- settings -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HarvestSettings:
    """What to harvest: ``hooks`` (one store each) and ``transcoders`` ((input hook, target hook) pairs), from
    contexts of ``context`` tokens (default 128, or the model's context if shorter; the model's BOS first when it
    has one and ``bos``), at most ``contexts`` of
    them, ``batch`` contexts per forward pass; stores of ``shard_rows``-row shards shuffled in windows of
    ``buffer_shards`` shards (seed ``seed``)."""

    hooks: tuple[str, ...] = ()
    transcoders: tuple[tuple[str, str], ...] = ()
    context: int | None = None
    contexts: int | None = None
    batch: int = 8
    shard_rows: int = 65536
    buffer_shards: int = 4
    seed: int = 0
    bos: bool = True

    def validate(self) -> None:
        for name, items, size in (("hooks", self.hooks, None), ("transcoders", self.transcoders, 2)):
            if isinstance(items, (str, bytes)) or not hasattr(items, "__iter__"):  # a string was read letter by letter
                raise MechscopeError(f"{name} must be a tuple of {'hook names' if size is None else 'pairs'}, got "
                                     f"{items!r}")  # fmt: skip
            if size and any(isinstance(p, (str, bytes)) or not hasattr(p, "__len__") or len(p) != size
                            for p in items):  # (IN,) was an unpack error, None a TypeError  # fmt: skip
                raise MechscopeError(f"each transcoder is an (input hook, target hook) pair, got {list(items)!r}")
        if not self.hooks and not self.transcoders:
            raise MechscopeError("expected a hook to harvest (--hook NAME) or a transcoder pair (--transcoder IN:OUT)")
        if any(not str(h).strip() for h in (*self.hooks, *(h for pair in self.transcoders for h in pair))):
            raise MechscopeError("a hook name is empty: give --hook NAME (blocks.0.hook_resid_pre, ...)")
        for name in ("batch", "shard_rows", "buffer_shards"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise MechscopeError(f"--{name.replace('_', '-')} must be a positive integer, got {v!r}")
        if self.contexts is not None and self.contexts < 1:
            raise MechscopeError(f"--contexts must be a positive integer, got {self.contexts}")
        if self.context is not None:  # None: 128, or the model's context if shorter
            check_int(self.context, "--context", 2)
        check_seed(self.seed)
        for hook, target in self.transcoders:
            S.check_distinct(hook, target)

    def specs(self) -> list[S.HarvestSpec]:
        out = [S.HarvestSpec(h) for h in self.hooks] + [S.HarvestSpec(i, o) for i, o in self.transcoders]
        names = [s.name for s in out]
        if len(set(names)) != len(names):
            raise MechscopeError(f"a hook is asked for twice: {', '.join(names)}")
        return out


@dataclass(frozen=True)
class ReadSettings:
    """The text an evaluation or a dashboard reads: ``contexts`` contexts of ``context`` tokens from the end of
    the text file (the last contexts, so that a harvest of the first ones is held out), ``batch`` per pass;
    ``context`` by default 128, or the model's context if shorter."""

    context: int | None = None
    contexts: int = 64
    batch: int = 8
    bos: bool = True

    def validate(self) -> None:
        for name in ("contexts", "batch"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise MechscopeError(f"--{name} must be a positive integer, got {v!r}")
        if self.context is not None:  # None: 128, or the model's context if shorter
            check_int(self.context, "--context", 2)


def dictionary_config(d_in: int, d_sae: int | None = None, expansion: int | None = None, *, d_out: int | None = None,
                      transcoder: bool = False, **kw) -> DictionaryConfig:  # fmt: skip
    """A :class:`DictionaryConfig` from the command's options (``d_sae`` or ``expansion`` x d_in)."""
    if d_sae is None:
        expansion = 8 if expansion is None else expansion
        if isinstance(expansion, bool) or not isinstance(expansion, int) or expansion < 1:
            raise MechscopeError(f"--expansion must be a positive integer, got {expansion!r}")
        d_sae = d_in * expansion
    return DictionaryConfig(d_in=d_in, d_sae=d_sae, transcoder=transcoder, d_out=d_out if transcoder else None, **kw)


# ---- the model and its text ------------------------------------------------------------------------------


def _text_model(model_spec, device=None, dtype=None, revision=None):
    from mechscope.lm.pipelines.neurons import load_text_model

    return load_text_model(str(model_spec), device, dtype, revision=revision)


def _contexts(tm, text_file, context: int | None, bos: bool, limit: int | None, tail: bool = False):
    from mechscope.core.validate import typed_options

    if tm.bos is None and bos and "--bos" in typed_options():  # read without one, whatever was typed
        raise MechscopeError(f"{tm.name}: its text is read without a BOS token here (a train-toy run learnt text "
                             "without one), so --bos would be ignored: leave it out")  # fmt: skip
    text, source = read_text(text_file)
    ids = encode_named(tm.encode, text, source)
    b = tm.bos if bos else None
    length = context_length(context, tm.model.cfg.n_ctx, 128, "--context")
    if tail:
        body = length - (b is not None)
        need = (limit or 1) * body
        ids = ids[-need:] if len(ids) > need else ids
    return S.contexts(ids, length, b, limit), source


# ---- harvest ----------------------------------------------------------------------------------------------


def sae_harvest(
    model_spec, out=None, text_file=None, settings: HarvestSettings | None = None, *, force: bool = False,
    progress: bool = True, distributed: bool | None = None, device=None, dtype=None, revision=None,
    stop_early: bool = True,
    model=None,
):  # fmt: skip
    """Harvest the activations of ``settings.hooks`` / ``settings.transcoders`` over a text file (tinyshakespeare
    by default) into ``out``; returns ``(out, LmSaeHarvest)``. ``model``: an already-loaded TextModel
    (:func:`mechscope.lm.pipelines.neurons.load_text_model`) instead of loading ``model_spec``."""
    settings = settings_or(settings, HarvestSettings)
    settings.validate()
    specs = settings.specs()
    out = Path(out) if out is not None else model_out("sae-harvest", model_spec)
    P.init_from_env(distributed, device)
    rank, world = P.rank_world()
    if rank == 0:
        check_target(out, force)
    timer = Timer("lm sae harvest")
    with timer.section("load"):
        tm = model or _text_model(model_spec, device, dtype, revision)
    names = [n for s in specs for n in (s.hook, s.target) if n]
    counter = work_counter(tm.model)
    with counter.counting():
        widths = S.hook_widths(tm.model, names)
        for s in specs:
            if s.target:
                S.check_pair(list(widths), s.hook, s.target)
    tokens, source = _contexts(tm, text_file, settings.context, settings.bos, settings.contexts)
    skip = int(tm.bos is not None and settings.bos)
    per_context = tokens.shape[1] - skip
    stage = staging(out)
    record = {"model": str(model_spec), "text": source, "settings": asdict(settings), "contexts": len(tokens)}
    offset = 0
    if rank == 0:
        offset = _prepare_stage(stage, record, specs, per_context)
    offset = P.broadcast_object(offset)
    start_ctx = offset // per_context
    bar = tqdm(total=tokens.numel(), initial=start_ctx * tokens.shape[1], unit="tok", unit_scale=True,
               disable=not progress or rank != 0, desc="harvest")  # fmt: skip
    local = S.harvest_batches(tm.model, tokens[start_ctx:], specs, batch=settings.batch, skip_first=skip, rank=rank,
                              world=world, stop=stop_early, on_batch=None)  # fmt: skip
    step_tokens = settings.batch * tokens.shape[1]

    def stream():
        for parts in _gather_all(local, len(specs)):
            bar.update(min(step_tokens, bar.total - bar.n))
            yield parts

    started = time.perf_counter()
    try:
        with timer.section("harvest"), counter.counting():
            if rank == 0:
                results = harvest_many(
                    stream(), [stage / "stores" / s.name for s in specs], shard_rows=settings.shard_rows,
                    buffer_rows=settings.shard_rows * settings.buffer_shards, seed=settings.seed,
                    dtype=torch.float32, progress=False, input_offset=start_ctx * per_context,
                )  # fmt: skip
            else:
                for _ in stream():
                    pass
    except MechscopeError:
        if rank == 0 and not any(stored_rows(stage / "stores" / s.name) for s in specs):
            shutil.rmtree(stage, ignore_errors=True)  # nothing to resume: leave nothing behind
        raise
    finally:
        bar.close()
    seconds = time.perf_counter() - started
    P.sum_work(counter)  # each process counted its slices: the whole job's on every rank
    done_tokens = (len(tokens) - start_ctx) * tokens.shape[1]
    result = None
    if rank == 0:
        stores = tuple(
            {"name": s.name, "hook": s.hook, "target": s.target, "d_in": widths[s.hook],
             "d_out": widths[s.target] if s.target else widths[s.hook], "width": r.width, "rows": r.rows,
             "shards": r.shards, "directory": s.name}
            for s, r in zip(specs, results, strict=True)
        )  # fmt: skip
        result = S.LmSaeHarvest(
            model=str(model_spec), text=source, context=tokens.shape[1], bos=tm.bos if skip else None,
            skip_first=skip, contexts=len(tokens), tokens=int(tokens.numel()), rows=results[0].rows, stores=stores,
            seconds=seconds, tokens_per_second=done_tokens / seconds if seconds > 0 else math.nan, world_size=world,
            resumed_rows=results[0].resumed_rows, settings=asdict(settings) | {"stop_early": stop_early},
            work=counter.report("lm sae harvest", int(tokens.numel())),
        )  # fmt: skip
        with atomic_output(out, force) as tmp:
            for s in specs:
                shutil.move(str(stage / "stores" / s.name), str(tmp / s.name))
            write_json(tmp / S.LmSaeHarvest.FILE, result.to_dict())
        clear_staging(out)
    P.barrier()
    return out, result  # None on ranks other than 0


def _gather_all(local, n_specs: int):
    """Each step's per-spec rows gathered over the ranks (rank order; the blocks themselves on one process)."""
    for parts in local:
        yield [next(iter(P.gathered([p]))) for p in parts]


def _prepare_stage(stage: Path, record: dict, specs, per_context: int) -> int:
    """The staging folder of a harvest: made, or checked to be the same harvest; returns the rows stored."""
    claim_stage(stage, record)
    rows = [stored_rows(stage / "stores" / s.name) for s in specs]
    done = min(rows)
    if done % per_context:
        done -= done % per_context  # a window ends mid-context: replay that context (the store skips its rows)
    return done


# ---- train -------------------------------------------------------------------------------------------------


def _read_harvest(store) -> tuple[Path, dict, dict]:
    """(the store folder, its spec entry, the harvest record) for ``store``: a harvest's output folder (with one
    store) or one of its store folders."""
    store = Path(store)
    for where, name in ((store, None), (store.parent, store.name)):
        record = where / S.LmSaeHarvest.FILE
        if record.is_file():
            h = S.LmSaeHarvest.load(record)
            entries = [e for e in h.stores if name is None or e["name"] == name]
            if name is None and len(entries) > 1:
                raise MechscopeError(
                    f"{store}: holds {len(entries)} stores ({', '.join(e['name'] for e in entries)}); pass one of "
                    "their folders"
                )
            if entries:
                return where / entries[0]["directory"], entries[0], h.to_dict()
    if not Path(store).exists():
        raise MechscopeError(f"{store}: not found (give an lm sae harvest's folder or one of its stores)")
    raise MechscopeError(f"{store}: not an lm sae harvest (no {S.LmSaeHarvest.FILE} in it or its parent)")


def sae_train(
    store, out=None, *, architecture: str = "topk", d_sae: int | None = None, expansion: int | None = None,
    k: int | None = 32, l1_coefficient: float = 5.0, l0_coefficient: float = 1.0, skip: bool = False,
    normalize: bool = True, batch_size: int = 4096, epochs: int = 1, steps: int | None = None, lr: float = 4e-4,
    seed: int = 0, checkpoint_every: int = 0, resume: bool = False, force: bool = False, progress: bool = True,
    distributed: bool | None = None, device=None, train_config: TrainConfig | None = None, **dictionary,
):  # fmt: skip
    """Train a dictionary on a harvested store (an SAE on a hook, a transcoder on a pair) and save it in SAELens'
    layout into ``out`` (default ``STORE/../sae-ARCH``); returns ``(out, LmSaeTraining)``."""
    from mechscope.lm.models.devices import resolve_device

    device = None if device is None else str(resolve_device(device))  # one line for a device that is not there
    check_options(d_sae=d_sae, expansion=expansion, l1_coefficient=l1_coefficient, steps=steps,
                  checkpoint_every=checkpoint_every, lr=lr, architecture=architecture, k=k)  # fmt: skip
    where, entry, record = _read_harvest(store)
    transcoder = entry["target"] is not None
    cfg = dictionary_config(
        entry["d_in"], d_sae, expansion, d_out=entry["d_out"], transcoder=transcoder, architecture=architecture,
        k=k if architecture in ("topk", "batchtopk") else None, l1_coefficient=l1_coefficient,
        l0_coefficient=l0_coefficient, skip=skip,
        normalize_activations="expected_average_only_in" if normalize else "none",
        **dictionary,
    )  # fmt: skip
    out = Path(out) if out is not None else Path("runs") / "sae" / f"{entry['name']}-{architecture}"
    staged = train_staged(where, cfg, out, name="lm sae train", rows=entry["rows"], force=force,
                          batch_size=batch_size, epochs=epochs, steps=steps, lr=lr, seed=seed,
                          checkpoint_every=checkpoint_every, resume=resume, progress=progress,
                          distributed=distributed, device=device, train_config=train_config)  # fmt: skip
    trained, rank = staged.trained, staged.rank
    result = S.LmSaeTraining(**training_fields(trained, model=record["model"], hook=entry["hook"],
                                               target=entry["target"], store=str(where), batch_size=batch_size,
                                               epochs=epochs), work=staged.work)  # fmt: skip
    if rank == 0:
        from mechscope.lm.methods.sae import layer_of

        with atomic_output(out, force) as tmp:
            save_saelens(
                trained.model, tmp, hook_name=entry["hook"],
                hook_layer=layer_of(entry["hook"]) or 0, model_name=record["model"], context_size=record["context"],
                prepend_bos=record["bos"] is not None, dataset_path=record["text"],
                hook_name_out=entry["target"], hook_layer_out=layer_of(entry["target"]) if transcoder else None,
            )  # fmt: skip
            write_json(tmp / S.LmSaeTraining.FILE, result.to_dict())
        clear_staging(out)
    P.barrier()
    return out, result


# ---- evaluate and show ---------------------------------------------------------------------------------------


def load_dictionary(path, hook: str | None = None, target: str | None = None, norm_scaling_factor=None):
    """(dictionary, hook, target, metadata) of a SAELens-format directory; ``hook``/``target`` override its
    ``hook_name``/``hook_name_out``."""
    elsewhere = other_wing(path, "lm")
    if elsewhere:
        raise MechscopeError(f"{path}: not a dictionary the lm commands read{elsewhere}")
    loaded = load_saelens(path, norm_scaling_factor=norm_scaling_factor)
    meta = loaded.metadata
    hook = hook or meta.get("hook_name")
    if not hook:
        raise MechscopeError(f"{path}: cfg.json names no hook_name; pass --hook")
    if loaded.model.cfg.transcoder:
        target = target or meta.get("hook_name_out")
        if not target:
            raise MechscopeError(f"{path}: a transcoder whose cfg.json names no hook_name_out; pass --target")
    return loaded.model, hook, target, meta


def trained_on(meta: dict) -> str:
    """The model a dictionary's cfg.json says it was trained on ("" when it names none, or not as a string)."""
    name = meta.get("model_name")
    return name if isinstance(name, str) else ""


def sae_evaluate(
    model_spec, dictionary, out=None, text_file=None, settings: ReadSettings | None = None, *, hook=None, target=None,
    force: bool = False, progress: bool = True, device=None, dtype=None, revision=None, model=None,
):  # fmt: skip
    """Splice the dictionary at ``dictionary`` (SAELens layout) into the model and measure it on the last
    contexts of the text; writes evaluation.json and report.html; returns ``(out, LmSaeEvaluation)``."""
    settings = settings_or(settings, ReadSettings)
    settings.validate()
    out = Path(out) if out is not None else dictionary_folder(dictionary) / "evaluation"
    check_target(out, force)
    sae, hook, target, meta = load_dictionary(dictionary, hook, target)
    S.check_distinct(hook, target)  # before the model loads
    timer = Timer("lm sae evaluate")
    tm = model or _text_model(model_spec, device, dtype, revision)
    counter, dict_counter = work_counter(tm.model), WorkCounter([sae], "rows")
    with counter.counting():
        S.check_dictionary(tm.model, sae, hook, target)
    tokens, source = _contexts(tm, text_file, settings.context, settings.bos, settings.contexts, tail=True)
    skip = int(tm.bos is not None and settings.bos)
    bar = tqdm(total=tokens.numel(), unit="tok", unit_scale=True, disable=not progress, desc="evaluate")
    with timer.section("evaluate"), counter.counting(), dict_counter.counting():
        try:
            effect, metrics = S.splice_effect(tm.model, tokens, sae, hook, target, skip_first=skip,
                                              batch=settings.batch, progress=bar.update)  # fmt: skip
        finally:
            bar.close()
    work = counter.report("lm sae evaluate", int(tokens.numel()))
    rows = tokens.shape[0] * (tokens.shape[1] - skip)  # the dictionary's rows: the positions after the BOS
    work["dictionary"] = dict_counter.report("lm sae evaluate, the dictionary", rows)
    result = S.LmSaeEvaluation(
        model=str(model_spec), dictionary=str(dictionary), hook=hook, target=target,
        architecture=sae.cfg.architecture, d_in=sae.cfg.d_in, d_sae=sae.cfg.d_sae, text=source, contexts=len(tokens),
        context=tokens.shape[1], skip_first=skip, effect=effect, metrics=metrics.to_dict(), seconds=timer.total(),
        latent_frequency=metrics.latent_frequency, work=work, trained_on=trained_on(meta),
    )  # fmt: skip
    with atomic_output(out, force) as tmp:
        write_json(tmp / S.LmSaeEvaluation.FILE, result.to_dict())
        result.save_html(tmp / "report.html")
    return out, result


def sae_show(
    model_spec, dictionary, out=None, text_file=None, settings: ReadSettings | None = None, *, hook=None, target=None,
    latents=(), n_random: int = 6, n_induction: int = 6, k: int = 8, seed: int = 0, force: bool = False,
    progress: bool = True, device=None, dtype=None, revision=None, model=None,
):  # fmt: skip
    """Dashboards of the dictionary's latents: those asked for, the ``n_induction`` most induction-like and
    ``n_random`` alive ones drawn at random (seeded); writes dashboards.json and report.html; returns
    ``(out, LmSaeDashboards)``."""
    settings = settings_or(settings, ReadSettings, contexts=256)
    settings.validate()
    check_seed(seed)
    for name, v in (("--random", n_random), ("--induction", n_induction)):
        check_int(v, name, 0, 100_000)  # -1 was a slice: all but the last
    out = Path(out) if out is not None else dictionary_folder(dictionary) / "dashboards"
    check_target(out, force)
    sae, hook, target, meta = load_dictionary(dictionary, hook, target)
    S.check_distinct(hook, target)  # before the model loads
    check_shown(latents, {"--random": n_random, "--induction": n_induction}, sae.cfg.d_sae, k)
    timer = Timer("lm sae show")
    tm = model or _text_model(model_spec, device, dtype, revision)
    counter = work_counter(tm.model)
    with counter.counting():
        S.check_dictionary(tm.model, sae, hook, target)
    tokens, source = _contexts(tm, text_file, settings.context, settings.bos, settings.contexts, tail=True)
    skip = int(tm.bos is not None and settings.bos)
    bar = tqdm(total=tokens.numel(), unit="tok", unit_scale=True, disable=not progress, desc="latents")
    with timer.section("latents"), counter.counting():
        try:
            acts = S.latent_activations(tm.model, tokens, sae, hook, skip_first=skip, batch=settings.batch,
                                        progress=bar.update)  # fmt: skip
        finally:
            bar.close()
    dens = densities(acts)
    with timer.section("induction"), counter.counting():
        ind = S.induction_latents(tm.model, sae, hook, seed=seed)
    chosen = _choose(latents, ind, dens, n_induction, n_random, seed)
    with timer.section("weights"):
        dirs = S.residual_directions(tm.model, sae, target or hook)
        effects = S.logit_effects(dirs, S.unembedding(tm.model), [i for i, _ in chosen]) if dirs is not None else {}
        mixes = S.neuron_comparison(tm.model, sae, hook, target, [i for i, _ in chosen])
    decode = _decoder(tm)
    dashboards = []
    with timer.section("dashboards"):
        for i, why in chosen:
            dashboards.append(_dashboard(acts, i, why, tokens, skip, decode, effects.get(i), mixes.get(i, []), ind, k,
                                         seed))  # fmt: skip
    how = ("decoder direction in the residual stream, through the final norm's gain and W_U, centred over the "
           "vocabulary" if dirs is not None else f"none: {target or hook} does not write linearly into the residual "
           "stream")  # fmt: skip
    result = S.LmSaeDashboards(
        model=str(model_spec), dictionary=str(dictionary), hook=hook, target=target,
        architecture=sae.cfg.architecture, d_in=sae.cfg.d_in, d_sae=sae.cfg.d_sae, text=source,
        contexts=len(tokens), context=tokens.shape[1], tokens=acts.n_rows, dead_fraction=float((dens == 0).mean()),
        logit_effect=how, induction=ind, induction_tokens=tuple(decode(t) for t in ind.tokens),
        latents=tuple(dashboards), summary=(), seconds=dict(timer.seconds), densities=dens,
        work=counter.report("lm sae show", int(tokens.numel())), trained_on=trained_on(meta),
        induction_bos=tm.model.cfg.bos_token_id is not None and tm.bos is not None,
    )  # fmt: skip
    result = replace(result, summary=tuple(summary_lines(result)))
    with atomic_output(out, force) as tmp:
        write_json(tmp / S.LmSaeDashboards.FILE, result.to_dict(), compact=True)
        result.save_html(tmp / "report.html")
    return out, result


def _decoder(tm):
    seen: dict[int, str] = {}

    def decode(i: int) -> str:
        if i not in seen:
            try:
                seen[i] = tm.decode(int(i))
            except Exception:  # a byte-fragment token
                seen[i] = f"<{i}>"
        return seen[i]

    return decode


def _choose(asked, ind, dens, n_induction: int, n_random: int, seed: int) -> list[tuple[int, str]]:
    chosen: dict[int, str] = {int(i): "asked" for i in asked}
    for i in ind.ranked[:n_induction]:
        chosen.setdefault(int(i), "induction")
    alive = [int(i) for i in (dens > 0).nonzero()[0] if int(i) not in chosen]
    g = torch.Generator().manual_seed(seed)
    for j in torch.randperm(len(alive), generator=g)[:n_random].tolist():
        chosen.setdefault(alive[j], "random")
    return list(chosen.items())


def _example(acts_row_latent, row: int, tokens, skip: int, decode, before: int = 12, after: int = 4):
    per = tokens.shape[1] - skip
    seq, pos = divmod(int(row), per)
    pos += skip
    lo, hi = max(0, pos - before), min(tokens.shape[1], pos + after + 1)
    base = seq * per - skip
    values = [float(acts_row_latent[base + p]) if p >= skip else 0.0 for p in range(lo, hi)]
    return S.TextExample(value=float(acts_row_latent[int(row)]), sequence=seq, position=pos,
                         tokens=tuple(decode(int(t)) for t in tokens[seq, lo:hi]), acts=tuple(values),
                         focus=pos - lo)  # fmt: skip


def _dashboard(acts, i: int, why: str, tokens, skip: int, decode, effect, mixes, ind, k: int, seed: int):
    s = latent_summary(acts, i, k=k, seed=seed)
    dense = acts.dense(i)
    top = tuple(_example(dense, r, tokens, skip, decode) for r in s.top_rows)
    bands = tuple(tuple(_example(dense, r, tokens, skip, decode) for r in band) for band in s.band_rows)
    induction = None
    if i in ind.ranked:
        j = ind.ranked.index(i)
        induction = {"rate_first": ind.rate_first[j], "rate_second": ind.rate_second[j],
                     "mean_first": ind.mean_first[j], "mean_second": ind.mean_second[j], "rank": j + 1}  # fmt: skip
    return S.LmLatentDashboard(
        latent=i, density=s.density, max=s.max, mean_when_active=s.mean_when_active, top=top,
        band_edges=s.band_edges, bands=bands, hist_counts=s.hist_counts, hist_edges=s.hist_edges,
        promoted=tuple((decode(t), v) for t, v in zip(effect.promoted, effect.promoted_values, strict=True))
        if effect else (),
        suppressed=tuple((decode(t), v) for t, v in zip(effect.suppressed, effect.suppressed_values, strict=True))
        if effect else (),
        mixes=tuple(mixes), induction=induction, why=why,
    )  # fmt: skip


def summary_lines(r) -> list[str]:
    lines = [
        f"{r.architecture} {'transcoder' if r.target else 'SAE'} of {r.d_sae:,} latents on {r.hook}"
        + (f" -> {r.target}" if r.target else "")
        + f" of {r.model}",
        f"read on {r.tokens:,} positions of {r.text}: {100 * r.dead_fraction:.1f}% of the latents never fire",
    ]
    if r.induction is not None and r.induction.ranked:
        i, margin = r.induction, S.INDUCTION_MARGIN
        n = sum(1 for a, b in zip(i.rate_first, i.rate_second, strict=True) if b - a >= margin)
        lines.append(
            f"induction-like latents (fire on the repeat of random tokens, not on the first copy): {n} with a firing "
            f"rate at least {margin:g} higher on the repeat; the top one, {i.ranked[0]}, fires on "
            f"{100 * i.rate_second[0]:.0f}% of repeated tokens and {100 * i.rate_first[0]:.0f}% of first-copy tokens"
        )
    return lines
