"""The CNN half, and its Python API for one's own CNN: ``mechscope.explain``, ``mechscope.attribute``,
``mechscope.visualize`` (also ``mechscope.cnn.explain``...).

Each takes a trained torch model (mechscope's :class:`~mechscope.cnn.models.cnn.CNN` or any
``nn.Module`` made of Conv2d, norms, activations, pooling, Flatten and Linear, applied in
order; see :func:`mechscope.cnn.models.spec.walk`) and its data, writes the same outputs as the
CLI command of that name, and returns the typed result::

    import mechscope
    result = mechscope.explain(model, (x_train, y_train), (x_test, y_test), out="explain")
    result.circuits.of(3).channels            # the class-3 circuit, read from fields

Data: a dataset name or path as ``--dataset`` takes it (``"mnist"``, ``"fashion-mnist"``,
``"path/to/data.npz"``...), an :class:`~mechscope.cnn.data.images.ImageDataset`, or tensors: images
[N, C, H, W] (or [N, H, W]) in the model's own input range, integer labels [N]. The model is
left as it was (weights, hooks, train/eval mode).
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

from mechscope.core.errors import user_errors


@contextmanager
def _out(out, name: str):
    """``out``, or with ``out=None`` a new temporary directory (a notebook that only wants the result), removed
    again when the call fails (a refused setting left an empty one behind each time)."""
    import shutil
    import tempfile

    if out is not None:
        yield Path(out)
        return
    tmp = Path(tempfile.mkdtemp(prefix=f"mechscope-{name}-"))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # made here, by this call, for this call's output only
        raise


def _model(model):
    """The network to explain: an ``nn.Module``, or a run folder of ``mechscope cnn train`` (a path gave an
    AttributeError deep inside)."""
    import os

    import torch.nn as nn

    from mechscope.core.errors import MechscopeError

    if isinstance(model, (str, os.PathLike)):
        from mechscope.cnn.runs import load_run

        return load_run(model).model
    if not isinstance(model, nn.Module):
        raise MechscopeError(f"model must be a torch nn.Module or a run folder, got {type(model).__name__}")
    return model


def as_dataset(train_data, test_data=None, class_names=None, data_dir=None):
    """An :class:`~mechscope.cnn.data.images.ImageDataset` from a name or path, an ImageDataset, or (images,
    labels) tensors for each split."""
    from mechscope.cnn.data.images import ImageDataset, load_dataset, make_dataset
    from mechscope.core.errors import DataError

    if isinstance(train_data, ImageDataset):
        return train_data
    if isinstance(train_data, (str, Path)):
        return load_dataset(str(train_data), data_dir, class_names)
    if test_data is None:
        raise DataError("pass test data too: (test_images, test_labels)")
    try:
        (x_train, y_train), (x_test, y_test) = train_data, test_data
    except (TypeError, ValueError):
        raise DataError("train and test data must each be (images, labels)") from None
    return make_dataset("tensors", x_train, y_train, x_test, y_test, class_names, {"kind": "tensors"})


@user_errors
def explain(
    model, train_data, test_data=None, out="explain", *, class_names=None, classes=None, patch=None,
    circuit_layer=None, test_limit=None, tolerance=0.01, n_pairs=16, force=False, data_dir=None,
):  # fmt: skip
    """Explain ``model`` (an ``nn.Module``, or a run folder) on the data: mechanisms.json and the microscope
    report.html in ``out``.

    Returns the :class:`~mechscope.cnn.methods.explained.ExplainResult`, which shows itself in a notebook;
    ``result.save_html(path)`` writes the report again. ``out=None``: a new temporary directory.
    """
    from mechscope.cnn.config import ExplainSettings
    from mechscope.cnn.pipelines.explain import explain_model
    from mechscope.core.validate import as_items

    data = as_dataset(train_data, test_data, class_names, data_dir)
    classes, patch = as_items(classes, "classes"), as_items(patch, "patch")
    settings = ExplainSettings(
        classes=classes or None, patch=patch or None, n_pairs=n_pairs,
        tolerance=tolerance, test_limit=test_limit, circuit_layer=circuit_layer,
    )  # fmt: skip
    with _out(out, "explain") as where:
        return explain_model(_model(model), data, where, settings, force=force)[1]


@user_errors
def attribute(
    model, train_data, test_data=None, out="attribution", *, methods=None, n=16, n_faithfulness=64, target="pred",
    layer=None, class_names=None, force=False, data_dir=None,
):  # fmt: skip
    """Attribution grids per method of ``model`` (an ``nn.Module``, or a run folder) and faithfulness.json in
    ``out`` (None: a temporary directory); returns the AttributionResult (in a notebook it shows the faithfulness
    table, the curves and the grids)."""
    from mechscope.cnn.pipelines.attribute import attribute_model
    from mechscope.core.validate import as_items

    data = as_dataset(train_data, test_data, class_names, data_dir)
    methods = as_items(methods, "methods")
    with _out(out, "attribution") as where:
        return attribute_model(_model(model), data, where, methods, n, n_faithfulness, force, 64, target, layer)[1]


@user_errors
def visualize(
    model, train_data, test_data=None, out="featvis", *, layers=None, units=None, steps=512, param="fourier",
    seed=0, class_names=None, force=False, data_dir=None,
):  # fmt: skip
    """Feature visualisations of every unit of ``model`` (an ``nn.Module``, or a run folder) beside its top test
    images, featvis.json in ``out`` (None: a temporary directory); returns the FeatvisResult (in a notebook it shows
    the summary, the grids and every unit)."""
    from mechscope.cnn.pipelines.visualize import visualize_model
    from mechscope.core.validate import as_items

    data = as_dataset(train_data, test_data, class_names, data_dir)
    layers, units = as_items(layers, "layers"), as_items(units, "units")
    with _out(out, "featvis") as where:
        return visualize_model(_model(model), data, where, layers, units, steps, param, seed, force=force)[1]
