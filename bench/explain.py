"""`mechscope mnist explain` speed: seconds per section on a default run (target: all ≤ 3 minutes).

Trains a default run first unless one is given (about 40 s, not counted).

    python bench/explain.py [--run DIR]
"""

from __future__ import annotations

import argparse
import tempfile
import time

from mechscope.pipelines import train_mnist
from mechscope.pipelines.explain import explain_mnist


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default=None, help="a run directory (default: train one with the defaults)")
    args = parser.parse_args()
    tmp = tempfile.mkdtemp()
    run = args.run
    if run is None:
        run = f"{tmp}/run"
        train_mnist(run, progress=False)
    start = time.perf_counter()
    _, result = explain_mnist(run, f"{tmp}/explain")
    total = time.perf_counter() - start
    sections = ", ".join(f"{k} {v:.1f}" for k, v in result["seconds"].items() if v >= 0.05)
    met = sum(c["meets_criterion"] for c in result["circuits"])
    print(
        f"mnist explain on {result['test_images']:,} test images: {total:.1f} s in all (target <= 180 s); "
        f"seconds per section: {sections}; circuits meeting their criterion: {met}/{len(result['circuits'])}"
    )


if __name__ == "__main__":
    main()
