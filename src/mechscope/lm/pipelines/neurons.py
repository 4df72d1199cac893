"""``lm neurons`` and ``lm solu-compare``: MLP neurons' top contexts and monosemanticity.

Strings steps together; the figures are computed in :mod:`mechscope.lm.methods.neurons`, the pages
drawn in :mod:`mechscope.lm.report.neurons`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from mechscope.core.errors import MechscopeError
from mechscope.core.outputs import atomic_output, check_target, write_json
from mechscope.core.paths import model_out
from mechscope.core.torch_utils import Timer, torch_threads
from mechscope.core.validate import check_count, check_seed, check_threads, check_types, settings_or
from mechscope.lm.methods.neurons import NeuronsResult, SoluComparison
from mechscope.lm.pipelines.loading import load_lm
from mechscope.lm.report.neurons import DENSE, sparse
from mechscope.lm.text import context_length, read_text
from mechscope.lm.tokenizer import encode_named

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NeuronSettings:
    layers: tuple[int, ...] | None = None
    neurons: tuple[tuple[int, int], ...] = ()  # (layer, neuron) shown first in the report
    site: str = "auto"
    k: int = 100
    sequences: int = 512
    length: int | None = None  # tokens per window: 64, or the model's context if shorter
    contexts: int = 5
    seed: int = 0
    min_count: int = 10

    def validate(self) -> None:
        check_types(self, {
            "k": "--k", "sequences": "--sequences", "length": "--length",
            "contexts": "--contexts", "seed": "--seed",
        })
        if self.k < 1:
            raise MechscopeError(f"--k must be at least 1, got {self.k}")
        if self.sequences < 1:
            raise MechscopeError(f"--sequences must be at least 1, got {self.sequences}")
        if self.length is not None and self.length < 2:
            raise MechscopeError(f"--length must be at least 2, got {self.length}")
        if self.contexts < 0:
            raise MechscopeError(f"--contexts must be 0 or more, got {self.contexts}")
        for name, value, high in (("--k", self.k, 100_000), ("--sequences", self.sequences, 1_000_000),
                                  ("--length", self.length, 65_536), ("--contexts", self.contexts, 1_000)):  # fmt: skip
            if value is not None and value > high:
                raise MechscopeError(f"{name} must be at most {high:,}, got {value:,}")
        check_seed(self.seed)


@dataclass(frozen=True)
class TextModel:
    """A model with what the neuron pipeline needs: an encoder, a decoder, a name, a BOS to prepend."""

    model: object
    encode: Callable[[str], list[int]]
    decode: Callable[[int], str]
    name: str
    bos: int | None = None


def load_text_model(spec: str, device=None, dtype=None, device_map=None, revision=None) -> TextModel:
    """A train-toy run (or one of its checkpoints), or anything ``load_model`` takes (:func:`load_lm`); a toy's
    text is its characters, read without BOS as it was trained."""
    from mechscope.lm.toy import is_toy_run

    model, tok, name = load_lm(spec, device, dtype, device_map, revision)
    toy = is_toy_run(spec)
    if tok is None and toy:
        raise MechscopeError(f"{spec}: a toy model trained on synthetic tokens has no text to read neurons on "
                             "(train it with --data text)")  # fmt: skip
    if tok is None:
        raise MechscopeError(f"{spec}: no tokenizer beside the weights (vocab.json + merges.txt or tokenizer.json)")
    return TextModel(model, tok.encode, lambda i: tok.decode([i]), name, None if toy else model.cfg.bos_token_id)


def text_sample(tm: TextModel, text: str, settings: NeuronSettings, name: str = "the text",
                max_chars: int = 2_000_000) -> torch.Tensor:  # fmt: skip
    """Seeded non-overlapping windows of the text as tokens [N, P] (BOS first where the model has one); ``name``
    goes before a one-line error about the text."""
    from mechscope.lm.methods.neurons import sample_windows

    ids = encode_named(tm.encode, text[:max_chars], name)
    if not ids:
        raise MechscopeError("the text is empty once encoded (none of its characters is in the model's vocabulary)")
    room = tm.model.cfg.n_ctx - (tm.bos is not None)
    length = min(context_length(settings.length, tm.model.cfg.n_ctx, 64, "--length") - (tm.bos is not None), room)
    if length < 2:
        raise MechscopeError(f"windows of {length + 1} tokens leave {length} of the text after the model's BOS; "
                             "neurons need at least 2 (--length 3 or more, and a model context to hold them)")
    windows = sample_windows(torch.tensor(ids), settings.sequences, length, settings.seed)
    if tm.bos is not None:
        windows = torch.cat([torch.full((len(windows), 1), tm.bos, dtype=torch.long), windows], 1)
    return windows


def check_neurons_asked(model, settings: NeuronSettings) -> None:
    from mechscope.lm.methods.neurons import check_neuron_model

    layers = check_neuron_model(model, list(settings.layers or []), settings.site)
    for layer, neuron in settings.neurons:
        if layer not in layers:
            raise MechscopeError(f"neuron {layer}.{neuron}: layer {layer} is not among the MLP layers read ({layers})")
        if not 0 <= neuron < model.cfg.d_mlp:
            raise MechscopeError(
                f"neuron {layer}.{neuron} out of range: layer {layer} has neurons 0..{model.cfg.d_mlp - 1}"
            )


def analyse(tm: TextModel, tokens: torch.Tensor, settings: NeuronSettings, source: str, progress=None):
    from mechscope.lm.methods.neurons import read_neurons

    skip = int(tm.bos is not None)
    return read_neurons(
        tm.model,
        tokens,
        name=tm.name,
        layers=list(settings.layers) if settings.layers else None,
        k=settings.k,
        site=settings.site,
        min_count=settings.min_count,
        n_contexts=settings.contexts,
        skip_first=skip,
        seed=settings.seed,
        sample={"seed": settings.seed, "source": source},
        progress=progress,
    )


def neurons(
    model_spec: str,
    out: str | Path | None = None,
    text_file: str | Path | None = None,
    settings: NeuronSettings | None = None,
    force: bool = False,
    progress=None,
    device=None,
    dtype=None,
    device_map=None,
    revision=None,
):
    """Every MLP neuron's top contexts and monosemanticity figures: neurons.json and report.html. ``work``: the
    passes through the blocks, in passes over the text sample (its sequences x positions, a BOS included)."""
    from mechscope.lm.methods.neurons import check_k
    from mechscope.lm.models.transformer import work_counter

    settings = settings_or(settings, NeuronSettings)
    settings.validate()
    out = Path(out) if out is not None else model_out("neurons", model_spec)
    check_target(out, force)
    tm = load_text_model(model_spec, device, dtype, device_map, revision)
    check_neurons_asked(tm.model, settings)
    text, source = read_text(text_file)
    tokens = text_sample(tm, text, settings, source)
    check_k(settings.k, tokens, int(tm.bos is not None), source)  # the top-k shares were NaN with fewer tokens
    counter = work_counter(tm.model)
    with counter.counting():
        result = analyse(tm, tokens, settings, source, progress)
    result = replace(result, decoder=tm.decode, work=counter.report("lm neurons", tokens.numel()))
    with atomic_output(out, force) as tmp:
        write_outputs(result, tmp, settings.neurons)
    return out, result


def write_outputs(result: NeuronsResult, where: Path, asked=()) -> None:
    """neurons.json (compact: it holds every neuron's contexts) and report.html into ``where``."""
    from mechscope.lm.report.neurons import write_neurons_report

    write_json(where / "neurons.json", result.to_dict(), compact=True)
    write_neurons_report(result, result.decoder, where / "report.html", asked=asked)


@dataclass(frozen=True)
class CompareSettings:
    """The toy transformer both models share; only the MLP's activation differs."""

    layers: int = 2
    d_model: int = 128
    n_heads: int = 4
    d_mlp: int = 512
    n_ctx: int = 64
    steps: int = 3000
    batch: int = 32
    lr: float = 1e-3
    warmup: int = 100
    seed: int = 0
    checkpoints: int = 8
    k: int = 100
    sequences: int = 512  # held-out windows the neurons are read on
    threads: int = 1  # torch threads while training and reading (see torch_threads)

    def toy(self, mlp: str):
        from mechscope.lm.toy import ToyConfig

        return ToyConfig(
            layers=self.layers,
            data="text",
            steps=self.steps,
            d_model=self.d_model,
            n_heads=self.n_heads,
            n_ctx=self.n_ctx,
            batch=self.batch,
            lr=self.lr,
            warmup=self.warmup,
            seed=self.seed,
            checkpoints=self.checkpoints,
            min_span=min(8, self.n_ctx // 2),
            repeat_fraction=0.0,  # plain text: no repeated spans injected
            mlp=mlp,
            d_mlp=self.d_mlp,
        )

    def validate(self) -> None:
        check_types(self, {
            "d_model": "--d-model", "d_mlp": "--d-mlp", "n_ctx": "--n-ctx",
            "steps": "--steps", "batch": "--batch", "k": "--k", "seed": "--seed",
            "threads": "--threads", "layers": "--layers",
        })
        for flag, value in (("--layers", self.layers), ("--d-model", self.d_model), ("--d-mlp", self.d_mlp),
                            ("--batch", self.batch), ("--k", self.k), ("sequences", self.sequences)):  # fmt: skip
            check_count(value, flag)
        if self.d_model % self.n_heads:
            raise MechscopeError(f"--d-model {self.d_model} is not a multiple of {self.n_heads} heads")
        if self.n_ctx < 2:
            raise MechscopeError(f"--n-ctx must be at least 2, got {self.n_ctx}")
        check_threads(self.threads)
        self.toy("gelu").validate()


COMPARED = (("GELU", "gelu"), ("SoLU", "solu"))


def solu_compare_run(
    settings: CompareSettings | None = None,
    out: str | Path | None = None,
    text_file: str | Path | None = None,
    force: bool = False,
    progress=None,
) -> tuple[Path, SoluComparison]:
    """Train the same toy transformer with GELU and with SoLU MLPs and compare held-out loss and the
    monosemanticity of their neurons. Each model is a train-toy run directory (``gelu/``, ``solu/``,
    each with its ``neurons/`` report); compare.json and report.html beside them."""
    from dataclasses import asdict

    from mechscope.core.torch_utils import combine_work
    from mechscope.lm.methods.neurons import check_k, sample_windows
    from mechscope.lm.report.neurons import compare_lines, write_compare_report
    from mechscope.lm.toy import Data

    settings = settings_or(settings, CompareSettings)
    settings.validate()
    say = progress or (lambda _: None)
    out = Path(out) if out is not None else Path("runs") / "solu-compare"
    check_target(out, force)
    text, source = read_text(text_file)
    data = Data(settings.toy("gelu"), text)  # the split both models train and are measured on
    tokens = sample_windows(data.val_ids, settings.sequences, settings.n_ctx, settings.seed)
    check_k(settings.k, tokens)  # before the training, not after the first model's
    timer = Timer("solu-compare")
    models, results, parts = [], {}, {}
    with atomic_output(out, force) as tmp, torch_threads(settings.threads):
        for label, mlp in COMPARED:
            row, read = _compare_one(settings, label, mlp, text, data, tokens, source, tmp, timer, say, progress, parts)
            models.append(row)
            results |= read
        post = results.get("SoLU after its LayerNorm")
        if post is not None:
            models.append(models[-1] | {"label": "SoLU after its LayerNorm"})
        seconds = dict(timer.seconds) | {"total": timer.total()}
        say("report")
        entries = [_entry(m, results[m["label"]]) for m in models]
        result = SoluComparison(
            settings=asdict(settings), text=source, vocab=data.vocab, models=entries,
            baseline=next(iter(results.values())).baseline, summary=compare_lines(entries), seconds=seconds,
            neurons=results, work=combine_work(parts, "lm solu-compare", tokens.numel()),
        )  # fmt: skip
        write_json(tmp / "compare.json", result.to_dict())
        write_compare_report(result, tmp / "report.html")
    return out, result


def _compare_one(settings, label, mlp, text, data, tokens, source, tmp, timer, say, progress, parts):
    """Train one of the compared models into ``tmp/MLP`` and read its neurons: its row and its readings; the passes
    of each step go into ``parts`` (WorkCounter summaries, each in its own rows; each reading keeps its own too)."""
    from mechscope.lm.methods.neurons import read_neurons
    from mechscope.lm.models.transformer import work_counter
    from mechscope.lm.report.toy import write_training_report
    from mechscope.lm.toy import load_toy, text_loss, train_toy_and_control

    say(f"training the {label} model ({settings.steps:,} steps)")
    run = tmp / mlp
    run.mkdir()
    with timer.section(f"train {label}"):
        toy = train_toy_and_control(settings.toy(mlp), text, run, progress is not None, control=False)
        trained = toy.series
        parts[f"train {label}"] = toy.work
        write_json(run / "training.json", toy.to_dict())
        write_training_report(trained, run / "training.html")
    model, chars, _ = load_toy(run)
    say(f"held-out loss and neurons of the {label} model")
    read = {}
    with timer.section(f"analyse {label}"):
        counter = work_counter(model)
        with counter.counting():
            held = text_loss(model, data.val_ids)
        parts[f"held-out loss {label}"] = counter.summary(held["tokens"])
        sites = [("auto", label)] + ([("post", f"{label} after its LayerNorm")] if mlp == "solu" else [])
        for site, name in sites:
            counter = work_counter(model)
            with counter.counting():
                r = read_neurons(
                    model, tokens, name=f"{label} ({mlp}/)", k=settings.k, site=site, seed=settings.seed,
                    sample={"seed": settings.seed, "source": f"{source}, held-out last 10%"},
                )  # fmt: skip
            parts[f"neurons {name}"] = work = counter.report(f"lm solu-compare: neurons {name}", tokens.numel())
            read[name] = r = replace(r, decoder=lambda i, chars=chars: chars[i], work=work)
            if site == "auto":
                (run / "neurons").mkdir()
                write_outputs(r, run / "neurons")
    row = {
        "label": label,
        "mlp": mlp,
        "dir": mlp,
        "act": model.cfg.act,
        "held_out_loss": held["loss"],
        "held_out_tokens": held["tokens"],
        "train_loss_last": trained["series"][-1]["train_loss"],
        "train_seconds": trained["train_seconds"],
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    return row, read


def _entry(model: dict, result) -> dict:
    """One model's row of compare.json: training figures and its neurons' distribution figures."""
    return model | {
        "stats": result.summary()["all"],
        "neurons": result.summary(),
        "baseline": result.baseline,
        "min_count": result.min_count,
        "hooks": [lay.hook for lay in result.layers],
        "most_monosemantic": _ids(sparse(result, result.ranking(), DENSE)[:20]),  # as the lm neurons page ranks
        "least_monosemantic": _ids(result.ranking()[::-1][:20]),
    }


def _ids(pairs) -> list[str]:
    return [f"{layer}.{n}" for layer, n in pairs]
