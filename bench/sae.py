"""Sparse dictionaries, measured in one run with the load average beside every ratio (issue 21).

1. **Harvesting throughput** as a ratio to the model's plain forward pass on the same batches (target >= 0.8):
   the CNN (default MNIST network, ``conv2.hook_out``, 10,000 images) and a transformer (``--lm``: a random
   4-layer d_model 256 model by default, or ``--lm smollm2``): harvest = forward with the hook captured, rows
   made and written into a sharded store on disk; forward = ``model(x)`` with no hook. For the transformer: the
   last block's ``hook_resid_post`` with the whole forward run (the harvest's overhead alone), the same with the
   forward stopped after the hook (what ``lm sae harvest`` does: no final norm, no unembedding), and the middle
   block's (half the blocks). Measurements alternate (forward, harvest, forward,
   ...) ``--repeats`` times and the medians are compared, so the load's drift hits both alike.
2. **Training throughput** against EleutherAI's sparsify (``pip install eai-sparsify==1.3.3``, a bench/test-only
   dependency) on the same activations and settings: TopK, d_sae = 8 d_in, k = 32, batch 4096, Adam at the same
   rate, decoder rows kept at unit norm with the parallel gradient removed (what both do), one thread; rows per
   second of each over the same batches, interleaved, medians (target ours / sparsify >= 1.0).
3. **Memory while harvesting**: a corpus whose activations are ten times a memory budget (``--budget-mb``,
   default 64 MiB: 640 MiB of activations streamed from a generator) harvested with a shuffle buffer well inside
   the budget; peak RSS (resource.getrusage) sampled after each shard against the RSS before, printed at 10%, 50%
   and 100% of the corpus: flat when the store streams.

    python bench/sae.py [--lm smollm2] [--repeats 3] [--skip-train] [--skip-memory]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import tempfile
import time

import torch

from benchlib import load


def interleaved(fns: dict, repeats: int) -> dict[str, float]:
    """Median seconds of each function, run in turn ``repeats`` times."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


# ---- 1. harvesting ---------------------------------------------------------------------------------------------


def bench_cnn_harvest(repeats: int) -> None:
    from mechscope.cnn.methods.sae import harvest_batches
    from mechscope.cnn.models.cnn import CNN
    from mechscope.cnn.models.spec import walk
    from mechscope.core.dictionaries.store import harvest_many

    torch.manual_seed(0)
    model = CNN().eval()
    spec = walk(model)
    x = torch.rand(10_000, 1, 28, 28)
    batch = 500

    def forward():
        with torch.no_grad():
            for s in range(0, len(x), batch):
                model(x[s : s + batch])

    def harvest():
        with tempfile.TemporaryDirectory() as tmp:
            harvest_many(([r] for r in harvest_batches(spec, x, "conv2.hook_out", batch=batch)), [f"{tmp}/s"],
                         shard_rows=32768, progress=False)  # fmt: skip

    t = interleaved({"forward": forward, "harvest": harvest}, repeats)
    ratio = t["forward"] / t["harvest"]  # target from docs/development.md: harvest >= 0.8
    print(f"CNN harvest conv2.hook_out, 10,000 images: forward {len(x) / t['forward']:,.0f} img/s, harvest "
          f"{len(x) / t['harvest']:,.0f} img/s: ratio {ratio:.2f} (target >= 0.8: "
          f"{'PASS' if ratio >= 0.8 else 'FAIL'}); {load()}")  # fmt: skip


def lm_model(spec: str | None):
    if spec:
        from mechscope.lm.models.loading import load_model

        return load_model(spec)[0].eval(), spec
    from mechscope.lm.models.transformer import HookedTransformer, TransformerConfig

    cfg = TransformerConfig(d_model=256, n_layers=4, n_heads=8, d_head=32, d_vocab=8192, n_ctx=128, d_mlp=1024,
                            bos_token_id=0)  # fmt: skip
    return HookedTransformer(cfg).eval(), "random 4-layer d_model 256"


def bench_lm_harvest(spec: str | None, repeats: int) -> None:
    from mechscope.core.dictionaries.store import harvest_many
    from mechscope.lm.methods.sae import HarvestSpec, harvest_batches

    model, name = lm_model(spec)
    n_ctx = min(128, model.cfg.n_ctx)
    n = 64 if spec else 256
    tokens = torch.randint(1, min(model.cfg.d_vocab, 10_000), (n, n_ctx), generator=torch.Generator().manual_seed(0))
    batch = 8 if spec else 32
    last, middle = model.cfg.n_layers - 1, model.cfg.n_layers // 2

    def forward():
        with torch.no_grad():
            for s in range(0, n, batch):
                model(tokens[s : s + batch])

    def harvest(layer: int, stop: bool = True):
        def run():
            specs = [HarvestSpec(f"blocks.{layer}.hook_resid_post")]
            with tempfile.TemporaryDirectory() as tmp:
                harvest_many(harvest_batches(model, tokens, specs, batch=batch, skip_first=1, stop=stop),
                             [f"{tmp}/s"], shard_rows=32768, progress=False)  # fmt: skip

        return run

    t = interleaved({"forward": forward, "full": harvest(last, stop=False), "last": harvest(last),
                     "middle": harvest(middle)}, repeats)  # fmt: skip
    tok = tokens.numel()
    worst = min(t["forward"] / t[k] for k in ("full", "last", "middle"))  # docs/development.md: harvest >= 0.8
    print(f"LM harvest ({name}), {tok:,} tokens: forward {tok / t['forward']:,.0f} tok/s; "
          f"blocks.{last}.hook_resid_post without stopping (the whole forward and the store: the overhead alone) "
          f"{tok / t['full']:,.0f} tok/s, ratio {t['forward'] / t['full']:.2f}; stopped after it (no final norm and "
          f"unembedding) {tok / t['last']:,.0f} tok/s, ratio {t['forward'] / t['last']:.2f}; "
          f"blocks.{middle}.hook_resid_post (forward stopped after it) {tok / t['middle']:,.0f} tok/s, ratio "
          f"{t['forward'] / t['middle']:.2f} (target >= 0.8 for all three: {'PASS' if worst >= 0.8 else 'FAIL'}); "
          f"{load()}")  # fmt: skip


# ---- 2. training against sparsify ------------------------------------------------------------------------------


def bench_training(repeats: int, d_in: int = 256, steps: int = 20) -> None:
    try:
        from sparsify import SparseCoder, SparseCoderConfig
    except ImportError:
        print("training: sparsify is not installed (pip install eai-sparsify==1.3.3); skipped")
        return
    from mechscope.core.dictionaries import DictionaryConfig, TrainConfig, train

    torch.set_num_threads(1)
    d_sae, k, batch, lr = 8 * d_in, 32, 4096, 4e-4
    g = torch.Generator().manual_seed(0)
    basis = torch.randn(4 * d_in, d_in, generator=g)
    codes = (torch.rand(steps * batch, 4 * d_in, generator=g) < 0.02) * torch.rand(steps * batch, 4 * d_in, generator=g)
    data = codes @ basis  # planted features in superposition: the same activations for both
    batches = list(data.split(batch))

    def ours():
        cfg = DictionaryConfig(d_in=d_in, d_sae=d_sae, architecture="topk", k=k)
        train(cfg, batches, TrainConfig(lr=lr, progress=False, log_every=10_000, init_rows=batch, b_dec_init="mean"))

    def theirs():
        sae = SparseCoder(d_in, SparseCoderConfig(num_latents=d_sae, k=k))
        opt = torch.optim.Adam(sae.parameters(), lr=lr)
        sae.b_dec.data = batches[0].mean(0)
        seen = torch.zeros(d_sae, dtype=torch.long)
        for x in batches:
            out = sae(x, dead_mask=seen == 0 if seen.any() else None)
            loss = out.fvu + out.auxk_loss / 32
            opt.zero_grad()
            loss.backward()
            sae.remove_gradient_parallel_to_decoder_directions()
            opt.step()
            sae.set_decoder_norm_to_unit_norm()
            seen[out.latent_indices.flatten()] += 1

    ours()  # warm-up: first-call imports (torch's optimiser machinery)
    theirs()
    t = interleaved({"ours": ours, "sparsify": theirs}, repeats)
    rows = steps * batch  # target from docs/development.md: training ratio >= 1.0
    print(f"training TopK {d_in} -> {d_sae}, k={k}, batch {batch}, {steps} steps, 1 thread: ours "
          f"{rows / t['ours']:,.0f} rows/s, sparsify 1.3.3 {rows / t['sparsify']:,.0f} rows/s: ratio "
          f"{t['sparsify'] / t['ours']:.2f} (target >= 1.0: {'PASS' if t['sparsify'] >= t['ours'] else 'FAIL'}); "
          f"{load()}")  # fmt: skip


# ---- 3. memory ------------------------------------------------------------------------------------------------------


def rss_mb() -> float:
    """Peak resident set so far (Linux: ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def bench_memory(budget_mb: int) -> None:
    from mechscope.core.dictionaries.store import harvest

    width, rows_per_batch = 512, 2048
    total_rows = 10 * budget_mb * 2**20 // (4 * width)  # ten times the budget, float32
    shard_rows = budget_mb * 2**20 // (4 * width) // 16  # the buffer (4 shards) a quarter of the budget
    n_batches = total_rows // rows_per_batch
    marks = {int(n_batches * f): f for f in (0.1, 0.5, 1.0)}
    before = current_rss_mb()
    seen: list[str] = []
    over: list[float] = []  # RSS over the start at each mark, MiB

    def batches():
        g = torch.Generator().manual_seed(0)
        for i in range(1, n_batches + 1):
            yield torch.randn(rows_per_batch, width, generator=g)
            if i in marks:
                over.append(current_rss_mb() - before)
                seen.append(f"{int(100 * marks[i])}%: RSS {over[-1]:+.0f} MiB")

    with tempfile.TemporaryDirectory() as tmp:
        r = harvest(batches(), f"{tmp}/s", shard_rows=shard_rows, progress=False)
    print(f"memory: {r.rows:,} rows x {width} float32 = {r.rows * width * 4 / 2**20:,.0f} MiB of activations "
          f"(10 x a {budget_mb} MiB budget) in {r.shards} shards, shuffle buffer "
          f"{4 * shard_rows * width * 4 / 2**20:.0f} "
          f"MiB; RSS over the start: {', '.join(seen)} (target: within the {budget_mb} MiB budget: "
          f"{'PASS' if max(over) <= budget_mb else 'FAIL'}); peak RSS {rss_mb():,.0f} MiB; {load()}")  # fmt: skip
    # (target from docs/development.md: memory within the budget)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lm", default=None, help="A model for the LM harvest (default: a random 4-layer model).")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--budget-mb", type=int, default=64)
    p.add_argument("--skip-train", action="store_true")
    p.add_argument("--skip-memory", action="store_true")
    a = p.parse_args()
    torch.set_num_threads(1)
    print(f"bench/sae.py, torch {torch.__version__}, 1 torch thread; {load()}")
    if not a.skip_memory:
        bench_memory(a.budget_mb)  # first: the peak RSS it reports is this process's
    bench_cnn_harvest(a.repeats)
    bench_lm_harvest(a.lm, a.repeats)
    if not a.skip_train:
        bench_training(a.repeats)


if __name__ == "__main__":
    main()
