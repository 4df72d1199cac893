"""``clip train``: train the small image–text model here, evaluate it, write it as a CLIP directory with its report.

The output directory is a Hugging Face CLIP checkpoint (config.json, model.safetensors, tokenizer.json,
preprocessor_config.json) with mechscope.json (its captions and fonts), train.json and report.html beside it; every
other ``clip`` command takes it as ``--model``.
"""

from __future__ import annotations

import logging
import platform
from pathlib import Path

from mechscope.clip.methods.evaluate import TrainResult, evaluate_small
from mechscope.clip.training import SmallSettings, save_small, train
from mechscope.core.outputs import atomic_output, check_target, weights_hash, write_json
from mechscope.core.torch_utils import Timer, n_parameters, torch_threads
from mechscope.core.validate import settings_or

log = logging.getLogger(__name__)
DEFAULT_OUT = Path("runs") / "clip" / "small"


def machine() -> str:
    import os

    import torch

    return f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} cores, torch {torch.__version__}"


def train_small(out=None, settings: SmallSettings | None = None, data_dir=None, force: bool = False,
                threads: int = 1, progress: bool = False) -> tuple[Path, TrainResult]:  # fmt: skip
    """Train, evaluate and save the small model into ``out`` (default runs/clip/small); returns (path, result)."""
    from mechscope.clip.data.digits import all_captions
    from mechscope.clip.models.clip import report_work, work_counters
    from mechscope.clip.models.loading import load_clip
    from mechscope.cnn.data.mnist import load_mnist
    from mechscope.core.torch_utils import counting

    s = settings_or(settings, SmallSettings)
    s.validate()
    out = check_target(out or DEFAULT_OUT, force)
    timer = Timer("clip train")
    with torch_threads(threads):
        with timer.section("data"):
            m = load_mnist(data_dir, download_missing=False)
        bar = _bar(s.steps) if progress else None
        with timer.section("training"):
            trained = train(s, m.train_images, m.train_labels,
                            (lambda step, row: _advance(bar, step + 1)) if bar else None)  # fmt: skip
        if bar is not None:
            bar.close()
        with atomic_output(out, force) as tmp:
            with timer.section("save"):
                save_small(tmp, trained, s)
            with timer.section("evaluation"):
                bundle = load_clip(tmp, device="cpu", dtype="float32")
                counters = work_counters(bundle.model, trained.counters)  # the training's counts, going on
                with counting(counters):
                    evaluation = evaluate_small(bundle, data_dir=data_dir)
            # in passes of one training step: its batch of images, and every caption once
            work = report_work(counters, "clip train", {"image": s.batch, "text": len(all_captions())})
            result = TrainResult(
                str(out), {k: (list(v) if isinstance(v, tuple) else v) for k, v in s.__dict__.items()},
                n_parameters(trained.model), tuple(trained.history), evaluation, round(trained.seconds, 2),
                {k: round(v, 2) for k, v in timer.seconds.items()}, weights_hash(bundle.model), machine(), work,
            )  # fmt: skip
            write_json(tmp / TrainResult.FILE, result.to_dict())
            result.save_html(tmp / "report.html")
    return out, result


def _bar(total: int):
    from tqdm import tqdm

    return tqdm(total=total, desc="clip train", unit="step", leave=False)


def _advance(bar, n: int) -> None:
    bar.n = n
    bar.refresh()
