"""The whole induction-head analysis of a model, timed per protocol.

Target (issue 7): SmolLM2-135M, every protocol, all 270 heads, per-head ablations included,
in at most 180 s on a 2-core CPU. The speed issue's tighter target, against one forward pass measured
in the same run, is in ``bench/speed_targets.py``.

    python bench/heads.py [--model smollm2]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

from mechscope.lm.pipelines.heads import induction_heads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    args = parser.parse_args()
    load, cpu = os.getloadavg()[0], time.process_time()
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        _, result = induction_heads(args.model, f"{tmp}/heads")
        total = time.perf_counter() - start
    for step, seconds in result.seconds.items():
        print(f"{step:<20}{seconds:7.1f} s")
    n_heads = sum(len(row) for row in result.labels)
    print(f"{'report + JSON':<20}{total - sum(result.seconds.values()):7.1f} s")
    print(f"work: {result.work}")
    print(f"CPU time {time.process_time() - cpu:.0f} s; load average {load:.1f} at the start, "
          f"{os.getloadavg()[0]:.1f} at the end, {os.cpu_count()} cores")
    print(f"total {total:.1f} s for {n_heads} heads (target <= 180 s): {'PASS' if total <= 180 else 'FAIL'}")


if __name__ == "__main__":
    main()
