"""The Python names the README showed before the reorganisation still import, from their new homes: the old
module paths are aliases of the new modules (the same objects), kept only where the README promised them."""

from __future__ import annotations

import importlib

import pytest


@pytest.mark.parametrize(
    "old, new, names",
    [
        ("mechscope.methods.attribution", "mechscope.cnn.methods.attribution", ["IntegratedGradients", "Saliency",
                                                                                  "GradCAM"]),
        ("mechscope.methods.ablation", "mechscope.core.intervene", ["layer_means", "ablate", "channel_masks",
                                                                     "class_accuracy", "intervene", "patch"]),
        ("mechscope.models.loading", "mechscope.lm.models.loading", ["load_model"]),
        ("mechscope.runs", "mechscope.cnn.runs", ["weights_hash", "load_run"]),
    ],
)  # fmt: skip
def test_old_module_paths_are_the_new_modules(old, new, names):
    before, after = importlib.import_module(old), importlib.import_module(new)
    assert before is after
    for name in names:
        assert getattr(before, name) is getattr(after, name)


def test_the_readme_examples_names():
    from mechscope.methods import ablation as A  # the old README's spelling
    from mechscope.methods.attribution import IntegratedGradients  # noqa: F401

    import mechscope
    from mechscope import hooks, run_with_cache  # noqa: F401

    assert A.layer_means is importlib.import_module("mechscope.core.intervene").layer_means
    for name in ("explain", "attribute", "visualize", "load_run", "load_mnist", "load_dataset", "walk", "attention",
                 "lm", "MechscopeError", "HookPoint", "hook_points"):  # fmt: skip
        assert getattr(mechscope, name) is not None
    for name in ("load_model", "repeated_tokens", "head_scores", "ablate_heads", "find_induction_heads", "circuits",
                 "train_toy", "HeadScores", "AblationResult", "ToyTraining"):  # fmt: skip
        assert getattr(mechscope.lm, name) is not None


def test_an_old_path_that_was_never_promised_is_gone():
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("mechscope.pipelines.explain")
