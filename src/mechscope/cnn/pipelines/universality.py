"""``mechscope cnn universality``: do CNNs trained with other seeds or widths learn the same units?

Loads the runs (same dataset and classes, else refused), builds one randomly initialised network per run
(same shape, seeded) as the baseline, runs every network over the test images once, matches units stage by
stage (:mod:`mechscope.cnn.methods.universality`), compares the class circuits of ``cnn explain`` through the
matching, and writes universality.json and report.html atomically.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from mechscope.cnn.methods import featvis as FV
from mechscope.cnn.methods import universality as U
from mechscope.cnn.models.cnn import CNN
from mechscope.cnn.models.spec import walk
from mechscope.cnn.runs import load_run, load_run_data
from mechscope.core.errors import MechscopeError
from mechscope.core.outputs import atomic_output, check_target, read_linked, write_json
from mechscope.core.torch_utils import Timer, counting, torch_threads
from mechscope.core.validate import check_threads

log = logging.getLogger(__name__)
BASELINE_SEED = 1_000_000  # the random network of run i is initialised with seed BASELINE_SEED + i
SHOWN = 4  # strongest and weakest matched pairs shown per stage


def universality(
    runs, out=None, test_limit: int | None = None, force: bool = False, progress=None, vis_steps: int = 128,
    batch_size: int = 500, threads: int = 1, data_dir=None,
) -> tuple[Path, U.UniversalityResult]:  # fmt: skip
    """Compare the runs (see the module docstring); ``threads`` torch threads (one: these small networks run 10-25
    times faster on a busy 2-core machine with one thread than with two)."""
    check_threads(threads)
    if not 1 <= vis_steps <= 100_000:
        raise MechscopeError(f"--vis-steps must be from 1 to 100,000, got {vis_steps:,}")
    with torch_threads(threads):
        return _universality(runs, out, test_limit, force, progress, vis_steps, batch_size, data_dir)


def _universality(runs, out, test_limit, force, progress, vis_steps, batch_size, data_dir):
    from mechscope.cnn.report.universality import summary_lines, write_report

    say = progress or (lambda _: None)
    timer = Timer("universality")
    runs = [Path(r) for r in runs]
    if len(runs) < 2:
        raise MechscopeError(f"universality compares two or more runs (--runs R1 R2 ...), got {len(runs)}")
    if test_limit is not None and test_limit < 100:  # CKA and correlations over 1 image are NaN ("conv1 nan")
        raise MechscopeError(f"--test-limit must be at least 100 images, got {test_limit}")
    same = sorted({str(r) for r in runs if sum(r.resolve() == q.resolve() for q in runs) > 1})
    if same:  # a network matched with itself is universal by construction
        raise MechscopeError(f"universality compares different runs; given more than once: {', '.join(same)}")
    out = Path(out) if out is not None else Path("runs") / "universality"
    check_target(out, force)
    loaded = [load_run(r) for r in runs]
    check_compatible(loaded)
    digests = [r.weights_sha256 for r in loaded]
    alike = sorted({str(r) for r, d in zip(runs, digests, strict=True) if digests.count(d) > 1})
    if alike:  # a copied run: correlation and CKA 1.00 reported as a finding
        raise MechscopeError(f"universality compares different networks; the same weights are in {', '.join(alike)}")
    data = load_run_data(loaded[0], data_dir=data_dir)
    x, y = data.test_float(test_limit), data.test_labels[:test_limit]
    labels = run_labels(runs)
    specs = {lab: walk(r.model, data.shape) for lab, r in zip(labels, loaded, strict=True)}
    for i, (lab, r) in enumerate(zip(labels, loaded, strict=True)):
        specs[f"random {lab}"] = walk(random_like(r.model, BASELINE_SEED + i), data.shape)
    trained_pairs = [(a, b) for i, a in enumerate(labels) for b in labels[i + 1 :]]
    baseline_pairs = [(lab, f"random {lab}") for lab in labels]
    counters = {k: spec.work_counter() for k, spec in specs.items()}
    with atomic_output(out, force) as tmp, counting(counters):
        say(f"running {len(specs)} networks over {len(y):,} test images")
        with timer.section("activations, matching, CKA"):
            feats, moments = U.collect_pairs(specs, [*trained_pairs, *baseline_pairs], x, batch_size)
            matched = {p: tuple(U.match_units(m, st, how) for (m, how), st in zip(ms, specs[p[0]].stage_names,
                                                                                    strict=False))
                       for p, ms in moments.items()}  # fmt: skip
            cka_labels = [f"{k} {st}" for k, spec in specs.items() for st in spec.stage_names]
            cka = U.cka_matrix([feats[k].means[st] for k, spec in specs.items() for st in spec.stage_names])
        say("class circuits")
        with timer.section("circuits"):
            circuits, sources = {}, {}
            for lab, r in zip(labels, loaded, strict=True):
                circuits[lab], sources[lab] = class_circuits(r, specs[lab], data, feats[lab], x, y)
            last = {lab: specs[lab].last.name for lab in labels}
            comparisons = [
                U.Comparison(a, b, "trained", matched[(a, b)], last[a],
                             U.circuit_reuse(matched[(a, b)][-1].mapping(), circuits[a], circuits[b],
                                             specs[b].last.out_channels))
                for a, b in trained_pairs
            ] + [U.Comparison(a, b, "baseline", matched[(a, b)]) for a, b in baseline_pairs]  # fmt: skip
        say("feature visualisations of the matched units shown")
        with timer.section("feature visualisation"):
            shown = shown_pairs(comparisons, labels[0])
            vis, vis_sources = unit_images(shown, specs, loaded, labels, data, feats, vis_steps)
        run_rows = tuple(_run_row(lab, r, feats[lab].logits, y, vis_sources[lab], sources[lab])
                         for lab, r in zip(labels, loaded, strict=True))  # fmt: skip
        result = U.UniversalityResult(
            dataset=data.name, class_names=tuple(data.class_names), test_images=len(y), runs=run_rows,
            baselines=tuple({"label": f"random {lab}", "shape_of": lab, "seed": BASELINE_SEED + i}
                            for i, lab in enumerate(labels)),
            comparisons=tuple(comparisons), cka_labels=tuple(cka_labels), cka=cka,
            settings={"test_limit": test_limit, "feature_visualisation_steps": vis_steps,
                      "observations": "each stage's output (after the activation and pooling); unit correlations "
                      "and per-stage CKA over images × positions, the CKA matrix over each image's channel means"},
        )  # fmt: skip
        result = replace(result, best_match_tests=result.stage_tests())
        result = replace(result, summary=tuple(summary_lines(result)))
        with timer.section("report"):
            write_report(result, shown, vis, feats, x, y, tmp / "report.html")
        work = {k: c.report(f"cnn universality, {k}", len(y)) for k, c in counters.items()}
        result = replace(result, seconds=dict(timer.seconds) | {"total": timer.total()}, work=work)
        write_json(tmp / U.UniversalityResult.FILE, result.to_dict())
    return out, result


def check_compatible(loaded) -> None:
    """Refuse runs trained on different data, with different class counts or depths (one line)."""
    first = loaded[0]
    for r in loaded[1:]:
        a, b = first.data, r.data
        same = a.get("name") == b.get("name") and all(a.get(k) == b.get(k) for k in ("md5", "sha256", "shape"))
        if not same:
            raise MechscopeError(
                f"{r.path} was trained on {b.get('name')} and {first.path} on {a.get('name')}"
                f"{' (other files)' if a.get('name') == b.get('name') else ''}; universality compares networks "
                "trained on the same dataset"
            )
        ka, kb = first.model.config.n_classes, r.model.config.n_classes
        if ka != kb:
            raise MechscopeError(f"{first.path} has {ka} classes and {r.path} has {kb}; they must be the same")
        sa, sb = len(first.model.config.channels), len(r.model.config.channels)
        if sa != sb:
            raise MechscopeError(
                f"{first.path} has {sa} conv stages and {r.path} has {sb}; universality compares networks of the "
                "same depth (widths may differ)"
            )


def run_labels(runs: list[Path]) -> list[str]:
    """Each run's folder name (with its position when two share a name)."""
    names = [r.name or str(r) for r in runs]
    return [n if names.count(n) == 1 else f"{n}#{i + 1}" for i, n in enumerate(names)]


def random_like(model: CNN, seed: int) -> CNN:
    """A randomly initialised CNN of ``model``'s shape (the global random state left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = CNN(model.config)
    return net.eval()


def class_circuits(run, spec, data, feats: U.NetFeatures, x, y) -> tuple[dict[int, tuple[int, ...]], str]:
    """Class -> its circuit's channels in the last stage: from RUN/explain when made from these weights on these
    test images, else computed with explain's circuit search (no held-out check)."""
    from mechscope.cnn.methods.circuits import class_means

    last = spec.last.name
    ours = class_means(feats.means[last], y, spec.n_classes)  # [C, K]
    found = _explain_circuits(run.path / "explain" / "mechanisms.json", last, ours, len(y))
    if found is not None:
        return found, "cnn explain (RUN/explain/mechanisms.json)"
    if not spec.readout.linear:
        return {}, "none (the read-out is not linear; run cnn explain on these test images)"
    from mechscope.cnn.config import ExplainSettings
    from mechscope.core.hooks import run_with_cache
    from mechscope.core.intervene import layer_means

    s = ExplainSettings()
    hook = spec.last.hook_out
    x_ref = data.to_float(data.train_images[: min(s.n_mean, max(1, len(data.train_labels) // 2))])
    with torch.no_grad():
        reference = layer_means(spec.model, x_ref, [hook])[hook]
        acts = torch.cat([run_with_cache(spec.model, x[i : i + 2000], names=[hook])[1][hook]
                          for i in range(0, len(x), 2000)])  # fmt: skip
    found = U.circuit_channels(spec, acts, reference, y, range(spec.n_classes), s.tolerance)
    return found, "computed here (explain's criterion; attribution prefix, pruned; no greedy search or swaps)"


def _explain_circuits(path: Path, stage: str, class_means: torch.Tensor, n: int) -> dict | None:
    """RUN/explain's circuits when they were found on the same test images by the same weights (its class means
    of the last stage agree with ours)."""
    from mechscope.cnn.methods.explained import ExplainResult

    found, why = read_linked(path, ExplainResult)
    if found is None:
        if why:
            log.warning("%s: %s; the class circuits are computed here", path, why)
        return None
    sel = next((s for s in found.selectivity if s.stage == stage), None)
    same = (
        sel is not None
        and found.data.get("test_images") == n
        and found.circuits.stage == stage
        and np.allclose(np.asarray(sel.class_means, dtype=float), class_means.numpy(), rtol=1e-3, atol=1e-5)
    )
    return {int(c.target): tuple(c.channels) for c in found.circuits.circuits} if same else None


def shown_pairs(comparisons, first: str) -> list[tuple[str, str, str, list]]:
    """(a, b, stage, matched pairs) for the first run against each other: the strongest and weakest live pairs."""
    out = []
    for c in comparisons:
        if c.kind != "trained" or c.a != first:
            continue
        for st in c.stages:
            live = [p for p in st.matched if p.a not in st.dead_a and p.b not in st.dead_b]
            rows = live if len(live) <= 2 * SHOWN else live[:SHOWN] + live[-SHOWN:]
            out.append((c.a, c.b, st.stage, rows))
    return out


def unit_images(shown, specs, loaded, labels, data, feats, steps: int) -> tuple[dict, dict]:
    """(run, stage, unit) -> ("png", path) of the run's own `cnn visualize` panel when it was made from these
    weights, else ("image", [C, H, W]) rendered here; and each run's source."""
    need: dict[str, set] = {lab: set() for lab in labels}
    for a, b, stage, rows in shown:
        need[a] |= {(stage, p.a) for p in rows}
        need[b] |= {(stage, p.b) for p in rows}
    x_all = data.test_float()
    vrange = (min(0.0, float(x_all.min())), max(1.0, float(x_all.max())))
    images, sources = {}, {}
    for lab, run in zip(labels, loaded, strict=True):
        panels = featvis_images(run.path / "featvis", specs[lab], getattr(run, "weights_sha256", ""))
        todo = sorted(u for u in need[lab] if u not in panels)
        images.update({(lab, *u): panels[u] for u in need[lab] if u in panels})
        if todo:
            assign = [(f"{st}.hook_post", u) for st, u in todo]
            obj = FV.units_objective(assign) - FV.total_variation()
            rendered = FV.render(specs[lab].model, obj, len(assign), steps, "fourier", seed=0, value_range=vrange)
            images.update({(lab, *u): rendered.images[i] for i, u in enumerate(todo)})
        sources[lab] = (
            "cnn visualize (RUN/featvis)"
            if panels and not todo
            else f"rendered here ({steps} steps)" + (", some from RUN/featvis" if panels else "")
        )
    return images, sources


def featvis_images(fv: Path, spec, digest: str) -> dict:
    """(stage, unit) -> the unit's maximising image from ``cnn visualize`` (its ``channel_images.npz``, saved for the
    stages it visualised whole), when made from these weights: the same kind of image as one rendered here, so the
    two networks' columns compare (its whole panel, beside its top images, is unreadable at this size)."""
    from mechscope.cnn.methods import blocks_vis as V

    out = {}
    for s in spec.stages:
        found = V.load_channel_images(fv / V.CHANNEL_IMAGES, digest, {s.hook_post: s.out_channels}) if digest else None
        if found:
            out.update({(s.name, u): img for u, img in enumerate(found[s.hook_post])})
    return out


def _run_row(label, run, logits, y, vis_source, circuit_source) -> dict:
    cfg = run.model.config
    return {
        "label": label, "path": str(run.path), "channels": list(cfg.channels), "seed": run.config.get("seed"),
        "test_accuracy": float((logits.argmax(1) == y).double().mean()),
        "feature_visualisations": vis_source, "circuits": circuit_source,
    }  # fmt: skip
