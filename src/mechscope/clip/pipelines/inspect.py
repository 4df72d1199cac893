"""``clip inspect``: a CLIP-family model's architecture, hook points, preprocessing and tokenizer, and (with images
and prompts) its zero-shot probabilities."""

from __future__ import annotations

from pathlib import Path

import torch

from mechscope.clip.methods.evaluate import InspectResult
from mechscope.core.outputs import atomic_output, check_target, weights_hash, write_json
from mechscope.core.paths import model_out
from mechscope.core.torch_utils import torch_threads
from mechscope.core.validate import usable_path


def inspect_bundle(bundle, images=None, prompts=None) -> InspectResult:
    """The record of a loaded model (images: a folder, classified among ``prompts`` when both are given)."""
    from mechscope.clip.data.folder import read_folder
    from mechscope.clip.methods.evaluate import check_prompts, zero_shot, zero_shot_model
    from mechscope.clip.models.clip import describe, report_work, work_counters
    from mechscope.core.errors import MechscopeError
    from mechscope.core.hooks import describe_names, hook_points
    from mechscope.core.torch_utils import counting

    arch = describe(bundle.model)
    tok = bundle.tokenizer
    padding = "to the context" if tok.pad_to_context else "to the longest text"
    tokenizer = {"vocabulary": tok.vocab_size, "context": tok.n_ctx, "start id": tok.bos_id, "end id": tok.eos_id,
                 "pad id": tok.pad_id, "padding": padding}  # fmt: skip
    names, probs, pixels, work = (), (), None, None
    if images is not None or prompts is not None:
        if images is None or prompts is None:
            raise MechscopeError("zero-shot scores need both --images and --prompts")
        prompts = check_prompts(list(prompts))
        pixels, names = read_folder(images, bundle.preprocess)
        counters = work_counters(bundle.model)
        with counting(counters):
            p = zero_shot(zero_shot_model(bundle, prompts), pixels)
        work = report_work(counters, "clip inspect", {"image": len(pixels), "text": len(prompts)})
        # SigLIP: each image-text pair's own probability (a sigmoid), as it was trained
        p = p.softmax(-1) if bundle.model.logit_bias is None else torch.sigmoid(p)
        probs = tuple(tuple(float(v) for v in row) for row in p)
        names = tuple(names)
    return InspectResult(
        bundle.name, bundle.model.cfg.family, arch, describe_names(hook_points(bundle.model)),
        bundle.preprocess.to_dict(), tokenizer, names, tuple(prompts or ()), probs, weights_hash(bundle.model),
        None if pixels is None else pixels.numpy(), work=work,
    )  # fmt: skip


def inspect(model, out=None, images=None, prompts=None, device=None, dtype=None, force: bool = False,
            threads: int = 1) -> tuple[Path, InspectResult]:  # fmt: skip
    """``clip inspect``: inspect.json and report.html in ``out``."""
    from mechscope.clip.models.loading import load_clip

    usable_path(model, "model")  # before a default folder is named after it
    out = check_target(out or model_out("clip-inspect", model), force)
    with torch_threads(threads):
        bundle = load_clip(model, device, dtype)
        result = inspect_bundle(bundle, images, prompts)
        with atomic_output(out, force) as tmp:
            write_json(tmp / InspectResult.FILE, result.to_dict())
            result.save_html(tmp / "report.html")
    return out, result
