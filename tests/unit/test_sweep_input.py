"""Bad input a new user's sweep found reaching a traceback or a silently wrong result (5 December 2026): each is one
line now. The CLI paths are checked where they are cheap; the rest at the function every CLI calls."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mechscope.core.errors import MechscopeError
from tests.e2e.test_cli import assert_one_line_error, run_main


def test_integer_lists_refuse_empty_items():
    from mechscope.core.validate import int_list

    assert int_list("1,2,3", "--x") == int_list(" 1, 2,3 ", "--x") == int_list("1 2 3", "--x") == [1, 2, 3]
    for bad in ("2,,4", "16,", ",16", "", " "):  # "2,,4" was read as [2, 4], "16," as [16]
        with pytest.raises(MechscopeError, match="none empty"):
            int_list(bad, "--channels")
    with pytest.raises(MechscopeError, match="--tokens expects integers"):
        int_list("1,x", "--tokens")


def test_steer_values_are_finite_and_bounded():
    from mechscope.core.attribution_graph import asked_interventions, parse_steer

    assert parse_steer(" 1_2_3 = -2.5", "1_12_5") == ("1_2_3", -2.5)
    for v in ("nan", "inf", "-inf", "1e400", "-1e308", "1e7"):
        with pytest.raises(MechscopeError, match="finite number of at most 1e\\+06"):
            parse_steer(f"1_2_3={v}", "1_12_5")
    with pytest.raises(MechscopeError, match="NODE=VALUE"):
        parse_steer("1_2_3", "1_12_5")
    calls = []
    with pytest.raises(MechscopeError, match="finite"):  # the API's values too, before any intervention
        asked_interventions(lambda *a, **k: calls.append(a), [], False, steer=[("1_2_3", math.nan)])
    assert not calls


def test_discovery_seed_and_random_counts():
    from mechscope.core.graphs import check_discovery_counts

    check_discovery_counts(0, 0)
    for seed, n_random, said in ((-1, 5, "--seed"), (2**70, 5, "--seed"), (0, -1, "--random"), (True, 5, "--seed")):
        with pytest.raises(MechscopeError, match=said):
            check_discovery_counts(seed, n_random)


def test_dictionary_training_seed_and_divergence():
    from mechscope.core.dictionaries import DictionaryConfig, TrainConfig, train

    with pytest.raises(MechscopeError, match="--seed must be an integer from 0 to 2\\*\\*63 - 1"):
        TrainConfig(seed=10**20)  # it overflowed in torch's generator
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(32, 4, generator=g) for _ in range(6)]
    cfg = DictionaryConfig(d_in=4, d_sae=8, architecture="relu", l1_coefficient=1.0)
    train(cfg, batches, TrainConfig(lr=1e-3, init_rows=32, progress=False))  # a sane rate trains
    with pytest.raises(MechscopeError, match="training diverged: the weights are not finite after 6 steps"):
        train(cfg, [b * 1e20 for b in batches], TrainConfig(lr=1e-3, init_rows=32, progress=False))  # squares overflow
    with pytest.raises(MechscopeError, match=r"lr must be in \(0, 10\], got 1e\+30"):  # overflowed inside Adam
        TrainConfig(lr=1e30)


def test_dataset_examples_with_fewer_images_than_k():
    from mechscope.cnn.methods.featvis import dataset_examples
    from mechscope.cnn.models.cnn import CNN

    torch.manual_seed(0)
    model = CNN().eval()
    images = torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    ex = dataset_examples(model, images, ["conv1.hook_out"], k=8)["conv1.hook_out"]  # it raised "k out of range"
    assert ex.top.shape == ex.bottom.shape == (16, 3) and sorted(ex.top[0].tolist()) == [0, 1, 2]


def test_clip_configs_need_layers_and_a_positive_norm_eps():
    from mechscope.clip.models.loading import clip_config

    clip_config({}, "clip")  # the defaults load
    with pytest.raises(MechscopeError, match="vision_config.num_hidden_layers must be a positive integer, got 0"):
        clip_config({"vision_config": {"num_hidden_layers": 0}}, "clip")  # a KeyError on the weights before
    for eps in (-1, 0, 2, "x", float("nan")):  # -1 gave NaN probabilities and exit 0
        with pytest.raises(MechscopeError, match="text_config.layer_norm_eps must be a small positive number"):
            clip_config({"text_config": {"layer_norm_eps": eps}}, "clip")


def test_clip_attack_and_neuron_settings():
    from mechscope.clip.pipelines.attack import AttackSettings
    from mechscope.clip.pipelines.neurons import NeuronSettings

    AttackSettings(prompt="a {} drawn", k=3, candidates=3).validate()
    for prompt in ("{} {}", "{}{}{}", "no slot"):  # two slots raised an IndexError from str.format
        with pytest.raises(MechscopeError, match="must hold one {}"):
            AttackSettings(prompt=prompt).validate()
    with pytest.raises(MechscopeError, match="--k 999 is more than the --candidates 3"):
        AttackSettings(k=999, candidates=3).validate()  # it compared the whole tower with itself as the control
    for v in (math.nan, math.inf, -math.inf):
        with pytest.raises(MechscopeError, match="--min-score must be a finite number"):
            NeuronSettings(min_score=v).validate()
    with pytest.raises(MechscopeError, match="must hold one {}"):
        NeuronSettings(templates=("a {} and {}",)).validate()


def test_lm_options_checked_before_any_work(capsys, tmp_path):
    """A device that is not there is one line in lm sae train (before the store is even read); an empty hook in
    lm sae harvest is one line and leaves no folder (it raised KeyError and left OUT.partial)."""
    code, _, err = run_main(capsys, "lm", "sae", "train", "--store", str(tmp_path / "none"), "--out",
                            str(tmp_path / "s"), "--device", "tpu")  # fmt: skip
    assert_one_line_error(code, err, "unknown device 'tpu'")
    code, _, err = run_main(capsys, "lm", "sae", "harvest", "--model", str(tmp_path / "none"), "--hook", "", "--out",
                            str(tmp_path / "h"))  # fmt: skip
    assert_one_line_error(code, err, "--hook is given an empty value")  # the CLI refuses any empty value
    assert not list(tmp_path.iterdir())
    from mechscope.lm.pipelines.sae import HarvestSettings

    with pytest.raises(MechscopeError, match="a hook name is empty"):  # the API too
        HarvestSettings(hooks=("blocks.0.hook_resid_pre", " ")).validate()
    for kw, said in (({"hooks": "blocks.0.hook_resid_post"}, "hooks must be a tuple of hook names, got 'blocks"),
                     ({"transcoders": (("blocks.0.mlp.hook_in",),)}, "each transcoder is an (input hook, target hook) "
                                                                     "pair")):  # fmt: skip
        with pytest.raises(MechscopeError) as e:  # a string was "a hook is asked for twice: b, l, o, c, k, ..."
            HarvestSettings(**kw).validate()  # and a one-hook pair "not enough values to unpack"
        assert str(e.value).startswith(said)
    from mechscope.core.dictionaries import TrainConfig

    with pytest.raises(MechscopeError, match=r"^expected adam_betas to be two numbers in \[0, 1\), got \(1.5, 0.9\)"):
        TrainConfig(adam_betas=(1.5, 0.9))  # torch's "Invalid beta parameter" at the first step
    assert TrainConfig(adam_betas=[0, 0.5]).adam_betas == (0.0, 0.5)
    for betas in ((np.float32(0.5), 0.25), (torch.tensor(0.5), 0.25), np.array([0.5, 0.25])):  # numpy, torch: as before
        assert TrainConfig(adam_betas=betas).adam_betas == (0.5, 0.25)
    with pytest.raises(MechscopeError, match="each transcoder is an .input hook, target hook. pair"):
        HarvestSettings(transcoders=(None,)).validate()  # a TypeError from len()
    for args in (["--out", ""], ["--out="], ["--model", ""]):  # '--out ""' wrote into the current folder
        code, _, err = run_main(capsys, "lm", "circuits", "--model", "x", *args)
        assert_one_line_error(code, err, f"{args[0].rstrip('=')} is given an empty value")


def test_graph_settings_and_counts_are_named_by_their_options():
    from mechscope.cnn.methods.attribution_graph import CnnGraphSettings
    from mechscope.core.attribution_graph import check_counts
    from mechscope.lm.methods.attribution_graph import GraphSettings

    for cls in (GraphSettings, CnnGraphSettings):
        with pytest.raises(MechscopeError, match=r"^--max-features \(max_feature_nodes\) must be"):
            cls(max_feature_nodes=-1).validate()
        with pytest.raises(MechscopeError, match=r"^--node-threshold \(node_threshold\) must be between 0 and 1"):
            cls(node_threshold=2).validate()
        with pytest.raises(MechscopeError, match=r"^--batch \(batch_size\)"):
            cls(batch_size=0).validate()
    check_counts(paths=0, dashboards=0, examples=4096)
    for field in ("paths", "dashboards", "examples"):  # -1 was taken as none, with no word said
        with pytest.raises(MechscopeError, match=f"^--{field} must be an integer from 0"):
            check_counts(**{field: -1})


def test_datasets_refuse_repeated_class_names_and_record_absolute_paths(tmp_path, monkeypatch):
    import numpy as np

    from mechscope.cnn.data.images import DataError, load_npz

    g = np.random.default_rng(0)
    arrays = {"x_train": g.integers(0, 255, (6, 8, 8), dtype=np.uint8), "y_train": np.array([0, 1, 2, 0, 1, 2]),
              "x_test": g.integers(0, 255, (3, 8, 8), dtype=np.uint8), "y_test": np.array([0, 1, 2])}  # fmt: skip
    (tmp_path / "d").mkdir()
    np.savez(tmp_path / "d" / "small.npz", **arrays)
    monkeypatch.chdir(tmp_path)
    ds = load_npz("d/small.npz")
    assert ds.source["file"] == str((tmp_path / "d" / "small.npz").resolve())  # it was "d/small.npz"
    with pytest.raises(DataError, match="class name\\(s\\) 'a' given more than once"):
        load_npz("d/small.npz", class_names=("a", "a", "b"))  # --target a silently meant class 0


def test_sae_counts_are_not_slices(tmp_path):
    from mechscope.cnn.pipelines.sae import _images
    from mechscope.lm.pipelines.sae import sae_show

    for limit in (-1, 0):  # -1 read every image but the last
        with pytest.raises(MechscopeError, match="--limit must be a positive integer"):
            _images(object(), "test", limit)
    for kw, said in (({"n_random": -1}, "--random"), ({"n_induction": -1}, "--induction")):
        with pytest.raises(MechscopeError, match=f"{said} must be an integer from 0"):
            sae_show("none", tmp_path / "none", tmp_path / "o", **kw)


def test_lm_targets_token_ranges_and_toy_runs_are_named_plainly(tmp_path):
    from mechscope.lm.methods.scores import token_range_of
    from mechscope.lm.models.loading import read_config
    from mechscope.lm.models.transformer import HookedTransformer, TransformerConfig
    from mechscope.lm.pipelines.attribution_graph import resolve_targets

    model = HookedTransformer(TransformerConfig(d_model=8, n_layers=1, n_heads=2, d_head=4, d_vocab=10, n_ctx=8,
                                                attn_only=True))
    assert resolve_targets(model, None, ["#3", 4]) == [3, 4]
    with pytest.raises(MechscopeError, match="--target names logit 3 more than once"):  # a repeated graph node id
        resolve_targets(model, None, ["#3", 3])
    with pytest.raises(MechscopeError, match="target logit -1 outside the model's 0..9"):  # "not in the vocabulary"
        resolve_targets(model, None, ["#-1"])
    assert token_range_of(model, None) == (1, 10) and token_range_of(model, (2, 5)) == (2, 5)
    with pytest.raises(MechscopeError, match=r"token range \[5, 3\) is empty: LOW must be below HIGH"):
        token_range_of(model, (5, 3))
    with pytest.raises(MechscopeError, match=r"outside the vocabulary 0..9"):
        token_range_of(model, (0, 11))
    (tmp_path / "training.json").write_text("{}")
    with pytest.raises(MechscopeError, match="a train-toy run: lm heads, circuits, neurons, graph"):
        read_config(tmp_path)  # lm generate and inspect said only "not a Hugging Face model directory"


@pytest.mark.parametrize(
    "args, said",
    [
        (["lm", "graph", "--model", "m", "--neurons", "--train-transcoders", "1000", "--tokens", "1"],
         "give one of --transcoders, --neurons and --train-transcoders"),
        (["lm", "train-toy", "--data", "synthetic", "--text", "t.txt"], "--text is read with --data text"),
        (["lm", "discover", "--model", "m", "--method", "eap", "--size", "5", "--threshold", "0.1"],
         "give --size or --threshold to cut the ranking, not both"),
        (["cnn", "discover", "--run", "r", "--method", "eap-ig", "--size", "5", "--threshold", "0.1"], "not both"),
    ],
)  # fmt: skip
def test_options_another_makes_meaningless_are_refused(capsys, tmp_path, monkeypatch, args, said):
    """Each was accepted and one option silently ignored (nothing trained, the size or the threshold unused)."""
    (tmp_path / "r").mkdir()
    (tmp_path / "t.txt").write_text("some text")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    named = {"r", "t.txt"}
    code, _, err = run_main(capsys, *(str(tmp_path / a) if a in named else a for a in args))
    assert_one_line_error(code, err, said)
    assert not list(work.iterdir())


def test_view_and_kind_refuse_the_options_they_ignore(capsys, tmp_path, quick_run):
    import os
    from pathlib import Path

    hist = Path(os.environ.get("MECHSCOPE_DATA", "../shared/data")) / "tracr" / "hist"
    if not (hist / "config.json").is_file():
        pytest.skip("tracr's hist not found")
    code, _, err = run_main(capsys, "lm", "graph", "--model", str(hist), "--prompt", "BOS a b", "--neurons", "--out",
                            str(tmp_path / "g"))  # fmt: skip
    assert code == 0, err
    code, _, err = run_main(capsys, "lm", "graph", "--view", str(tmp_path / "g" / "graph.json"), "--model", "m",
                            "--tokens", "2,3", "--out", str(tmp_path / "v"))  # fmt: skip
    assert_one_line_error(code, err, "--view re-renders a saved graph and takes only --out and --force, not --model, "
                                     "--tokens")  # fmt: skip
    code, _, err = run_main(capsys, "cnn", "graph", "--run", str(quick_run), "--channels", "--kind", "transcoder",
                            "--out", str(tmp_path / "c"))  # fmt: skip
    assert_one_line_error(code, err, "--kind chooses the dictionaries")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g"]


def test_cnn_messages_name_the_real_problem(tmp_path):
    from mechscope.cnn.pipelines.attribute import parse_target
    from mechscope.cnn.runs import load_run
    from mechscope.core.errors import RunError

    with pytest.raises(MechscopeError, match="target 'foo' is not a class name"):  # it said "out of range"
        parse_target("foo", ("a", "b"))
    with pytest.raises(MechscopeError, match="target '7' out of range"):
        parse_target("7", ("a", "b"))
    (tmp_path / "afile").write_text("x")
    with pytest.raises(RunError, match="afile: is a file, not a run directory"):  # it said "not found"
        load_run(tmp_path / "afile")
    with pytest.raises(RunError, match="run directory not found"):
        load_run(tmp_path / "nope")


def test_paths_of_the_wrong_kind_are_named(tmp_path):
    import numpy as np

    from mechscope.cnn.data.images import DataError, load_npz
    from mechscope.lm.methods.transcoders import Transcoders
    from mechscope.lm.pipelines.sae import _read_harvest
    from mechscope.lm.text import read_text

    (tmp_path / "d.npz").mkdir()
    with pytest.raises(DataError, match="d.npz: is a directory, not a .npz file"):
        load_npz(tmp_path / "d.npz")
    (tmp_path / "text.npz").write_text("x_train,y_train\n1,2\n")
    with pytest.raises(DataError, match="text.npz: not a zip archive; a .npz dataset is the zip np.savez writes"):
        load_npz(tmp_path / "text.npz")  # numpy's message spoke of pickled data
    np.save(tmp_path / "one.npy", np.zeros(3))
    (tmp_path / "one.npy").rename(tmp_path / "one.npz")
    with pytest.raises(DataError, match="one.npz: a single .npy array"):  # a context-manager TypeError
        load_npz(tmp_path / "one.npz")
    with pytest.raises(MechscopeError, match="is a directory; expected a text file"):
        read_text(tmp_path / "d.npz")  # "text file not found"
    (tmp_path / "f").write_text("x")
    with pytest.raises(MechscopeError, match="f: is a file, not a transcoder folder"):
        Transcoders.load(tmp_path / "f")
    with pytest.raises(MechscopeError, match="nope: not found"):
        _read_harvest(tmp_path / "nope")  # "not an lm sae harvest"


def test_options_a_task_or_architecture_does_not_read(capsys, tmp_path, quick_run, mnist_root):
    import os
    from pathlib import Path

    reverse = Path(os.environ.get("MECHSCOPE_DATA", "../shared/data")) / "tracr" / "reverse"
    if (reverse / "config.json").is_file():
        code, _, err = run_main(capsys, "lm", "discover", "--model", str(reverse), "--n", "5", "--distinct", "--out",
                                str(tmp_path / "d"))  # fmt: skip
        assert_one_line_error(code, err, "--n, --distinct: options of the induction task, not of tracr's examples")
    code, _, err = run_main(capsys, "cnn", "attribute", "--run", str(quick_run), "--method", "saliency", "--layer",
                            "conv1", "--data-dir", str(mnist_root), "--out", str(tmp_path / "a"))  # fmt: skip
    assert_one_line_error(code, err, "--layer conv1 is Grad-CAM's")
    code, _, err = run_main(capsys, "lm", "sae", "train", "--store", str(tmp_path), "--architecture", "relu", "--k",
                            "8", "--l0", "2", "--out", str(tmp_path / "s"))  # fmt: skip
    assert_one_line_error(code, err, "--k, --l0 not read by --architecture relu")
    assert not (tmp_path / "d").exists() and not (tmp_path / "a").exists() and not (tmp_path / "s").exists()


def test_repeats_and_other_files_are_named():
    from mechscope.clip.pipelines.neurons import NeuronSettings
    from mechscope.cnn.pipelines.attribute import _methods
    from mechscope.core.attribution_graph import asked_interventions, check_graph_record
    from mechscope.core.scrub import scrub
    from mechscope.lm.methods.graph import TransformerEdges
    from tests.unit.test_discovery_lm import tiny

    with pytest.raises(MechscopeError, match="--method saliency given more than once"):
        _methods(["saliency", "gradcam", "saliency"], None, "conv2.hook_post", 8)
    with pytest.raises(MechscopeError, match="--ablate 1_2_3,4_5_6 given more than once"):
        asked_interventions(lambda *a, **k: None, [], False, ablate=[["1_2_3", "4_5_6"], ["4_5_6", "1_2_3"]])
    with pytest.raises(MechscopeError, match="--words: 'one' given more than once"):
        NeuronSettings(words=("one", "two", "one")).validate()
    with pytest.raises(MechscopeError, match="not a graph JSON"):  # a run's config.json: "field 'model' ... type"
        check_graph_record({"kind": "cnn", "model": {"channels": [16, 32]}})
    with pytest.raises(MechscopeError, match="samples must be an integer from 1 to 100,000"):
        scrub(TransformerEdges(tiny()), None, metric=None, hypothesis={"claims": []}, samples=10**12)


def test_more_inputs_named_plainly(capsys, tmp_path):
    import os
    from pathlib import Path

    from mechscope.clip.data.render import font_path
    from mechscope.cnn.pipelines.solu_cnn import solu_compare_cnn
    from mechscope.core.attribution_graph.checks import _source

    class Rep:  # a replacement model that knows no such node, as a logit node is no source
        def source_of(self, node):
            raise MechscopeError("layer 5 outside 0..3")

    with pytest.raises(MechscopeError, match="5_0_3: not a feature node of this graph .*only feature nodes"):
        _source(Rep(), "5_0_3")
    with pytest.raises(MechscopeError, match="--activations: relu given more than once"):
        solu_compare_cnn(tmp_path / "s", ("relu", "relu"))  # "takes two or more of relu, gelu, solu"
    with pytest.raises(MechscopeError, match="nope.ttf: font file not found"):  # "unknown font"
        font_path(str(tmp_path / "nope.ttf"))
    hist = Path(os.environ.get("MECHSCOPE_DATA", "../shared/data")) / "tracr" / "hist"
    if (hist / "config.json").is_file():
        code, _, err = run_main(capsys, "lm", "graph", "--model", str(hist), "--prompt", "a b", "--no-bos", "--neurons",
                                "--out", str(tmp_path / "g"))  # fmt: skip
        assert_one_line_error(code, err, "a compiled tracr model reads BOS (id 0) at position 0")


def test_clip_special_tokens_inside_the_vocabulary():
    from mechscope.clip.models.loading import clip_config

    with pytest.raises(MechscopeError, match="text_config.eos_token_id 999 is not a token of the 40-token vocabulary"):
        clip_config({"text_config": {"vocab_size": 40, "eos_token_id": 999, "bos_token_id": 1, "pad_token_id": 0}},
                    "clip")  # fmt: skip


def test_texts_a_user_gives_are_refused_when_unusable(capsys, tmp_path):
    import os
    from pathlib import Path

    hist = Path(os.environ.get("MECHSCOPE_DATA", "../shared/data")) / "tracr" / "hist"
    if not (hist / "config.json").is_file():
        pytest.skip("tracr's hist not found")
    (tmp_path / "empty.txt").write_text("  \n")
    code, _, err = run_main(capsys, "lm", "graph", "--model", str(hist), "--prompt", "BOS a b", "--neurons", "--text",
                            str(tmp_path / "empty.txt"), "--out", str(tmp_path / "g"))  # fmt: skip
    assert_one_line_error(code, err, "empty.txt")  # it only warned: no dashboards
    assert not (tmp_path / "g").exists()


def test_repeated_names_each_repeat_once_sorted():
    from mechscope.core.validate import repeated

    assert repeated(["b", "a", "b", "c", "a", "b"]) == ["a", "b"] and repeated((3, 1, 2)) == []
    assert repeated(tuple(sorted(g)) for g in (["y", "x"], ["x", "y"], ["z"])) == [("x", "y")]


def test_an_out_folder_where_nothing_can_be_made_is_refused_before_the_work(capsys, tmp_path):
    """As root, access() says /proc is writable; lm circuits then failed after its work. The check now makes (and
    removes) a folder beside the target."""
    from pathlib import Path

    from mechscope.core.errors import RunError
    from mechscope.core.outputs import check_target

    if not Path("/proc/self").is_dir():
        pytest.skip("no /proc here")
    with pytest.raises(RunError, match="cannot .* in /proc"):
        check_target("/proc/mechscope-out")
    assert check_target(tmp_path / "a" / "b") == tmp_path / "a" / "b"
    assert list(tmp_path.iterdir()) == []  # the check leaves nothing behind


def test_a_run_whose_weights_are_a_folder_says_so(tmp_path):
    import mechscope
    from mechscope.cnn.models.cnn import CNN
    from mechscope.cnn.runs import prepare_out_dir, save_run
    from mechscope.core.errors import RunError

    out = prepare_out_dir(tmp_path / "run")
    save_run(out, CNN(), {"seed": 0, "data": {"name": "mnist", "kind": "builtin"}}, {})
    (out / "model.safetensors").unlink()
    with pytest.raises(RunError, match="model.safetensors is missing"):
        mechscope.load_run(out)
    (out / "model.safetensors").mkdir()  # it said "missing"
    with pytest.raises(RunError, match="model.safetensors is not a file"):
        mechscope.load_run(out)


def test_a_clip_config_without_a_tower_says_which_defaults_it_takes(caplog):
    from mechscope.clip.models.loading import clip_config

    cfg = clip_config({"text_config": {"vocab_size": 40, "hidden_size": 32, "intermediate_size": 64,
                                       "num_hidden_layers": 1, "num_attention_heads": 2}}, "clip")  # fmt: skip
    assert cfg.vision.image_size == 224  # transformers' CLIPVisionConfig default
    assert "no vision_config: the vision tower takes clip's default sizes" in caplog.text


def test_cnn_discover_and_graph_take_a_class_by_name(capsys, tmp_path, quick_run):
    """The docs say a class is its index or its name; discover's --class and graph's --target took integers only
    ("Input should be a valid integer" for 'dog'). One class_index resolves both, as explain's --class did."""
    from mechscope.cnn.config import class_index

    names = ("cat", "dog", "bird")
    assert [class_index(c, names) for c in ("dog", "2", 0)] == [1, 2, 0]
    with pytest.raises(MechscopeError, match="unknown class 'fish'; expected 0..2 or a class name"):
        class_index("fish", names)
    with pytest.raises(MechscopeError, match="class 3 out of range: expected 0..2"):
        class_index("3", names)
    for odd in (1.7, True, "1.5", None):  # int(1.7) was class 1 without a word, int(True) class 1
        with pytest.raises(MechscopeError, match=f"^unknown class {odd!r}; expected 0..2 or a class name$"):
            class_index(odd, names)
    assert class_index(__import__("numpy").int64(2), names) == 2
    assert [class_index(c, names) for c in (torch.tensor(2), __import__("numpy").array(1))] == [2, 1]  # as before
    for odd in ("³", torch.tensor(1.5)):  # "³".isdigit() but int() refuses it: a traceback from the command line
        with pytest.raises(MechscopeError, match="^unknown class "):
            class_index(odd, names)
    code, _, err = run_main(capsys, "cnn", "discover", "--run", str(quick_run), "--class", "seven", "--out",
                            str(tmp_path / "d"))  # fmt: skip
    assert_one_line_error(code, err, "unknown class 'seven'; expected 0..9 or a class name")
    code, _, err = run_main(capsys, "cnn", "graph", "--run", str(quick_run), "--channels", "--target", "seven",
                            "--out", str(tmp_path / "g"))  # fmt: skip
    assert_one_line_error(code, err, "unknown class 'seven'; expected 0..9 or a class name")
    assert not (tmp_path / "d").exists() and not (tmp_path / "g").exists()


def test_a_signed_index_pair_is_refused_not_read_without_its_sign():
    """int("-0") is 0: "-0.5" was read as neuron 0.5 (clip neurons) and "-0.1" as head 0.1 (lm graph --qk)."""
    from mechscope.clip.methods.neurons import parse_neuron
    from mechscope.lm.cli.common import parse_pair
    from mechscope.lm.cli.graph import _qk

    assert parse_neuron("1.37") == (1, 37) and _qk("1.2@3:1") == (1, 2, 3, 1) and parse_pair("0.3") == (0, 3)
    bad = ((parse_neuron, "-0.5"), (_qk, "-0.1"), (_qk, "1.2@-0"), (parse_pair, "-0.3"), (parse_pair, "0.+3"))
    for parse, text in bad:
        with pytest.raises(MechscopeError, match=f"got {text!r}".replace("+", r"\+").replace(".", r"\.")):
            parse(text)
