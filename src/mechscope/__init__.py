"""mechscope: a workbench for mechanistic interpretability, vision and language in one tool."""

from mechscope.errors import MechscopeError
from mechscope.hooks import HookPoint, hook_points, hooks, run_with_cache

__version__ = "0.1.0"

__all__ = [
    "HookPoint",
    "MechscopeError",
    "__version__",
    "hook_points",
    "hooks",
    "load_mnist",
    "load_run",
    "run_with_cache",
]


def __getattr__(name: str):
    # Keep `import mechscope` light: data and run loading import on first use.
    if name == "load_run":
        from mechscope.runs import load_run

        return load_run
    if name == "load_mnist":
        from mechscope.data.mnist import load_mnist

        return load_mnist
    raise AttributeError(f"module 'mechscope' has no attribute {name!r}")
