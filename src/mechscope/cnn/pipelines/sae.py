"""``mechscope cnn sae {harvest,train,evaluate,show}``: sparse dictionaries on a CNN, from the Python API too.

Each ``*_model`` function works on a model and an :class:`~mechscope.cnn.data.images.ImageDataset`, each ``*_run``
one on a run directory (``cnn train``'s); all return ``(output directory, result)`` and write atomically:

- harvest: the channel vector at every position of a hook (default: the last stage's ``hook_out``) over the
  training (or test) images, into a sharded store (``harvest.json`` + ``store/``); resumable from ``OUT.partial``;
- train: a dictionary on the store, saved in SAELens' layout with ``training.json``;
- evaluate: the dictionary spliced in: reconstruction, sparsity, test accuracy recovered, logit KL;
- show: latents against channels (class selectivity, stroke tuning) and dashboards (``report.html``).

Harvesting and training run data-parallel under ``torchrun`` (see :mod:`mechscope.core.dictionaries.parallel`).
Each JSON's ``work`` holds the passes the command made (the whole job's under ``torchrun``): through the network's
stages for harvest, evaluate and show (see each result's field), through the dictionary for train.
"""

from __future__ import annotations

import re
import shutil
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from mechscope.cnn.data.images import check_dataset
from mechscope.cnn.methods import sae as S
from mechscope.cnn.models.spec import walk
from mechscope.cnn.runs import load_run, load_run_data
from mechscope.core.dictionaries import DictionaryConfig, TrainConfig, load_saelens, save_saelens
from mechscope.core.dictionaries import parallel as P
from mechscope.core.dictionaries.config import check_options
from mechscope.core.dictionaries.latents import check_shown, densities, latent_summary, maxima
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
from mechscope.core.paths import other_wing
from mechscope.core.torch_utils import Timer, WorkCounter
from mechscope.core.validate import check_int, check_seed

STORE = "store"


def _positive(name: str, v) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise MechscopeError(f"--{name} must be a positive integer, got {v!r}")


def _images(data, split: str, limit: int | None):
    if split not in ("train", "test"):
        raise MechscopeError(f"--split must be train or test, got {split!r}")
    if limit is not None:
        _positive("limit", limit)  # -1 was a slice: every image but the last
    x = data.train_float(limit) if split == "train" else data.test_float(limit)
    y = (data.train_labels if split == "train" else data.test_labels)[:limit]
    if len(x) == 0:
        raise MechscopeError(f"the {split} split of {data.name} holds no images")
    return x, y


# ---- harvest ----------------------------------------------------------------------------------------------


def sae_harvest_model(
    model, data, out, hook: str | None = None, *, split: str = "train", limit: int | None = None, batch: int = 512,
    shard_rows: int = 65536, buffer_shards: int = 4, seed: int = 0, force: bool = False, progress: bool = True,
    distributed: bool | None = None, run=None,
):  # fmt: skip
    """Store the channel vectors at ``hook`` of every image of ``data``'s ``split`` (the first ``limit``)."""
    for name, v in (("batch", batch), ("shard-rows", shard_rows), ("buffer-shards", buffer_shards)):
        _positive(name, v)
    if limit is not None:
        _positive("limit", limit)
    check_seed(seed)
    check_dataset(data)
    spec = walk(model, data.shape)
    hook = hook or spec.last.hook_out
    counter = spec.work_counter()
    with counter.counting():
        shape = S.hook_shape(spec, hook)
    x, _ = _images(data, split, limit)
    P.init_from_env(distributed)
    rank, world = P.rank_world()
    out = Path(out)
    if rank == 0:
        check_target(out, force)
    per_image = int(np.prod(shape[1:])) if len(shape) == 3 else 1
    stage = staging(out)
    record = {"run": str(run), "dataset": data.name, "split": split, "images": len(x), "hook": hook, "batch": batch,
              "shard_rows": shard_rows, "buffer_shards": buffer_shards, "seed": seed}  # fmt: skip
    done = 0
    if rank == 0:
        done = _prepare_stage(stage, record)
    start_img = P.broadcast_object(done) // per_image
    bar = tqdm(total=len(x), initial=start_img, unit="img", unit_scale=True, disable=not progress or rank != 0,
               desc="harvest")  # fmt: skip
    local = S.harvest_batches(spec, x[start_img:], hook, batch=batch, rank=rank, world=world)

    def stream():
        for i, block in enumerate(P.gathered(local)):
            bar.update(min(batch, len(x) - start_img - i * batch))
            yield [block]

    started = time.perf_counter()
    try:
        with counter.counting():
            if rank == 0:
                (r,) = harvest_many(stream(), [stage / STORE], shard_rows=shard_rows,
                                    buffer_rows=shard_rows * buffer_shards,
                                    seed=seed, dtype=torch.float32, progress=False,
                                    input_offset=start_img * per_image)  # fmt: skip
            else:
                for _ in stream():
                    pass
    except MechscopeError:
        if rank == 0 and not stored_rows(stage / STORE):
            shutil.rmtree(stage, ignore_errors=True)
        raise
    finally:
        bar.close()
    seconds = time.perf_counter() - started
    P.sum_work(counter)  # each process counted its slices: the whole job's on every rank
    if rank != 0:
        P.barrier()
        return out, None
    n_new = len(x) - start_img
    result = S.CnnSaeHarvest(
        run=str(run), dataset=data.name, split=split, hook=hook, activation_shape=tuple(shape), images=len(x),
        rows=r.rows, width=r.width, shards=r.shards, store=STORE, seconds=seconds,
        images_per_second=n_new / seconds if seconds > 0 else float("nan"),
        rows_per_second=n_new * per_image / seconds if seconds > 0 else float("nan"), world_size=world,
        resumed_rows=r.resumed_rows, settings=record, work=counter.report("cnn sae harvest", len(x)),
    )  # fmt: skip
    with atomic_output(out, force) as tmp:
        shutil.move(str(stage / STORE), str(tmp / STORE))
        write_json(tmp / S.CnnSaeHarvest.FILE, result.to_dict())
    clear_staging(out)
    P.barrier()
    return out, result


def _prepare_stage(stage: Path, record: dict) -> int:
    claim_stage(stage, record)
    return stored_rows(stage / STORE)


def sae_harvest_run(run, out=None, hook: str | None = None, *, dataset=None, data_dir=None, **kw):
    """:func:`sae_harvest_model` on a run directory (default output RUN/sae-harvest)."""
    loaded = load_run(run)
    out = Path(out) if out is not None else Path(run) / "sae-harvest"
    check_target(out, kw.get("force", False))
    data = load_run_data(loaded, dataset, data_dir)
    return sae_harvest_model(loaded.model, data, out, hook, run=run, **kw)


# ---- train --------------------------------------------------------------------------------------------------


def _read_harvest(store) -> tuple[Path, S.CnnSaeHarvest]:
    store = Path(store)
    for where in (store, store.parent):
        if (where / S.CnnSaeHarvest.FILE).is_file():
            h = S.CnnSaeHarvest.load(where / S.CnnSaeHarvest.FILE)
            return where / h.store, h
    if not store.exists():
        raise MechscopeError(f"{store}: not found (give a cnn sae harvest's folder)")
    raise MechscopeError(f"{store}: not a cnn sae harvest (no {S.CnnSaeHarvest.FILE} in it or its parent)")


def sae_train_run(
    store, out=None, *, architecture: str = "topk", d_sae: int | None = None, expansion: int | None = None,
    k: int | None = 8, l1_coefficient: float = 5.0, l0_coefficient: float = 1.0, normalize: bool = True,
    batch_size: int = 4096, epochs: int = 1, steps: int | None = None, lr: float = 4e-4, seed: int = 0,
    checkpoint_every: int = 0, resume: bool = False, force: bool = False, progress: bool = True,
    distributed: bool | None = None, device=None, train_config: TrainConfig | None = None, **dictionary,
):  # fmt: skip
    """Train an SAE on a ``cnn sae harvest`` store; saved in SAELens' layout into ``out`` (default
    ``HARVEST/../sae-ARCH``); returns ``(out, CnnSaeTraining)``."""
    check_options(d_sae=d_sae, expansion=expansion, l1_coefficient=l1_coefficient, steps=steps,
                  checkpoint_every=checkpoint_every, lr=lr, architecture=architecture, k=k)  # fmt: skip
    where, h = _read_harvest(store)
    if d_sae is None:
        expansion = 16 if expansion is None else expansion
        _positive("expansion", expansion)
        d_sae = h.width * expansion
    cfg = DictionaryConfig(d_in=h.width, d_sae=d_sae, architecture=architecture,
                           k=k if architecture in ("topk", "batchtopk") else None, l1_coefficient=l1_coefficient,
                           l0_coefficient=l0_coefficient,
                           normalize_activations="expected_average_only_in" if normalize else "none",
                           **dictionary)  # fmt: skip
    out = Path(out) if out is not None else where.parent.parent / f"sae-{architecture}"
    staged = train_staged(where, cfg, out, name="cnn sae train", rows=h.rows, force=force, batch_size=batch_size,
                          epochs=epochs, steps=steps, lr=lr, seed=seed, checkpoint_every=checkpoint_every,
                          resume=resume, progress=progress, distributed=distributed, device=device,
                          train_config=train_config)  # fmt: skip
    trained, rank = staged.trained, staged.rank
    result = S.CnnSaeTraining(**training_fields(trained, model=h.run, hook=h.hook, target=None, store=str(where),
                                                batch_size=batch_size, epochs=epochs), work=staged.work)  # fmt: skip
    if rank == 0:
        stage = re.match(r"conv(\d+)", h.hook)  # SAELens' hook_layer: the stage's number (conv12: 12), else 0
        layer = int(stage.group(1)) if stage else 0
        with atomic_output(out, force) as tmp:
            save_saelens(trained.model, tmp, hook_name=h.hook, hook_layer=layer, model_name=h.run,
                         dataset_path=f"{h.dataset} {h.split}")  # fmt: skip
            write_json(tmp / S.CnnSaeTraining.FILE, result.to_dict())
        clear_staging(out)
    P.barrier()
    return out, result


# ---- evaluate ---------------------------------------------------------------------------------------------


def load_dictionary(path, hook: str | None = None):
    """(SAE, hook) of a SAELens-format directory (``hook`` overrides its ``hook_name``)."""
    elsewhere = other_wing(path, "cnn")
    if elsewhere:
        raise MechscopeError(f"{path}: not a dictionary the cnn commands read{elsewhere}")
    loaded = load_saelens(path)
    hook = hook or loaded.metadata.get("hook_name")
    if not hook:
        raise MechscopeError(f"{path}: cfg.json names no hook_name; pass --hook")
    return loaded.model, hook


def sae_evaluate_model(model, data, dictionary, out, *, hook: str | None = None, limit: int | None = None,
                       force: bool = False, progress: bool = True, run=None):  # fmt: skip
    """Splice the SAE at ``dictionary`` into ``model`` and measure it on the test images; returns
    ``(out, CnnSaeEvaluation)``."""
    check_target(out, force)
    check_dataset(data)
    sae, hook = load_dictionary(dictionary, hook)
    spec = walk(model, data.shape)
    counter, dict_counter = spec.work_counter(), WorkCounter([sae], "rows")
    with counter.counting():
        shape = S.check_dictionary(spec, sae, hook)
    x, y = _images(data, "test", limit)
    timer = Timer("cnn sae evaluate")
    bar = tqdm(total=len(x), unit="img", disable=not progress, desc="evaluate")
    try:
        with counter.counting(), dict_counter.counting():
            effect, metrics = S.splice_effect(spec, x, y, sae, hook, progress=bar.update)
    finally:
        bar.close()
    rows = len(x) * (int(np.prod(shape[1:])) if len(shape) == 3 else 1)  # the hook's rows: one per image position
    work = counter.report("cnn sae evaluate", len(x))
    work["dictionary"] = dict_counter.report("cnn sae evaluate, the dictionary", rows)
    result = S.CnnSaeEvaluation(
        run=str(run), dictionary=str(dictionary), hook=hook, architecture=sae.cfg.architecture, d_in=sae.cfg.d_in,
        d_sae=sae.cfg.d_sae, dataset=f"{data.name} test ({len(x):,} images)", effect=effect,
        metrics=metrics.to_dict(), seconds=timer.total(), latent_frequency=metrics.latent_frequency, work=work,
    )  # fmt: skip
    with atomic_output(out, force) as tmp:
        write_json(tmp / S.CnnSaeEvaluation.FILE, result.to_dict())
        result.save_html(tmp / "report.html")
    return Path(out), result


def sae_evaluate_run(run, dictionary, out=None, *, dataset=None, data_dir=None, **kw):
    """:func:`sae_evaluate_model` on a run directory (default output SAE/evaluation)."""
    loaded = load_run(run)
    out = Path(out) if out is not None else dictionary_folder(dictionary) / "evaluation"
    check_target(out, kw.get("force", False))
    data = load_run_data(loaded, dataset, data_dir)
    return sae_evaluate_model(loaded.model, data, dictionary, out, run=run, **kw)


# ---- show ------------------------------------------------------------------------------------------------


def sae_show_model(
    model, data, dictionary, out, *, hook: str | None = None, latents=(), n_selective: int = 6, n_random: int = 6,
    k: int = 8, limit: int | None = None, tuning: bool = True, featvis_steps: int = 256, seed: int = 0,
    force: bool = False, progress: bool = True, run=None,
):  # fmt: skip
    """Latents against channels and dashboards (asked latents, the ``n_selective`` most class-selective, ``n_random``
    alive ones at random); returns ``(out, CnnSaeDashboards)``."""
    check_seed(seed)
    check_int(featvis_steps, "--featvis-steps", 0, 100_000)  # 0: no feature visualisations
    for name, v in (("selective", n_selective), ("random", n_random)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise MechscopeError(f"--{name} must be an integer >= 0, got {v!r}")
    check_target(out, force)
    check_dataset(data)
    sae, hook = load_dictionary(dictionary, hook)
    spec = walk(model, data.shape)
    counter = spec.work_counter()
    with counter.counting():
        shape = S.check_dictionary(spec, sae, hook)
        check_shown(latents, {"--selective": n_selective, "--random": n_random}, sae.cfg.d_sae, k)
        x, y = _images(data, "test", limit)
        kk = data.n_classes
        timer = Timer("cnn sae show")
        say = (lambda s: tqdm.write(f"  {s}...")) if progress else (lambda s: None)  # noqa: E731
        say("activations and latents")
        with timer.section("latents"):
            acts = S.activations(spec, x, hook)
            lat = S.latent_activations(sae, acts)
        dens = densities(lat)
        ch_means = S.unit_class_means(S.channel_means(acts), y, kk)
        lt_means = S.unit_class_means(S.latent_means(lat, len(x)), y, kk)
        ch_sel, lt_sel = S.selectivity(ch_means), S.selectivity(lt_means)
        alive = dens > 0
        ch_tuning, lt_tuned = None, ()
        lt_labels: dict[int, S.UnitTuningSummary] = {}
        conv = len(shape) == 3 and hook.startswith("conv")
        if tuning and conv:
            say("stroke tuning of channels and latents")
            from mechscope.cnn.methods.stimuli import draw_stimuli

            with timer.section("tuning"):
                stim = draw_stimuli(spec.input_shape[1:], seed)
                ch_max = acts.flatten(2).amax(2).amax(0)
                ch_tuning = tuple(S.tuning_labels(spec, hook, lambda r: r, stim, ch_max))
                enc = lambda r: sae.encode(r)  # noqa: E731
                with torch.no_grad():
                    labels = S.tuning_labels(spec, hook, enc, stim, torch.from_numpy(maxima(lat)))
                lt_labels = {i: t for i, t in enumerate(labels)}
                lt_tuned = tuple(i for i, t in lt_labels.items() if t.tuned and alive[i])
        comparison = _comparison(ch_sel, lt_sel, alive, ch_tuning, lt_tuned)
        say("the random sparse control")
        with timer.section("control"):
            l0 = max(1, round(len(lat.values) / max(lat.n_rows, 1)))
            control = S.random_control(sae.cfg.d_in, sae.cfg.d_sae, l0, S.to_rows(acts).mean(0), seed)
            c_lat = S.latent_activations(control, acts)
            c_alive = densities(c_lat) > 0
            c_sel = np.asarray(S.selectivity(S.unit_class_means(S.latent_means(c_lat, len(x)), y, kk)))
            comparison["random_sparse"] = {
                "units": int(c_alive.sum()), "k": l0, "selective": int((c_sel[c_alive] >= S.SELECTIVE).sum()),
                "median_index": float(np.median(c_sel[c_alive])) if c_alive.any() else float("nan"),
            }  # fmt: skip
            if tuning and conv:
                with torch.no_grad():
                    c_labels = S.tuning_labels(spec, hook, lambda r: control.encode(r), stim,
                                               torch.from_numpy(maxima(c_lat)))  # fmt: skip
                comparison["random_sparse"]["tuned"] = sum(1 for i, t in enumerate(c_labels) if t.tuned and c_alive[i])
        chosen = _choose(latents, lt_sel, alive, n_selective, n_random, seed)
        effects = S.class_effects(spec, sae, hook)
        dec = sae.folded().W_dec.detach().float()
        say(f"dashboards of {len(chosen)} latents")
        rf = _rf(spec, hook)
        hw = shape[1:] if len(shape) == 3 else (1, 1)
        with timer.section("dashboards"):
            boards = []
            for i, why in chosen:
                boards.append(_dashboard(lat, i, why, y, hw, rf, spec.input_shape, lt_means[i], lt_sel[i],
                                         lt_labels.get(i), effects, dec[i], k, seed))  # fmt: skip
        if featvis_steps and conv:
            say("feature visualisation")
            with timer.section("featvis"):
                images = S.featvis_latents(spec, sae, hook, [b.latent for b in boards], steps=featvis_steps, seed=seed)
            boards = [replace(b, featvis=images[j]) for j, b in enumerate(boards)]
    shown = sorted({e.image for b in boards for e in b.top + tuple(e for band in b.bands for e in band)})
    result = S.CnnSaeDashboards(
        run=str(run), dictionary=str(dictionary), hook=hook, architecture=sae.cfg.architecture, d_in=sae.cfg.d_in,
        d_sae=sae.cfg.d_sae, dataset=f"{data.name} test ({len(x):,} images)", class_names=tuple(data.class_names),
        images=len(x), dead_fraction=float((~alive).mean()), comparison=comparison,
        channel_selectivity=tuple(float(v) for v in ch_sel),
        channel_preferred=tuple(int(v) for v in ch_means.argmax(1)),
        channel_tuning=ch_tuning, latent_selectivity=tuple(float(v) for v in lt_sel),
        latent_preferred=tuple(int(v) for v in lt_means.argmax(1)), latent_tuned=tuple(lt_tuned), latents=tuple(boards),
        summary=(), seconds=dict(timer.seconds), densities=dens, example_images={i: x[i] for i in shown},
        work=counter.report("cnn sae show", len(x)),
    )  # fmt: skip
    from mechscope.cnn.report.sae import summary_lines

    result = replace(result, summary=tuple(summary_lines(result)))
    with atomic_output(out, force) as tmp:
        write_json(tmp / S.CnnSaeDashboards.FILE, result.to_dict())
        result.save_html(tmp / "report.html")
    return Path(out), result


def sae_show_run(run, dictionary, out=None, *, dataset=None, data_dir=None, **kw):
    """:func:`sae_show_model` on a run directory (default output SAE/dashboards)."""
    loaded = load_run(run)
    out = Path(out) if out is not None else dictionary_folder(dictionary) / "dashboards"
    check_target(out, kw.get("force", False))
    data = load_run_data(loaded, dataset, data_dir)
    return sae_show_model(loaded.model, data, dictionary, out, run=run, **kw)


def _rf(spec, hook: str):
    try:
        stage = spec.stage(hook)
    except MechscopeError:
        return None
    return stage.rf_out if hook.endswith("hook_out") else stage.rf_post


def _comparison(ch_sel, lt_sel, alive, ch_tuning, lt_tuned) -> dict:
    ch_sel, lt_sel = np.asarray(ch_sel), np.asarray(lt_sel)
    out = {
        "threshold": S.SELECTIVE,
        "channels": {"units": len(ch_sel), "selective": int((ch_sel >= S.SELECTIVE).sum()),
                     "median_index": float(np.median(ch_sel))},
        "latents": {"units": int(alive.sum()), "selective": int((lt_sel[alive] >= S.SELECTIVE).sum()),
                    "median_index": float(np.median(lt_sel[alive])) if alive.any() else float("nan")},
    }  # fmt: skip
    if ch_tuning is not None:
        out["channels"]["tuned"] = sum(t.tuned for t in ch_tuning)
        out["latents"]["tuned"] = len(lt_tuned)
        tuned = set(lt_tuned)
        out["latents"]["selective_or_tuned"] = int(sum(1 for i in np.nonzero(alive)[0]
                                                      if lt_sel[i] >= S.SELECTIVE or i in tuned))  # fmt: skip
        out["channels"]["selective_or_tuned"] = int(sum(1 for i, t in enumerate(ch_tuning)
                                                       if ch_sel[i] >= S.SELECTIVE or t.tuned))  # fmt: skip
    return out


def _choose(asked, sel, alive, n_selective: int, n_random: int, seed: int) -> list[tuple[int, str]]:
    chosen: dict[int, str] = {int(i): "asked" for i in asked}
    order = [int(i) for i in np.argsort(-np.asarray(sel), kind="stable") if alive[i]]
    for i in order[:n_selective]:
        chosen.setdefault(i, "most class-selective")
    rest = [i for i in np.nonzero(alive)[0].tolist() if i not in chosen]
    g = torch.Generator().manual_seed(seed)
    for j in torch.randperm(len(rest), generator=g)[:n_random].tolist():
        chosen.setdefault(rest[j], "random")
    return list(chosen.items())


def _example(row: int, value: float, labels, hw, rf, input_shape) -> S.ImageExample:
    h, w = hw
    image, pos = divmod(int(row), h * w)
    py, px = divmod(pos, w)
    box = rf.box(py, px, *input_shape[1:]) if rf is not None else (0, input_shape[1], 0, input_shape[2])
    return S.ImageExample(value=float(value), image=image, label=int(labels[image]), position=(py, px),
                          box=tuple(int(v) for v in box))  # fmt: skip


def _dashboard(lat, i, why, labels, hw, rf, input_shape, means, sel, tuning, effects, dec, k, seed):
    s = latent_summary(lat, i, k=k, seed=seed)
    ex = lambda r, v: _example(r, v, labels, hw, rf, input_shape)  # noqa: E731
    order = torch.argsort(dec.abs(), descending=True)[:5]
    return S.CnnLatentDashboard(
        latent=int(i), density=s.density, max=s.max, mean_when_active=s.mean_when_active,
        top=tuple(ex(r, v) for r, v in zip(s.top_rows, s.top_values, strict=True)), band_edges=s.band_edges,
        bands=tuple(tuple(ex(r, v) for r, v in zip(rs, vs, strict=True))
                    for rs, vs in zip(s.band_rows, s.band_values, strict=True)),
        hist_counts=s.hist_counts, hist_edges=s.hist_edges, class_means=tuple(float(v) for v in means),
        selectivity=float(sel), preferred_class=int(torch.as_tensor(means).argmax()), tuning=tuning,
        class_effect=tuple(float(v) for v in effects[i]) if effects is not None else None,
        mixes=tuple((int(c), float(dec[c])) for c in order), why=why,
    )  # fmt: skip
