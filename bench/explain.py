"""`cnn explain` speed: the default network against a 3-stage network of the same width, in one run.

Trains both on MNIST first unless runs are given (about 40 s each, not counted), then explains
each on all 10,000 test images and prints the seconds per section and the ratio (target: the
3-stage network takes at most 2x the default's time). The 3-stage network has the default's
widths (16, 32) plus a third 32-channel stage: --channels 16,32,32 --kernel-size 3 --padding 1.

    python bench/explain.py [--run DIR] [--run3 DIR]
"""

from __future__ import annotations

import argparse
import tempfile
import time

from benchlib import load
from mechscope.cnn.models.cnn import CNNConfig
from mechscope.cnn.pipelines.explain import explain_run
from mechscope.cnn.pipelines.train import train
from mechscope.cnn.training import keep_freed_memory

THREE_STAGES = CNNConfig(channels=(16, 32, 32), kernel_size=3, padding=1)


def explain_timed(run: str, out: str) -> tuple[float, object]:
    start = time.perf_counter()
    _, result = explain_run(run, out)
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default=None, help="a default run (default: train one)")
    parser.add_argument("--run3", default=None, help="a run of the 3-stage network (default: train one)")
    args = parser.parse_args()
    keep_freed_memory()
    tmp = tempfile.mkdtemp()
    runs = {"default": args.run, "3-stage": args.run3}
    for name, shape in (("default", None), ("3-stage", THREE_STAGES)):
        if runs[name] is None:
            runs[name] = f"{tmp}/{name}"
            _, m = train(runs[name], model_config=shape, progress=False)
            acc, n = m["test_accuracy"], m["n_parameters"]
            print(f"trained {name}: test accuracy {acc:.4f}, {n:,} parameters", flush=True)
    seconds = {}
    print(f"{load()} at the start", flush=True)
    for name, run in runs.items():
        total, result = explain_timed(run, f"{tmp}/{name}-explain")
        seconds[name] = total
        sections = ", ".join(f"{k} {v:.1f}" for k, v in result.seconds.items() if v >= 0.05)
        met = sum(c.meets_criterion for c in result.circuits.circuits)
        print(
            f"cnn explain, {name} ({', '.join(result.stage_names)}) on {result.overview.n_test:,} test images: "
            f"{total:.1f} s; seconds per section: {sections}; circuits meeting their criterion: "
            f"{met}/{len(result.circuits.circuits)}",
            flush=True,
        )
    ratio = seconds["3-stage"] / seconds["default"]
    print(f"3-stage / default: {ratio:.2f} (target <= 2) {'PASS' if ratio <= 2 else 'FAIL'}; {load()} at the end")


if __name__ == "__main__":
    main()
