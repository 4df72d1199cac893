"""``lm solu-compare`` at its default size, timed: GELU and SoLU trained and read, both together.

Target (issue 14): at most 15 minutes on a 2-core CPU for both models. Prints the time of each
step, the held-out losses and the monosemanticity figures of both models.

    python bench/solu.py [--out DIR] [--steps N]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

from mechscope.lm.pipelines.neurons import CompareSettings, solu_compare_run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="Keep the outputs here (default: a temporary directory).")
    parser.add_argument("--steps", type=int, default=CompareSettings.steps)
    args = parser.parse_args()
    settings = CompareSettings(steps=args.steps)
    load = os.getloadavg()[0]
    cpu = time.process_time()
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        _, data = solu_compare_run(settings, args.out or f"{tmp}/solu-compare", force=bool(args.out))
        total = time.perf_counter() - start
    for step, seconds in data["seconds"].items():
        print(f"{step:<20}{seconds:7.1f} s")
    for m in data["models"]:
        s = m["stats"]
        print(
            f"{m['label']:<26} held-out loss {m['held_out_loss']:.4f}  median entropy {s['entropy_median']:.2f} bits  "
            f"top share >= 0.5: {100 * s['share_one_token_ge_0.5']:.0f}%  "
            f">= 0.9: {100 * s['share_one_token_ge_0.9']:.0f}%"
        )
    print(
        f"{settings.layers} layers, d_model {settings.d_model}, d_mlp {settings.d_mlp}, context {settings.n_ctx}, "
        f"{settings.steps} steps of {settings.batch}, {settings.threads} torch thread(s); CPU time "
        f"{time.process_time() - cpu:.0f} s; load average {load:.1f} at the start, "
        f"{os.getloadavg()[0]:.1f} at the end, {os.cpu_count()} cores"
    )
    print(f"total {total:.0f} s for both models (target <= 900 s): {'PASS' if total <= 900 else 'FAIL'}")


if __name__ == "__main__":
    main()
