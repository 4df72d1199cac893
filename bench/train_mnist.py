"""Train the MNIST CNN on the defaults and print test accuracy and training seconds.

Target (issue 2): test accuracy >= 0.992 in <= 60 s of training on a 2-core CPU.
`--seeds 0 1 2` trains once per seed and prints one line each, then the worst case.

    python bench/train_mnist.py [--seeds 0 1 2] [--data-dir DIR]
"""

from __future__ import annotations

import argparse
import platform

import torch

from benchlib import load
from mechscope.cnn.config import TrainConfig
from mechscope.cnn.data.mnist import load_mnist
from mechscope.cnn.training import keep_freed_memory, train_cnn
from mechscope.core.torch_utils import n_parameters


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[TrainConfig().seed])
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args()
    keep_freed_memory()  # as `mechscope cnn train` does: the library itself never changes the allocator
    data = load_mnist(args.data_dir)
    print(
        f"machine: {platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"{load()} at the start"
    )
    results = []
    for seed in args.seeds:
        r = train_cnn(data, TrainConfig(seed=seed), progress=False)
        results.append((r.evaluation.accuracy, r.train_seconds))
        print(
            f"seed {seed}: test_accuracy {r.evaluation.accuracy:.4f}  train_seconds {r.train_seconds:.1f}  "
            f"parameters {n_parameters(r.model)}  steps {r.steps}",
            flush=True,
        )
    worst_acc = min(a for a, _ in results)
    worst_sec = max(s for _, s in results)
    ok = worst_acc >= 0.992 and worst_sec <= 60
    print(
        f"worst: test_accuracy {worst_acc:.4f} (target >= 0.992)  train_seconds {worst_sec:.1f} (target <= 60)  "
        f"{'PASS' if ok else 'FAIL'}; {load()} at the end"
    )


if __name__ == "__main__":
    main()
