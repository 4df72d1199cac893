"""Q/K/V composition of GPT-2 small's 144 heads: ours against TransformerLens, on the real weights.

Target (issue 12): all Q, K and V composition scores (66 × 144 = 9,504 ordered pairs of heads
in different layers, × 3) in under 5 s on this machine, and at least 10× faster than
TransformerLens' ``all_composition_scores`` on the same weights, both measured in this run.

    python bench/circuits.py [--model ../shared/data/gpt2-small-partial] [--repeats 3]

The weights are GPT-2 small's real attention weights, LayerNorms and position embedding from
``gpt2-small-partial`` (no token embedding, no MLP matrices: see ../shared/data/README.md).
TransformerLens needs a runnable transformers model to build its bridge, so a GPT-2-small-shaped
``GPT2LMHeadModel`` is built offline (random initialisation) and the real tensors are copied in;
the missing ones (``wte``, the MLP matrices) stay random. Composition reads only W_Q, W_K, W_V,
W_O after folding ln_1 and centring W_O, so the scores do not depend on the missing tensors;
the script checks that the two sets of scores agree and prints the largest difference.

Timed:

* ours: ``analysis_weights`` (folding) + ``composition_scores`` (Q, K, V); and ``all_composition``
  (the same plus the seeded random-matrix baseline);
* TransformerLens: ``all_composition_scores(mode)`` for Q, K and V on the processed bridge
  (``enable_compatibility_mode()``: fold_ln, center_writing_weights, center_unembed,
  fold_value_biases); its weight processing is timed separately and not counted in the ratio.

``--repeats`` rounds, each timing all three in turn (so that load from other processes on a
shared machine falls on each alike); each reports its best round, after one untimed warm-up of
ours and one of TransformerLens. The baseline's cache (``random_baseline`` is ``lru_cache``d) is cleared before
each round of ``all_composition``, so that every round computes it. Also prints the published-fact check: with
folded weights, the K-composition of the previous-token head 4.11 into layers 5–11 ranks the published induction
heads 5.1, 5.5, 6.9, 7.2, 7.10 (Olsson et al. 2022; ARENA 1.2).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here needs the network
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

from mechscope.lm.methods.composition import all_composition, composition_scores, random_baseline  # noqa: E402
from mechscope.lm.models.folding import analysis_weights  # noqa: E402
from mechscope.lm.models.loading import load_model  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = Path(os.environ.get("MECHSCOPE_DATA", REPO.parent / "shared" / "data")) / "gpt2-small-partial"
INDUCTION = {(5, 1), (5, 5), (6, 9), (7, 2), (7, 10)}  # published induction heads of GPT-2 small
PREVIOUS = (4, 11)  # published previous-token head


def ours_scores(model):
    return composition_scores(analysis_weights(model))


def tl_bridge(model_dir: Path, tmp: Path):
    """A TransformerBridge on a GPT-2-small-shaped transformers model holding the real attention weights."""
    import transformers
    from safetensors.torch import load_file
    from transformer_lens.model_bridge import TransformerBridge

    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    config = transformers.GPT2Config(**json.loads((model_dir / "config.json").read_text()))
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(config).eval()
    real = load_file(model_dir / "model.safetensors")
    target = hf.transformer.state_dict()
    for name, tensor in real.items():
        if target[name].shape != tensor.shape:
            raise SystemExit(f"{name}: checkpoint {tuple(tensor.shape)}, model {tuple(target[name].shape)}")
    missing, unexpected = hf.transformer.load_state_dict(real, strict=False)
    assert not unexpected, unexpected
    copied = len(real)
    # tokenizer: GPT-2's own BPE files from ../shared/data when present (only boot needs one here)
    tok_dir = model_dir.parent / "gpt2-tokenizer"
    if (tok_dir / "encoder.json").exists():
        tok = transformers.GPT2TokenizerFast(
            vocab_file=str(tok_dir / "encoder.json"), merges_file=str(tok_dir / "vocab.bpe")
        )
    else:
        import tokenizers

        tk = tokenizers.Tokenizer(tokenizers.models.WordLevel({"<|endoftext|>": 0}, unk_token="<|endoftext|>"))
        tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<|endoftext|>")
    tok.bos_token = tok.eos_token = tok.pad_token = "<|endoftext|>"
    tok.save_pretrained(tmp / "tokenizer")  # reloaded so that TransformerLens can re-open it by path
    tok = transformers.AutoTokenizer.from_pretrained(tmp / "tokenizer")
    bridge = TransformerBridge.boot_transformers(str(model_dir), hf_model=hf, tokenizer=tok, device="cpu")
    return bridge, copied, [m for m in missing if not m.endswith("attn.bias")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores, "
        f"load average {load()} (other processes' load slows every measurement)"
    )

    start = time.perf_counter()
    model, _ = load_model(args.model, partial_ok=True)
    missing = model.missing_weights
    print(f"loaded {args.model.name} in {time.perf_counter() - start:.1f} s ({len(missing)} tensors missing)")
    cfg = model.cfg
    heads = cfg.n_layers * cfg.n_heads
    pairs = cfg.n_heads**2 * cfg.n_layers * (cfg.n_layers - 1) // 2

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        bridge, copied, missing = tl_bridge(args.model, Path(tmp))
        t_boot = time.perf_counter() - start
    print(
        f"TransformerLens bridge: {copied} real tensors copied in, random: {', '.join(short(missing))}; "
        f"boot {t_boot:.1f} s"
    )
    start = time.perf_counter()
    bridge.enable_compatibility_mode(disable_warnings=True)
    t_process = time.perf_counter() - start
    print(f"TransformerLens: process_weights (fold_ln, centring, value biases)  {t_process:6.2f} s (not in the ratio)")

    def tl_all():
        with torch.no_grad():
            return {m: bridge.all_composition_scores(m).scores.detach().float() for m in "QKV"}

    # Rounds interleave the three measurements, so that load from other processes on a shared
    # machine falls on all of them alike; each reports its best round, in wall-clock seconds and
    # in CPU seconds of this process (all threads), which other processes' load inflates less.
    ours_scores(model)  # warm-up (first eigh / GEMM calls)
    tl_all()  # the same warm-up round for TransformerLens
    runs = {
        "ours": (lambda: ours_scores(model)),
        "all": (lambda: all_composition(analysis_weights(model))),
        "tl": tl_all,
    }
    wall, cpu, out = {k: [] for k in runs}, {k: [] for k in runs}, {}
    for _ in range(args.repeats):
        for key, fn in runs.items():
            random_baseline.cache_clear()  # lru_cache'd: without this, rounds after the first leave the baseline out
            start, start_cpu = time.perf_counter(), time.process_time()
            out[key] = fn()
            wall[key].append(time.perf_counter() - start)
            cpu[key].append(time.process_time() - start_cpu)
    ours, result, theirs = out["ours"], out["all"], out["tl"]
    best = {k: (min(wall[k]), min(cpu[k])) for k in runs}
    labels = {
        "ours": "ours: analysis_weights + composition_scores",
        "all": f"ours: all_composition (+ baseline {result.baseline.mean:.4f} ± {result.baseline.std:.4f}, "
        f"{result.baseline.samples} samples)",
        "tl": "TransformerLens: all_composition_scores Q, K, V",
    }
    for key, label in labels.items():
        print(f"{label}  {best[key][0]:6.2f} s wall, {best[key][1]:6.2f} s CPU  (rounds, wall: {fmt(wall[key])})")

    diffs = {m: (ours[m] - theirs[m]).abs().max().item() for m in "QKV"}
    print(
        "max |ours - TransformerLens| on the real weights: "
        + ", ".join(f"{m} {d:.1e}" for m, d in diffs.items())
        + f" (scores up to {max(ours[m].max().item() for m in 'QKV'):.3f})"
    )

    ls, hs = PREVIOUS
    k = ours["K"][ls, hs, ls + 1 :].flatten()  # into every head of layers 5..11
    order = torch.argsort(k, descending=True)[:6]
    top = [(ls + 1 + int(i) // cfg.n_heads, int(i) % cfg.n_heads) for i in order]
    hits = [h for h in top if h in INDUCTION]
    print(
        f"K-composition of {ls}.{hs} into layers {ls + 1}-{cfg.n_layers - 1}, top six: "
        + ", ".join(
            f"{a}.{b} {k[i]:.3f}" + ("*" if (a, b) in INDUCTION else "") for (a, b), i in zip(top, order, strict=True)
        )
        + f"  (* published induction head: {len(hits)} of 6; need >= 4: {'PASS' if len(hits) >= 4 else 'FAIL'})"
    )

    (t_ours, c_ours), (t_tl, c_tl), t_all = best["ours"], best["tl"], best["all"][0]
    print(
        f"composition of {heads} heads ({pairs} pairs x 3): ours {t_ours:.2f} s (target < 5 s; with the baseline "
        f"{t_all:.2f} s), TransformerLens {t_tl:.2f} s: ratio {t_tl / t_ours:.1f}x wall, {c_tl / c_ours:.1f}x CPU "
        f"(target >= 10x): {'PASS' if t_tl / t_ours >= 10 and t_ours < 5 else 'FAIL'}; load average {load()}"
    )


def load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def fmt(times: list[float]) -> str:
    return ", ".join(f"{t:.2f}" for t in times) + (f"; median {statistics.median(times):.2f}" if len(times) > 2 else "")


def short(names: list[str]) -> list[str]:
    """transformer.h.3.mlp.c_fc.weight, ... → h.*.mlp.c_fc.weight once."""
    out = []
    for n in names:
        parts = n.removeprefix("transformer.").split(".")
        s = ".".join("*" if p.isdigit() else p for p in parts)
        if s not in out:
            out.append(s)
    return out


if __name__ == "__main__":
    main()
