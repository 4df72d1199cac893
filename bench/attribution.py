"""Integrated Gradients speed against Captum, and peak memory with a chunk size.

Times IG on 64 test images x 64 steps (Gauss-Legendre, as both default to) for mechscope and
Captum in the same run, best of several repeats each, the two alternating (so that a change of load falls on
both alike), and prints the ratio Captum / mechscope (>= 1.0 means mechscope is not slower). Then measures the peak
resident memory of IG on 1,000 images in a fresh process (its own ``VmHWM``), with and without a chunk size
(``batch_size``).

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

from benchlib import agreement, load
from mechscope.cnn.config import TrainConfig
from mechscope.cnn.data.mnist import MNIST, load_mnist
from mechscope.cnn.methods.attribution import IntegratedGradients
from mechscope.cnn.pipelines.train import train
from mechscope.cnn.runs import load_run

# Peak memory is the child's VmHWM (its own high-water mark), as in bench/lm.py: ru_maxrss would be the parent's
# peak, which Linux carries into a child through fork and exec.
MEMORY_CHILD = """
import sys, torch
def hwm():  # KiB
    line = next(x for x in open("/proc/self/status") if x.startswith("VmHWM"))
    return int(line.split()[1])
from mechscope.cnn.data.mnist import MNIST, load_mnist
from mechscope.cnn.methods.attribution import IntegratedGradients
from mechscope.cnn.runs import load_run
model = load_run(sys.argv[1]).model
x = MNIST.to_float(load_mnist().test_images[:1000])
with torch.no_grad():
    t = model(x).argmax(1)
before = hwm()
chunk = int(sys.argv[2]) or None
IntegratedGradients(n_steps=64, batch_size=chunk).attribute(model, x, t)
after = hwm()
print(before, after)
"""


def best_interleaved(fns, repeats: int) -> list[float]:
    """Best time of each function, measured in alternation (as bench/lm.py does) so that drift affects all alike."""
    for fn in fns:
        fn()  # warm-up
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, ts in zip(fns, times, strict=True):
            start = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - start)
    return [min(ts) for ts in times]


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
    print(f"{load()} at the start", flush=True)
    t_ours, t_captum = best_interleaved(
        [lambda: ours.attribute(model, x, t), lambda: theirs.attribute(x, target=t, n_steps=64)], args.repeats
    )
    diff = (ours.attribute(model, x, t) - theirs.attribute(x, target=t, n_steps=64)).abs().max().item()
    ratio = t_captum / t_ours
    print(  # target from docs/development.md: ratio Captum / mechscope >= 1.0
        f"IG 64 images x 64 steps (best of {args.repeats}, alternating): mechscope {t_ours * 1000:.0f} ms, captum "
        f"{t_captum * 1000:.0f} ms, ratio captum/mechscope {ratio:.2f} (target >= 1.0): "
        f"{'PASS' if ratio >= 1.0 else 'FAIL'}; max |difference| {diff:.1e} {agreement(diff, 1e-4)}; {load()}"
    )

    rows = {}
    for chunk in (0, 4096, 512):  # 0: every path point at once, as Captum does by default
        out = subprocess.run([sys.executable, "-c", MEMORY_CHILD, run, str(chunk)], capture_output=True, text=True)
        if out.returncode != 0:
            raise SystemExit(out.stderr)
        before, after = map(int, out.stdout.split())
        rows[chunk] = {"peak_rss_mib": after / 1024, "rss_before_mib": before / 1024}
    print(
        "IG on 1,000 images x 64 steps, peak resident memory of the process (VmHWM, MiB; "
        f"{rows[0]['rss_before_mib']:.0f} before the attribution starts): "
        + ", ".join(
            f"{'no chunking' if c == 0 else f'batch_size {c}'} {r['peak_rss_mib']:.0f}" for c, r in rows.items()
        )
    )
    print(f"{load()} at the end")
    print(json.dumps({"ig_ratio_vs_captum": ratio, "peak_mib": rows}))


if __name__ == "__main__":
    main()
