"""The only place that strings steps together: data -> model -> methods -> outputs.

One module per command of the CNN half (``train``, ``attribute``, ``visualize``, ``explain``),
each with a ``*_model`` function for a model and dataset in hand (the Python API) and a
``*_run`` function for a run directory (the CLI); ``lm`` is the language half's.
"""

from __future__ import annotations

from mechscope.pipelines.attribute import DEFAULT_METHODS, attribute_model, attribute_run, select_examples
from mechscope.pipelines.train import train, train_mnist
from mechscope.pipelines.visualize import visualize_model, visualize_run

__all__ = [
    "DEFAULT_METHODS", "attribute_mnist", "attribute_model", "attribute_run", "select_examples", "train",
    "train_mnist", "visualize_mnist", "visualize_model", "visualize_run",
]  # fmt: skip


def attribute_mnist(run, out=None, methods=None, n=16, n_faithfulness=64, data_dir=None, force=False, ig_steps=64,
                    target="pred", layer=None):  # fmt: skip
    """The MNIST-era signature of :func:`attribute_run`."""
    return attribute_run(run, out, methods, n, n_faithfulness, None, data_dir, None, force, ig_steps, target, layer)


def visualize_mnist(run, out=None, layers=None, units=None, steps=512, param="fourier", seed=0, n_diverse=3,
                    data_dir=None, force=False):  # fmt: skip
    """The MNIST-era signature of :func:`visualize_run`."""
    return visualize_run(run, out, layers, units, steps, param, seed, n_diverse, None, data_dir, None, force)
