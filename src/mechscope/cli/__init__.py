"""The command line: ``mechscope <group> <command>``. Parsing only; the work is in pipelines.

User errors (:class:`~mechscope.errors.MechscopeError`) become one line on stderr and exit 2.
"""

from __future__ import annotations

import logging
import sys

import typer

from mechscope.cli import (
    cnn_solu,  # noqa: F401  (registers `cnn solu-compare` on the cnn group)
    lm_circuits,  # noqa: F401  (registers `lm circuits` on the lm group)
    lm_neurons,  # noqa: F401  (registers `lm neurons` and `lm solu-compare`)
)
from mechscope.cli.cnn import app as cnn_app
from mechscope.cli.lm import app as lm_app
from mechscope.errors import MechscopeError

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


@app.callback()
def _root(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log what each step does (downloads, sizes)."),
) -> None:
    level = logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr, force=True)


def main(argv: list[str] | None = None) -> None:
    """Entry point for the ``mechscope`` script and ``python -m mechscope``."""
    try:
        app(args=argv, prog_name="mechscope")
    except MechscopeError as e:
        print(f"mechscope: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("mechscope: interrupted", file=sys.stderr)
        sys.exit(130)
