"""Feature visualisation speed: every channel of both conv layers and all 10 logits, 512 steps.

Target (issue 4): at most 60 s on a 2-core CPU, batched across units. Prints the seconds, the
number of units, and how many visualisations exceed their unit's maximum over the test set.

    python bench/featvis.py [--run DIR] [--steps 512]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from benchlib import load
from mechscope.cnn.config import TrainConfig
from mechscope.cnn.data.mnist import MNIST, load_mnist
from mechscope.cnn.methods import featvis as FV
from mechscope.cnn.pipelines.train import train
from mechscope.cnn.runs import load_run
from mechscope.core.hooks import run_with_cache


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default=None)
    parser.add_argument("--steps", type=int, default=512)
    args = parser.parse_args()
    run = args.run
    if run is None:
        run = tempfile.mkdtemp() + "/run"
        train(run, TrainConfig(epochs=1, train_limit=8192), progress=False)
    model = load_run(run).model
    layers = ["conv1.hook_post", "conv2.hook_post", "hook_logits"]
    with torch.no_grad():
        _, probe = run_with_cache(model, torch.zeros(1, 1, 28, 28), names=layers)
    assign = [(layer, u) for layer in layers for u in range(probe[layer].shape[1])]
    objective = FV.units_objective(assign) - FV.total_variation()
    print(f"{load()} at the start", flush=True)
    start = time.perf_counter()
    result = FV.render(model, objective, len(assign), steps=args.steps, seed=0)
    seconds = time.perf_counter() - start
    end = load()
    best = FV.dataset_means_max(model, MNIST.to_float(load_mnist().test_images), layers)
    maxima = torch.cat([best[layer] for layer in layers])
    with torch.no_grad():
        _, cache = run_with_cache(model, result.images, names=layers)
    reached = FV.units_objective(assign)(cache)
    exceed = int((reached > maxima).sum())
    print(
        # target from docs/development.md: <= 60 s
        f"{len(assign)} units x {args.steps} steps in one batch: {seconds:.1f} s (target <= 60 s: "
        f"{'PASS' if seconds <= 60 else 'FAIL'}; {end} at the end); "
        f"{exceed} of {len(assign)} visualisations exceed their unit's maximum over the 10,000 test images"
    )


if __name__ == "__main__":
    main()
