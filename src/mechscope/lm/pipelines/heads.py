"""``mechscope lm heads``: find the induction heads of a model; heads.json and report.html."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

from mechscope.core.errors import MechscopeError
from mechscope.core.outputs import atomic_output, check_target, write_json
from mechscope.core.paths import model_out
from mechscope.core.torch_utils import Timer
from mechscope.core.validate import check_seed, read_text_file
from mechscope.lm.methods.heads import HeadProtocol, HeadsResult, check_protocol, find_induction_heads
from mechscope.lm.models.transformer import work_counter
from mechscope.lm.pipelines.loading import load_lm
from mechscope.lm.text import default_text_path

log = logging.getLogger(__name__)


def _text_tokens(tokenizer, text_file: Path | None, protocol, n_ctx: int, seed: int, text: str | None = None):
    """Seeded windows of real text for the previous-token protocol; None when no text is at hand. ``text``: the
    contents of ``text_file``, already read (:func:`induction_heads` reads a given file before any work)."""
    import torch

    if tokenizer is None:  # (a text_file given is refused before: induction_heads)
        log.warning("no tokenizer: the real-text previous-token score is not measured")
        return None
    path = Path(text_file) if text_file else default_text_path()
    if text is None:
        if not path.is_file():
            if text_file:
                raise MechscopeError(f"{path}: text file not found")
            log.warning("%s not found: the real-text previous-token score is not measured", path)
            return None
        text = read_text_file(path)
    ids = torch.tensor(tokenizer.encode(text[:300_000]))
    length = min(protocol.text_len, n_ctx)
    if len(ids) < length + 1:
        raise MechscopeError(f"{path}: {len(ids)} tokens, too short for windows of {length}")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - length, (protocol.text_batch,), generator=g)
    return torch.stack([ids[s : s + length] for s in starts])


def induction_heads(
    model_spec: str,
    out: str | Path | None = None,
    protocol=None,
    text_file: str | Path | None = None,
    show: list[tuple[int, int]] | None = None,
    force: bool = False,
    progress=None,
    device=None,
    dtype=None,
    device_map=None,
    revision=None,
) -> tuple[Path, HeadsResult]:
    """Find the induction heads of a model; write heads.json and report.html. Returns (out, the result)."""
    from mechscope.lm.report.heads import write_report

    protocol = protocol or HeadProtocol()
    check_seed(protocol.seed)
    out = Path(out) if out is not None else model_out("heads", model_spec)
    check_target(out, force)  # before minutes of work
    given = read_text_file(Path(text_file)) if text_file else None  # missing, a folder, empty, binary
    timer = Timer("lm heads")
    with timer.section("load"):
        model, tok, _ = load_lm(model_spec, device, dtype, device_map, revision)
    if text_file and tok is None:
        raise MechscopeError(f"--text needs a tokenizer; {model_spec} has none")  # its inputs are token ids
    check_protocol(model, protocol)  # a bad setting is one line before anything else is looked for
    text = _text_tokens(tok, text_file, protocol, model.cfg.n_ctx, protocol.seed, given)
    counter = work_counter(model)
    with counter.counting():
        result = find_induction_heads(model, protocol, text, name=str(model_spec), show=show, progress=progress)
    work = counter.report("lm heads", protocol.batch * (1 + 2 * protocol.n))

    def as_text(ids):
        return [tok.decode([i]) if tok else str(i) for i in ids]

    token_text = {k: as_text(v["tokens"]) for k, v in result.examples.items() if k in ("repeated", "text")}
    result = replace(result, seconds={**timer.seconds, **result.seconds}, token_text=token_text, work=work)
    with atomic_output(out, force) as tmp:
        write_json(tmp / "heads.json", result.to_dict())
        write_report(result, tmp / "report.html")
    return out, result
