"""`cnn universality` speed: three default networks (seeds 0, 1, 2) on all 10,000 test images.

Trains them first unless runs are given (one torch thread, a few minutes each on a busy 2-core machine; not
counted), then compares them once and prints the seconds per section, the load average before and after,
and whether the total met the target (at most 60 s after training).

    python bench/universality.py [--runs DIR DIR DIR]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch

from mechscope.cnn.config import TrainConfig
from mechscope.cnn.pipelines.train import train
from mechscope.cnn.pipelines.universality import universality
from mechscope.core.torch_utils import torch_threads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", default=None, help="run directories (default: train seeds 0, 1, 2)")
    args = parser.parse_args()
    tmp = tempfile.mkdtemp()
    runs = args.runs
    if runs is None:
        runs = []
        for seed in (0, 1, 2):
            with torch_threads(1):
                _, m = train(f"{tmp}/seed{seed}", TrainConfig(seed=seed), progress=False)
            runs.append(f"{tmp}/seed{seed}")
            print(f"trained seed {seed}: test accuracy {m['test_accuracy']:.4f}", flush=True)
    load_before = os.getloadavg()
    start = time.perf_counter()
    _, result = universality(runs, f"{tmp}/universality")
    total = time.perf_counter() - start
    load_after = os.getloadavg()
    sections = ", ".join(f"{k} {v:.1f}" for k, v in result.seconds.items() if k != "total")
    print(
        f"cnn universality, {len(runs)} networks on {result.test_images:,} test images: {total:.1f} s "
        f"({sections}); torch {torch.__version__}, {os.cpu_count()} cores; load average (1, 5, 15 min) "
        f"before {', '.join(f'{v:.1f}' for v in load_before)}, after {', '.join(f'{v:.1f}' for v in load_after)}; "
        f"target <= 60 s: {'PASS' if total <= 60 else 'FAIL'}"
    )


if __name__ == "__main__":
    main()
