"""`cnn blocks` speed: Building Blocks of one test image of the default network (target: at most 20 s).

Trains the default network on MNIST first unless a run is given (not counted), then times
``blocks_run`` for test image 0 with the command's defaults and prints the wall and CPU seconds,
the seconds per section and the load average before and after (os.getloadavg: the machine's
other work slows wall time; CPU seconds say what this process itself used).

    python bench/blocks.py [--run DIR] [--steps N] [--repeat N]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

from mechscope.cnn.pipelines.blocks import blocks_run
from mechscope.cnn.pipelines.train import train
from mechscope.cnn.training import keep_freed_memory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default=None, help="a default run (default: train one)")
    parser.add_argument("--steps", type=int, default=None, help="feature visualisation steps (default: the CLI's)")
    parser.add_argument("--repeat", type=int, default=1, help="time this many runs")
    args = parser.parse_args()
    keep_freed_memory()
    tmp = tempfile.mkdtemp()
    run = args.run
    if run is None:
        run = f"{tmp}/default"
        _, m = train(run, progress=False)
        print(f"trained default: test accuracy {m['test_accuracy']:.4f}", flush=True)
    kw = {} if args.steps is None else {"steps": args.steps}
    for i in range(args.repeat):
        load = os.getloadavg()
        wall, cpu = time.perf_counter(), time.process_time()
        _, r = blocks_run(run, f"{tmp}/blocks-{i}", **kw)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        sections = ", ".join(f"{k} {v:.1f}" for k, v in r.seconds.items() if k != "total")
        ks = ", ".join(f"{lb.stage} k={lb.groups.k} ({100 * lb.groups.explained:.1f}%)" for lb in r.layers)
        after = os.getloadavg()
        print(
            f"cnn blocks, test image 0, {r.settings['steps']} steps: {wall:.1f} s wall, {cpu:.1f} s CPU "
            f"(target <= 20 s: {'PASS' if wall <= 20 else 'FAIL'}); {sections}; {ks}; "
            f"load average before {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, after {after[0]:.2f} {after[1]:.2f} "
            f"{after[2]:.2f} on {os.cpu_count()} cores",
            flush=True,
        )


if __name__ == "__main__":
    main()
