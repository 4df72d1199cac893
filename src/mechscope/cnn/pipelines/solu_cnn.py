"""``cnn solu-compare``: the CNN trained with each activation (same seed, data, steps), compared by test
accuracy and by the class selectivity of its conv channels. The SoLU question of Elhage et al. (2022)
asked of the CNN half: does the softmax linear unit make channels more selective, at what cost?"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from mechscope.cnn.config import TrainConfig
from mechscope.cnn.methods.channel_selectivity import ActivationComparison
from mechscope.cnn.models.cnn import ACTIVATIONS, CNNConfig
from mechscope.core.errors import MechscopeError
from mechscope.core.outputs import atomic_output, check_target, write_json
from mechscope.core.torch_utils import Timer
from mechscope.core.validate import repeated


def solu_compare_cnn(
    out: str | Path | None = None,
    activations: tuple[str, ...] = ("relu", "gelu", "solu"),
    config: TrainConfig | None = None,
    shape: CNNConfig | None = None,
    dataset: str = "mnist",
    data_dir=None,
    class_names=None,
    test_limit: int | None = None,
    force: bool = False,
    progress=None,
) -> tuple[Path, ActivationComparison]:
    """Train one run per activation under ``out`` (``relu/``, ``gelu/``, ``solu/``: ordinary run
    directories) and write compare.json and report.html beside them. ``work``: the selectivity readings' passes
    through each network's stages, in passes over the test images read; the trainings are not counted (they run
    inside ``cnn train``; each run's epochs are in ``training``)."""
    from mechscope.cnn.data.images import load_dataset
    from mechscope.cnn.methods.activations import ExplainData, collect
    from mechscope.cnn.methods.channel_selectivity import channel_selectivity
    from mechscope.cnn.models.spec import walk
    from mechscope.cnn.pipelines.train import train
    from mechscope.cnn.report.solu_cnn import summary_lines, write_report
    from mechscope.cnn.runs import load_run
    from mechscope.core.results import plain

    say = progress or (lambda _: None)
    config = config or TrainConfig()
    config.validate()
    shape = shape or CNNConfig()
    twice = repeated(activations)
    if twice:
        raise MechscopeError(f"--activations: {twice[0]} given more than once")
    acts_asked = tuple(activations)
    bad = [a for a in acts_asked if a not in ACTIVATIONS]
    if bad or len(acts_asked) < 2:
        raise MechscopeError(
            f"--activations takes two or more of {', '.join(ACTIVATIONS)}, got {', '.join(activations) or 'none'}"
        )
    if test_limit is not None and test_limit < 1:
        raise MechscopeError(f"--test-limit must be at least 1, got {test_limit}")
    out = Path(out) if out is not None else Path("runs") / "solu-compare-cnn"
    check_target(out, force)
    data = load_dataset(dataset, data_dir, class_names)
    ed = ExplainData.from_dataset(data, test_limit, n_mean=1000, held_out=0)
    rows, stages, counts = [], {}, {}
    timer = Timer("solu-compare")
    with atomic_output(out, force) as tmp:
        for act in acts_asked:
            say(f"training with {act}")
            with timer.section(f"train {act}"):
                run, metrics = train(tmp / act, config, replace(shape, activation=act), dataset, data_dir,
                                     class_names, progress=progress is not None)  # fmt: skip
            with timer.section(f"selectivity {act}"):
                model = load_run(run).model
                spec = walk(model, data.shape)
                counter = spec.work_counter()
                with counter.counting():
                    found = channel_selectivity(model, spec, ed, collect(model, spec, ed))
                counts[act] = counter
            stages[act] = found
            rows.append(
                {
                    "activation": act,
                    "dir": act,
                    "test_accuracy": metrics.test_accuracy,
                    "train_seconds": metrics.train_seconds,
                    "n_parameters": metrics.n_parameters,
                    "stages": [_stage_stats(s) for s in found],
                }
            )
        kept = {k: v for k, v in shape.to_dict().items()
                if k not in ("mean", "std", "in_channels", "activation", "image_size", "n_classes")}  # fmt: skip
        result = ActivationComparison(
            dataset=data.name, class_names=list(data.class_names), test_images=len(ed.y), training=config.to_dict(),
            shape=kept, models=rows, channels={act: [plain(s) for s in found] for act, found in stages.items()},
            seconds=dict(timer.seconds) | {"total": timer.total()}, stages=stages, work=_work(counts, len(ed.y)),
            test_set=len(data.test_labels),
        )  # fmt: skip
        result = replace(result, summary=summary_lines(result.to_dict()))
        write_json(tmp / "compare.json", result.to_dict())
        write_report(result.to_dict(), stages, tmp / "report.html")
    return out, result


def _work(counters: dict, n: int) -> dict:
    """The readings' counts (one WorkCounter per network) added up, in passes over the ``n`` test images, with
    ``parts``: each network's."""
    from mechscope.core.torch_utils import combine_work

    work = combine_work({act: c.summary(n) for act, c in counters.items()}, "cnn solu-compare", n)
    return work | {"not_counted": "the training of each network (cnn train's loop; each run's epochs are in training)"}


def _stage_stats(s) -> dict:
    import numpy as np

    idx = s.index.numpy()
    live = np.ones(len(idx), bool)
    live[list(s.silent)] = False
    v = idx[live]
    return {
        "stage": s.stage,
        "hook": s.hook,
        "channels": len(idx),
        "silent": len(s.silent),
        "median": float(np.median(v)) if len(v) else None,
        "mean": float(v.mean()) if len(v) else None,
        "quartiles": [float(np.percentile(v, 25)), float(np.percentile(v, 75))] if len(v) else None,
        "share_ge_0.5": float((v >= 0.5).mean()) if len(v) else None,
        "explain_median": float(np.median(s.explain_index.numpy()[live])) if len(v) else None,
    }
