"""Command-line options every wing's commands share, defined once (the wings' ``cli`` packages import them)."""

from __future__ import annotations

import typer

ForceOpt = typer.Option(
    False, "--force", help="Replace the files this command writes in --out (other files there are kept)."
)
DeviceOpt = typer.Option(None, "--device", help="cpu, cuda, cuda:N or mps (default: the best one present).")
DtypeOpt = typer.Option(
    None, "--dtype", help="float32, bfloat16 or float16 (default: float32 on the CPU, bfloat16 on a GPU)."
)
DistributedOpt = typer.Option(
    None, "--distributed/--no-distributed",
    help="Data-parallel over the processes torchrun started (default: when launched by torchrun); launch as "
    "torchrun --nproc-per-node N -m mechscope -- COMMAND ...",
)  # fmt: skip
