"""mechscope: a workbench for mechanistic interpretability, vision and language in one tool.

The curated API. The package has two wings over a shared core: ``mechscope.cnn`` (train and explain a CNN),
``mechscope.lm`` (transformers: induction heads, circuits, toy models, neurons) and ``mechscope.core`` (hooks,
interventions, results, outputs, rendering). Heavy parts import on first use, so ``import mechscope`` is light.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import os
import sys

# MKL's strict reproducible mode (conditional numerical reproducibility): without it MKL's results here changed with
# the number of threads and, about one run in five, from one process to the next (`lm heads`' gradients and exact
# ablations, in the fifth digit). MKL reads this at its first call, so it holds when mechscope is imported before
# any torch computation; a value the user has set is kept. 3-5% slower on a forward (docs/development.md).
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

from mechscope.core.errors import MechscopeError  # noqa: E402  (after MKL's setting)
from mechscope.core.version import VERSION as __version__  # noqa: E402

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
    "cnn",
    "load_run",
    "run_with_cache",
    "visualize",
    "walk",
]

_LAZY = {  # name -> (module, attribute or None for the module itself)
    "HookPoint": ("mechscope.core.hooks", "HookPoint"),
    "hook_points": ("mechscope.core.hooks", "hook_points"),
    "hooks": ("mechscope.core.hooks", "hooks"),
    "run_with_cache": ("mechscope.core.hooks", "run_with_cache"),
    "load_run": ("mechscope.cnn.runs", "load_run"),
    "load_mnist": ("mechscope.cnn.data.mnist", "load_mnist"),
    "load_dataset": ("mechscope.cnn.data.images", "load_dataset"),
    "explain": ("mechscope.cnn", "explain"),
    "attribute": ("mechscope.cnn", "attribute"),
    "visualize": ("mechscope.cnn", "visualize"),
    "walk": ("mechscope.cnn.models.spec", "walk"),
    "attention": ("mechscope.lm", "attention"),
    "lm": ("mechscope.lm", None),
    "cnn": ("mechscope.cnn", None),
}


def __getattr__(name: str):
    if name in _LAZY:
        module, attr = _LAZY[name]
        found = importlib.import_module(module)
        return found if attr is None else getattr(found, attr)
    raise AttributeError(f"module 'mechscope' has no attribute {name!r}")


# ---- old import paths the README promised, as aliases of the new modules (no module of their own) ----------

OLD_PATHS = {
    "mechscope.methods.attribution": "mechscope.cnn.methods.attribution",
    "mechscope.methods.ablation": "mechscope.core.intervene",
    "mechscope.models.loading": "mechscope.lm.models.loading",
    "mechscope.runs": "mechscope.cnn.runs",
}
_OLD_PACKAGES = {"mechscope.methods", "mechscope.models"}


class _OldPaths(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """``import mechscope.methods.attribution`` (and the other old paths the README showed) gives the module at its
    new home, the same object, so that classes and functions keep one identity."""

    def find_spec(self, name, path=None, target=None):
        if name in OLD_PATHS or name in _OLD_PACKAGES:
            return importlib.util.spec_from_loader(name, self, is_package=name in _OLD_PACKAGES)
        return None

    def create_module(self, spec):
        if spec.name in OLD_PATHS:
            return importlib.import_module(OLD_PATHS[spec.name])
        return None  # an empty namespace for mechscope.methods / mechscope.models

    def exec_module(self, module):
        if module.__spec__.name in _OLD_PACKAGES:
            module.__path__ = []


if not any(isinstance(f, _OldPaths) for f in sys.meta_path):
    sys.meta_path.insert(0, _OldPaths())
