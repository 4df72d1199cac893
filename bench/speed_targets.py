"""The speed issue's two targets, measured in one run: `lm heads --model smollm2` and `cnn explain` on the default CNN.

Each analysis runs in a fresh process of its own (wall time and peak resident memory); one pass of what it works on
is timed here right before and right after it (median of 3 each time; the mean of the two is used, so that a change
of load during the analysis moves both sides alike): for `lm heads` one forward pass of its batch (8 sequences of 101
tokens), for `cnn explain` one forward pass over the 10,000 test images at the fastest of four batch sizes (what
the hardware allows; the 2,048-image batch `cnn explain` itself collects with is about 3x slower and printed beside
it). Printed per analysis:

* the target ratio: `lm heads`' wall time less the load over one forward pass (target ≤ 8), and `cnn explain`'s
  wall time less the report over one pass over the test set (target ≤ 20, and under 30 s in all);
* how close to the limit it runs: wall time less the load (the report) over (the passes it counted × one pass),
  where a backward pass counts as two forward passes (1 means it costs exactly the passes it makes);
* for `lm heads`, what its exact per-head ablations alone cost: each measured head, under each ablation kind,
  re-runs the layers from its own to the last, so (layers − layer) / layers of a pass, summed from heads.json.

    python bench/speed_targets.py [--run RUN] [--only heads|explain] [--work DIR]

`--run` is a trained default CNN run (default: one is trained here first, not counted). Quote the load average it
prints beside the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scaling import ROOT, one_cnn_pass, one_forward, shared_data_default, timed  # noqa: E402  (bench/ is not a package)


def exact_ablation_passes(data: dict) -> float:
    """Full-pass equivalents of the exact per-head ablations in heads.json: each measured head re-runs its layer
    and every later one."""
    layers = len(data["labels"])
    return sum((layers - int(row["head"].split(".")[0])) / layers
               for kind in data["ablation"].values() for row in kind["measured"])  # fmt: skip


def heads(work: Path, env: dict, model: str) -> dict:
    out = work / "heads"
    before, *_ = one_forward(model)  # median of 3 of one forward of 8 x 101 tokens, right before and right after
    wall, peak, baseline = timed(["lm", "heads", "--model", model, "--out", str(out), "--force"], env, work)
    after, _, weights_mib, one_layer_mib = one_forward(model)
    forward = (before + after) / 2
    data = json.loads((out / "heads.json").read_text())
    load = data["seconds"]["load"]
    passes = data["work"]["forward_passes"] + 2 * data["work"]["backward_passes"]
    exact = exact_ablation_passes(data)
    row = {"wall_s": wall, "load_s": load, "forward_s": forward, "forward_s_before_after": [before, after],
           "target_ratio": (wall - load) / forward,
           "passes": passes, "limit_ratio": (wall - load) / (passes * forward), "exact_ablation_passes": exact,
           "measured": sum(len(k["measured"]) for k in data["ablation"].values()), "peak_mib": peak,
           "baseline_mib": baseline, "weights_mib": weights_mib, "one_layer_mib": one_layer_mib,
           "memory_ratio": peak / (weights_mib + one_layer_mib),
           "memory_ratio_above_baseline": (peak - baseline) / (weights_mib + one_layer_mib)}  # fmt: skip
    print(f"lm heads --model {model}: {wall:.1f} s (load {load:.1f} s), one forward of 8 x 101 tokens {forward:.2f} s "
          f"(mean of {before:.2f} s right before and {after:.2f} s right after, median of 3 each)")
    print(f"  target: (wall - load) / one forward = {row['target_ratio']:.1f} (target <= 8, i.e. "
          f"{8 * forward + load:.0f} s): {'MET' if row['target_ratio'] <= 8 else 'NOT MET'}")
    print(f"  limit: {passes:.1f} passes counted; (wall - load) / (passes x one pass) = {row['limit_ratio']:.2f}")
    print(f"  the exact ablations of {row['measured']} (head, kind) pairs alone are {exact:.1f} passes "
          f"({exact * forward:.0f} s at one pass each)")
    print(f"  memory: peak {peak:.0f} MiB, {baseline:.0f} MiB before the work (interpreter, torch, CLI); weights "
          f"{weights_mib:.0f} MiB + one layer's activations {one_layer_mib:.0f} MiB: {row['memory_ratio']:.2f}x, "
          f"{row['memory_ratio_above_baseline']:.2f}x above the process before its work (target <= 1.3x): "
          f"{'MET' if row['memory_ratio_above_baseline'] <= 1.3 else 'NOT MET'}")
    return row


def explain(work: Path, env: dict, run: Path | None) -> dict:
    if run is None:
        run = work / "mnist"
        if not (run / "model.safetensors").is_file():
            subprocess.run([sys.executable, "-m", "mechscope", "cnn", "train", "--out", str(run), "--force"],
                           check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    out = work / "explain"
    before = one_cnn_pass(run)  # right before and right after the analysis; the mean of the two per batch size
    wall, peak, baseline = timed(["cnn", "explain", "--run", str(run), "--out", str(out), "--force"], env, work)
    after = one_cnn_pass(run)
    per_batch = {b: (before[b] + after[b]) / 2 for b in before}
    data = json.loads((out / "mechanisms.json").read_text())
    fastest = min(per_batch, key=per_batch.get)
    forward, at_2048 = per_batch[fastest], per_batch[2048]
    report = data["seconds"].get("report", 0.0)
    passes = data["work"]["forward_passes"] + 2 * data["work"]["backward_passes"]
    row = {"wall_s": wall, "report_s": report, "forward_s": forward, "forward_batch": fastest,
           "forward_s_per_batch": per_batch, "forward_s_before_after": [before[fastest], after[fastest]],
           "target_ratio": (wall - report) / forward,
           "target_ratio_at_2048": (wall - report) / at_2048, "passes": passes,
           "limit_ratio": (wall - report) / (passes * forward), "peak_mib": peak, "baseline_mib": baseline,
           "sections": {k: round(v, 2) for k, v in data["seconds"].items()}}  # fmt: skip
    met = wall < 30 and row["target_ratio"] <= 20
    print(f"cnn explain --run {run}: {wall:.1f} s (report {report:.1f} s); one pass over the test set "
          f"{forward:.3f} s at its fastest batch ({fastest} images), {at_2048:.3f} s in batches of 2,048 (each the "
          f"mean of right before and right after the analysis: {before[fastest]:.3f} and {after[fastest]:.3f} s)")
    print(f"  target: under 30 s and (wall - report) / one pass = {row['target_ratio']:.1f} <= 20: "
          f"{'MET' if met else 'NOT MET'} ({row['target_ratio_at_2048']:.1f} against the 2,048-image pass)")
    print(f"  limit: {passes:.1f} passes counted; (wall - report) / (passes x one pass) = {row['limit_ratio']:.2f}")
    print(f"  sections (s): {row['sections']}; peak memory {peak:.0f} MiB ({baseline:.0f} MiB before the work)")
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=None, help="a trained default CNN run (default: train one)")
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--only", choices=("heads", "explain"), default=None)
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="speed-"))
    shared_data_default()
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    start = os.getloadavg()
    print(f"load average {start[0]:.1f} at the start, {os.cpu_count()} cores; work in {work}", flush=True)
    rows = {}
    if args.only in (None, "heads"):
        rows["heads"] = heads(work, env, args.model)
    if args.only in (None, "explain"):
        rows["explain"] = explain(work, env, args.run)
    end = os.getloadavg()
    print(f"load average {end[0]:.1f} at the end")
    (work / "speed_targets.json").write_text(json.dumps({"load": [start[0], end[0]], **rows}, indent=1))


if __name__ == "__main__":
    main()
