"""``mechscope lm graph``: the attribution graph of a prompt; graph.json, graph.html, the unpruned graph and
circuit-tracer's graph JSON.

:func:`graph_model` is the Python API (a model object or a model name; transcoders from a folder, the MLP neurons,
or trained here), :func:`graph_run` the CLI's, :func:`view_run` re-renders an annotated graph JSON (as the viewer
downloads it) without any model. Each writes its files atomically (never over an existing folder without ``force``).
"""

from __future__ import annotations

import logging
import numbers
import re
from dataclasses import replace
from functools import cache, partial
from pathlib import Path

import torch

from mechscope.core.attribution_graph import PhaseWork, asked_interventions, check_asked, check_counts
from mechscope.core.attribution_graph.files import view_graph, write_graph_files
from mechscope.core.errors import MechscopeError
from mechscope.core.outputs import atomic_output, check_target, write_json
from mechscope.core.paths import model_out
from mechscope.core.torch_utils import Timer
from mechscope.core.validate import check_int, repeated, scalar, settings_or
from mechscope.lm.methods.attribution_graph import (
    GraphSettings,
    LmAttributionGraph,
    attribution_graph,
    feature_examples,
    intervene,
)
from mechscope.lm.methods.attribution_graph_qk import qk_attribution
from mechscope.lm.methods.crosslayer import CrossLayerTranscoder, is_crosslayer
from mechscope.lm.methods.edge_paths import edge_paths
from mechscope.lm.methods.replacement_training import TranscoderTraining, train_transcoders
from mechscope.lm.methods.transcoders import Transcoders
from mechscope.lm.models.transformer import work_counter
from mechscope.lm.pipelines.loading import load_lm
from mechscope.lm.tokenizer import encode_named

log = logging.getLogger(__name__)

FULL_ABOUT = ("the unpruned graph: rows (targets), cols (sources), values (edges) over the node space "
              "[features with rows | errors | inputs | logits]; kind: 0 feature 1 error 2 input 3 logit; features: "
              "their source index")


def prompt_tokens(model, tokenizer, prompt: str | None, tokens: list[int] | None, bos: bool = True) -> torch.Tensor:
    """The prompt's token ids [P] (BOS first when the model has one and ``bos``), refused in one line when empty or
    longer than the context window."""
    if (prompt is None) == (tokens is None):
        raise MechscopeError("give a prompt (--prompt TEXT) or token ids (--tokens 1,2,3), one of them")
    if prompt is not None:
        if tokenizer is None:
            raise MechscopeError(f"{model.cfg.name or 'this model'} has no tokenizer: give --tokens")
        ids = encode_named(tokenizer.encode, prompt, "the prompt", add_bos=False)
    else:
        ids = _id_list(tokens)
    b = model.cfg.bos_token_id
    if bos and b is not None and (not ids or ids[0] != b):
        ids = [b, *ids]
    if getattr(model, "tracr", None) is not None and ids and b is not None and ids[0] != b:  # --no-bos on tracr
        raise MechscopeError(f"a compiled tracr model reads BOS (id {b}) at position 0: put it first or leave out "
                             "--no-bos")  # fmt: skip
    if not ids:
        raise MechscopeError("the prompt is empty")
    if len(ids) > model.cfg.n_ctx:
        raise MechscopeError(f"the prompt has {len(ids)} tokens, longer than the context of {model.cfg.n_ctx}")
    t = torch.tensor(ids)
    model.check_tokens(t[None])
    return t


def _id_list(tokens) -> list[int]:
    """Token ids given in Python, one prompt: a list of integers or a 1-D tensor/array of them ([[1, 2], [3, 4]]
    was "Boolean value of Tensor ... ambiguous", "1,2,3" a TypeError from torch)."""
    if getattr(tokens, "ndim", 1) == 2 and len(tokens) == 1:  # one prompt as a batch of one [1, P]
        tokens = tokens[0]
    if isinstance(tokens, (str, bytes)) or not hasattr(tokens, "__iter__") or getattr(tokens, "ndim", 1) != 1:
        raise MechscopeError(f"tokens must be one prompt's token ids (a list of integers or a 1-D tensor), got "
                             f"{type(tokens).__name__} of shape {list(getattr(tokens, 'shape', []))}")  # fmt: skip
    ids = [scalar(t) for t in tokens]
    bad = [t for t in ids if isinstance(t, bool) or not isinstance(t, numbers.Integral)]
    if bad:
        what = "a list: one prompt's ids, not a batch" if isinstance(bad[0], (list, tuple)) else repr(bad[0])
        raise MechscopeError(f"token ids are integers, got {what if len(what) < 60 else what[:57] + '...'}")
    return [int(t) for t in ids]


def check_qk(model, qk, positions: int) -> None:
    """Each QK head asked, (layer, head[, query_pos[, key_pos]]), of integers inside the model and the prompt."""
    cfg = model.cfg
    asked = []
    for spec in qk or []:
        if isinstance(spec, (str, bytes)) or not hasattr(spec, "__len__") or not 2 <= len(spec) <= 4:
            raise MechscopeError(f"a QK head is (layer, head[, query_pos[, key_pos]]), got {spec!r}")
        values = [check_int(v, "a QK head's layer, head and positions") for v in spec]
        asked.append(tuple(values))
        if not (0 <= values[0] < cfg.n_layers and 0 <= values[1] < cfg.n_heads):
            raise MechscopeError(f"head {values[0]}.{values[1]} outside the model's {cfg.n_layers} layers x "
                                 f"{cfg.n_heads} heads")  # fmt: skip
        bad = [v for v in values[2:] if not 0 <= v < positions]
        if bad:
            raise MechscopeError(f"QK position {bad[0]} outside the prompt's 0..{positions - 1}")
    twice = repeated(asked)
    if twice:  # the same attribution was computed, and written, twice
        head, where = f"{twice[0][0]}.{twice[0][1]}", ":".join(map(str, twice[0][2:]))
        raise MechscopeError(f"--qk {head}{'@' + where if where else ''} given more than once")


def resolve_targets(model, tokenizer, targets) -> list[int] | None:
    """Target logits given as ids or texts (a text must be one token)."""
    if not targets:
        return None
    out = []
    for t in targets:
        t = scalar(t)  # a 0-d tensor or array
        if isinstance(t, numbers.Integral) and not isinstance(t, bool):
            t = int(t)
        if not isinstance(t, (int, str)) or isinstance(t, bool):  # True was int('True'), 5.0 a tokenizer TypeError
            raise MechscopeError(f"a target is a token id or a one-token text, got {t!r}")
        if isinstance(t, int) or (isinstance(t, str) and re.fullmatch(r"#-?\d+", t)):  # '#-1': out of range below
            out.append(int(str(t).lstrip("#")))
            continue
        if tokenizer is None:
            raise MechscopeError(f"target {t!r}: this model has no tokenizer; give a token id as #ID")
        ids = tokenizer.encode(t, add_bos=False)
        if len(ids) != 1:
            raise MechscopeError(f"target {t!r} is {len(ids)} tokens, not one; give a token id as #ID")
        out.append(ids[0])
    V = model.cfg.n_logits
    bad = [i for i in out if not 0 <= i < V]
    if bad:
        raise MechscopeError(f"target logit {bad[0]} outside the model's 0..{V - 1}")
    twice = repeated(out)
    if twice:  # the graph would hold the same logit node twice
        raise MechscopeError(f"--target names logit {twice[0]} more than once ({', '.join(map(repr, targets))})")
    return out


def get_transcoders(
    model, tokenizer, transcoders, train_tokens: int | None, text, progress=None, crosslayer: bool = False
):
    """(Transcoders or a CrossLayerTranscoder, training record or None) from a folder (a CLT's layout is detected),
    ``"neurons"``, a :class:`Transcoders` or :class:`CrossLayerTranscoder`, or trained (``crosslayer``: one CLT) on
    ``text()``'s (text, name)."""
    if train_tokens is not None:  # 0 is a count to refuse, not "not given"
        check_int(train_tokens, "--train-transcoders (train_tokens)", 256, 10**9)
    if crosslayer and (transcoders is not None or not train_tokens):
        raise MechscopeError("--crosslayer trains a cross-layer transcoder: give it with --train-transcoders TOKENS")
    if model.cfg.attn_only:
        if transcoders not in (None, "neurons") or train_tokens:
            raise MechscopeError(f"{model.cfg.name or 'this model'} has no MLPs: it takes no transcoders")
        return Transcoders(()), None
    if isinstance(transcoders, (Transcoders, CrossLayerTranscoder)):
        transcoders.check(model)
        return transcoders, None
    if transcoders == "neurons":
        return Transcoders.from_mlp_neurons(model), None
    if transcoders is not None:
        t = CrossLayerTranscoder.load(transcoders) if is_crosslayer(transcoders) else Transcoders.load(transcoders)
        t.check(model)
        return t, None
    if not train_tokens:
        raise MechscopeError(
            "give transcoders (--transcoders DIR), use the MLP neurons (--neurons, ReLU MLPs only) "
            "or train small ones here (--train-transcoders TOKENS)"
        )
    if tokenizer is None:
        raise MechscopeError("training transcoders needs a tokenizer (text)")
    words, name = text()
    r = train_transcoders(
        model,
        encode_named(tokenizer.encode, words, name, add_bos=False),
        TranscoderTraining(tokens=train_tokens, crosslayer=crosslayer),
        text_name=str(name),
        progress=progress,
    )
    return r.transcoders, r


def graph_model(
    model,
    prompt: str | None = None,
    *,
    tokens: list[int] | None = None,
    tokenizer=None,
    transcoders=None,
    train_tokens: int | None = None,
    crosslayer: bool = False,
    targets=None,
    logit_pos: int | None = None,
    settings: GraphSettings | None = None,
    qk: list[tuple] | None = None,
    ablate: list[list[str]] | None = None,
    steer: list[tuple[str, float]] | None = None,
    auto_intervention: bool = True,
    paths: int | None = 0,
    dashboards: int = 24,
    examples: int = 4096,
    text_file=None,
    bos: bool = True,
    out=None,
    force: bool = False,
    progress=None,
    name: str = "",
    device=None,
    dtype=None,
    revision: str | None = None,
) -> tuple[Path | None, LmAttributionGraph]:
    """The attribution graph of a prompt, checked, with interventions, QK attributions and dashboards; written to
    ``out`` when given. ``model``: a name (``smollm2``, a folder) or a ``HookedTransformer``; ``qk``: heads
    ``(layer, head[, query_pos[, key_pos]])``; ``ablate``: lists of node ids to ablate together; ``steer``: (node,
    value); ``auto_intervention``: ablate the most influential feature (and the first layer's) too;
    ``dashboards``: top-example cards for the most influential feature nodes, from ``examples`` tokens of text;
    ``crosslayer``: with ``train_tokens``, train one cross-layer transcoder instead of per-layer ones (a folder's
    CLT layout is detected on its own);
    ``device``, ``dtype``, ``revision``: as ``load_model`` takes them, for a model given by name."""
    from mechscope.lm.models.convert.tracr import vocab_tokenizers
    from mechscope.lm.models.transformer import HookedTransformer
    from mechscope.lm.text import read_text

    check_counts(paths=paths or 0, dashboards=dashboards, examples=examples)
    check_asked(ablate, steer)
    settings = settings_or(settings, GraphSettings)  # before the model loads and transcoders train
    text = cache(partial(read_text, text_file))  # read once, when first needed (transcoders, dashboards)
    if text_file is not None:  # a text the user gave is read before any work: missing, a folder, empty, binary
        text()
    if out is not None:
        check_target(out, force)
    timer = Timer("lm graph")
    if not isinstance(model, HookedTransformer):
        with timer.section("load"):
            model, tok, loaded_name = load_lm(model, device, dtype, revision=revision)
        tokenizer, name = tokenizer or tok, name or loaded_name
    in_words, out_words = vocab_tokenizers(model)  # a tracr model's vocabularies (None otherwise)
    words = tokenizer or in_words  # reads the prompt and names the input tokens
    ids = prompt_tokens(model, words, prompt, tokens, bos)
    tgt = resolve_targets(model, out_words or tokenizer, targets)
    check_qk(model, qk, len(ids))  # before the transcoders train and the graph is computed, not after them
    work = PhaseWork(work_counter(model), timer)  # the blocks' passes, by phase (see PhaseWork for what they include)

    with work.counter.counting():
        with work.phase("transcoders"):
            tcs, trained = get_transcoders(model, tokenizer, transcoders, train_tokens, text, progress, crosslayer)
        with work.phase("graph"):
            graph, rep = attribution_graph(
                model,
                tcs,
                ids,
                tokenizer=words,
                logit_tokenizer=out_words,
                targets=tgt,
                logit_pos=logit_pos,
                settings=settings,
                name=name or model.cfg.name,
            )
        with work.phase("interventions"):
            feats = graph.features()
            checks = asked_interventions(partial(intervene, graph, rep), feats, auto_intervention, ablate, steer)
        qks = []
        with work.phase("qk"):
            labels = list(graph.input_labels)
            for spec in qk or []:
                layer, head, *rest = spec
                qp = rest[0] if len(rest) > 0 else None
                kp = rest[1] if len(rest) > 1 else None
                qks.append(qk_attribution(rep, layer, head, qp, kp, labels=labels))
        path_rows = []
        if paths:
            with work.phase("paths"):
                top = int(rep.logit_targets[0])  # the label the graph gave this logit's node
                label = next(n.get("label") for n in graph.nodes if n["kind"] == "logit" and n["feature"] == top)
                path_rows.append(edge_paths(rep, 0, n=paths, label=label))
        dash = {}
        if dashboards and feats and tokenizer is not None and examples:
            with work.phase("dashboards"):
                dash = _dashboards(
                    model, tcs, tokenizer, [(f["layer"], f["feature"]) for f in feats[:dashboards]], examples, text,
                    text_file is not None,
                )
    if trained is not None:
        dic = dict(graph.dictionaries) | {
            "quality": [
                {k: r.get(k) for k in ("layer", "explained_variance", "l0", "error_share", "dead")}
                for r in trained.layers
            ],
            "trained": trained.settings,
        }
    else:
        dic = graph.dictionaries
    graph = replace(
        graph,
        checks=tuple(c.to_dict() for c in checks),
        qk=tuple(q.to_dict() for q in qks),
        dashboards=dash,
        dictionaries=dic,
        paths=tuple(p.to_dict() for p in path_rows),
        seconds={**graph.seconds, **{f"pipeline: {k}": v for k, v in timer.seconds.items()}},
        full=graph.full,
        work=work.report("lm graph", len(ids), graph.counts, graph.settings["batch_size"], _not_counted(trained)),
    )
    if out is None:
        return None, graph
    out = Path(out)
    with atomic_output(out, force) as tmp:
        write_outputs(graph, tmp)
        if trained is not None:
            tcs.save(tmp / "transcoders", model_name=name)
            write_json(tmp / "transcoders" / "training.json", trained.to_dict())
    return out, graph


def _not_counted(trained) -> str:
    """What ``work`` leaves out (:class:`~mechscope.core.attribution_graph.PhaseWork`)."""
    out = "the transcoders' encoders and decoders and the unembedding (not blocks)"
    if trained is not None:
        out += "; the training steps of the transcoders trained here (their activations' harvest is counted)"
    return out


def write_outputs(graph, where: Path, slug: str = "graph") -> None:
    """graph.json, graph.html, graph-circuit-tracer.json and (when the graph has it) graph_full.safetensors."""
    from mechscope.lm.report.attribution_graph import page

    write_graph_files(graph, where, page(graph, slug), FULL_ABOUT, slug)


def _dashboards(model, tcs, tokenizer, feats, examples: int, text, given: bool) -> dict:
    try:
        words, name = text()
        ids = encode_named(tokenizer.encode, words[: examples * 8], name, add_bos=False)
    except MechscopeError as e:
        if given:  # a text the user gave: refused, not passed over with a warning
            raise
        log.warning("no dashboards: %s", e)
        return {}
    ctx = min(64, model.cfg.n_ctx)
    bos = model.cfg.bos_token_id
    body = ctx - (1 if bos is not None else 0)
    rows = [
        ([bos] if bos is not None else []) + ids[i : i + body]
        for i in range(0, min(len(ids), examples) - body + 1, body)
    ]
    if not rows:
        return {}
    contexts = torch.tensor(rows)
    out = feature_examples(model, tcs, contexts, feats, lambda i: tokenizer.decode([i]))
    for v in out.values():
        v["note"] = f"top of {len(rows)} contexts of {ctx} tokens ({len(rows) * body:,} tokens of text)"
    return out


def graph_run(model: str, prompt, out=None, force: bool = False, **kw) -> tuple[Path, LmAttributionGraph]:
    """The CLI's call: the default output folder is ``runs/graph/MODEL``."""
    out = Path(out) if out is not None else model_out("graph", model)
    path, graph = graph_model(model, prompt, out=out, force=force, **kw)
    return path, graph


def view_run(graph_json, out=None, force: bool = False) -> tuple[Path, LmAttributionGraph]:
    """Re-render a graph JSON (as written, or downloaded from the viewer with annotations): graph.html, the
    circuit-tracer JSON and the checked graph.json itself, into ``out`` (default: beside it, ``FILE-view/``)."""
    return view_graph(graph_json, LmAttributionGraph, write_outputs, out, force)
