"""``mechscope lm discover`` and the transformer half of ``mechscope scrub``: discovery.json / scrub.json and a
self-contained report.html, written atomically."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

from mechscope.core.errors import MechscopeError, about
from mechscope.core.graphs import check_discovery_settings
from mechscope.core.outputs import atomic_output, check_target, write_json
from mechscope.core.paths import model_out
from mechscope.core.torch_utils import Timer
from mechscope.lm.methods.discovery import LMDiscovery, discover, hand_edge_ids, heads_edges
from mechscope.lm.methods.graph import TransformerEdges
from mechscope.lm.methods.scrubbing import LMScrub, parse_hypothesis_file, scrub_hypothesis
from mechscope.lm.methods.tasks import make_task, unread_settings
from mechscope.lm.models.transformer import work_counter
from mechscope.lm.pipelines.loading import load_lm


def _name(spec) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(spec).rstrip("/").split("/")[-1] or str(spec))


def load_any(spec: str, device=None, dtype=None, revision=None):
    """A model for discovery: a train-toy run, a tracr folder, or anything ``load_model`` takes (:func:`load_lm`)."""
    return load_lm(spec, device, dtype, revision=revision)[0]


def discover_model(
    model_spec: str,
    out: str | Path | None = None,
    *,
    method: str = "eap-ig",
    task: str | None = None,
    metric: str | None = None,
    size: int | float | None = None,
    threshold: float | None = None,
    steps: int | None = None,
    ablation: str = "patch",
    n: int = 20,
    batch: int = 8,
    seed: int = 0,
    limit: int | None = None,
    token_range: tuple[int, int] | None = None,
    distinct: bool = False,
    curve: bool = True,
    n_random: int | None = None,
    compare_heads: str | Path | None = None,
    force: bool = False,
    device=None,
    dtype=None,
    revision: str | None = None,
    progress: bool = False,
) -> tuple[Path, LMDiscovery]:
    """Discover a transformer's circuit; write discovery.json and report.html. Returns (out, the result)."""
    from mechscope.lm.models.convert.tracr import check_circuit
    from mechscope.lm.report.discovery import write_report

    steps, n_random = check_discovery_settings(method, seed, n_random, size, threshold, steps, curve,
                                                 ablation)
    out = Path(out) if out is not None else model_out("discover", model_spec)
    check_target(out, force)
    timer = Timer("lm discover")
    with timer.section("load"):
        model = load_any(model_spec, device, dtype, revision)
        info = getattr(model, "tracr", None)
        if (task or ("tracr" if info is not None else "induction")) == "tracr":
            flags = {"n": "--n", "batch": "--batch", "token_range": "--tokens", "distinct": "--distinct"}
            given = {"n": n, "batch": batch, "token_range": token_range, "distinct": distinct}
            asked = [flags[k] for k in flags if k in unread_settings("tracr", given)]  # in the order of the flags
            if asked:  # the tracr task runs the compiled model's stored examples; these were silently unread
                raise MechscopeError(f"{', '.join(asked)}: options of the induction task, not of tracr's examples")
        known = check_circuit(info.directory, model.cfg) if info is not None else None
        hand = _hand_edges(compare_heads, model) if compare_heads is not None else None
        counter = work_counter(model)
        with counter.counting():
            t = make_task(model, task, metric, n=n, batch=batch, seed=seed, limit=limit, token_range=token_range,
                          distinct=distinct)  # fmt: skip
    with counter.counting():
        result = discover(model, t, method, size=size, threshold=threshold, steps=steps, ablation=ablation,
                          curve=curve, n_random=n_random, seed=seed, known=known, hand_edges=hand,
                          name=str(model_spec), progress=progress)  # fmt: skip
    work = counter.report("lm discover", t.ids.numel())
    result = replace(result, seconds={**timer.seconds, **result.seconds}, work=work)
    with atomic_output(out, force) as tmp:
        write_json(tmp / LMDiscovery.FILE, result.to_dict())
        write_report(result, tmp / "report.html")
    return out, result


def _hand_edges(path, model) -> list[tuple[str, str, str]]:
    """The edges a heads report (``--compare-heads``) confirmed, from a report of a model of this one's shape (one
    of another shape was read as this one's: heads renamed, every edge on h0 with kv_groups 0)."""
    import numpy as np

    from mechscope.lm.methods.heads import HeadsResult

    heads = HeadsResult.load(path)
    cfg = model.cfg
    shape = tuple(np.shape(heads.scores.get("induction")))
    groups = cfg.n_heads // cfg.kv_heads
    if shape != (cfg.n_layers, cfg.n_heads) or heads.kv_groups != groups:
        raise MechscopeError(
            f"{path}: a heads report of a model with {' × '.join(map(str, shape))} layers × heads and "
            f"{heads.kv_groups!r} query heads per key/value head; this model has {cfg.n_layers} × {cfg.n_heads} and "
            f"{groups}"
        )
    hand = heads_edges(heads)
    if not hand:
        raise MechscopeError(f"{path}: the heads report confirmed no edge to compare with")
    with about(path):  # an edge this model's graph lacks (a hand-edited layer past the last), said of the file
        hand_edge_ids(TransformerEdges(model).graph, hand)
    return hand


def scrub_file(data: dict, where: str, out: str | Path | None = None, force: bool = False, device=None,
               dtype=None) -> tuple[Path, LMScrub]:  # fmt: skip
    """Causal scrubbing of a transformer hypothesis (the parsed JSON of ``where``); scrub.json and report.html."""
    from mechscope.lm.report.discovery import write_scrub_report

    spec = parse_hypothesis_file(data, where)
    out = Path(out) if out is not None else Path("runs") / "scrub" / _name(Path(where).stem)
    check_target(out, force)
    model = load_any(spec.model, device, dtype)
    with about(where):
        result = scrub_hypothesis(model, spec, name=spec.model, counter=work_counter(model))
    with atomic_output(out, force) as tmp:
        write_json(tmp / LMScrub.FILE, result.to_dict())
        write_scrub_report(result, tmp / "report.html")
    return out, result
