"""The tasks of circuit discovery and causal scrubbing on transformers, their metrics, and features of the input.

A **task** is a clean batch, a corrupted batch of the same shape and a scalar metric of the model's output on
the clean batch (:class:`Task`):

* ``induction`` (any model with a vocabulary): BOS + ``n`` random tokens + the same ``n`` again, ``batch``
  sequences (seeded); corrupted = the other sequences (each row gets the next row's tokens). Metrics on the
  second copy (positions n+1..2n−1, each predicting the next token, which the first copy gives away):
  ``loss`` (cross-entropy, the default; lower is better), ``logprob`` (its negative), ``kl`` (KL divergence
  from the clean run's predictions; zero with zero gradient at the clean run, so EAP cannot use it),
  ``logit_diff`` (the correct token's logit minus the corrupted sequence's token's).
* ``tracr`` (a tracr folder): every example of ``examples.json`` at its own length (padded, padded keys masked:
  :class:`~mechscope.lm.methods.graph.Tokens`), corrupted = another example (a seeded derangement; lengths may
  differ, which is what ``length`` and ``reverse`` depend on). Categorical outputs: ``logit_diff`` (default:
  the expected class's logit minus the logit of the class the corrupted example's run predicts there),
  ``logit``, ``logprob``, ``kl``, ``accuracy`` (not differentiable: ACDC and scrubbing only); numerical
  outputs: ``projection`` (default: (y − y')·(y₀ − y')/|y₀ − y'|², 1 at the clean run and 0 at the corrupted
  one) and ``mse`` (against the clean output). Positions 1..n only (BOS's output means nothing).

:data:`FEATURES` are what a causal-scrubbing claim may say a component reads: values of the clean batch's
input (:func:`feature_values`).
"""

from __future__ import annotations

import inspect
import re
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from mechscope.core.errors import MechscopeError
from mechscope.core.intervene import derangement
from mechscope.core.torch_utils import evaluating
from mechscope.core.validate import check_seed
from mechscope.lm.methods.graph import Tokens, TransformerEdges, pad_sequences
from mechscope.lm.methods.scores import repeated_tokens, token_range_of
from mechscope.lm.models.transformer import HookedTransformer

TASKS = ("induction", "tracr")
INDUCTION_METRICS = {"loss": "lower", "logprob": "higher", "kl": "lower", "logit_diff": "higher"}
CATEGORICAL_METRICS = {"logit_diff": "higher", "logit": "higher", "logprob": "higher", "kl": "lower",
                       "accuracy": "higher"}  # fmt: skip
NUMERICAL_METRICS = {"projection": "higher", "mse": "lower"}
NOT_DIFFERENTIABLE = {"accuracy"}


# ---- tasks ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Task:
    """A clean batch, a corrupted batch and a metric of the output on the clean batch (see the module docstring)."""

    kind: str
    metric_name: str
    better: str | None
    clean: Any = field(repr=False)
    corrupted: Any = field(repr=False)
    metric: Callable = field(repr=False, compare=False)
    description: str = ""
    period: int | None = None  # repeated sequences: the repeat's length n
    settings: dict = field(default_factory=dict)
    made_on: Any = field(default=None, repr=False, compare=False)  # a weak reference to the model whose outputs
    # the metric holds (kl's clean predictions, every tracr metric); None: any model of the vocabulary will do

    @property
    def ids(self) -> torch.Tensor:
        return self.clean.ids if isinstance(self.clean, Tokens) else self.clean

    @property
    def n_examples(self) -> int:
        return int(self.ids.shape[0])


def _check_metric(name: str | None, table: dict, kind: str) -> str:
    name = next(iter(table)) if name is None else name
    if name not in table:
        raise MechscopeError(f"unknown metric {name!r} for the {kind} task: one of {', '.join(table)}")
    return name


def _run(model: HookedTransformer, inputs) -> torch.Tensor:
    with torch.no_grad(), evaluating(model):
        out, _ = TransformerEdges(model).forward(inputs)
    return out.detach()


def _check_graph_memory(model: HookedTransformer, batch: int, positions: int) -> None:
    """Refuse a batch whose edge graph would not fit: every sender's and receiver's activations on the clean and the
    corrupted batch (an estimate, in float32; a batch of a million was killed for memory without a word)."""
    from mechscope.lm.methods.heads import MEMORY_BUDGET

    cfg = model.cfg
    nodes = 2 + cfg.n_layers * (4 * cfg.n_heads + 2)  # embeddings, heads (out, q, k, v), MLPs (out, in)
    need = 2 * nodes * batch * positions * cfg.d_model * 4
    if need > MEMORY_BUDGET:
        raise MechscopeError(
            f"batch {batch} × {positions} positions would hold about {need / 2**30:.1f} GiB of the edge graph's "
            f"activations (budget {MEMORY_BUDGET / 2**30:.0f} GiB); use a smaller batch or n"
        )


def induction_task(
    model: HookedTransformer,
    metric: str | None = None,
    *,
    n: int = 20,
    batch: int = 8,
    seed: int = 0,
    token_range: tuple[int, int] | None = None,
    distinct: bool = False,
) -> Task:
    """Repeated random tokens (BOS + n + the same n); corrupted = each row's next row. ``distinct``: each copy's
    n tokens all different (drawn without replacement: with a range of exactly n tokens, every row is a
    permutation of the same tokens, so rows agree on the token at a position often enough for scrubbing's
    per-position features)."""
    name = _check_metric(metric, INDUCTION_METRICS, "induction")
    if model.cfg.d_vocab_out is not None:  # clean and corrupted scored the same and every edge +0, exit 0
        raise MechscopeError(f"{model.cfg.name or 'this model'}: its outputs are classes of their own, not next "
                             "tokens (a compiled tracr model), so the induction task's loss means nothing; its own "
                             "task is tracr (the default for it)")  # fmt: skip
    for what, v, low in (("n", n, 2), ("batch", batch, 2)):
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise MechscopeError(f"the induction task needs {what} >= {low}, got {v!r}")
    check_seed(seed, "seed")
    if 1 + 2 * n > model.cfg.n_ctx:
        raise MechscopeError(f"BOS + 2 × {n} tokens do not fit the context of {model.cfg.n_ctx}")
    _check_graph_memory(model, batch, 1 + 2 * n)
    if not isinstance(distinct, bool):
        raise MechscopeError(f"distinct must be true or false, got {distinct!r}")
    lo, hi = token_range_of(model, token_range)
    gen = torch.Generator().manual_seed(seed)
    if distinct:
        if hi - lo < n:
            raise MechscopeError(f"{n} distinct tokens need a token range of at least {n}, got [{lo}, {hi})")
        seq = torch.stack([lo + torch.randperm(hi - lo, generator=gen)[:n] for _ in range(batch)])
        bos = model.cfg.bos_token_id if model.cfg.bos_token_id is not None else lo
        clean = torch.cat([torch.full((batch, 1), bos), seq, seq], 1)
    else:
        clean = repeated_tokens(model, n, batch, 2, gen, (lo, hi))
    corrupted = clean.roll(-1, 0)
    q = torch.arange(n + 1, 2 * n)  # second-copy positions whose next token the first copy gives away
    target, other = clean[:, q + 1], corrupted[:, q + 1]
    clean_lp = F.log_softmax(_run(model, clean)[:, q].double(), -1)

    def logprob(out):
        lp = F.log_softmax(out[:, q].double(), -1)
        return lp.gather(-1, target[..., None]).mean()

    fns = {
        "loss": lambda out: -logprob(out),
        "logprob": logprob,
        "kl": lambda out: (
            F.kl_div(F.log_softmax(out[:, q].double(), -1), clean_lp, log_target=True, reduction="none").sum(-1).mean()
        ),  # fmt: skip
        "logit_diff": lambda out: (
            (out[:, q].gather(-1, target[..., None]) - out[:, q].gather(-1, other[..., None])).double().mean()
        ),
    }
    return Task("induction", name, INDUCTION_METRICS[name], clean, corrupted, fns[name],
                f"second-copy {name} on BOS + {n} random{' distinct' if distinct else ''} tokens [{lo}, {hi}) "
                f"repeated, {batch} sequences; "
                "corrupted: another of the sequences", n,
                {"n": n, "batch": batch, "seed": seed, "token_range": [lo, hi], "distinct": distinct},
                weakref.ref(model) if name == "kl" else None)  # fmt: skip


def tracr_task(model: HookedTransformer, metric: str | None = None, *, seed: int = 0, limit: int | None = None) -> Task:
    """Every example of the tracr model's ``examples.json`` (or the first ``limit``); corrupted = another example."""
    check_seed(seed, "seed")
    from mechscope.lm.models.convert.tracr import read_examples

    info = getattr(model, "tracr", None)
    if info is None:
        raise MechscopeError("the tracr task needs a tracr model (a folder of shared/data/tracr)")
    numerical = info.output_type == "numerical"
    table = NUMERICAL_METRICS if numerical else CATEGORICAL_METRICS
    name = _check_metric(metric, table, f"tracr ({info.output_type} output)")
    ex = read_examples(info.directory, info, model.cfg.d_vocab, model.cfg.n_logits)
    ids = list(ex.ids)
    outputs = list(ex.outputs)
    if limit is not None:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 2:
            raise MechscopeError(f"--limit (limit) must be an integer >= 2, got {limit!r}")
        ids, outputs = ids[:limit], outputs[:limit]
    where = Path(info.directory) / "examples.json"
    if len(ids) < 2:
        raise MechscopeError(f"{where}: the tracr task corrupts each example into another: it needs two or more")
    clean = pad_sequences(ids, info.pad_id if info.pad_id is not None else info.bos_id)
    corrupted = clean[derangement(len(ids), torch.Generator().manual_seed(seed))]
    if torch.equal(clean.ids, corrupted.ids):
        raise MechscopeError(f"{where}: every example is the same, so each corrupted input is its clean one: "
                             "nothing to attribute")  # fmt: skip
    valid = clean.valid()
    valid[:, 0] = False  # BOS's output means nothing
    clean_out = _run(model, clean)
    corrupted_out = _run(model, corrupted)
    if numerical:
        y0, y1 = clean_out[..., 0].double(), corrupted_out[..., 0].double()
        d = torch.where(valid, y0 - y1, torch.zeros_like(y0))
        denom = float((d * d).sum())

        def projection(out):
            if denom == 0:
                raise MechscopeError("the corrupted examples give the clean outputs: nothing to measure")
            return ((out[..., 0].double() - y1) * d).sum() / denom

        fns = {"projection": projection,
               "mse": lambda out: ((out[..., 0].double() - y0)[valid] ** 2).mean()}  # fmt: skip
    else:
        target = torch.zeros_like(clean.ids)
        for i, o in enumerate(outputs):
            target[i, 1 : 1 + len(o)] = torch.tensor(o)
        other = corrupted_out.argmax(-1)
        clean_lp = F.log_softmax(clean_out.double(), -1)

        def pick(out, cls):
            return out.double().gather(-1, cls[..., None])[..., 0][valid]

        fns = {
            "logit_diff": lambda out: (pick(out, target) - pick(out, other)).mean(),
            "logit": lambda out: pick(out, target).mean(),
            "logprob": lambda out: pick(F.log_softmax(out.double(), -1), target).mean(),
            "kl": lambda out: (
                F.kl_div(F.log_softmax(out.double(), -1), clean_lp, log_target=True, reduction="none")
                .sum(-1)[valid]
                .mean()
            ),  # fmt: skip
            "accuracy": lambda out: (out.argmax(-1) == target)[valid].double().mean(),
        }
    fewer = f", all there are of the {limit} asked for" if limit is not None and limit > len(ids) else ""
    return Task("tracr", name, table[name], clean, corrupted, fns[name],
                f"{name} on the {len(ids)} examples of {info.name}{fewer} (each at its own length); corrupted: "
                "another example (a seeded derangement)", None,
                {"seed": seed, "limit": limit, "examples": len(ids)}, weakref.ref(model))  # fmt: skip


def check_model(model) -> None:
    """A HookedTransformer, or a one-line error (the (model, tokenizer) pair load_model returns named as such)."""
    if isinstance(model, tuple) and model and isinstance(model[0], HookedTransformer):
        raise MechscopeError("model is the (model, tokenizer) pair mechscope.lm.load_model returns: pass its model")
    if not isinstance(model, HookedTransformer):
        raise MechscopeError(f"expected a HookedTransformer (mechscope.lm.load_model), got {type(model).__name__}")


def check_task(task) -> None:
    """A :class:`Task` (make_task), or a one-line error."""
    if not isinstance(task, Task):
        raise MechscopeError(f"expected a Task (mechscope.lm.methods.tasks.make_task), got {type(task).__name__}")


def make_task(model: HookedTransformer, task: str | None = None, metric: str | None = None, **settings) -> Task:
    """The task a model suits (``tracr`` for tracr models, ``induction`` otherwise) or the one named."""
    check_model(model)
    kind = task or ("tracr" if getattr(model, "tracr", None) is not None else "induction")
    if kind not in TASKS:
        raise MechscopeError(f"unknown task {kind!r}: one of {', '.join(TASKS)}")
    reads = _TASK_SETTINGS[kind]
    unknown = sorted(set(settings) - _ALL)
    if unknown:
        raise MechscopeError(f"unknown task setting {unknown[0]!r} (the tasks read {', '.join(sorted(_ALL))})")
    ignored = unread_settings(kind, settings)
    if ignored:  # they were dropped without a word
        raise MechscopeError(f"{', '.join(ignored)}: not settings of the {kind} task (it reads {', '.join(reads)})")
    kept = {k: v for k, v in settings.items() if k in reads and v is not None}
    return tracr_task(model, metric, **kept) if kind == "tracr" else induction_task(model, metric, **kept)


def unread_settings(kind: str, settings: dict) -> list[str]:
    """The settings given (not None, not at their default) that the task ``kind`` does not read, sorted."""
    reads = _TASK_SETTINGS[kind]
    return sorted(k for k, v in settings.items() if k not in reads and v is not None and v != _UNREAD_DEFAULTS[k])


def _settings(fn) -> dict:
    return {k: p.default for k, p in inspect.signature(fn).parameters.items() if p.kind is p.KEYWORD_ONLY}


_TASK_SETTINGS = {"tracr": tuple(_settings(tracr_task)), "induction": tuple(_settings(induction_task))}
_ALL = {k for keys in _TASK_SETTINGS.values() for k in keys}
# a setting the task does not read may be given at its default (the CLI passes every option)
_UNREAD_DEFAULTS = _settings(tracr_task) | _settings(induction_task)


# ---- features of the input (causal scrubbing) ---------------------------------------------------------

FEATURES = {
    "token": "the token at the position (per position)",
    "prev_token": "the token one position back, i−1 (per position; -1 at position 0)",
    "token[i-K]": "the token K positions back (per position), e.g. token[i-2]",
    "token[i-n]": "the token one repeat back in a repeated sequence (per position; needs the induction task)",
    "token[i-n+K]": "the token n−K positions back, e.g. token[i-n+1] (the token after the earlier copy)",
    "position": "the position (per position: any row that is real there, same position)",
    "length": "the sequence's length (per row: tracr's length-dependent programs)",
    "sequence": "the row itself (per row; recursively resampled, so the same as no feature)",
}
_TOKEN = re.compile(r"^token\[i(?:(?P<sign>[+-])(?P<k>\d+)|-n(?:(?P<nsign>[+-])(?P<nk>\d+))?)?\]$")


def _shifted(ids: torch.Tensor, back: int) -> torch.Tensor:
    """The token ``back`` positions back (forward for negative), -1 where there is none."""
    out = torch.full_like(ids, -1)
    p = ids.shape[1]
    if back >= 0 and back < p:
        out[:, back:] = ids[:, : p - back]
    elif back < 0 and -back < p:
        out[:, : p + back] = ids[:, -back:]
    return out


PADDED = -2  # a positional feature's value at a row's padding: no real position has it, so none draws from there


def feature_values(name: str, task: Task) -> torch.Tensor:
    """The values of feature ``name`` on the task's clean batch: [N] (per row) or [N, P] (per row and position).
    At a padded position a per-position feature reads :data:`PADDED`: a real position of one row drew its donor
    among every row at that position, padding included (a shorter row's PAD there, which tracr's heads read as
    zeros: 15% of the scored positions of reverse's ``position`` claim, ties in the argmax)."""
    values = _feature_values(name, task)
    if values.dim() == 2 and isinstance(task.clean, Tokens):
        values = torch.where(task.clean.valid(), values, PADDED)
    return values


def _feature_values(name: str, task: Task) -> torch.Tensor:
    if not isinstance(name, str):
        raise MechscopeError(f"a feature is named by a string, got {name!r}")
    ids = task.ids
    lengths = task.clean.lengths if isinstance(task.clean, Tokens) else torch.full((len(ids),), ids.shape[1])
    if name == "token":
        return ids
    if name == "prev_token":
        return _shifted(ids, 1)
    if name == "position":
        return torch.arange(ids.shape[1]).expand_as(ids)
    if name == "length":
        return lengths
    if name == "sequence":
        return torch.arange(len(ids))
    m = _TOKEN.match(name)
    if m is None:
        raise MechscopeError(f"unknown feature {name!r}: one of {', '.join(FEATURES)}")
    if m["k"] is not None:
        return _within(name, ids, int(m["k"]) * (1 if m["sign"] == "-" else -1))
    if "-n" in name:
        if task.period is None:
            raise MechscopeError(f"feature {name!r} needs a repeated sequence (the induction task)")
        k = int(m["nk"] or 0) * (1 if m["nsign"] == "-" else -1)
        return _within(name, ids, task.period + k)
    return ids


def _within(name: str, ids: torch.Tensor, back: int) -> torch.Tensor:
    """The token ``back`` positions away, refused when that is beyond every sequence (it was -1 everywhere, a
    constant feature that scrubbing read as a claim)."""
    if abs(back) >= ids.shape[1]:
        raise MechscopeError(f"feature {name!r}: an offset of {abs(back)} is beyond the {ids.shape[1]} positions")
    return _shifted(ids, back)


def is_feature(name: str) -> bool:
    """Whether ``name`` is a feature :func:`feature_values` reads (one of :data:`FEATURES` or a token offset)."""
    return name in FEATURES or _TOKEN.match(name) is not None


def describe_feature(name: str) -> str:
    """The feature ``name`` in words, as a report gives it."""
    if name in FEATURES:
        return FEATURES[name]
    return f"the token at that offset ({name})"
