"""Every command-line option reaches its pipeline, with the default its help and its declaration give.

Outside truths: the pipeline function's own signature (``inspect.signature``: the recorder below binds each call to
it, so a value given to the wrong parameter shows up under that parameter's name), the option declarations and help
text of ``--help`` (their defaults), and the project rule that a bad value is one line ``mechscope: error: ...`` and
exit 2. The pipelines are replaced by a recorder that stops the command: nothing loads, trains or writes.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import json
import re

import pytest
import typer

from mechscope.cli import app, main
from tests.e2e.test_cli import assert_one_line_error, run_main


class Called(Exception):
    """Raised by the recorder: the command reached its pipeline (main() lets a non-user error through)."""


def record(monkeypatch, target: str) -> dict:
    """Replace ``module:function`` by a recorder of its arguments, bound to the real function's signature."""
    module, name = target.split(":")
    mod = importlib.import_module(module)
    sig, seen = inspect.signature(getattr(mod, name)), {}

    def fake(*a, **k):
        bound = sig.bind(*a, **k)
        bound.apply_defaults()
        seen.update(bound.arguments)
        raise Called

    fake.__wrapped__ = getattr(mod, name)  # so that a second recorder binds to the real signature too
    monkeypatch.setattr(mod, name, fake)
    return seen


def reach(monkeypatch, target: str, *argv: str) -> dict:
    seen = record(monkeypatch, target)
    monkeypatch.setattr("mechscope.cnn.runs.load_run", lambda run: "a loaded run")  # cnn evaluate: before its data
    with pytest.raises(Called):
        main(list(argv))
    return seen


def value_at(seen: dict, path: str):
    """``config.epochs``: a bound argument, then attributes (or keys, for a ``**kw``)."""
    head, *rest = path.split(".")
    v = seen[head]
    for part in rest:
        v = v[part] if isinstance(v, dict) else getattr(v, part)
    return v


FROM_OPTION = object()  # the default that arrives is the option's own declared default
P = "pathlib:Path"

# command: (pipeline "module:function", the required arguments, rows of (option, value given, path, value expected
# [, default expected when it is not the option's own])). The values given within a command are all different.
# (--threads rows: the default 1 that their help text states: "Torch threads (default 1: ...)")
# fmt: off
CASES = {
    "cnn train": ("mechscope.cnn.pipelines.train:train", ["--no-malloc-tuning"], [
        ("--out", "o1", "out", P + ":o1", P + ":runs/mnist"),  # help: "default: runs/DATASET"
        ("--dataset", "kmnist", "dataset", "kmnist"),
        ("--data-dir", "dd", "data_dir", P + ":dd"), ("--class-names", "cn", "class_names", P + ":cn"),
        ("--epochs", "4", "config.epochs", 4), ("--seed", "7", "config.seed", 7),
        ("--batch-size", "32", "config.batch_size", 32), ("--lr", "0.002", "config.lr", 0.002),
        ("--shift", "3", "config.shift", 3), ("--train-limit", "500", "config.train_limit", 500),
        ("--max-steps", "11", "config.max_steps", 11), ("--channels", "8,12", "model_config.channels", (8, 12),
        (16, 32)),
        ("--kernel-size", "3", "model_config.kernel_size", 3), ("--padding", "1", "model_config.padding", 1),
        ("--batchnorm", None, "model_config.batchnorm", True, False),
        ("--activation", "gelu", "model_config.activation", "gelu"), ("--pool", "6", "model_config.pool", 6),
        ("--hidden", "24", "model_config.hidden", 24), ("--force", None, "force", True, False),
    ]),
    "cnn evaluate": ("mechscope.cnn.runs:load_run_data", ["--run", "r"], [
        ("--dataset", "kmnist", "dataset", "kmnist"), ("--data-dir", "dd", "data_dir", P + ":dd"),
        ("--class-names", "cn", "class_names", P + ":cn"),
    ]),
    "cnn attribute": ("mechscope.cnn.pipelines.attribute:attribute_run", ["--run", "r"], [
        ("--method", "saliency", "methods", ["saliency"]), ("--n", "5", "n", 5),
        ("--n-faithfulness", "9", "n_faithfulness", 9), ("--target", "label", "target", "label"),
        ("--layer", "conv1", "layer", "conv1"), ("--out", "o1", "out", P + ":o1"),
        ("--dataset", "kmnist", "dataset", "kmnist"), ("--data-dir", "dd", "data_dir", P + ":dd"),
        ("--class-names", "cn", "class_names", P + ":cn"), ("--force", None, "force", True, False),
    ]),
    "cnn visualize": ("mechscope.cnn.pipelines.visualize:visualize_run", ["--run", "r"], [
        ("--layer", "conv1", "layers", ["conv1"]), ("--units", "0,3", "units", [0, 3]), ("--steps", "9", "steps", 9),
        ("--param", "pixel", "param", "pixel"), ("--seed", "4", "seed", 4), ("--out", "o1", "out", P + ":o1"),
        ("--dataset", "kmnist", "dataset", "kmnist"), ("--data-dir", "dd", "data_dir", P + ":dd"),
        ("--class-names", "cn", "class_names", P + ":cn"), ("--force", None, "force", True, False),
    ]),
    "cnn explain": ("mechscope.cnn.pipelines.explain:explain_run", ["--run", "r"], [
        ("--out", "o1", "out", P + ":o1"), ("--class", "3", "settings.classes", ("3",)),
        ("--patch", "7,1", "settings.patch", ("7", "1")), ("--pairs", "5", "settings.n_pairs", 5),
        ("--tolerance", "0.05", "settings.tolerance", 0.05),
        ("--circuit-layer", "conv1", "settings.circuit_layer", "conv1"),
        ("--test-limit", "300", "settings.test_limit", 300), ("--dataset", "kmnist", "dataset", "kmnist"),
        ("--data-dir", "dd", "data_dir", P + ":dd"), ("--class-names", "cn", "class_names", P + ":cn"),
        ("--force", None, "force", True, False),
    ]),
    "cnn blocks": ("mechscope.cnn.pipelines.blocks:blocks_run", ["--run", "r"], [
        ("--image", "5", "kw.image", 5), ("--groups", "3", "kw.groups", 3), ("--steps", "9", "kw.steps", 9),
        ("--grid", "7", "kw.max_side", 7), ("--seed", "4", "kw.seed", 4), ("--threads", "2", "kw.threads", 2, 1),
        ("--out", "o1", "out", P + ":o1"), ("--dataset", "kmnist", "dataset", "kmnist"),
        ("--data-dir", "dd", "data_dir", P + ":dd"), ("--class-names", "cn", "class_names", P + ":cn"),
        ("--force", None, "kw.force", True, False),
    ]),
    "cnn solu-compare": ("mechscope.cnn.pipelines.solu_cnn:solu_compare_cnn", [], [
        ("--out", "o1", "out", P + ":o1"), ("--activations", "relu,solu", "activations", ("relu", "solu"),
        ("relu", "gelu", "solu")),
        ("--dataset", "kmnist", "dataset", "kmnist"), ("--data-dir", "dd", "data_dir", P + ":dd"),
        ("--class-names", "cn", "class_names", P + ":cn"), ("--epochs", "4", "config.epochs", 4),
        ("--seed", "7", "config.seed", 7), ("--batch-size", "32", "config.batch_size", 32),
        ("--train-limit", "500", "config.train_limit", 500), ("--max-steps", "11", "config.max_steps", 11),
        ("--test-limit", "300", "test_limit", 300), ("--force", None, "force", True, False),
    ]),
    "cnn tuning": ("mechscope.cnn.pipelines.tuning:tuning_run", ["--run", "r"], [
        ("--out", "o1", "out", P + ":o1"), ("--seed", "4", "seed", 4), ("--dataset", "kmnist", "dataset", "kmnist"),
        ("--data-dir", "dd", "data_dir", P + ":dd"), ("--class-names", "cn", "class_names", P + ":cn"),
        ("--force", None, "force", True, False),
    ]),
    "cnn universality": ("mechscope.cnn.pipelines.universality:universality", ["--runs", "r1", "--runs", "r2"], [
        ("--out", "o1", "out", P + ":o1"), ("--test-limit", "300", "test_limit", 300),
        ("--data-dir", "dd", "data_dir", P + ":dd"), ("--vis-steps", "9", "vis_steps", 9),
        ("--threads", "2", "threads", 2, 1), ("--force", None, "force", True, False),
    ]),
    "cnn discover": ("mechscope.cnn.pipelines.discovery:discover_run", ["--run", "r"], [
        ("--method", "acdc", "method", "acdc"), ("--metric", "logit", "metric", "logit"),
        ("--class", "3", "target", "3"), ("--n", "12", "n", 12), ("--corrupt", "other-class", "corrupt", "other-class"),
        ("--ablation", "mean", "ablation", "mean"), ("--size", "9", "size", 9),
        ("--threshold", "0.5", "threshold", 0.5),
        ("--steps", "6", "steps", 6), ("--seed", "4", "seed", 4), ("--explain", "m.json", "explain", "m.json"),
        ("--no-curve", None, "curve", False, True), ("--random", "2", "n_random", 2), ("--out", "o1", "out", P + ":o1"),
        ("--dataset", "kmnist", "dataset", "kmnist"), ("--data-dir", "dd", "data_dir", P + ":dd"),
        ("--force", None, "force", True, False),
    ]),
    "cnn graph": ("mechscope.cnn.pipelines.attribution_graph:graph_run", ["--run", "r"], [
        ("--image", "5", "image", 5), ("--split", "train", "kw.split", "train"),
        ("--target", "3", "kw.target", "3"), ("--max-features", "40", "kw.settings.max_feature_nodes", 40),
        ("--node-threshold", "0.7", "kw.settings.node_threshold", 0.7),
        ("--edge-threshold", "0.9", "kw.settings.edge_threshold", 0.9),
        ("--check", "3", "kw.settings.check_sources", 3),
        ("--kind", "transcoder", "kw.training.kind", "transcoder"),
        ("--dashboards", "2", "kw.dashboards", 2), ("--out", "o1", "out", P + ":o1"),
        ("--dataset", "kmnist", "kw.dataset", "kmnist"), ("--data-dir", "dd", "kw.data_dir", P + ":dd"),
        ("--force", None, "force", True, False),
    ]),
    "cnn sae harvest": ("mechscope.cnn.pipelines.sae:sae_harvest_run", ["--run", "r"], [
        ("--out", "o1", "out", P + ":o1"), ("--hook", "conv1.hook_out", "hook", "conv1.hook_out"),
        ("--split", "test", "kw.split", "test"), ("--limit", "300", "kw.limit", 300), ("--batch", "64", "kw.batch", 64),
        ("--shard-rows", "1000", "kw.shard_rows", 1000), ("--buffer-shards", "2", "kw.buffer_shards", 2),
        ("--seed", "4", "kw.seed", 4), ("--dataset", "kmnist", "dataset", "kmnist"),
        ("--data-dir", "dd", "data_dir", P + ":dd"), ("--force", None, "kw.force", True, False),
        ("--no-distributed", None, "kw.distributed", False),
    ]),
    "cnn sae evaluate": ("mechscope.cnn.pipelines.sae:sae_evaluate_run", ["--run", "r", "--sae", "s"], [
        ("--out", "o1", "out", P + ":o1"), ("--hook", "conv1.hook_out", "kw.hook", "conv1.hook_out"),
        ("--limit", "300", "kw.limit", 300), ("--dataset", "kmnist", "dataset", "kmnist"),
        ("--data-dir", "dd", "data_dir", P + ":dd"), ("--force", None, "kw.force", True, False),
    ]),
    "cnn sae show": ("mechscope.cnn.pipelines.sae:sae_show_run", ["--run", "r", "--sae", "s"], [
        ("--out", "o1", "out", P + ":o1"), ("--latent", "5", "kw.latents", (5,), ()),
        ("--selective", "2", "kw.n_selective", 2), ("--random", "3", "kw.n_random", 3),
        ("--hook", "conv1.hook_out", "kw.hook", "conv1.hook_out"), ("--limit", "300", "kw.limit", 300),
        ("--no-tuning", None, "kw.tuning", False), ("--featvis-steps", "9", "kw.featvis_steps", 9),
        ("--seed", "4", "kw.seed", 4), ("--dataset", "kmnist", "dataset", "kmnist"),
        ("--data-dir", "dd", "data_dir", P + ":dd"), ("--force", None, "kw.force", True, False),
    ]),
    "lm circuits": ("mechscope.lm.pipelines.circuits:circuits", ["--model", "m"], [
        ("--out", "o1", "out", "o1"), ("--head", "1.2", "heads", [(1, 2)]), ("--prompt", "hi", "prompt", "hi"),
        ("--force", None, "force", True, False), ("--device", "cpu", "device", "cpu"),
        ("--dtype", "float16", "dtype", "float16"), ("--device-map", "auto", "device_map", "auto"),
        ("--revision", "step9", "revision", "step9"),
    ]),
    "lm heads": ("mechscope.lm.pipelines.heads:induction_heads", ["--model", "m"], [
        ("--out", "o1", "out", "o1"), ("--n", "12", "protocol.n", 12), ("--batch", "3", "protocol.batch", 3),
        ("--seed", "4", "protocol.seed", 4), ("--top-k", "2", "protocol.top_k", 2),
        ("--show", "1.2", "show", [(1, 2)], []),
        ("--text", "t.txt", "text_file", "t.txt"), ("--no-ablation", None, "protocol.per_head_ablation", False, True),
        ("--force", None, "force", True, False), ("--device", "cpu", "device", "cpu"),
        ("--dtype", "float16", "dtype", "float16"), ("--device-map", "auto", "device_map", "auto"),
        ("--revision", "step9", "revision", "step9"),
    ]),
    "lm neurons": ("mechscope.lm.pipelines.neurons:neurons", ["--model", "m"], [
        ("--out", "o1", "out", "o1"), ("--text", "t.txt", "text_file", "t.txt"),
        ("--layer", "1", "settings.layers", (1,)),
        ("--neuron", "0.17", "settings.neurons", ((0, 17),), ()), ("--site", "mid", "settings.site", "mid"),
        ("--k", "12", "settings.k", 12), ("--sequences", "30", "settings.sequences", 30),
        ("--length", "16", "settings.length", 16), ("--contexts", "3", "settings.contexts", 3),
        ("--seed", "4", "settings.seed", 4), ("--force", None, "force", True, False),
        ("--device", "cpu", "device", "cpu"),
        ("--dtype", "float16", "dtype", "float16"), ("--device-map", "auto", "device_map", "auto"),
        ("--revision", "step9", "revision", "step9"),
    ]),
    "lm solu-compare": ("mechscope.lm.pipelines.neurons:solu_compare_run", [], [
        ("--out", "o1", "out", "o1"), ("--text", "t.txt", "text_file", "t.txt"),
        ("--layers", "1", "settings.layers", 1),
        ("--d-model", "48", "settings.d_model", 48), ("--d-mlp", "96", "settings.d_mlp", 96),
        ("--n-ctx", "20", "settings.n_ctx", 20), ("--steps", "30", "settings.steps", 30),
        ("--batch", "6", "settings.batch", 6), ("--seed", "4", "settings.seed", 4), ("--k", "12", "settings.k", 12),
        ("--threads", "2", "settings.threads", 2, 1), ("--force", None, "force", True, False),
    ]),
    "lm train-toy": ("mechscope.lm.pipelines.toy:train_toy_run", [], [
        ("--layers", "1", "config.layers", 1), ("--data", "text", "config.data", "text"),
        ("--text", "t.txt", "text_file", "t.txt"), ("--steps", "30", "config.steps", 30),
        ("--seed", "4", "config.seed", 4),
        ("--mlp", "gelu", "config.mlp", "gelu"), ("--d-mlp", "96", "config.d_mlp", 96),
        ("--no-control", None, "control", False), ("--out", "o1", "out", "o1"), ("--force", None, "force", True, False),
    ]),
    "lm discover": ("mechscope.lm.pipelines.discovery:discover_model", ["--model", "m"], [
        ("--method", "acdc", "method", "acdc"), ("--task", "induction", "task", "induction"),
        ("--metric", "kl", "metric", "kl"), ("--size", "0.25", "size", 0.25), ("--threshold", "0.5", "threshold", 0.5),
        ("--steps", "6", "steps", 6), ("--ablation", "zero", "ablation", "zero"), ("--n", "12", "n", 12),
        ("--batch", "3", "batch", 3), ("--tokens", "100,200", "token_range", (100, 200)),
        ("--distinct", None, "distinct", True),
        ("--limit", "40", "limit", 40), ("--seed", "4", "seed", 4), ("--no-curve", None, "curve", False, True),
        ("--random", "2", "n_random", 2), ("--compare-heads", "h.json", "compare_heads", "h.json"),
        ("--out", "o1", "out", "o1"), ("--force", None, "force", True, False), ("--device", "cpu", "device", "cpu"),
        ("--dtype", "float16", "dtype", "float16"), ("--revision", "step9", "revision", "step9"),
    ]),
    "lm graph": ("mechscope.lm.pipelines.attribution_graph:graph_run", ["--model", "m"], [
        ("--prompt", "hi", "prompt", "hi"), ("--tokens", "0,6", "kw.tokens", [0, 6]),
        ("--transcoders", "tc", "kw.transcoders", "tc"), ("--text", "t.txt", "kw.text_file", "t.txt"),
        ("--target", "#3", "kw.targets", ["#3"], []), ("--logit-pos", "2", "kw.logit_pos", 2),
        ("--max-features", "40", "kw.settings.max_feature_nodes", 40),
        ("--edges-per-row", "7", "kw.settings.edges_per_row", 7),
        ("--node-threshold", "0.7", "kw.settings.node_threshold", 0.7),
        ("--edge-threshold", "0.9", "kw.settings.edge_threshold", 0.9), ("--batch", "5", "kw.settings.batch_size", 5),
        ("--check", "3", "kw.settings.check_sources", 3), ("--qk", "1.2@3", "kw.qk", [(1, 2, 3)], []),
        ("--paths", "4", "kw.paths", 4), ("--dashboards", "8", "kw.dashboards", 8),
        ("--examples", "99", "kw.examples", 99),
        ("--out", "o1", "out", "o1"), ("--force", None, "force", True, False), ("--device", "cpu", "kw.device", "cpu"),
        ("--dtype", "float16", "kw.dtype", "float16"), ("--revision", "step9", "kw.revision", "step9"),
    ]),
    "lm sae harvest": ("mechscope.lm.pipelines.sae:sae_harvest", ["--model", "m"], [
        ("--hook", "blocks.0.hook_resid_post", "settings.hooks", ("blocks.0.hook_resid_post",), ()),
        ("--transcoder", "a:b", "settings.transcoders", (("a", "b"),), ()), ("--out", "o1", "out", "o1"),
        ("--text", "t.txt", "text_file", "t.txt"), ("--context", "16", "settings.context", 16),
        ("--contexts", "30", "settings.contexts", 30), ("--batch", "3", "settings.batch", 3),
        ("--shard-rows", "1000", "settings.shard_rows", 1000), ("--buffer-shards", "2", "settings.buffer_shards", 2),
        ("--no-bos", None, "settings.bos", False), ("--seed", "4", "settings.seed", 4),
        ("--force", None, "force", True, False), ("--distributed", None, "distributed", True),
        ("--device", "cpu", "device", "cpu"), ("--dtype", "float16", "dtype", "float16"),
        ("--revision", "step9", "revision", "step9"),
    ]),
    "lm sae evaluate": ("mechscope.lm.pipelines.sae:sae_evaluate", ["--model", "m", "--sae", "s"], [
        ("--out", "o1", "out", "o1"), ("--hook", "h1", "hook", "h1"), ("--target", "h2", "target", "h2"),
        ("--text", "t.txt", "text_file", "t.txt"), ("--context", "16", "settings.context", 16),
        ("--contexts", "30", "settings.contexts", 30), ("--batch", "3", "settings.batch", 3),
        ("--no-bos", None, "settings.bos", False), ("--force", None, "force", True, False),
        ("--device", "cpu", "device", "cpu"), ("--dtype", "float16", "dtype", "float16"),
        ("--revision", "step9", "revision", "step9"),
    ]),
    "lm sae show": ("mechscope.lm.pipelines.sae:sae_show", ["--model", "m", "--sae", "s"], [
        ("--out", "o1", "out", "o1"), ("--latent", "5", "latents", (5,), ()), ("--random", "2", "n_random", 2),
        ("--induction", "3", "n_induction", 3), ("--hook", "h1", "hook", "h1"), ("--target", "h2", "target", "h2"),
        ("--text", "t.txt", "text_file", "t.txt"), ("--context", "16", "settings.context", 16),
        ("--contexts", "30", "settings.contexts", 30), ("--batch", "7", "settings.batch", 7),
        ("--no-bos", None, "settings.bos", False), ("--seed", "4", "seed", 4), ("--force", None, "force", True, False),
        ("--device", "cpu", "device", "cpu"), ("--dtype", "float16", "dtype", "float16"),
        ("--revision", "step9", "revision", "step9"),
    ]),
    "clip train": ("mechscope.clip.pipelines.train:train_small", [], [
        ("--out", "o1", "out", "o1"), ("--steps", "30", "settings.steps", 30), ("--batch", "6", "settings.batch", 6),
        ("--lr", "0.002", "settings.lr", 0.002), ("--seed", "4", "settings.seed", 4),
        ("--train-limit", "500", "settings.train_limit", 500), ("--data-dir", "dd", "data_dir", "dd"),
        ("--threads", "2", "threads", 2, 1), ("--force", None, "force", True, False),
    ]),
    "clip inspect": ("mechscope.clip.pipelines.inspect:inspect", ["--model", "m"], [
        ("--out", "o1", "out", "o1"), ("--images", "im", "images", "im"), ("--prompts", "a,b", "prompts", ("a", "b")),
        ("--device", "cpu", "device", "cpu"), ("--dtype", "float16", "dtype", "float16"),
        ("--threads", "2", "threads", 2, 1), ("--force", None, "force", True, False),
    ]),
    "clip neurons": ("mechscope.clip.pipelines.neurons:neurons", ["--model", "m"], [
        ("--out", "o1", "out", "o1"), ("--layer", "1", "settings.layers", (1,)),
        ("--neuron", "0.17", "settings.neurons", ((0, 17),), ()), ("--read", "2", "settings.read", 2),
        ("--images", "im", "images", "im"), ("--concepts", "cc", "concepts", "cc"),
        ("--words", "cat,dog", "settings.words", ("cat", "dog")), ("--reduce", "max", "settings.reduce", "max"),
        ("--per-digit", "5", "settings.per_digit", 5), ("--controls", "7", "settings.controls", 7),
        ("--min-score", "0.5", "settings.min_score", 0.5), ("--k", "3", "settings.k", 3),
        ("--steps", "9", "settings.steps", 9), ("--param", "fourier", "settings.featvis_param", "fourier"),
        ("--diverse", "6", "settings.diverse", 6), ("--seed", "4", "settings.seed", 4),
        ("--data-dir", "dd", "data_dir", "dd"), ("--device", "cpu", "device", "cpu"),
        ("--dtype", "float16", "dtype", "float16"), ("--threads", "8", "threads", 8, 1),
        ("--force", None, "force", True, False),
    ]),
    "clip attack": ("mechscope.clip.pipelines.attack:attack", ["--model", "m"], [
        ("--out", "o1", "out", "o1"), ("--word", "four", "settings.word", "four"),
        ("--target", "five", "settings.target", "five"), ("--true", "six", "settings.true", "six"),
        ("--images", "im", "images", "im"), ("--classes", "a,b", "settings.classes", ("a", "b")),
        ("--prompt", "a {}", "settings.prompt", "a {}"), ("--prompts", "c,d", "settings.prompts", ("c", "d")),
        ("--n", "30", "settings.n", 30), ("--layer", "1", "settings.layers", (1,)), ("--k", "3", "settings.k", 3),
        ("--candidates", "9", "settings.candidates", 9), ("--font", "serif", "settings.font", "serif"),
        ("--size", "12", "settings.size", 12), ("--x", "0.25", "settings.x", 0.25), ("--y", "0.4", "settings.y", 0.4),
        ("--label", None, "settings.label", True), ("--ablation", "zero", "settings.ablation", "zero"),
        ("--controls", "7", "settings.controls", 7), ("--ablate", "0.17", "settings.ablate", ((0, 17),), ()),
        ("--seed", "4", "settings.seed", 4), ("--data-dir", "dd", "data_dir", "dd"),
        ("--device", "cpu", "device", "cpu"),
        ("--dtype", "float16", "dtype", "float16"), ("--threads", "2", "threads", 2, 1),
        ("--force", None, "force", True, False),
    ]),
}


SAE_TRAIN = [("--architecture", "relu", "architecture", "relu"), ("--d-sae", "40", "d_sae", 40),
             ("--expansion", "3", "expansion", 3), ("--k", "5", "k", 5), ("--l1", "2.5", "l1_coefficient", 2.5),
             ("--l0", "0.5", "l0_coefficient", 0.5), ("--no-normalize", None, "normalize", False),
             ("--batch-size", "64", "batch_size", 64), ("--epochs", "2", "epochs", 2), ("--steps", "9", "steps", 9),
             ("--lr", "0.01", "lr", 0.01), ("--seed", "4", "seed", 4),
             ("--checkpoint-every", "6", "checkpoint_every", 6),
             ("--resume", None, "resume", True), ("--force", None, "force", True),
             ("--distributed", None, "distributed", True)]
CASES["cnn sae train"] = ("mechscope.cnn.pipelines.sae:sae_train_run", ["--store", "st"],
                          [*SAE_TRAIN[:3], ("--k", "7", "k", 7), *SAE_TRAIN[4:], ("--out", "o1", "out", P + ":o1")])
CASES["lm sae train"] = ("mechscope.lm.pipelines.sae:sae_train", ["--store", "st"],
                         [*SAE_TRAIN, ("--skip", None, "skip", True), ("--device", "cpu", "device", "cpu"),
                          ("--out", "o1", "out", "o1")])
CASES["cnn blocks#typical"] = ("mechscope.cnn.pipelines.blocks:blocks_run", ["--run", "r"],
                               [("--typical", "3", "kw.typical", 3)])
CASES["cnn graph#channels"] = ("mechscope.cnn.pipelines.attribution_graph:graph_run", ["--run", "r"], [
    ("--channels", None, "kw.dictionaries", "channels", None), ("--ablate", "a,b", "kw.ablate", [["a", "b"]], []),
    ("--steer", "1_12_5=2", "kw.steer", [("1_12_5", 2.0)], [])])
CASES["cnn graph#dictionaries"] = ("mechscope.cnn.pipelines.attribution_graph:graph_run", ["--run", "r"],
                                   [("--dictionaries", "d", "kw.dictionaries", "d")])
CASES["lm graph#train"] = ("mechscope.lm.pipelines.attribution_graph:graph_run", ["--model", "m"], [
    ("--train-transcoders", "500", "kw.train_tokens", 500), ("--crosslayer", None, "kw.crosslayer", True),
    ("--ablate", "a,b", "kw.ablate", [["a", "b"]], []), ("--steer", "3_1_7=2", "kw.steer", [("3_1_7", 2.0)], []),
    ("--no-bos", None, "kw.bos", False, True)])
CASES["lm graph#neurons"] = ("mechscope.lm.pipelines.attribution_graph:graph_run", ["--model", "m"],
                             [("--neurons", None, "kw.transcoders", "neurons", None)])
LOAD = [("--device", "cpu", "device", "cpu"), ("--dtype", "float16", "dtype", "float16"),
        ("--device-map", "auto", "device_map", "auto"), ("--revision", "step9", "revision", "step9")]
CASES["lm inspect"] = ("mechscope.lm.models.loading:load_model", ["--model", "m"], LOAD)
CASES["lm generate"] = ("mechscope.lm.models.loading:load_model", ["--model", "m", "--tokens", "1",
                                                                  "--max-new-tokens", "0"], LOAD)  # help: "0 or more"
# options the table leaves out: required, aliases, or checked elsewhere (--threads: test_threads_option.py)
UNCHECKED = {"--help", "--threads", "--malloc-tuning", "--no-malloc-tuning", "--view", "--digit", "--runs", "--run",
             "--model", "--sae", "--store", "--hypothesis"}
# fmt: on


def _expected(v):
    if isinstance(v, str) and v.startswith(P + ":"):
        from pathlib import Path

        return Path(v.split(":", 2)[2])
    return v


def _words(name: str) -> list[str]:
    """``lm graph#train``: the command ``lm graph`` (a second set of options that cannot be given with the first)."""
    return name.split("#")[0].split()


@functools.cache
def _root():
    return typer.main.get_command(app)


def _command(name: str):
    cmd = _root()
    for part in _words(name):
        cmd = cmd.commands[part]
    return cmd


def _declared_default(name: str, flag: str):
    """The default an option is declared with (what --help shows), by its flag (or its --no- form)."""
    for p in _command(name).params:
        if flag in p.opts or flag in getattr(p, "secondary_opts", ()):
            return p.default
    raise AssertionError(f"{name} has no option {flag}")


@pytest.mark.parametrize("name", list(CASES))
def test_each_option_reaches_its_parameter(monkeypatch, name):
    """Truth: the pipeline's signature. Every option given a distinct non-default value arrives, with that value, at
    the parameter (or settings field) of the pipeline that means it, not at another one."""
    target, base, rows = CASES[name]
    argv = [*_words(name), *base]
    for flag, given, *_ in rows:
        argv += [flag] if given is None else [flag, given]
    seen = reach(monkeypatch, target, *argv)
    wrong = {path: value_at(seen, path) for _, _, path, want, *_ in rows if value_at(seen, path) != _expected(want)}
    assert not wrong, f"{name}: {wrong}"


@pytest.mark.parametrize("name", list(CASES))
def test_no_option_passes_the_declared_default(monkeypatch, name):
    """Truth: each option's declared default (the one --help documents). With no option given, the pipeline gets
    exactly it (or the meaning of an on/off flag that is not given)."""
    target, base, rows = CASES[name]
    seen = reach(monkeypatch, target, *_words(name), *base)
    for flag, _, path, _want, *default in rows:
        expected = _expected(default[0]) if default else _declared_default(name, flag)
        assert value_at(seen, path) == expected, f"{name} {flag} -> {path}"


def test_every_option_of_every_command_is_in_the_table():
    """Truth: --help's option list. A command's option missing from CASES would go unchecked above."""
    unchecked_here = {"lm train-toy": {"--device", "--dtype"}, "lm inspect": {"--hook", "--prompt", "--tokens"},
                      "lm generate": {"--prompt", "--tokens", "--max-new-tokens"}}  # fmt: skip
    given: dict[str, set] = {}
    for name, (_, _, rows) in CASES.items():
        given.setdefault(" ".join(_words(name)), set()).update(r[0] for r in rows)
    missing = {}
    for name, flags_given in given.items():
        flags = {o for p in _command(name).params for o in (*p.opts, *getattr(p, "secondary_opts", ()))}
        gap = {f for f in flags if f.startswith("--")} - flags_given - UNCHECKED - unchecked_here.get(name, set())
        gap -= {f for f in gap if any(f == "--no-" + g[2:] or g == "--no-" + f[2:] for g in flags_given)}
        if gap:
            missing[name] = sorted(gap)
    assert not missing


DEFAULT_IN_HELP = re.compile(r"\(default:? ([0-9][0-9,._e-]*)[;:),]")


def _helped_defaults():
    out = []
    for name in sorted({" ".join(_words(n)) for n in CASES}):
        for p in _command(name).params:
            m = DEFAULT_IN_HELP.search((getattr(p, "help", "") or "") + ")")
            if m and p.default is not None:
                out.append((name, p.opts[0], m.group(1), p.default))
    return out


@pytest.mark.parametrize("name, flag, text, default", _helped_defaults())
def test_a_number_the_help_calls_the_default_is_the_default(name, flag, text, default):
    """Truth: the help text. An option whose help says "(default N)" and that declares a default declares N."""
    assert float(text.replace(",", "").replace("_", "")) == float(default)


def test_the_sae_train_defaults_are_the_pipelines_own():
    """Truth: the pipelines' signatures. Both sae train commands declare the defaults their pipeline declares."""
    for name in ("cnn sae train", "lm sae train"):
        target, _, rows = CASES[name]
        module, fn = target.split(":")
        sig = inspect.signature(getattr(importlib.import_module(module), fn))
        for flag, _, param, _ in rows:
            if param not in ("out",):
                assert _declared_default(name, flag) == sig.parameters[param].default, f"{name} {flag}"


@pytest.mark.parametrize("wing, data", [("lm", {"model": "m"}), ("cnn", {"run": "r"})])
def test_scrub_passes_its_options(monkeypatch, tmp_path, wing, data):
    """Truth: scrub_file's signature (data, where, out, force), in each wing: the hypothesis file picks the wing."""
    hyp = tmp_path / "h.json"
    hyp.write_text(json.dumps(data))
    seen = reach(monkeypatch, f"mechscope.{wing}.pipelines.discovery:scrub_file", "scrub", "--hypothesis", str(hyp),
                 "--out", "o1", "--force")  # fmt: skip
    assert (seen["data"], seen["where"], seen["out"], seen["force"]) == (data, str(hyp), "o1", True)
    seen = reach(monkeypatch, f"mechscope.{wing}.pipelines.discovery:scrub_file", "scrub", "--hypothesis", str(hyp))
    assert (seen["out"], seen["force"]) == (None, False)  # --help: "default: runs/scrub/HYPOTHESIS", the pipeline's


# fmt: off
BAD = [line.split() for line in (
    "cnn graph --run r --kind both", "cnn graph --run r --channels --kind sae", "cnn graph",
    "cnn graph --run r --channels --dictionaries d", "cnn explain --run r --patch 8,", "lm graph --model m --qk 1.x",
    "lm graph --model m --neurons --transcoders t", "lm graph --model m --crosslayer", "lm graph",
    "lm sae harvest --model m --transcoder a:b:c", "lm discover --model m --tokens 1",
    "lm heads --model m --device-map balanced", "lm heads --model m --show 1.2 --show 1.2",
    "lm neurons --model m --neuron 0-17", "lm generate --model m --prompt a --tokens 1",
    "lm generate --model m --max-new-tokens -1 --prompt a", "lm inspect --model m --prompt a --tokens 1",
    "clip inspect --model m --threads 0", "clip attack --model m --x nope", "lm heads --model=",
)]
# a --qk with an empty query or key ("1.2@", "1.2@3:") is none of the forms its help gives (it was read as "1.2" and
# "1.2@3")
BAD += [["lm", "graph", "--model", "m", "--qk", q] for q in ("1.2@", "1.2@3:", "1.2@:4")]
# fmt: on


@pytest.mark.parametrize("argv", BAD, ids=lambda a: " ".join(a) if isinstance(a, list) else None)
def test_a_bad_value_is_one_line_and_exit_2(capsys, monkeypatch, argv):
    """Truth: the project rule (mechscope.cli.main's docstring): one line `mechscope: error: ...`, exit 2, and the
    pipeline never reached."""
    for target in ("mechscope.cnn.pipelines.attribution_graph:graph_run", "mechscope.cnn.pipelines.explain:explain_run",
                   "mechscope.lm.pipelines.attribution_graph:graph_run", "mechscope.lm.pipelines.sae:sae_harvest",
                   "mechscope.lm.pipelines.discovery:discover_model", "mechscope.lm.pipelines.heads:induction_heads",
                   "mechscope.lm.pipelines.neurons:neurons", "mechscope.lm.models.loading:load_model",
                   "mechscope.clip.pipelines.inspect:inspect", "mechscope.clip.pipelines.attack:attack"):  # fmt: skip
        record(monkeypatch, target)
    code, _, err = run_main(capsys, *argv)
    assert_one_line_error(code, err)
    assert code == 2
