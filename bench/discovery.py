"""Circuit discovery, timed: EAP and EAP-IG over every edge of a transformer's graph for the induction metric, as a
multiple of one forward-plus-backward pass of the plain model (target for EAP: at most 5×; it makes two forwards
and one backward), and ACDC on a tracr model and a train-toy model with its number of forward passes.

The reference pass computes what EAP's backward computes: activation gradients only (the weights' requires_grad
off), down to the first block's input. Reference, EAP and EAP-IG are each run once untimed (reference and EAP) and
then alternate over ``--repeats`` rounds; the best (min) of each is compared, so a change of load falls on all alike.

    python bench/discovery.py [--model smollm2] [--n 20] [--batch 8] [--repeats 2] [--toy runs/toy-synthetic-2L]
                              [--tracr ../shared/data/tracr/reverse] [--threads 2]

Every figure is printed with the machine's load average (start and end) and core count: on a shared machine the
ratios are the figures to compare, the seconds move with the load.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch


def _load() -> str:
    return f"{os.getloadavg()[0]:.1f}"


def _timed(fn, repeat: int = 1):
    best, out = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def bench_transformer(model_spec: str, n: int, batch: int, steps: int, repeats: int = 2) -> None:
    from mechscope.core.graphs import eap, eap_ig
    from mechscope.core.hooks import hooks
    from mechscope.lm.methods.graph import TransformerEdges
    from mechscope.lm.methods.tasks import induction_task
    from mechscope.lm.pipelines.discovery import load_any

    model = load_any(model_spec)
    task = induction_task(model, n=n, batch=batch)
    edges = TransformerEdges(model)
    g = edges.graph
    print(
        f"{model_spec}: {g.n_edges:,} edges ({g.n_senders} senders, {g.n_receivers} receivers); induction "
        f"metric on {batch} × (BOS + {n} + {n}) tokens; load {_load()} at the start, {os.cpu_count()} cores"
    )

    def fwd_bwd():  # as EAP's backward: activation gradients only (weights' off), down to block 0's input
        weights = [p for p in model.parameters() if p.requires_grad]
        tracked = []

        def track(x, hook):
            tracked.append(x.detach().requires_grad_())
            return tracked[-1]

        try:
            for p in weights:
                p.requires_grad_(False)
            with torch.enable_grad(), hooks(model, fwd=[("blocks.0.hook_resid_pre", track)]):
                torch.autograd.grad(task.metric(model(task.clean)), tracked)
        finally:
            for p in weights:
                p.requires_grad_(True)

    runs = {
        "base": fwd_bwd,
        "eap": lambda: eap(edges, task.clean, task.corrupted, metric=task.metric, better="lower"),
        "ig": lambda: eap_ig(edges, task.clean, task.corrupted, metric=task.metric, steps=steps),
    }
    runs["base"]()  # warm-up of the reference and of EAP
    runs["eap"]()
    best, out = {k: float("inf") for k in runs}, {}
    for _ in range(repeats):  # alternating, so that a change of load falls on all three alike
        for key, fn in runs.items():
            t, out[key] = _timed(fn)
            best[key] = min(best[key], t)
    base, t_eap, t_ig, r = best["base"], best["eap"], best["ig"], out["ig"]
    print(
        f"  one forward + backward of the plain model (activation gradients down to blocks.0.hook_resid_pre, "
        f"weights' requires_grad off)  {base:7.2f} s; best of {repeats} rounds, alternating with EAP and EAP-IG"
    )
    print(
        f"  EAP (2 forwards, 1 backward, every edge)    {t_eap:7.2f} s = {t_eap / base:4.1f}× "
        f"(target <= 5×: {'PASS' if t_eap / base <= 5 else 'FAIL'}); load {_load()}"
    )
    print(
        f"  EAP-IG, {steps} steps ({r.forward_passes} forwards, {r.backward_passes} backwards)  {t_ig:7.2f} s = "
        f"{t_ig / base:4.1f}×; load {_load()}"
    )


def bench_acdc(spec: str, label: str) -> None:
    from mechscope.core.graphs import acdc
    from mechscope.lm.methods.graph import TransformerEdges
    from mechscope.lm.methods.tasks import make_task
    from mechscope.lm.pipelines.discovery import load_any

    model = load_any(spec)
    task = make_task(model)
    edges = TransformerEdges(model)
    with torch.no_grad():
        m0 = float(task.metric(edges.forward(task.clean)[0]))
        m1 = float(task.metric(edges.forward(task.corrupted)[0]))
    tau = 0.01 * abs(m0 - m1)
    t, r = _timed(lambda: acdc(edges, task.clean, task.corrupted, metric=task.metric, threshold=tau,
                               better=task.better))  # fmt: skip
    print(
        f"ACDC on {label} ({edges.graph.n_edges:,} edges, {task.n_examples} examples, {task.metric_name}, tau "
        f"{tau:.3g}): {t:.2f} s, {r.forward_passes} forward passes ({r.settings['edges_tried']} edges tried), "
        f"{len(r.kept)} edges kept; load {_load()}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--n", type=int, default=20)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=2, help="alternating rounds of the reference, EAP and EAP-IG")
    parser.add_argument("--tracr", default=None, help="a tracr folder (default: ../shared/data/tracr/reverse)")
    parser.add_argument("--toy", default=None, help="a train-toy run (default: runs/toy-synthetic-2L if present)")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    start, cpu = time.perf_counter(), time.process_time()
    bench_transformer(args.model, args.n, args.batch, args.steps, args.repeats)
    root = Path(os.environ.get("MECHSCOPE_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
    tracr = args.tracr or str(root / "tracr" / "reverse")
    if Path(tracr).is_dir():
        bench_acdc(tracr, f"tracr {Path(tracr).name}")
    toy = args.toy or "runs/toy-synthetic-2L"
    if Path(toy).is_dir():
        bench_acdc(toy, f"the toy model {toy}")
    else:
        print(f"no toy model at {toy}: train one with `mechscope lm train-toy` (or pass --toy)")
    print(
        f"total {time.perf_counter() - start:.0f} s, CPU {time.process_time() - cpu:.0f} s; load {_load()} at the "
        f"end, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"
    )


if __name__ == "__main__":
    main()
