"""Attribution graphs (issue 23): time and peak memory of one SmolLM2 graph against prompt length, as multiples of
one forward-plus-backward pass of the same model on the same prompt, with the load average beside every figure.

For each length (16, 32, 64, 128 tokens by default) a fresh process (so that its peak RSS is its own) loads
SmolLM2 and the transcoders (``--transcoders DIR``, SAELens layout, one per layer; layers left empty are error
nodes), makes a prompt of random tokens repeated once (BOS, n/2 tokens, the same n/2 again: an induction prompt),
and measures:

- ``fwd+bwd``: one forward pass with gradients and a backward pass from the last position's top logit (median of
  ``--repeats``); the peak RSS above the loaded model during it;
- ``graph``: :func:`mechscope.lm.methods.attribution_graph.attribution_graph` with every active feature given a row
  (no ``--max-features`` cap unless asked) and no intervention checks; its wall time, backward passes, active
  features ``N``, stored edges, and the peak RSS above the loaded model.

The graph stores its rows sparsely (triplets of the non-zero entries): memory grows with the edges kept, not with
``N²`` (circuit-tracer's dense adjacency matrix is ``(N + E + T)²`` floats); the table prints ``N² × 4`` bytes
beside the measured peak to show the difference.

    python bench/attribution_graph.py --transcoders DIR [--lengths 16 32 64 128] [--repeats 3] [--max-features N]
                                      [--edges-per-row K]

With ``--edges-per-row K`` each row keeps its K largest feature entries (and every error and token entry): the
stored edges are then at most (K + errors + tokens) per row, linear in the features; without it every non-zero
entry is kept, and a row's non-zero entries grow with the features upstream of it.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

from benchlib import load


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def one(
    length: int, transcoders: str, repeats: int, max_features: int | None, threads: int, per_row: int | None
) -> dict:
    import torch

    from mechscope.lm.methods.attribution_graph import GraphSettings, attribution_graph
    from mechscope.lm.methods.transcoders import Transcoders
    from mechscope.lm.models.loading import load_model

    torch.set_num_threads(threads)
    model, _ = load_model("smollm2")
    tcs = Transcoders.load(transcoders)
    g = torch.Generator().manual_seed(0)
    half = torch.randint(1000, 10000, ((length - 1) // 2,), generator=g)
    body = torch.cat([half, half])
    tokens = torch.cat([torch.tensor([model.cfg.bos_token_id]), body])[:length]
    if len(tokens) < length:
        tokens = torch.cat([tokens, half[: length - len(tokens)]])
    base = rss_mb()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        x = model.embed(tokens[None]).detach().requires_grad_(True)
        logits = model.unembed(model.run_blocks(x))
        logits[0, -1].max().backward()
        times.append(time.perf_counter() - t)
        del x, logits
    fb = statistics.median(times)
    fb_peak = rss_mb() - base
    settings = GraphSettings(check_sources=0, max_feature_nodes=max_features, edges_per_row=per_row, batch_size=32)
    t = time.perf_counter()
    graph, rep = attribution_graph(model, tcs, tokens, settings=settings)
    seconds = time.perf_counter() - t
    c = graph.counts
    n = c["active_features"]
    return {
        "length": length,
        "fwd_bwd_s": fb,
        "graph_s": seconds,
        "ratio_time": seconds / fb,
        "backward_passes": c["backward_passes"],
        "active_features": n,
        "feature_rows": c["feature_nodes"],
        "edges_stored": c["edges_stored"],
        "peak_fwd_bwd_mb": fb_peak,
        "peak_graph_mb": rss_mb() - base,
        "dense_adjacency_mb": (n + c["error_nodes"] + c["input_nodes"] + c["logit_nodes"]) ** 2 * 4 / 2**20,
        "replacement": graph.scores["replacement"],
        "completeness": graph.scores["completeness"],
        "load": load(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--transcoders", required=True)
    ap.add_argument("--lengths", type=int, nargs="+", default=[16, 32, 64, 128])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-features", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--edges-per-row", type=int, default=None, help="feature entries kept per row (default: all)")
    ap.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one is not None:
        print(json.dumps(one(a.one, a.transcoders, a.repeats, a.max_features, a.threads, a.edges_per_row)))
        return
    print(
        f"SmolLM2 attribution graphs, transcoders {a.transcoders}, edges per row {a.edges_per_row or 'all'}; {load()}",
        flush=True,
    )
    head = (
        f"{'tokens':>6} {'fwd+bwd s':>9} {'graph s':>8} {'× f+b':>7} {'bwd passes':>10} {'features':>8} "
        f"{'edges':>9} {'peak f+b MB':>11} {'peak graph MB':>13} {'dense N² MB':>11}  load"
    )
    print(head, flush=True)
    failed = 0
    for n in a.lengths:
        cmd = [sys.executable, __file__, "--transcoders", a.transcoders, "--repeats", str(a.repeats), "--one", str(n)]
        cmd += ["--threads", str(a.threads)] + (["--max-features", str(a.max_features)] if a.max_features else [])
        cmd += ["--edges-per-row", str(a.edges_per_row)] if a.edges_per_row else []
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            print(f"{n:>6} failed: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode}")
            failed += 1
            continue
        r = json.loads(done.stdout.strip().splitlines()[-1])
        print(
            f"{n:>6} {r['fwd_bwd_s']:>9.2f} {r['graph_s']:>8.1f} {r['ratio_time']:>7.0f} {r['backward_passes']:>10} "
            f"{r['active_features']:>8} {r['edges_stored']:>9} {r['peak_fwd_bwd_mb']:>11.0f} "
            f"{r['peak_graph_mb']:>13.0f} {r['dense_adjacency_mb']:>11.0f}  {r['load']}",
            flush=True,
        )
    if failed == len(a.lengths):
        raise SystemExit(f"every length failed ({failed} of {len(a.lengths)})")


if __name__ == "__main__":
    main()
