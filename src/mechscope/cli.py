"""The command line: ``mechscope <group> <command>``. Parsing only; the work is in each wing's pipelines.

The root app holds the two wings' groups (``cnn``, with its old name ``mnist`` as an alias, and ``lm``); each wing
registers its own commands on its group (``mechscope.cnn.cli``, ``mechscope.lm.cli``).

User errors (:class:`~mechscope.core.errors.MechscopeError`, parse errors, out of memory, a full disk) become
one line on stderr and exit 2; Ctrl-C is one line and exit 130 (see :func:`main`).
"""

from __future__ import annotations

import errno
import logging
import os
import sys
import warnings

import typer

from mechscope.clip.cli import app as clip_app
from mechscope.cnn.cli import app as cnn_app
from mechscope.core.cli_options import ForceOpt, ThreadsOpt
from mechscope.core.errors import MechscopeError
from mechscope.lm.cli import app as lm_app

# click's exceptions, wherever this typer takes click from (typer >= 0.24 vendors its own copy)
click_errors = sys.modules[typer.BadParameter.__module__]
_NO_ARGS = getattr(click_errors, "NoArgsIsHelpError", ())  # click >= 8.2: a group called with nothing

app = typer.Typer(
    name="mechscope",
    help="Mechanistic interpretability workbench: explain a CNN on MNIST or your own images, find induction heads "
    "in transformers.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(cnn_app, name="cnn")
app.add_typer(cnn_app, name="mnist", help="Alias of `cnn` (the group's name when it was MNIST-only).")
app.add_typer(lm_app, name="lm")
app.add_typer(clip_app, name="clip")


@app.command("scrub")
def scrub_cmd(
    hypothesis: str = typer.Option(..., "--hypothesis", help="A hypothesis file (JSON): the model (\"model\": a "
                                   "transformer, or \"run\": a CNN run), the metric, the data and the claims."),
    out: str | None = typer.Option(None, "--out", help="Output directory (default: runs/scrub/HYPOTHESIS)."),
    force: bool = ForceOpt,
    threads: int | None = ThreadsOpt,
) -> None:
    """Causal scrubbing of a hypothesis (transformer or CNN): scrub.json and a self-contained report.html."""
    from mechscope.core.torch_utils import torch_threads

    with torch_threads(threads):
        where, r, whom = _scrub(hypothesis, out, force)
    _say_scrub(where, r, whom)


def _scrub(hypothesis: str, out, force: bool):
    """(where, result, whom it scrubbed) of the hypothesis file, by its wing."""
    from pathlib import Path

    from mechscope.core.validate import read_json_object

    path = Path(hypothesis)
    data = read_json_object(path, "hypothesis")
    wing = data.get("wing", "cnn" if "run" in data and "model" not in data else "lm")
    if wing not in ("lm", "cnn"):
        raise MechscopeError(f"{path}: 'wing' must be 'lm' or 'cnn', got {wing!r}")
    if wing == "cnn":
        from mechscope.cnn.pipelines.discovery import scrub_file as cnn_scrub

        where, r = cnn_scrub(data, str(path), out, force)
        return where, r, f"{r.run}, {r.metric}" + (f" (class {r.target})" if r.target is not None else "")
    from mechscope.lm.pipelines.discovery import scrub_file as lm_scrub

    where, r = lm_scrub(data, str(path), out, force)
    return where, r, f"{r.model}, {r.metric}"


def _say_scrub(where, r, whom: str) -> None:
    s = r.scrub
    typer.echo(f"{r.name} on {whom}: clean {s.metric_clean:.4g}, resampled {s.metric_random:.4g}, scrubbed "
               f"{s.metric_scrubbed:.4g}: {s.recovered:.1%} ± {s.recovered_sd:.1%} of the behaviour recovered")
    built = " (the clean model by construction, not run)"
    for c in s.claims:
        typer.echo(f"  claim {c.name!r} alone: {c.recovered:.1%}" + ("" if c.measured else built))
    if s.unclaimed is not None:
        typer.echo(f"  unclaimed edges alone: {s.unclaimed.recovered:.1%}" + ("" if s.unclaimed.measured else built))
    typer.echo(f"scrub.json and report.html written to {where} ({s.forward_passes} forward passes, {s.seconds:.1f} s)")


def _version(value: bool) -> None:
    if value:
        from mechscope.core.outputs import versions

        v = versions()
        typer.echo(f"mechscope {v.pop('mechscope')} (" + ", ".join(f"{k} {x}" for k, x in v.items()) + ")")
        raise typer.Exit()


@app.callback()
def _root(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log what each step does (downloads, sizes)."),
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the versions of mechscope, Python and "
        "the libraries its numbers depend on (what every JSON record's `versions` holds), and exit.",
    ),  # fmt: skip
) -> None:
    level = logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr, force=True)
    if not verbose:  # libraries' warnings stay off the terminal unless -v (main() restores both afterwards)
        warnings.simplefilter("ignore")
        for name in QUIET_LOGGERS:
            logging.getLogger(name).setLevel(logging.ERROR)


# libraries whose log warnings are not the user's business unless -v
QUIET_LOGGERS = ("transformers", "accelerate", "huggingface_hub", "torch", "captum", "matplotlib", "PIL", "gguf")
# OSErrors a user's environment causes: one line, not a traceback
ENVIRONMENT_ERRNOS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
}


def error_line(e: BaseException) -> str | None:
    """The one line a user error, out-of-memory or a full disk gives (None: a bug, which keeps its traceback)."""
    if isinstance(e, MechscopeError):
        text = str(e)
    elif isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError" or (
        isinstance(e, RuntimeError) and ("can't allocate memory" in str(e) or "out of memory" in str(e).lower())
    ):
        detail = str(e).strip().splitlines()[-1] if str(e).strip() else ""
        text = "out of memory" + (f" ({detail})" if detail else "")
        text += "; try smaller settings (a smaller batch, fewer examples, a narrower model)"  # each command's own
    elif isinstance(e, OSError) and e.errno in ENVIRONMENT_ERRNOS:
        where = f"{e.filename}: " if e.filename else ""
        text = f"{where}{ENVIRONMENT_ERRNOS[e.errno]}"
    else:
        return None
    return "mechscope: error: " + " ".join(text.split())


def _terminate_as_interrupt():
    """SIGTERM (``kill``, a job scheduler's stop) unwinds like Ctrl-C, so that atomic outputs remove their temporary
    directories on the way out (main thread only). Returns the handler it replaced (None: none replaced)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    return signal.signal(signal.SIGTERM, interrupt)


def _empty_option(args: list[str]) -> str | None:
    """The first option given an empty string (``--out ""``, ``--out=``), None when there is none."""
    for i, a in enumerate(args):
        if a == "--":
            break
        if a.startswith("--") and a.endswith("=") and len(a) > 3:
            return a[:-1]
        if a.startswith("--") and "=" not in a and i + 1 < len(args) and args[i + 1] == "":
            return a
    return None


class _LineEnd:
    """Stderr while a command runs: every write passes through, and it remembers whether the text so far ends a line.

    A progress bar redraws its line with carriage returns and leaves it open when the work stops, so the error (or
    "interrupted") line written after it starts a line of its own, where ``grep '^mechscope: error:'`` finds it.
    """

    def __init__(self, stream):
        self.stream, self.open_line = stream, False

    def write(self, text):
        written = self.stream.write(text)
        if isinstance(text, str) and text:
            self.open_line = not text.endswith("\n")
        return written

    def __getattr__(self, name):  # flush, fileno, isatty, encoding...: the stream's own
        return getattr(self.stream, name)


def _say(line: str) -> None:
    """Write one line to stderr, on a line of its own."""
    if isinstance(sys.stderr, _LineEnd) and sys.stderr.open_line:
        sys.stderr.write("\n")
    print(line, file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    """Entry point for the ``mechscope`` script and ``python -m mechscope``.

    Every user error (a :class:`MechscopeError`, a command line click cannot parse, out of memory,
    a full disk) is one line on stderr starting ``mechscope: error:`` and exit status 2; Ctrl-C is
    ``mechscope: interrupted`` and 130. Anything else is a bug and keeps its traceback.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    empty = _empty_option(args)
    if empty:  # '--out ""' meant the current folder, '--model ""' the folder '.': never what was asked
        print(f"mechscope: error: {empty} is given an empty value", file=sys.stderr)
        sys.exit(2)
    previous = _terminate_as_interrupt()
    command = typer.main.get_command(app)
    levels = {name: logging.getLogger(name).level for name in QUIET_LOGGERS}
    sys.stderr = _LineEnd(sys.stderr)
    try:
        with warnings.catch_warnings(), command.make_context("mechscope", args) as ctx:
            command.invoke(ctx)
    except typer.Exit as e:  # --help, and commands that end early on purpose
        if e.exit_code:
            sys.exit(e.exit_code)
    except _NO_ARGS as e:  # `mechscope` or `mechscope lm` alone: the help
        print(e.ctx.get_help() if e.ctx else e.format_message())
        sys.exit(0)
    except click_errors.UsageError as e:  # a value that does not parse, an unknown or a missing option
        hint = f" (see {e.ctx.command_path} --help)" if e.ctx is not None else ""
        _say("mechscope: error: " + " ".join(e.format_message().split()).rstrip(".") + hint)
        sys.exit(2)
    except (KeyboardInterrupt, typer.Abort):
        _say("mechscope: interrupted")
        sys.exit(130)
    except BrokenPipeError:  # `mechscope ... | head`: the reader left; stop quietly, as `cat` does
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so that the interpreter's final flush does not fail again
        sys.exit(141)
    except Exception as e:
        line = error_line(e)
        if line is None:
            raise
        _say(line)
        sys.exit(2)
    finally:
        if isinstance(sys.stderr, _LineEnd):
            sys.stderr = sys.stderr.stream
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
        if previous is not None:
            import signal

            signal.signal(signal.SIGTERM, previous)
