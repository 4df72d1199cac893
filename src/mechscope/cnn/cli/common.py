"""The ``cnn`` command group (alias ``mnist``) and what its commands share: the options and their parsing."""

from __future__ import annotations

import typer

from mechscope.cnn.config import TrainConfig
from mechscope.cnn.models.cnn import CNNConfig
from mechscope.core.cli_options import ForceOpt

_D, _M = TrainConfig(), CNNConfig()  # the CLI's defaults are the library's defaults
app = typer.Typer(help="Train and explain a small CNN on MNIST or any small image dataset.", no_args_is_help=True)

Dataset = typer.Option(
    None,
    "--dataset",
    help="mnist, fashion-mnist, kmnist, emnist-digits, emnist-letters, emnist-balanced, idx (a folder of IDX "
    "files: --data-dir DIR) or a .npz file (default: mnist for train, the run's own data otherwise).",
)
DataDir = typer.Option(
    None,
    "--data-dir",
    help="Data root holding the dataset's folder (default: $MECHSCOPE_DATA, else ~/.cache/mechscope/data); "
    "with --dataset idx, the folder of IDX files.",
)
ClassNames = typer.Option(None, "--class-names", help="A file with one class name per line (default: the dataset's).")
Force = ForceOpt
RunDir = typer.Option(..., "--run", help="Run directory written by `mechscope cnn train`.")


def _ints(text: str | None, what: str) -> list[int] | None:
    from mechscope.core.errors import MechscopeError
    from mechscope.core.validate import int_list

    if text is None:
        return None
    if not text.strip():
        raise MechscopeError(f"{what} expects at least one integer, got {text!r}")
    return int_list(text, what)
