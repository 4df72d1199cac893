"""Transformer speed and memory, measured against transformers in the same run.

Prints, for SmolLM2-135M (GGUF) and a GPT-2-small-shaped random model:
  * forward time on the same input, ours against transformers' eager attention path
    (ratio transformers / mechscope; target >= 1.0);
  * peak resident memory of run_with_cache for one hook name against all hook names, each in a
    fresh process (only what is asked for is stored);
  * GGUF load time, ours against transformers' GGUF loader (target: ours at least 2x faster).

    python bench/lm.py [--batch 4] [--seq 128] [--repeats 5]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
import warnings

import torch

CACHE_CHILD = """
import resource, sys, torch
from mechscope.hooks import run_with_cache
from mechscope.models.loading import load_model
model, _ = load_model(sys.argv[1])
g = torch.Generator().manual_seed(0)
x = torch.randint(0, model.cfg.d_vocab, (int(sys.argv[3]), int(sys.argv[4])), generator=g)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
names = None if sys.argv[2] == "all" else [sys.argv[2]]
_, cache = run_with_cache(model, x, names=names)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(before, after, sum(t.numel() * t.element_size() for t in cache.values()))
"""


def best_interleaved(fns, repeats):
    """Best time of each function, measured in alternation so that drift affects all alike."""
    for fn in fns:
        fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, ts in zip(fns, times, strict=True):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
    return [min(ts) for ts in times]


def forward_ratio(name, ours, ref, vocab, batch, seq, repeats):
    x = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        t_ours, t_ref = best_interleaved([lambda: ours(x), lambda: ref(x)], repeats)
        diff = (ours(x) - ref(x).logits).abs().max().item()
    print(
        f"{name}: forward {batch}x{seq} tokens: mechscope {t_ours * 1000:.0f} ms, transformers (eager) "
        f"{t_ref * 1000:.0f} ms, ratio {t_ref / t_ours:.2f} (target >= 1.0); max |logit difference| {diff:.1e}"
    )


def cache_memory(name, spec, hook, batch, seq):
    rows = {}
    for which in (hook, "all"):
        out = subprocess.run(
            [sys.executable, "-c", CACHE_CHILD, spec, which, str(batch), str(seq)], capture_output=True, text=True
        )
        if out.returncode:
            raise SystemExit(out.stderr)
        before, after, stored = map(int, out.stdout.split())
        rows[which] = (after / 1024, stored / 2**20)
    one, every = rows[hook], rows["all"]
    print(
        f"{name}: run_with_cache peak RSS {one[0]:.0f} MiB for {hook} ({one[1]:.1f} MiB stored) against "
        f"{every[0]:.0f} MiB for every hook point ({every[1]:.0f} MiB stored)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    import transformers
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

    from mechscope.models.loading import load_model, smollm2_path

    path = smollm2_path()
    t = time.perf_counter()
    ours, _ = load_model("smollm2")
    t_ours = time.perf_counter() - t
    t = time.perf_counter()
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    t_ref = time.perf_counter() - t
    print(
        f"SmolLM2-135M GGUF load: mechscope {t_ours:.1f} s (weights and tokenizer), transformers {t_ref:.1f} s "
        f"(weights only), ratio {t_ref / t_ours:.1f} (target >= 2.0)"
    )
    forward_ratio("SmolLM2-135M", ours, ref, ours.cfg.d_vocab, args.batch, args.seq, args.repeats)
    del ref
    cache_memory("SmolLM2-135M", "smollm2", "blocks.15.attn.hook_pattern", args.batch, args.seq)

    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        ref = transformers.GPT2LMHeadModel(transformers.GPT2Config(attn_implementation="eager")).eval()
        ref.save_pretrained(tmp)
        ours, _ = load_model(tmp)
        forward_ratio("GPT-2 small (random)", ours, ref, 50257, args.batch, args.seq, args.repeats)
        del ref
        cache_memory("GPT-2 small (random)", tmp, "blocks.6.attn.hook_pattern", args.batch, args.seq)


if __name__ == "__main__":
    main()
