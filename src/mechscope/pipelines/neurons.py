"""``lm neurons`` and ``lm solu-compare``: MLP neurons' top contexts and monosemanticity.

Strings steps together; the figures are computed in :mod:`mechscope.methods.neurons`, the pages
drawn in :mod:`mechscope.report.neurons`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from mechscope.config import check_seed
from mechscope.errors import MechscopeError
from mechscope.models.devices import torch_threads
from mechscope.outputs import atomic_output, check_target, write_json
from mechscope.pipelines.lm import model_out

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NeuronSettings:
    layers: tuple[int, ...] | None = None
    neurons: tuple[tuple[int, int], ...] = ()  # (layer, neuron) shown first in the report
    site: str = "auto"
    k: int = 100
    sequences: int = 512
    length: int = 64
    contexts: int = 5
    seed: int = 0
    min_count: int = 10

    def validate(self) -> None:
        if self.k < 1:
            raise MechscopeError(f"--k must be at least 1, got {self.k}")
        if self.sequences < 1:
            raise MechscopeError(f"--sequences must be at least 1, got {self.sequences}")
        if self.length < 2:
            raise MechscopeError(f"--length must be at least 2, got {self.length}")
        if self.contexts < 0:
            raise MechscopeError(f"--contexts must be 0 or more, got {self.contexts}")
        check_seed(self.seed)


@dataclass(frozen=True)
class TextModel:
    """A model with what the neuron pipeline needs: an encoder, a decoder, a name, a BOS to prepend."""

    model: object
    encode: Callable[[str], list[int]]
    decode: Callable[[int], str]
    name: str
    bos: int | None = None


def default_text_path() -> Path:
    from mechscope.data.mnist import resolve_data_dir

    return resolve_data_dir() / "tinyshakespeare" / "input.txt"


def read_text(text_file: str | Path | None) -> tuple[str, str]:
    """The text (tinyshakespeare by default) and where it came from; one-line errors."""
    path = Path(text_file) if text_file else default_text_path()
    if not path.is_file():
        raise MechscopeError(f"{path}: text file not found")
    from mechscope.validate import read_text_file

    return read_text_file(path), str(path)


def load_text_model(spec: str, device=None, dtype=None, device_map=None, revision=None) -> TextModel:
    """A train-toy run (or one of its checkpoints), or anything ``load_model`` takes."""
    from mechscope.cli.lm import load_for_command
    from mechscope.toy import is_toy_run, load_toy

    if is_toy_run(spec):
        model, chars, name = load_toy(spec)
        if not chars:
            raise MechscopeError(
                f"{spec}: a toy model trained on synthetic tokens has no text to read neurons on "
                "(train it with --data text)"
            )
        lookup = {c: i for i, c in enumerate(chars)}
        return TextModel(model, lambda t: [lookup[c] for c in t if c in lookup], lambda i: chars[i], name)
    model, tok = load_for_command(spec, device, dtype, device_map, revision=revision)
    if tok is None:
        raise MechscopeError(f"{spec}: no tokenizer beside the weights (vocab.json + merges.txt or tokenizer.json)")
    return TextModel(model, tok.encode, lambda i: tok.decode([i]), str(spec), model.cfg.bos_token_id)


def text_sample(tm: TextModel, text: str, settings: NeuronSettings, max_chars: int = 2_000_000) -> torch.Tensor:
    """Seeded non-overlapping windows of the text as tokens [N, P] (BOS first where the model has one)."""
    from mechscope.methods.neurons import sample_windows

    ids = tm.encode(text[:max_chars])
    if not ids:
        raise MechscopeError("the text is empty once encoded (none of its characters is in the model's vocabulary)")
    room = tm.model.cfg.n_ctx - (tm.bos is not None)
    length = min(settings.length, tm.model.cfg.n_ctx) - (tm.bos is not None)
    windows = sample_windows(torch.tensor(ids), settings.sequences, max(1, min(length, room)), settings.seed)
    if tm.bos is not None:
        windows = torch.cat([torch.full((len(windows), 1), tm.bos, dtype=torch.long), windows], 1)
    return windows


def check_neurons_asked(model, settings: NeuronSettings) -> None:
    from mechscope.methods.neurons import check_neuron_model

    layers = check_neuron_model(model, list(settings.layers or []), settings.site)
    for layer, neuron in settings.neurons:
        if layer not in layers:
            raise MechscopeError(f"neuron {layer}.{neuron}: layer {layer} is not among the MLP layers read ({layers})")
        if not 0 <= neuron < model.cfg.d_mlp:
            raise MechscopeError(
                f"neuron {layer}.{neuron} out of range: layer {layer} has neurons 0..{model.cfg.d_mlp - 1}"
            )


def analyse(tm: TextModel, tokens: torch.Tensor, settings: NeuronSettings, source: str, progress=None):
    from mechscope.methods.neurons import read_neurons

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
    """Every MLP neuron's top contexts and monosemanticity figures: neurons.json and report.html."""
    settings = settings or NeuronSettings()
    settings.validate()
    out = Path(out) if out is not None else model_out("neurons", model_spec)
    check_target(out, force)
    tm = load_text_model(model_spec, device, dtype, device_map, revision)
    check_neurons_asked(tm.model, settings)
    text, source = read_text(text_file)
    tokens = text_sample(tm, text, settings)
    result = analyse(tm, tokens, settings, source, progress)
    with atomic_output(out, force) as tmp:
        write_outputs(result, tm.decode, tmp, settings.neurons)
    return out, result


def write_outputs(result, decode, where: Path, asked=()) -> None:
    """neurons.json (compact: it holds every neuron's contexts) and report.html into ``where``."""
    from mechscope.report.neurons import write_neurons_report

    data = {"schema": 1, **result.to_dict(decode)}
    write_json(where / "neurons.json", data, compact=True)
    write_neurons_report(result, decode, where / "report.html", asked=asked)


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
        from mechscope.toy import ToyConfig

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
        if self.d_model % self.n_heads:
            raise MechscopeError(f"--d-model {self.d_model} is not a multiple of {self.n_heads} heads")
        if self.batch < 1 or self.k < 1 or self.sequences < 1:
            raise MechscopeError(f"--batch, --k and sequences must be at least 1, got {self.batch}, {self.k}")
        if self.n_ctx < 2:
            raise MechscopeError(f"--n-ctx must be at least 2, got {self.n_ctx}")
        if self.threads < 1:
            raise MechscopeError(f"--threads must be at least 1, got {self.threads}")
        self.toy("gelu").validate()


COMPARED = (("GELU", "gelu"), ("SoLU", "solu"))


def solu_compare_run(
    settings: CompareSettings | None = None,
    out: str | Path | None = None,
    text_file: str | Path | None = None,
    force: bool = False,
    progress=None,
) -> tuple[Path, dict]:
    """Train the same toy transformer with GELU and with SoLU MLPs and compare held-out loss and the
    monosemanticity of their neurons. Each model is a train-toy run directory (``gelu/``, ``solu/``,
    each with its ``neurons/`` report); compare.json and report.html beside them."""
    import time
    from dataclasses import asdict

    from mechscope.methods.neurons import read_neurons, sample_windows
    from mechscope.report.neurons import compare_lines, write_compare_report
    from mechscope.report.toy import write_training_report
    from mechscope.toy import Data, load_toy, text_loss, train_toy

    settings = settings or CompareSettings()
    settings.validate()
    say = progress or (lambda _: None)
    out = Path(out) if out is not None else Path("runs") / "solu-compare"
    check_target(out, force)
    text, source = read_text(text_file)
    data = Data(settings.toy("gelu"), text)  # the split both models train and are measured on
    tokens = sample_windows(data.val_ids, settings.sequences, settings.n_ctx, settings.seed)
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    models, results, decode = [], {}, None
    with atomic_output(out, force) as tmp, torch_threads(settings.threads):
        for label, mlp in COMPARED:
            say(f"training the {label} model ({settings.steps:,} steps)")
            t = time.perf_counter()
            run = tmp / mlp
            run.mkdir()
            trained = train_toy(settings.toy(mlp), text, run, progress=progress is not None)
            write_json(run / "training.json", trained)
            write_training_report(trained, run / "training.html")
            seconds[f"train {label}"] = time.perf_counter() - t
            model, chars, _ = load_toy(run)
            decode = decode or (lambda i, chars=chars: chars[i])
            t = time.perf_counter()
            say(f"held-out loss and neurons of the {label} model")
            held = text_loss(model, data.val_ids)
            sites = [("auto", label)] + ([("post", f"{label} after its LayerNorm")] if mlp == "solu" else [])
            for site, name in sites:
                r = read_neurons(
                    model,
                    tokens,
                    name=f"{label} ({mlp}/)",
                    k=settings.k,
                    site=site,
                    seed=settings.seed,
                    sample={"seed": settings.seed, "source": f"{source}, held-out last 10%"},
                )
                results[name] = r
                if site == "auto":
                    (run / "neurons").mkdir()
                    write_outputs(r, decode, run / "neurons")
            seconds[f"analyse {label}"] = time.perf_counter() - t
            models.append(
                {
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
            )
        post = results.get("SoLU after its LayerNorm")
        if post is not None:
            models.append(models[-1] | {"label": "SoLU after its LayerNorm"})
        seconds["total"] = time.perf_counter() - start
        say("report")
        entries = [_entry(m, results[m["label"]]) for m in models]
        summary = compare_lines(entries)
        data_out = {
            "schema": 1,
            "settings": asdict(settings),
            "text": source,
            "vocab": data.vocab,
            "models": entries,
            "baseline": next(iter(results.values())).baseline,
            "summary": summary,
            "seconds": seconds,
        }
        write_json(tmp / "compare.json", data_out)
        meta = {"settings": asdict(settings), "source": source, "vocab": data.vocab, "seconds": seconds}
        write_compare_report(entries, results, decode, tmp / "report.html", meta, summary)
    return out, data_out


def _entry(model: dict, result) -> dict:
    """One model's row of compare.json: training figures and its neurons' distribution figures."""
    return model | {
        "stats": result.summary()["all"],
        "neurons": result.summary(),
        "baseline": result.baseline,
        "min_count": result.min_count,
        "hooks": [lay.hook for lay in result.layers],
        "most_monosemantic": _ids(result.ranking()[:20]),
        "least_monosemantic": _ids(result.ranking()[::-1][:20]),
    }


def _ids(pairs) -> list[str]:
    return [f"{layer}.{n}" for layer, n in pairs]
