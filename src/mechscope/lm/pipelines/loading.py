"""The one loader of the language commands: a ``train-toy`` run (the folder, its ``control/``, or one checkpoint
file) or anything :func:`~mechscope.lm.models.loading.load_model` takes (smollm2, a .gguf file, a model folder, a
tracr folder, a hub id)."""

from __future__ import annotations

from pathlib import Path

from mechscope.core.errors import MechscopeError
from mechscope.core.paths import dictionary_note
from mechscope.core.validate import usable_path
from mechscope.lm.tokenizer import CharTokenizer


def load_lm(spec: str | Path, device=None, dtype=None, device_map=None, revision=None, partial_ok: bool = False):
    """``(model, tokenizer or None, name)``. A toy run's tokenizer is its characters (none for synthetic tokens),
    its name the run's; ``--revision`` and ``--device-map`` pick a hub id's revision and spread a model folder over
    devices, so with a toy run they are one line, not ignored."""
    from mechscope.lm.models.loading import load_model
    from mechscope.lm.toy import is_toy_run, load_toy

    spec = str(spec)
    local = usable_path(spec, "model").exists()  # a name too long to look up: one line
    note = dictionary_note(spec) if local else ""
    if note:  # its training.json is not a toy run's
        raise MechscopeError(f"{spec}: not a model{note}")
    if local and is_toy_run(spec):
        if revision is not None or device_map is not None:
            raise MechscopeError("--revision and --device-map read a hub id or a model folder, not a train-toy run")
        model, chars, name = load_toy(spec, device, dtype)
        return model, (CharTokenizer(chars) if chars else None), name
    model, tok = load_model(spec, dtype, partial_ok, device=device, device_map=device_map, revision=revision)
    return model, tok, spec
