"""Integrated Gradients speed against Captum, and peak memory with a chunk size.

Times IG on 64 test images x 64 steps (Gauss-Legendre, as both default to) for mechscope and
Captum in the same run, best of several repeats each, and prints the ratio Captum / mechscope
(>= 1.0 means mechscope is not slower). Then measures the peak resident memory of IG on
1,000 images in a fresh process, with and without a chunk size (``batch_size``).

    python bench/attribution.py [--run DIR] [--repeats 5]

Without --run it trains a quick model first (the speed comparison does not depend on accuracy).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import warnings

import torch

from mechscope.cnn.config import TrainConfig
from mechscope.cnn.data.mnist import MNIST, load_mnist
from mechscope.cnn.methods.attribution import IntegratedGradients
from mechscope.cnn.pipelines.train import train
from mechscope.cnn.runs import load_run

MEMORY_CHILD = """
import resource, sys, torch
from mechscope.cnn.data.mnist import MNIST, load_mnist
from mechscope.cnn.methods.attribution import IntegratedGradients
from mechscope.cnn.runs import load_run
model = load_run(sys.argv[1]).model
x = MNIST.to_float(load_mnist().test_images[:1000])
with torch.no_grad():
    t = model(x).argmax(1)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
chunk = int(sys.argv[2]) or None
IntegratedGradients(n_steps=64, batch_size=chunk).attribute(model, x, t)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(before, after)
"""


def best_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default=None)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    from captum.attr import IntegratedGradients as CaptumIG

    run = args.run
    if run is None:
        run = tempfile.mkdtemp() + "/run"
        train(run, TrainConfig(epochs=1, train_limit=8192), progress=False)
    model = load_run(run).model
    x = MNIST.to_float(load_mnist().test_images[:64])
    with torch.no_grad():
        t = model(x).argmax(1)

    ours = IntegratedGradients(n_steps=64)
    theirs = CaptumIG(model)
    t_ours = best_time(lambda: ours.attribute(model, x, t), args.repeats)
    t_captum = best_time(lambda: theirs.attribute(x, target=t, n_steps=64), args.repeats)
    diff = (ours.attribute(model, x, t) - theirs.attribute(x, target=t, n_steps=64)).abs().max().item()
    print(
        f"IG 64 images x 64 steps: mechscope {t_ours * 1000:.0f} ms, captum {t_captum * 1000:.0f} ms, "
        f"ratio captum/mechscope {t_captum / t_ours:.2f} (target >= 1.0); max |difference| {diff:.1e}"
    )

    rows = {}
    for chunk in (0, 4096, 512):  # 0: every path point at once, as Captum does by default
        out = subprocess.run([sys.executable, "-c", MEMORY_CHILD, run, str(chunk)], capture_output=True, text=True)
        if out.returncode != 0:
            raise SystemExit(out.stderr)
        before, after = map(int, out.stdout.split())
        rows[chunk] = {"peak_rss_mib": after / 1024, "rss_before_mib": before / 1024}
    print(
        "IG on 1,000 images x 64 steps, peak resident memory of the process (MiB; "
        f"{rows[0]['rss_before_mib']:.0f} before the attribution starts): "
        + ", ".join(
            f"{'no chunking' if c == 0 else f'batch_size {c}'} {r['peak_rss_mib']:.0f}" for c, r in rows.items()
        )
    )
    print(json.dumps({"ig_ratio_vs_captum": t_captum / t_ours, "peak_mib": rows}))


if __name__ == "__main__":
    main()
