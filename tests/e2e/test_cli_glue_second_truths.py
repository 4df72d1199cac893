"""The command-line glue of both wings: the defaults the docs state, and the lines each command prints.

Outside truths: the synopsis lines of docs/cnn, docs/lm and docs/discovery.md (``[--steps 256]``: the default the
user reads), and hand-made results with a distinct number in every field (the pipeline is replaced by a stub that
returns them), whose values each printed line must name, in the place the line's words give them.
"""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace as NS

import pytest

from tests.e2e.test_cli import run_main
from tests.e2e.test_cli_options_truths import _command, _declared_default

DOCS = Path(__file__).resolve().parents[2] / "docs"
FLAG = re.compile(r"--([a-z][a-z0-9-]*) ([^\s\]|]+)(?=[\s\]])")
VALUE = re.compile(r"[0-9][0-9.e-]*|[0-9]+(,[0-9]+)+|[a-z]+(,[a-z]+)*")


def _groups():
    """(doc, command words, text of one [...] group) of every ``mechscope ...`` synopsis line and its continuation
    lines (indented ten spaces or more)."""
    docs = [*sorted((DOCS / "cnn").glob("*.md")), *sorted((DOCS / "lm").glob("*.md")), DOCS / "discovery.md"]
    for doc in [*docs, DOCS / "getting-started.md"]:
        words = None
        for line in doc.read_text().splitlines():
            m = re.match(r"\s*mechscope ((?:[a-z-]+ )+?)\s*(?=--|\[|$)", line)
            if m:
                words = m.group(1).split()
            elif not re.match(r"\s{10,}", line):
                words = None
            if words:
                for group in re.findall(r"\[([^\]]*)\]", line):
                    yield doc.name, " ".join(words), group


def _synopses() -> list[tuple[str, str, str, str]]:
    """(doc, command, --flag, value) for every ``[--flag VALUE]`` of a synopsis, and every ```--flag N``` of
    building-blocks.md's "Options:" paragraph."""
    rows = [(doc, command, "--" + flag, value) for doc, command, group in _groups()
            for flag, value in FLAG.findall(group + " ") if VALUE.fullmatch(value)]  # fmt: skip
    text = (DOCS / "cnn" / "building-blocks.md").read_text()
    options = text[text.index("Options:") : text.index("Options:") + 400]
    rows += [("building-blocks.md", "cnn blocks", "--" + f, v) for f, v in re.findall(r"`--([a-z-]+) (\d+)`", options)]
    return sorted(set(rows))


def _switches() -> list[tuple[str, str, str]]:
    """(doc, command, --flag) for every flag a synopsis gives without a value (``[--no-bos]``, ``[--force]``)."""
    rows = set()
    for doc, command, group in _groups():
        tokens = group.split()
        for i, t in enumerate(tokens):
            if t.startswith("--") and "/" not in t and (i + 1 == len(tokens) or tokens[i + 1][:2] in ("--", "|")):
                rows.add((doc, command, t))
    return sorted(rows)


SYNOPSES = _synopses()
SWITCHES = _switches()


def test_the_docs_synopses_were_read():
    """Truth: the docs themselves. The parser found the defaults a reader sees (a sample named by hand)."""
    found = {(c, f, v) for _, c, f, v in SYNOPSES}
    for want in [("cnn blocks", "--steps", "256"), ("cnn visualize", "--steps", "512"), ("lm sae train", "--k", "32"),
                 ("cnn universality", "--vis-steps", "128"), ("lm discover", "--n", "20"),
                 ("cnn discover", "--n", "64"), ("cnn graph", "--node-threshold", "0.8"),
                 ("lm sae show", "--contexts", "256")]:  # fmt: skip
        assert want in found
    assert len(SYNOPSES) >= 40


def _same(value: str, default) -> bool:
    if isinstance(default, bool) or default is None:
        return False
    if isinstance(default, (int, float)):
        return float(value) == float(default)
    return str(default) == value


@pytest.mark.parametrize("doc, command, flag, value", SYNOPSES, ids=lambda x: str(x))
def test_a_default_the_docs_show_is_the_commands_default(doc, command, flag, value):
    """Truth: the docs' synopsis. ``[--flag V]`` is the default: the option declares V, or declares none and its
    help names V as the default the pipeline takes."""
    default = _declared_default(command, flag)
    if default is None:
        (param,) = [p for p in _command(command).params if flag in p.opts]
        assert re.search(rf"default:? {re.escape(value)}\b", param.help), (doc, command, flag, param.help)
    else:
        assert _same(value, default), (doc, command, flag, value, default)


@pytest.mark.parametrize("doc, command, flag", SWITCHES, ids=lambda x: str(x))
def test_a_switch_the_docs_show_is_off_by_default(doc, command, flag):
    """Truth: the docs' synopsis. A bare ``[--x]`` turns on what is off by default; ``[--no-x]`` turns off what is on
    (the pipeline then gets the opposite of the flag's meaning when it is not given)."""
    (param,) = [p for p in _command(command).params if flag in (*p.opts, *getattr(p, "secondary_opts", ()))]
    assert param.is_flag, (doc, command, flag)
    assert param.default is (flag in param.secondary_opts), (doc, command, flag, param.default)


# --- printed lines: the pipeline returns a hand-made result, the command prints it ---------------------------------


def out_of(capsys, monkeypatch, target: str, returned, *argv: str) -> list[str]:
    """The stdout lines of ``mechscope ARGV`` with ``module:function`` returning ``returned``."""
    module, name = target.split(":")
    monkeypatch.setattr(f"{module}.{name}", lambda *a, **k: returned)
    code, out, err = run_main(capsys, *argv)
    assert code == 0, err
    return out.splitlines()


def test_cnn_sae_evaluate_prints_each_metric_in_its_place(capsys, monkeypatch):
    """Truth: a hand-made result; dead fraction 0.125 is 12.5 %, accuracy recovered 0.875 is 87.5 %."""
    r = NS(metrics={"l0": 3.25, "explained_variance": 0.912, "dead_fraction": 0.125, "tokens": 12345},
           effect=NS(acc_clean=0.9911, acc_spliced=0.9722, acc_ablated=0.1033, accuracy_recovered=0.875,
                     kl_spliced=0.0456))  # fmt: skip
    lines = out_of(capsys, monkeypatch, "mechscope.cnn.pipelines.sae:sae_evaluate_run", (Path("o9"), r),
                   "cnn", "sae", "evaluate", "--run", "r", "--sae", "s")  # fmt: skip
    assert lines[0] == "L0 3.25, explained variance 0.912, dead 12.5% over 12,345 positions"
    assert lines[1] == ("test accuracy: clean 0.9911, spliced 0.9722, zero-ablated 0.1033: 87.5% recovered; "
                        "logit KL 0.0456 nats")  # fmt: skip
    assert lines[2].endswith("written to o9")


def test_lm_sae_evaluate_prints_each_metric_in_its_place(capsys, monkeypatch):
    """Truth: a hand-made result; ce_loss_recovered 0.625 is 62.5 %, dead fraction 0.25 is 25.0 %."""
    r = NS(metrics={"l0": 17.25, "explained_variance": 0.734, "dead_fraction": 0.25, "tokens": 4096},
           effect=NS(loss_clean=2.1111, loss_spliced=2.5222, loss_zero_ablated=3.9333, ce_loss_recovered=0.625,
                     kl_spliced=0.3444))  # fmt: skip
    lines = out_of(capsys, monkeypatch, "mechscope.lm.pipelines.sae:sae_evaluate", ("o8", r),
                   "lm", "sae", "evaluate", "--model", "m", "--sae", "s")  # fmt: skip
    assert lines[0] == "L0 17.2, explained variance 0.734, dead 25.0% over 4,096 positions"
    assert lines[1] == ("CE loss: clean 2.1111, spliced 2.5222, zero-ablated 3.9333: 62.5% recovered; "
                        "KL to clean 0.3444 nats")  # fmt: skip


def _trained(target):
    return NS(architecture="topk", target=target, d_in=32, d_sae=384, hook="h.x", steps=117, rows=54321, seconds=4.5,
              rows_per_second=12071.3,
              final={"loss": 0.01234, "l0": 7.5, "explained_variance": 0.876, "dead_fraction": 0.0625})  # fmt: skip


@pytest.mark.parametrize("wing, target, word", [("lm", "h.y", "transcoder"), ("lm", None, "SAE"), ("cnn", None, "SAE")])
def test_sae_train_names_the_dictionary_and_its_last_step(capsys, monkeypatch, wing, target, word):
    """Truth: a hand-made result: a result with a target (an output hook) is a transcoder, one without an SAE;
    d_in 32 -> d_sae 384; dead fraction 0.0625 is 6.2 % (6.25 rounded half to even)."""
    fn = "mechscope.lm.pipelines.sae:sae_train" if wing == "lm" else "mechscope.cnn.pipelines.sae:sae_train_run"
    lines = out_of(capsys, monkeypatch, fn, ("o7", _trained(target)), wing, "sae", "train", "--store", "st")
    assert lines[0] == f"topk {word} 32 -> 384 latents on h.x: 117 steps, 54,321 rows in 4.5 s (12,071 rows/s)"
    assert lines[1] == "last: loss 0.01234, L0 7.5, explained variance 0.876, dead 6.2%"


def test_cnn_sae_harvest_prints_rows_images_and_rates(capsys, monkeypatch):
    """Truth: a hand-made result with distinct rows, width, images, shards and rates."""
    r = NS(hook="conv2.hook_out", activation_shape=(32, 4, 4), rows=16000, width=32, images=1000, shards=3,
           seconds=2.5, images_per_second=400.0, rows_per_second=6400.0, world_size=2)  # fmt: skip
    lines = out_of(capsys, monkeypatch, "mechscope.cnn.pipelines.sae:sae_harvest_run", (Path("o6"), r),
                   "cnn", "sae", "harvest", "--run", "r")  # fmt: skip
    assert lines[:2] == ["conv2.hook_out [32, 4, 4]: 16,000 rows of width 32 from 1,000 images in 3 shards",
                         "2.5 s: 400 images/s (6,400 rows/s, 2 process(es))"]  # fmt: skip


def test_lm_sae_harvest_prints_each_store(capsys, monkeypatch):
    """Truth: a hand-made result with two stores of distinct sizes, in their order."""
    r = NS(stores=[{"name": "a.b", "rows": 2048, "width": 64, "shards": 2},
                   {"name": "c.d", "rows": 999, "width": 128, "shards": 1}],
           tokens=3047, seconds=1.5, tokens_per_second=2031.3, world_size=1)  # fmt: skip
    lines = out_of(capsys, monkeypatch, "mechscope.lm.pipelines.sae:sae_harvest", ("o5", r),
                   "lm", "sae", "harvest", "--model", "m", "--hook", "a.b")  # fmt: skip
    assert lines[:3] == ["a.b: 2,048 rows of width 64 in 2 shards", "c.d: 999 rows of width 128 in 1 shards",
                         "3,047 tokens in 1.5 s (2,031 tokens/s, 1 process(es))"]  # fmt: skip


def test_cnn_train_prints_accuracy_time_and_parameters(capsys, monkeypatch):
    """Truth: hand-made metrics with distinct accuracy, seconds and parameter count."""
    metrics = NS(test_accuracy=0.98765, train_seconds=36.25, n_parameters=21840)
    lines = out_of(capsys, monkeypatch, "mechscope.cnn.pipelines.train:train", (Path("o4"), metrics),
                   "cnn", "train", "--no-malloc-tuning")  # fmt: skip
    assert lines == ["test accuracy 0.9877 after 36.2 s of training (21,840 parameters)", "run written to o4"]


def test_cnn_visualize_prints_units_exceeding_and_logits(capsys, monkeypatch):
    """Truth: a hand-made summary: 58 units, 7 exceeding, median ratio 0.83, 9 of 10 logits their own class."""
    s = NS(units=58, exceed_dataset_max=7, median_ratio_to_dataset_max=0.834, logit_visualisations=10,
           logit_visualisations_classified_as_their_class=9)  # fmt: skip
    lines = out_of(capsys, monkeypatch, "mechscope.cnn.pipelines.visualize:visualize_run",
                   (Path("o3"), NS(summary=s)), "cnn", "visualize", "--run", "r")  # fmt: skip
    assert lines[0] == "58 units visualised; 7 exceed their maximum over the test images (median ratio 0.83)"
    assert lines[1] == "logit visualisations classified as their own class: 9/10"


def _faithfulness():
    a = NS(method="saliency", deletion_auc=0.111, insertion_auc=0.777, randomisation={"conv2": 0.25, "all": 0.5},
           randomisation_on_input={"conv2": -0.125, "all": 0.0625})  # fmt: skip
    b = NS(method="gradcam", deletion_auc=0.222, insertion_auc=0.666, randomisation={"conv2": 0.75, "all": 0.875},
           randomisation_on_input={"conv2": 0.375, "all": 0.625})  # fmt: skip
    return NS(n_inputs=64, random_deletion_auc=0.333, random_insertion_auc=0.444, layers=["conv2", "all"],
              sanity_threshold=0.5, ranking=lambda: [a, b], passes=lambda m: m is a)  # fmt: skip


def test_cnn_attribute_prints_the_ranking_rows(capsys, monkeypatch):
    """Truth: a hand-made faithfulness report; the row order is its ranking, deletion before insertion, whole-image
    ρ before foreground ρ, and only the method that fails the check flagged."""
    r = NS(faithfulness=_faithfulness(), skipped={"ig": "no gradients"})
    lines = out_of(capsys, monkeypatch, "mechscope.cnn.pipelines.attribute:attribute_run", (Path("o2"), r),
                   "cnn", "attribute", "--run", "r")  # fmt: skip
    assert lines[0] == ("faithfulness on 64 test images (random pixel order: deletion AUC 0.333, insertion AUC "
                        "0.444)")  # fmt: skip
    assert lines[2] == "1    saliency                  0.111     0.777  +0.25 +0.50 | -0.12 +0.06"
    assert lines[3] == "2    gradcam                   0.222     0.666  +0.75 +0.88 | +0.38 +0.62  fails sanity check"
    assert lines[4] == "skipped ig: no gradients"
    assert "|ρ| < 0.5 " in lines[5]


def _explained():
    c = NS(target=2, meets_criterion=False, held_out_sufficiency=0.61, held_out_full_accuracy=0.92,
           held_out_other_classes_called_circuit=0.07, held_out_other_classes_called_full=0.03, size=3,
           channels=(4, 9, 1), sufficiency=0.81, full_accuracy=0.97, necessity=0.12,
           necessity_resample=0.34)  # fmt: skip
    whole = {"conv1": 0.4321, "conv2": 0.1234}
    return NS(class_names=["zero", "one", "two"], stage_names=["conv1", "conv2"], overview=NS(test_accuracy=0.9911),
              ablation=NS(whole_stage=lambda s, how: NS(test_accuracy=whole[s] if how == "mean" else -1.0)),
              circuits=NS(circuits=[c], stage="conv2", held_out_met=lambda c: True),
              seconds={"a": 10.0, "b": 2.0})  # fmt: skip


def test_cnn_explain_prints_each_circuits_numbers(capsys, monkeypatch):
    """Truth: a hand-made result: class 2 is named "two"; mean- before resample-ablated; 12 s in all."""
    lines = out_of(capsys, monkeypatch, "mechscope.cnn.pipelines.explain:explain_run", (Path("o1"), _explained()),
                   "cnn", "explain", "--run", "r")  # fmt: skip
    assert lines[0] == "test accuracy 0.9911; mean-ablating all of conv1 0.4321, all of conv2 0.1234"
    assert lines[1] == ("two:  3 conv2 channels [4, 9, 1]: alone 0.810 (full 0.970), mean-ablated 0.120, "
                        "resample-ablated 0.340  (criterion NOT met); held-out alone 0.610 (full 0.920), others "
                        "called two 0.070 (full 0.030)")  # fmt: skip
    assert lines[2:] == ["analysis took 12 s", "report: o1/report.html", "mechanisms.json written to o1"]


def test_cnn_discover_prints_the_hand_circuit_comparison(capsys, monkeypatch):
    """Truth: a hand-made comparison: 2 of a 3-channel hand circuit in the discovered top 3; AUROC 0.917."""
    monkeypatch.setattr("mechscope.core.render.discovery.cli_lines", lambda r: ["L1"])
    r = NS(hand={"stage": "conv2", "hand": [4, 9, 1], "overlap": [4, 9], "discovered_top": [9, 4, 7], "auroc": 0.9166})
    lines = out_of(capsys, monkeypatch, "mechscope.cnn.pipelines.discovery:discover_run", (Path("d"), r),
                   "cnn", "discover", "--run", "r")  # fmt: skip
    assert lines[0] == "L1"
    assert lines[1] == "cnn explain's conv2 circuit [4, 9, 1]: 2 in the discovered top 3 [9, 4, 7]; AUROC 0.917"


def test_lm_discover_prints_the_path_patching_comparison(capsys, monkeypatch):
    """Truth: a hand-made comparison: 4 of 7 edges in the top 10; AUROC 0.812, within slots q/k 0.654."""
    monkeypatch.setattr("mechscope.core.render.discovery.cli_lines", lambda r: [])
    c = {"auroc": 0.8123, "slots": ["q", "k"], "auroc_in_slot": 0.6543, "in_top": 4, "edges": list(range(7)), "top": 10}
    lines = out_of(capsys, monkeypatch, "mechscope.lm.pipelines.discovery:discover_model",
                   ("d", NS(ground_truth={}, comparison=c)), "lm", "discover", "--model", "m")  # fmt: skip
    assert lines[0] == "path-patched edges: AUROC 0.812 (among q/k inputs 0.654); 4 of 7 in the top 10"


def test_lm_circuits_prints_k_composition_induction_and_gaps(capsys, monkeypatch):
    """Truth: a hand-made result: the K-composition pairs asked for (not Q or V), its baseline, the edges."""
    pairs = {"K": [{"source": "0.1", "target": "1.2", "score": 0.456}], "Q": [{"source": "9.9", "target": "9.8",
                                                                             "score": 0.999}]}  # fmt: skip
    comp = NS(top_pairs=lambda kind, n: pairs.get(kind, []) if n == 3 else [], baseline=NS(mean=0.0789))
    r = NS(composition=comp, induction=NS(edges=lambda: [{"source": "0.1", "targets": ["1.2", "1.3"]}]),
           unavailable={"logit_lens": "no unembedding"})  # fmt: skip
    lines = out_of(capsys, monkeypatch, "mechscope.lm.pipelines.circuits:circuits", ("c", r),
                   "lm", "circuits", "--model", "m")  # fmt: skip
    assert lines == ["strongest K-composition: 0.1→1.2 (0.456); random baseline 0.079",
                     "induction circuit (path patching): 0.1→1.2/1.3", "not available: logit lens (no unembedding)",
                     "circuits.json and report.html written to c"]  # fmt: skip


def test_cnn_graph_prints_counts_and_the_logits_inputs(capsys, monkeypatch):
    """Truth: a hand-made graph: distinct counts in each slot; the run's seconds are its pipeline sections' sum."""
    monkeypatch.setattr("mechscope.cnn.cli.graph.graph_check_lines", lambda g: ["CHECK"])
    nodes = [{"id": "f1", "kind": "feature", "label": "conv2 #5"}, {"id": "L", "kind": "logit", "label": "7"}]
    g = NS(title="T", counts={"active_features": 12, "backward_passes": 1, "nodes_pruned": 3, "edges_pruned": 45},
           nodes=nodes, inputs_of=lambda i, k: [(nodes[0], 0.5)] if (i, k) == ("L", 5) else [], checks=[],
           seconds={"pipeline: a": 1.25, "pipeline: b": 2.0, "total": 99.0})  # fmt: skip
    lines = out_of(capsys, monkeypatch, "mechscope.cnn.pipelines.attribution_graph:graph_run", (Path("g"), g),
                   "cnn", "graph", "--run", "r")  # fmt: skip
    assert lines[:4] == ["T", "12 active features, 1 backward pass; pruned: 3 nodes, 45 edges", "CHECK",
                         "strongest inputs of class 7: conv2 #5 +0.500"]  # fmt: skip
    assert lines[4].endswith("written to g (3.2 s)")


@pytest.mark.parametrize(
    "argv, target",
    [(["cnn", "tuning", "--run", "r"], "mechscope.cnn.pipelines.tuning:tuning_run"),
     (["cnn", "universality", "--runs", "a", "b"], "mechscope.cnn.pipelines.universality:universality"),
     (["cnn", "solu-compare"], "mechscope.cnn.pipelines.solu_cnn:solu_compare_cnn"),
     (["lm", "sae", "show", "--model", "m", "--sae", "s"], "mechscope.lm.pipelines.sae:sae_show"),
     (["cnn", "sae", "show", "--run", "r", "--sae", "s"], "mechscope.cnn.pipelines.sae:sae_show_run")],
)  # fmt: skip
def test_summary_commands_print_every_summary_line_in_order(capsys, monkeypatch, argv, target):
    """Truth: a hand-made summary of three distinct lines: each printed once, in order, before the last line."""
    r = NS(summary=["first α", "second 0.123", "third"], seconds={"total": 5.0})
    lines = out_of(capsys, monkeypatch, target, (Path("p"), r), *argv)
    assert lines[:3] == r.summary and len(lines) == 4 and " p" in lines[3]


def test_universality_takes_runs_after_one_runs_flag(monkeypatch):
    """Truth: --runs' help and docs/cnn/universality.md: ``--runs R1 R2 R3`` names three runs, in that order."""
    from tests.e2e.test_cli_options_truths import reach

    seen = reach(monkeypatch, "mechscope.cnn.pipelines.universality:universality", "cnn", "universality", "--runs",
                 "r1", "r2", "r3")  # fmt: skip
    assert [str(p) for p in seen["runs"]] == ["r1", "r2", "r3"]


def test_lm_inspect_prints_a_hooks_mean_and_std(capsys, monkeypatch):
    """Truth: numpy's mean and sample standard deviation (ddof=1, torch's default) of a hand-made activation."""
    import numpy as np
    import torch

    act = [[1.0, 2.0, 3.0, 10.0]]
    tok = NS(vocab_size=49152)
    cache = {"blocks.0.hook_resid_post": torch.tensor(act)}
    monkeypatch.setattr("mechscope.lm.cli.models._inspect", lambda *a: (None, tok, cache, ["blocks.0.hook_x"], []))
    monkeypatch.setattr("mechscope.lm.models.transformer.describe", lambda m: {"layers": 30000, "dtype": "float32"})
    code, out, err = run_main(capsys, "lm", "inspect", "--model", "m", "--hook", "blocks.0.hook_resid_post")
    assert code == 0, err
    mean, std = np.mean(act), np.std(act, ddof=1)
    assert out.splitlines()[:3] == ["layers      30,000", "dtype       float32", "tokenizer   yes, 49,152 tokens"]
    assert out.splitlines()[-1] == f"blocks.0.hook_resid_post: shape [1, 4], mean +{mean:.4f}, std {std:.4f}"


def _library_default(target: str, param: str):
    import dataclasses
    import importlib
    import inspect

    module, name = target.split(":")
    obj = getattr(importlib.import_module(module), name)
    if dataclasses.is_dataclass(obj):
        return {f.name: f.default for f in dataclasses.fields(obj)}[param]
    return inspect.signature(obj).parameters[param].default


# fmt: off
LIBRARY = [("cnn sae harvest", "mechscope.cnn.pipelines.sae:sae_harvest_model",
            {"--split": "split", "--batch": "batch", "--shard-rows": "shard_rows", "--buffer-shards": "buffer_shards",
             "--seed": "seed"}),
           ("cnn sae show", "mechscope.cnn.pipelines.sae:sae_show_model",
            {"--selective": "n_selective", "--random": "n_random", "--tuning": "tuning",
             "--featvis-steps": "featvis_steps", "--seed": "seed"}),
           ("lm sae harvest", "mechscope.lm.pipelines.sae:HarvestSettings",
            {"--batch": "batch", "--shard-rows": "shard_rows", "--buffer-shards": "buffer_shards", "--seed": "seed",
             "--bos": "bos"}),
           ("lm sae evaluate", "mechscope.lm.pipelines.sae:ReadSettings",
            {"--contexts": "contexts", "--batch": "batch", "--bos": "bos"}),
           ("lm sae show", "mechscope.lm.pipelines.sae:sae_show",
            {"--random": "n_random", "--induction": "n_induction", "--seed": "seed"})]
# fmt: on


@pytest.mark.parametrize("command, target, flags", LIBRARY, ids=[c for c, *_ in LIBRARY])
def test_sae_option_defaults_are_the_librarys_own(command, target, flags):
    """Truth: the library function's (or settings class's) own default, which a notebook user gets: the command
    declares the same one (cnn/cli/common.py: "the CLI's defaults are the library's defaults")."""
    wrong = {f: (_declared_default(command, f), _library_default(target, p)) for f, p in flags.items()
             if _declared_default(command, f) != _library_default(target, p)}  # fmt: skip
    assert not wrong


@pytest.mark.parametrize("flag, calls", [("--malloc-tuning", 1), ("--no-malloc-tuning", 0)])
def test_malloc_tuning_flag_keeps_freed_memory_only_when_on(capsys, monkeypatch, flag, calls):
    """Truth: the flag's help ("Keep freed memory in glibc"): --malloc-tuning calls the allocator setting once,
    --no-malloc-tuning never."""
    called = []
    monkeypatch.setattr("mechscope.cnn.training.keep_freed_memory", lambda: called.append(1))
    metrics = NS(test_accuracy=0.5, train_seconds=1.0, n_parameters=10)
    out_of(capsys, monkeypatch, "mechscope.cnn.pipelines.train:train", (Path("o"), metrics), "cnn", "train", flag)
    assert len(called) == calls
