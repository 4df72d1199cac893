"""``mechscope lm train-toy``: train a small transformer and watch its induction heads form."""

from __future__ import annotations

from pathlib import Path

from mechscope.core.errors import MechscopeError
from mechscope.core.outputs import atomic_output, check_target, write_json
from mechscope.lm.toy import ToyConfig, ToyTraining, train_toy_and_control


def train_toy_run(
    config: ToyConfig,
    out: str | Path | None = None,
    text_file: str | Path | None = None,
    control: bool = True,
    force: bool = False,
    progress: bool = True,
) -> tuple[Path, ToyTraining]:
    """Train a toy model (attention-only unless ``config.mlp``; and its 1-layer control); write training.json
    and training.html. Returns (out, the :class:`~mechscope.lm.toy.ToyTraining`), whose ``work`` counts the
    training steps and checkpoint measurements of both models, in passes over the training split's tokens (text) or
    one training batch's (synthetic data)."""
    from mechscope.lm.report.toy import write_training_report
    from mechscope.lm.text import read_text

    config.validate()
    if config.data == "synthetic" and text_file is not None:  # the text would be silently unread
        raise MechscopeError("--text is read with --data text; synthetic data are drawn afresh, not read")
    text = read_text(text_file)[0] if config.data == "text" else None
    mlp = "" if config.mlp == "none" else f"-{config.mlp}"
    out = Path(out) if out is not None else Path("runs") / f"toy-{config.data}-{config.layers}L{mlp}"
    check_target(out, force)  # before minutes of training
    with atomic_output(out, force) as tmp:  # checkpoints too: an interrupted run leaves nothing behind
        result = train_toy_and_control(config, text, tmp, progress, control)
        write_json(tmp / "training.json", result.to_dict())
        write_training_report(result.series, tmp / "training.html")
    return out, result
