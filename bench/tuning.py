"""``cnn tuning`` on a default run, timed; with ``--random``, how often random first-layer kernels get a label.

Target (issue 14): tuning curves for every unit of the default network in at most 30 s. Prints
the time of each step, wall and CPU, the load average before and after, and what was found.

    python bench/tuning.py --run RUN            # a run of `mechscope cnn train` (default network)
    python bench/tuning.py --random [--n 8]     # the default network with N(0, 1) / U(-1, 1) conv1 kernels

The random mode replaces conv1's 16 kernels by random ones (zero bias) ``--n`` times per
distribution and counts the units labelled: the false-positive rate the circular-variance
threshold is chosen against (maxima over the first 2,000 MNIST test images).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time


def timed_run(run: str, seed: int) -> None:
    from mechscope.cnn.pipelines.tuning import tuning_run

    load = os.getloadavg()
    cpu = time.process_time()
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        _, r = tuning_run(run, f"{tmp}/tuning", seed)
        total = time.perf_counter() - start
    cpu = time.process_time() - cpu
    for step, seconds in r.seconds.items():
        print(f"{step:<18}{seconds:7.1f} s")
    for line in r.summary:
        print(line)
    print(  # target from docs/development.md: <= 30 s
        f"cnn tuning: {len(r.units)} units in {total:.1f} s wall (target <= 30 s: "
        f"{'PASS' if total <= 30 else 'FAIL'}), {cpu:.1f} s CPU (this process); "
        f"load average before {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, after {os.getloadavg()[0]:.2f} "
        f"({os.cpu_count()} CPUs)"
    )


def random_kernels(n: int) -> None:
    import numpy as np
    import torch

    from mechscope.cnn.data.images import load_dataset
    from mechscope.cnn.methods.stimuli import draw_stimuli
    from mechscope.cnn.methods.tuning import CV_MAX, dataset_max, tuning
    from mechscope.cnn.models.cnn import CNN
    from mechscope.cnn.models.spec import walk

    data = load_dataset("mnist")
    x = data.test_float(2000)
    stim = draw_stimuli(28, 0)
    for kind in ("normal", "uniform"):
        labelled, best = [], []
        for rep in range(n):
            torch.manual_seed(rep)
            model = CNN().eval()
            with torch.no_grad():
                w = model.conv1.conv.weight
                w.copy_(torch.randn_like(w) if kind == "normal" else torch.rand_like(w) * 2 - 1)
                model.conv1.conv.bias.zero_()
            spec = walk(model)
            r = tuning(spec, stim, dataset_max(spec, x))
            for u in r.stage("conv1").units:
                labelled += [u.label] if u.tuned else []
                cvs = [d["sharpness"] for d in u.family_best.values()
                       if d["sharpness_kind"] == "circular variance" and d["drive"] >= 0.5]  # fmt: skip
                best.append(min(cvs, default=1.0))
        best = np.array(best)
        print(
            f"{kind}: {len(labelled)} of {len(best)} random kernels labelled (threshold {CV_MAX}); lowest circular "
            f"variance with drive >= 0.5 at most 0.3: {(best <= 0.3).sum()}, 0.4: {(best <= 0.4).sum()}; "
            f"labels: {', '.join(labelled) or 'none'}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", help="Run directory of the default network (`mechscope cnn train`).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--random", action="store_true", help="Count labels given to random conv1 kernels.")
    parser.add_argument("--n", type=int, default=8, help="Random networks per distribution (16 kernels each).")
    args = parser.parse_args()
    if args.random:
        random_kernels(args.n)
    elif args.run:
        timed_run(args.run, args.seed)
    else:
        parser.error("give --run RUN (train one with `mechscope cnn train --out RUN`) or --random")


if __name__ == "__main__":
    main()
