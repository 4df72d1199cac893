"""``--threads``: every command that runs a model takes it, checks it as the command line is read, and holds it for
the command only.

docs/getting-started.md tells users on a shared machine to pass ``--threads 1`` (two threads spinning for cores
another process holds make small models 10-20 times slower); before, 22 of the 32 commands that run a model said
"No such option: --threads".
"""

from __future__ import annotations

import pytest
import torch
import typer

from mechscope.cli import app
from tests.e2e.test_cli import assert_one_line_error, run_main


def _commands(group, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], object]]:
    out = []
    for name, cmd in group.commands.items():
        if name == "mnist":  # the alias of cnn: the same commands
            continue
        if hasattr(cmd, "commands"):  # a group (typer may vendor its own click)
            out += _commands(cmd, (*path, name))
        else:
            out.append(((*path, name), cmd))
    return out


COMMANDS = _commands(typer.main.get_command(app))


def test_every_command_that_runs_a_model_takes_threads():
    assert len(COMMANDS) >= 30  # the walk found the tree (a walk that finds nothing would pass below)
    lacking = [" ".join(p) for p, c in COMMANDS if not _has_threads(c)]  # lm inspect too: a GGUF's load, --hook's run
    assert not lacking, f"without --threads: {lacking}"


def _has_threads(cmd) -> bool:
    return any("--threads" in p.opts for p in cmd.params)


@pytest.mark.parametrize("path", [p for p, c in COMMANDS if _has_threads(c)], ids=" ".join)
@pytest.mark.parametrize("value", ["0", "100000"])
def test_a_bad_thread_count_is_one_line_before_anything_else(capsys, path, value):
    """Checked as the line is read: before a missing --run or --model is reported, and before anything loads."""
    code, _, err = run_main(capsys, *path, "--threads", value)
    assert_one_line_error(code, err, "--threads must be an integer from 1 to")
    assert code == 2 and f"got {value}" in err


def test_threads_hold_for_the_command_only(capsys, quick_run, monkeypatch):
    import mechscope.cnn.training as training

    seen = []
    real = training.evaluate

    def evaluate(*a, **k):
        seen.append(torch.get_num_threads())
        return real(*a, **k)

    monkeypatch.setattr(training, "evaluate", evaluate)
    before = torch.get_num_threads()
    want = 2 if before == 1 else 1
    code, out, err = run_main(capsys, "cnn", "evaluate", "--run", str(quick_run), "--threads", str(want))
    assert code == 0, err
    assert seen == [want] and torch.get_num_threads() == before
    assert out.startswith("test accuracy 0.")
