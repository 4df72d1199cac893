"""mechscope: a workbench for mechanistic interpretability, vision and language in one tool."""

from mechscope.errors import MechscopeError
from mechscope.hooks import HookPoint, hook_points, hooks, run_with_cache

__version__ = "0.1.0"

__all__ = [
    "HookPoint",
    "MechscopeError",
    "__version__",
    "attention",
    "attribute",
    "explain",
    "hook_points",
    "hooks",
    "load_dataset",
    "load_mnist",
    "lm",
    "load_run",
    "run_with_cache",
    "visualize",
    "walk",
]


def __getattr__(name: str):
    # Keep `import mechscope` light: data and run loading import on first use.
    if name == "load_run":
        from mechscope.runs import load_run

        return load_run
    if name == "load_mnist":
        from mechscope.data.mnist import load_mnist

        return load_mnist
    if name in ("explain", "attribute", "visualize"):  # the CNN half's Python API
        from mechscope import api

        return getattr(api, name)
    if name == "load_dataset":
        from mechscope.data.images import load_dataset

        return load_dataset
    if name == "lm":  # the language half's calls: mechscope.lm.load_model, find_induction_heads, ...
        import importlib

        return importlib.import_module("mechscope.lm")
    if name == "attention":
        from mechscope.lm import attention

        return attention
    if name == "walk":
        from mechscope.models.spec import walk

        return walk
    raise AttributeError(f"module 'mechscope' has no attribute {name!r}")
