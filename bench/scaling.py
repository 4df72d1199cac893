"""How `lm heads`, `lm circuits` and `cnn explain` grow with the model: wall time, passes and peak memory against size.

Transformers: random checkpoints of real architectures' shapes, built offline by transformers (Pythia's
GPT-NeoX configurations: 14m, 70m, 160m, 410m and, with --big, 1b), each analysed by `mechscope lm heads` and by
`mechscope lm circuits` with the default protocol (8 sequences of BOS + 50 + 50 tokens; the checkpoints have no
tokenizer, so `lm circuits` reads no prompt) in a fresh process. CNNs: the default MNIST network,
2x and 4x its channels, and 3 and 4 stages, each trained briefly (one epoch on 8,192 images; the analysis's cost
does not depend on how well it was trained) and explained by `mechscope cnn explain`.

For each: wall time, the passes the analysis made (its JSON's "work"), the time of one forward pass of the
analysis's batch measured here, their ratio (wall / (passes x one pass): how close to the limit it runs), peak
resident memory of the process against the model's bytes plus one layer's activations, and a fitted exponent
of time against parameters x tokens (or images). Prints a table, writes scaling.json and a figure.

    python bench/scaling.py [--only heads|circuits|lm|cnn] [--big] [--out DIR] [--png docs/img/scaling.png]
    python bench/scaling.py --only lm --keep OLD/scaling.json ...  # the rows not run now (and their load) from OLD
    python bench/scaling.py --replot runs/bench-scaling/scaling.json --png docs/img/scaling.png  # the figure again
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
PYTHIA = {  # hidden, layers, heads, intermediate (EleutherAI/pythia-* configs)
    "pythia-14m": (128, 6, 4, 512),
    "pythia-70m": (512, 6, 8, 2048),
    "pythia-160m": (768, 12, 12, 3072),
    "pythia-410m": (1024, 24, 16, 4096),
    "pythia-1b": (2048, 16, 8, 8192),
}
CNNS = {  # name -> cnn train options
    "default 16,32": [],
    "2x 32,64": ["--channels", "32,64"],
    "4x 64,128": ["--channels", "64,128"],
    "3 stages 16,32,32": ["--channels", "16,32,32", "--kernel-size", "3", "--padding", "1"],
    "4 stages 16,32,32,32": ["--channels", "16,32,32,32", "--kernel-size", "3", "--padding", "1"],
}


PEAK = """
import resource, sys
import torch  # noqa: F401  (every analysis has it in memory before its work)
from mechscope.cli import main

def kib(field):  # this process's own figures: ru_maxrss keeps the forking parent's across exec on Linux
    try:
        return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
baseline = kib("VmRSS:")
try:
    main(sys.argv[2:])
finally:
    open(sys.argv[1], "w").write(f"{kib('VmHWM:')} {baseline}")
"""


def shared_data_default() -> None:
    """As make does: MNIST and the real text from ``../shared/data`` beside the clone, unless MECHSCOPE_DATA says
    otherwise; set in this process, so the bench's own work and the commands it starts both see it."""
    shared = ROOT.parent / "shared" / "data"
    if (shared / "mnist").is_dir():
        os.environ.setdefault("MECHSCOPE_DATA", str(shared))


def timed(args: list[str], env: dict, work: Path) -> tuple[float, float, float]:
    """(wall seconds, peak resident memory in MiB, resident memory before the command's work in MiB: the
    interpreter, torch and mechscope's CLI) of ``mechscope ARGS`` in a fresh process of its own."""
    peak_file = work / "peak.txt"
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", PEAK, str(peak_file), *args], env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    wall = time.perf_counter() - start
    if done.returncode not in (0, None):
        raise SystemExit(f"mechscope {' '.join(args)} failed: {done.stderr[-2000:]}")
    peak, baseline = (int(v) / 1024 for v in peak_file.read_text().split())  # KiB
    return wall, peak, baseline


def pythia_dir(name: str, where: Path) -> Path:
    import transformers

    d, layers, heads, ff = PYTHIA[name]
    path = where / name
    if not (path / "config.json").is_file():
        cfg = transformers.GPTNeoXConfig(
            vocab_size=50304, hidden_size=d, num_hidden_layers=layers, num_attention_heads=heads,
            intermediate_size=ff, max_position_embeddings=2048, rotary_pct=0.25, use_parallel_residual=True,
            bos_token_id=0, eos_token_id=0,
        )  # fmt: skip
        torch.manual_seed(0)
        transformers.GPTNeoXForCausalLM(cfg).save_pretrained(path)
    return path


def one_forward(model_dir: Path, batch: int = 8, positions: int = 101) -> tuple[float, int, float, float]:
    """(seconds of one forward pass of the protocol's batch here (median of 3), parameters, MiB of the weights, MiB
    of one layer's activations on that batch: its widest [batch, positions, max(4 d_model, d_mlp)] float32 tensor,
    three times)."""
    from mechscope.lm.models.loading import load_model

    model, _ = load_model(str(model_dir), device="cpu")
    tokens = torch.randint(1000, 10000, (batch, positions), generator=torch.Generator().manual_seed(0))
    times = []
    with torch.no_grad():
        model(tokens)  # warm-up
        for _ in range(3):
            t = time.perf_counter()
            model(tokens)
            times.append(time.perf_counter() - t)
    n = sum(p.numel() for p in model.parameters())
    one_layer_mib = batch * positions * max(4 * model.cfg.d_model, model.cfg.d_mlp or 0) * 4 * 3 / 2**20
    return float(np.median(times)), n, n * 4 / 2**20, one_layer_mib


def lm_rows(names: list[str], work: Path, env: dict, command: str = "heads") -> list[dict]:
    """One row per Pythia shape of `lm heads` or (``command``) `lm circuits`."""
    rows = []
    for name in names:
        path = pythia_dir(name, work / "models")
        out = work / command / name
        wall, peak, baseline = timed(["lm", command, "--model", str(path), "--out", str(out), "--force", "--device",
                                      "cpu"], env, work)  # fmt: skip
        data = json.loads((out / f"{command}.json").read_text())
        forward, n_params, weights_mib, one_layer_mib = one_forward(path)
        passes = data["work"]["forward_passes"] + 2 * data["work"]["backward_passes"]  # a backward ~ 2 forwards
        layers = PYTHIA[name][1]
        load = data["seconds"].get("load", 0.0)  # (`lm circuits` before 5 December did not time it)
        rows.append({
            "model": name, "parameters": n_params, "tokens": 8 * 101, "wall_s": wall, "load_s": load,
            "forward_s": forward, "passes": passes, "ratio": (wall - load) / (passes * forward),
            "peak_mib": peak, "baseline_mib": baseline, "weights_mib": weights_mib,
            "memory_ratio": peak / (weights_mib + one_layer_mib),
            "memory_ratio_above_baseline": (peak - baseline) / (weights_mib + one_layer_mib),
            "layers": layers,
        })  # fmt: skip
        if command == "heads":
            rows[-1]["measured_heads"] = len(data["ablation"]["mean"]["measured"])
        print(f"lm {command:<9} {name:<12} {n_params / 1e6:8.1f}M params  {wall:7.1f} s  passes {passes:6.1f}  "
              f"one pass {forward:6.2f} s  ratio {rows[-1]['ratio']:5.2f}  peak {peak:7.0f} MiB "
              f"(weights {weights_mib:.0f}, before the work {baseline:.0f})",
              flush=True)  # fmt: skip
    return rows


def cnn_rows(work: Path, env: dict) -> list[dict]:
    rows = []
    for name, options in CNNS.items():
        run = work / "cnn" / name.replace(" ", "_").replace(",", "-")
        if not (run / "model.safetensors").is_file():
            subprocess.run([sys.executable, "-m", "mechscope", "cnn", "train", "--out", str(run), "--epochs", "1",
                            "--train-limit", "8192", "--force", *options], check=True, env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        out = run / "explain"
        wall, peak, baseline = timed(["cnn", "explain", "--run", str(run), "--out", str(out), "--force"], env, work)
        data = json.loads((out / "mechanisms.json").read_text())
        metrics = json.loads((run / "metrics.json").read_text())
        forward = min(one_cnn_pass(run).values())  # the fastest batch size
        passes = data["work"]["forward_passes"] + 2 * data["work"]["backward_passes"]
        report = data["seconds"].get("report", 0.0)
        rows.append({
            "model": name, "parameters": metrics["n_parameters"], "images": 10_000, "wall_s": wall,
            "forward_s": forward, "passes": passes, "report_s": report,
            "ratio": (wall - report) / (passes * forward), "peak_mib": peak, "baseline_mib": baseline,
        })  # fmt: skip
        print(f"{name:<22} {metrics['n_parameters']:>9,} params  {wall:7.1f} s  passes {passes:7.1f}  one pass "
              f"{forward:6.3f} s  ratio {rows[-1]['ratio']:6.1f}  peak {peak:6.0f} MiB", flush=True)  # fmt: skip
    return rows


def one_cnn_pass(run: Path, batches: tuple[int, ...] = (256, 512, 1024, 2048)) -> dict[int, float]:
    """Seconds of one forward pass over the 10,000 test images, per batch size: the median of 3, measured after a
    first round over every batch size (which is not kept).

    Both the batch and the warm-up matter on this machine. glibc serves a block larger than its mmap threshold
    with fresh pages, and raises the threshold only when such a block is freed; until then every batch's
    activations fault their pages in again (0.46 s a pass at 256 images in a fresh process against 0.21 s after).
    At 2,048 images (the batch `cnn explain` collects with) a pass stays near 0.55 s. What the hardware allows is
    the fastest, `min(...values())`."""
    from mechscope.cnn.runs import load_run, load_run_data

    loaded = load_run(run)
    x = load_run_data(loaded).test_float()
    seconds = {}
    with torch.no_grad():
        for _round in range(2):
            for batch in batches:
                times = []
                for _ in range(3):
                    t = time.perf_counter()
                    for i in range(0, len(x), batch):
                        loaded.model(x[i : i + batch])
                    times.append(time.perf_counter() - t)
                seconds[batch] = float(np.median(times))
    return seconds


def exponent(size: list[float], seconds: list[float]) -> float:
    """The slope of log(seconds) against log(size): time grows as size**slope."""
    return float(np.polyfit(np.log(size), np.log(seconds), 1)[0]) if len(size) > 1 else float("nan")


HALVES = {"heads": "lm_heads", "circuits": "lm_circuits", "cnn": "cnn_explain"}  # --only name -> scaling.json key
LM_STYLE = {"heads": ("o-", "C0"), "circuits": ("D-", "C3")}


def figure(rows: dict[str, list[dict]], path: Path, loads: dict) -> None:
    """``rows``: each half's rows by its --only name; ``loads``: the load average at the start and end of each half's
    run, {"heads": (a, b), ...}."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4), layout="constrained")
    axes = fig.subplots(1, 3)
    for half in ("heads", "circuits"):
        lm = rows.get(half) or []
        if not lm:
            continue
        style, color = LM_STYLE[half]
        x = [r["parameters"] * r["tokens"] for r in lm]
        walls = [r["wall_s"] for r in lm]
        axes[0].loglog(x, walls, style, color=color, label=f"lm {half} (slope {exponent(x, walls):.2f})")
        for r, xi in zip(lm, x, strict=True):
            axes[0].annotate(r["model"].removeprefix("pythia-"), (xi, r["wall_s"]), fontsize=7)
        axes[2].loglog([r["weights_mib"] for r in lm], [r["peak_mib"] for r in lm], style, color=color,
                       label=f"lm {half}")  # fmt: skip
    axes[0].set_xlabel("parameters × tokens")
    axes[0].set_ylabel("wall time (s)")
    axes[0].legend(fontsize=8)
    cnn = rows.get("cnn") or []
    if cnn:
        wide = width_series(cnn)
        deep = [r for r in cnn if "stages" in r["model"] or r["model"].startswith("default")]
        x = [r["parameters"] for r in wide]
        axes[1].loglog(x, [r["wall_s"] for r in wide], "s-", color="C1",
                       label=f"wider, 2 stages (slope {exponent(x, [r['wall_s'] for r in wide]):.2f})")  # fmt: skip
        axes[1].loglog([r["parameters"] for r in deep], [r["wall_s"] for r in deep], "^", color="C2",
                       label="deeper: 3 and 4 stages")  # fmt: skip
        for r in cnn:
            axes[1].annotate(r["model"].split(" ")[0] + ("" if "stages" not in r["model"] else " stages"),
                             (r["parameters"], r["wall_s"]), fontsize=7)  # fmt: skip
        from matplotlib.ticker import NullFormatter

        axes[1].xaxis.set_minor_formatter(NullFormatter())
        axes[1].set_xlabel("parameters (10,000 test images)")
        axes[1].set_ylabel("wall time (s)")
        axes[1].legend(fontsize=8)
        axes[2].loglog([r["parameters"] * 4 / 2**20 for r in cnn], [r["peak_mib"] for r in cnn], "s", color="C1",
                       label="cnn explain")  # fmt: skip
    axes[2].legend(fontsize=8)
    axes[2].plot([1, 1e4], [1, 1e4], color="grey", lw=0.6, ls="--")
    axes[2].set_xlabel("weights (MiB)")
    axes[2].set_ylabel("peak resident memory (MiB)")
    said = {half: f"{loads[half][0]:.1f} → {loads[half][1]:.1f}" for half in HALVES if half in loads}
    if len(set(said.values())) == 1:
        load = f"load average {next(iter(said.values()))}"
    else:
        load = "load average " + "; ".join(f"{half} {text}" for half, text in said.items())
    fig.suptitle(f"mechscope's analyses against the model's size (2-core CPU; {load})", fontsize=10)
    fig.savefig(path, dpi=100)


def width_series(cnn: list[dict]) -> list[dict]:
    """The CNN rows of growing width (2 stages: the default, 2x and 4x channels), smallest first."""
    return sorted((r for r in cnn if "stages" not in r["model"]), key=lambda r: r["parameters"])


def loads_of(done: dict) -> dict:
    """Each half's load average in a scaling.json, by --only name (files from before three halves said "lm" for
    `lm heads`, and older ones one load for both)."""
    loads = done.get("loads", {"lm": done["load_average"], "cnn": done["load_average"]})
    return {("heads" if half == "lm" else half): tuple(v) for half, v in loads.items()}


def rows_of(done: dict) -> dict[str, list[dict]]:
    return {half: done.get(key) or [] for half, key in HALVES.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", choices=("heads", "circuits", "lm", "cnn"), help="lm: heads and circuits")
    p.add_argument("--big", action="store_true", help="also pythia-1b (about 4 GB of weights)")
    p.add_argument("--out", default="runs/bench-scaling")
    p.add_argument("--png", default=None, help="write the figure here too (e.g. docs/img/scaling.png)")
    p.add_argument("--replot", default=None, help="only draw the figure again from a scaling.json (to --png)")
    p.add_argument("--keep", default=None, help="with --only: the rows not run now (and their load) from this file")
    args = p.parse_args()
    if args.replot:
        done = json.loads(Path(args.replot).read_text())
        figure(rows_of(done), Path(args.png or "scaling.png"), loads_of(done))
        return
    work = Path(args.out).absolute()
    work.mkdir(parents=True, exist_ok=True)
    shared_data_default()
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    names = [n for n in PYTHIA if n != "pythia-1b" or args.big]
    run = {None: set(HALVES), "lm": {"heads", "circuits"}}.get(args.only, {args.only})
    rows: dict[str, list[dict]] = {half: [] for half in HALVES}
    loads = {}
    for half in HALVES:
        if half in run:
            start = os.getloadavg()[0]
            rows[half] = cnn_rows(work, env) if half == "cnn" else lm_rows(names, work, env, half)
            loads[half] = (start, os.getloadavg()[0])
    if args.keep and args.only:  # the halves not run now, as measured before (each with its own load average)
        kept = json.loads(Path(args.keep).read_text())
        for half, old in rows_of(kept).items():
            if half not in run and old:
                rows[half], loads[half] = old, loads_of(kept)[half]
    every = [v for half in HALVES if half in loads for v in loads[half]]
    summary = {"load_average": (every[0], every[-1]), "loads": loads, "cores": os.cpu_count(),
               **{key: rows[half] for half, key in HALVES.items()}}  # fmt: skip
    for half in ("heads", "circuits"):
        lm = rows[half]
        if lm:
            slope = exponent([r["parameters"] * r["tokens"] for r in lm], [r["wall_s"] for r in lm])
            summary[f"lm_{half}_time_exponent"] = slope
            print(f"lm {half}: time ~ (parameters x tokens)^{slope:.2f}; memory at most "
                  f"{max(r['memory_ratio'] for r in lm):.2f}x (weights + one layer's activations), "
                  f"{max(r['memory_ratio_above_baseline'] for r in lm):.2f}x above the process before its work "
                  "(target 1.3x)")  # fmt: skip
    if rows["cnn"]:
        cnn = rows["cnn"]
        wide = width_series(cnn)  # the figure's "wider" series
        summary["cnn_explain_time_exponent"] = exponent([r["parameters"] for r in wide], [r["wall_s"] for r in wide])
        summary["cnn_explain_time_exponent_all_rows"] = exponent([r["parameters"] for r in cnn],
                                                                 [r["wall_s"] for r in cnn])  # fmt: skip
        print(f"cnn explain: time ~ parameters^{summary['cnn_explain_time_exponent']:.2f} over the width series "
              f"(^{summary['cnn_explain_time_exponent_all_rows']:.2f} over every row, deeper networks included)")
    (work / "scaling.json").write_text(json.dumps(summary, indent=2))
    figure(rows, work / "scaling.png", loads)
    if args.png:
        figure(rows, Path(args.png), loads)
    print("load average " + "; ".join(f"{h} {a:.1f} -> {b:.1f}" for h, (a, b) in loads.items())
          + f", {os.cpu_count()} cores; {work / 'scaling.json'}")  # fmt: skip


if __name__ == "__main__":
    with tempfile.TemporaryDirectory():
        main()
