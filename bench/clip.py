"""Multimodal neurons and typographic attacks, measured here (issue 24): the figures of docs/clip/multimodal-neurons.md.

1. **Parity** with transformers on tiny random CLIP and SigLIP checkpoints built offline (float32): the largest
   absolute difference of the image embeddings, the text embeddings and the similarity logits; and on the small
   model trained here, loaded by transformers' ``CLIPModel`` from the directory ``clip train`` writes.
2. **The small model**: ``clip train`` with its defaults (or ``--steps`` ...), its zero-shot accuracies within and
   across modalities, and its wall time with the load average beside it.
3. **Multimodal neurons** (``clip neurons``): how many digit concepts get one, each best neuron's score against the
   random control neurons and the mismatched pairings, and the neurons read in full.
4. **The typographic attack** (``clip attack``): a handwritten 7 with "three" written on it (painted, and on a
   label), the success rate before and after ablating the neurons found, the random control, how the neurons
   that carry it score as "three" neurons, and the success rate with the multimodal neurons of step 3 (and the
   best "three" and "seven" neurons) ablated instead (``--ablate``).

    MECHSCOPE_DATA=/work/shared/data python bench/clip.py [--out runs/bench-clip] [--steps 2000] [--skip-train]
        [--mix 0.45,0.25,0.2,0.1] [--bare 0.3]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import torch

from benchlib import load

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parity() -> dict:
    from tests.unit.test_clip_models import TEXTS, tiny_checkpoint

    from mechscope.clip.models.loading import load_clip

    out = {}
    for family in ("clip", "siglip"):
        d = Path(tempfile.mkdtemp()) / family
        ref = tiny_checkpoint(d, family)
        b = load_clip(d, device="cpu", dtype="float32")
        px = torch.randn(8, 3, 30, 30, generator=torch.Generator().manual_seed(1))
        tk = b.tokenizer.batch(TEXTS)
        with torch.no_grad():
            o = ref(input_ids=tk, pixel_values=px)
            img = ref.get_image_features(pixel_values=px)
            txt = ref.get_text_features(input_ids=tk)
            img, txt = getattr(img, "pooler_output", img), getattr(txt, "pooler_output", txt)
            out[family] = {
                "image_embeds": float((b.model.encode_image(px) - img).abs().max()),
                "text_embeds": float((b.model.encode_text(tk) - txt).abs().max()),
                "logits": float((b.model(px, tk) - o.logits_per_image).abs().max()),
                "max_abs_logit": float(o.logits_per_image.abs().max()),
            }
    return out


def small_parity(directory: Path) -> dict:
    import transformers

    from mechscope.clip.models.loading import load_clip

    b = load_clip(directory, device="cpu")
    ref = transformers.CLIPModel.from_pretrained(directory).eval()
    px = b.preprocess.normalize(torch.rand(16, 1, 32, 32, generator=torch.Generator().manual_seed(0)))
    tk = b.tokenizer.batch(["a handwritten three", "the word seven", "the number nine", "three"])
    with torch.no_grad():
        return {"logits": float((b.model(px, tk) - ref(input_ids=tk, pixel_values=px).logits_per_image).abs().max())}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="runs/bench-clip")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--mix", default=None)
    p.add_argument("--bare", type=float, default=None)
    p.add_argument("--skip-train", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report: dict = {"date": datetime.now().isoformat(timespec="seconds"), "load_start": load()}

    t = time.perf_counter()
    report["parity"] = parity()
    print("parity (max |ours - transformers|, float32):", json.dumps(report["parity"], indent=1))

    import mechscope.clip as C

    model_dir = out / "small"
    if not args.skip_train:
        kw = {}
        if args.steps:
            kw["steps"] = args.steps
        if args.mix:
            kw["mix"] = tuple(float(x) for x in args.mix.split(","))
        if args.bare is not None:
            kw["bare"] = args.bare
        load_before = load()
        t = time.perf_counter()
        _, tr = C.train_small(model_dir, force=True, **kw)
        report["train"] = {
            "wall_s": round(time.perf_counter() - t, 1),
            "train_s": tr.train_seconds,
            "load_before": load_before,
            "load_after": load(),
            "settings": tr.settings,
            "parameters": tr.parameters,
            "final": tr.history[-1],
            "evaluation": [(a.images, a.prompts, round(a.accuracy, 4), a.n) for a in tr.evaluation],
        }
        print(json.dumps(report["train"], indent=1))
    report["small_parity"] = small_parity(model_dir)
    print("small model parity:", report["small_parity"])
    b = C.load(model_dir, device="cpu")

    t = time.perf_counter()
    nr = C.neurons(b)
    nr.save_html(out / "neurons.html")
    (out / "neurons.json").write_text(json.dumps(nr.to_dict(), indent=1, default=str))
    mm = nr.multimodality
    report["neurons"] = {
        "wall_s": round(time.perf_counter() - t, 1), "load": load(), "n_multimodal": mm.n_multimodal,
        "n_neurons": mm.n_neurons, "n_controls": mm.n_controls,
        "concepts": [{k: (round(v, 3) if isinstance(v, float) else v) for k, v in c.to_dict().items()}
                     for c in mm.concepts],
        "readings": [{k: v for k, v in r.to_dict().items()} for r in nr.readings],
    }  # fmt: skip
    print(f"neurons: {mm.n_multimodal}/10 multimodal")
    for c in mm.concepts:
        print(
            f"  {c.concept:>6} {c.neuron:>6} {c.score:.2f} (pic {c.picture_d:.2f} word {c.word_d:.2f}) ctrl "
            f"{c.control_mean:.2f}±{c.control_sd:.2f} null {c.null_mean:.2f}/{c.null_max:.2f} {c.multimodal}"
        )

    three = [c.concept for c in mm.concepts].index("three")
    d_mlp = b.model.cfg.vision.d_mlp
    layers = list(nr.layers)
    report["attack"] = {}
    # the multimodal neurons found (and the best "three" and "seven" neurons) ablated instead of the found ones
    mm_neurons = [(c.layer, c.unit) for c in mm.concepts if c.multimodal or c.concept in ("three", "seven")]
    mm_neurons = list(dict.fromkeys(mm_neurons))
    for style, kw in (
        ("painted", {}),
        ("label", {"label": True}),
        ("painted-multimodal-ablated", {"ablate": tuple(mm_neurons)}),
    ):
        t = time.perf_counter()
        ar = C.attack(b, **kw)
        ar.save_html(out / f"attack-{style}.html")
        s = ar.finding.summary
        rows = []
        for n in ar.finding.neurons[: s.k]:
            col = layers.index(n.layer) * d_mlp + n.unit
            rows.append({"neuron": n.neuron, "effect": round(n.effect, 3), "estimated": round(n.estimated, 3),
                         "three_picture_d": round(float(mm.picture_d[three, col]), 3),
                         "three_word_d": round(float(mm.word_d[three, col]), 3),
                         "three_score_rank": int((mm.scores[three] > mm.scores[three, col]).sum()) + 1})  # fmt: skip
        report["attack"][style] = {"wall_s": round(time.perf_counter() - t, 1), "summary": s.to_dict(),
                                   "neurons": rows, "settings": ar.settings}  # fmt: skip
        if s.given:
            report["attack"][style]["given"] = {"neurons": list(s.given), "success": s.given_success,
                                                "accuracy": s.given_accuracy, "undone": s.given_undone,
                                                "clean_accuracy": s.given_clean_accuracy}  # fmt: skip
            print(
                f"  given {s.given}: success {s.heldout_success:.3f} -> {s.given_success:.3f}, true class "
                f"{s.given_accuracy:.3f}, undone {s.given_undone:.2f}, clean {s.given_clean_accuracy:.3f}"
            )
        print(
            f"attack ({style}): success {s.success_rate:.3f} (any {s.success_rate_any:.3f}) held-out "
            f"{s.heldout_success:.3f} -> {s.heldout_success_ablated:.3f}, undone {s.undone:.2f}, control "
            f"{s.control_success_mean:.3f}±{s.control_success_sd:.3f}; "
            f"clean after {s.heldout_clean_accuracy_ablated:.3f}; held-out true class {s.heldout_accuracy:.3f} -> "
            f"{s.heldout_accuracy_ablated:.3f}"
        )
        for r in rows:
            print("   ", r)
    report["load_end"] = load()
    (out / "bench.json").write_text(json.dumps(report, indent=1, default=str))
    print(f"written to {out / 'bench.json'}")


if __name__ == "__main__":
    main()
